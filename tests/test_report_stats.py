"""dataset/render_stats.py: the per-sample row and the fixed-bin histograms that merge."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serialgen.assets_manifest.motions import MOTION_NAMES
from serialgen.dataset.render_stats import (CATEGORICAL_FIELDS, NUMERIC_FIELDS, STATS_FORMAT, STATS_VERSION,
                                            Histograms, StatsError, read_stats, sample_row)

# The records of one sample of a `make shards`-like render (256x384, workbench), trimmed to the
# fields the row reads plus a few neighbours.
META = {
    "camera": {"focal_mm": 39.848334, "height": 384, "model": "pinhole", "sensor_mm": 36.0, "width": 256},
    "character": "proc-000000", "character_kind": "procedural", "engine": "workbench",
    "expression": "angry", "framing": "upper_body", "key": "proc-000000_p00481_v0",
    "lighting": {"azimuth": 184.18, "elevation": 58.58, "intensity": 1.28},
    "motion": "jump", "motion_index": 2, "phase": 0.164025, "pose_id": 481,
    "resolution": [256, 384], "schema": "serialgen.sample/1", "split": "train",
    "view": {"azimuth": 101.12832684720406, "elevation": 21.18496090879636, "fill": 0.946,
             "focal_mm": 39.84833422084251, "framing": "upper_body", "offset": [-0.11, -0.03]},
    "view_index": 0,
}


def pose(visible: list[int], defined: list[int] | None = None) -> dict:
    defined = defined if defined is not None else [1] * len(visible)
    return {"width": 256, "height": 384, "names": [f"k{i}" for i in range(len(visible))],
            "keypoints": [[10.0, 20.0, v] for v in visible], "defined": defined}


def test_row_of_a_rendered_sample():
    row = sample_row(META, pose([1, 1, 0, 1], [1, 1, 1, 1]))
    assert row == {"character": "proc-000000", "split": "train", "framing": "upper_body",
                   "azimuth": pytest.approx(101.128327), "elevation": pytest.approx(21.184961),
                   "focal_mm": 39.848334, "expression": "angry", "fg_luminance": None,
                   "pose_source": "motion_set", "motion": "jump", "keypoint_visibility": 0.75}
    assert set(NUMERIC_FIELDS) | set(CATEGORICAL_FIELDS) <= set(row)


def test_row_reads_fg_luminance_when_the_meta_has_it():
    assert sample_row({**META, "fg_luminance": 0.42}, pose([1]))["fg_luminance"] == 0.42


def test_visibility_counts_only_defined_keypoints():
    # a rig without fingers: undefined keypoints are neither seen nor missed
    assert sample_row(META, pose([1, 0, 0, 0], [1, 1, 0, 0]))["keypoint_visibility"] == 0.5
    assert sample_row(META, pose([0, 0], [0, 0]))["keypoint_visibility"] is None


def test_pose_source_from_the_library_order():
    n = len(MOTION_NAMES)
    assert sample_row({**META, "motion": MOTION_NAMES[5], "motion_index": 5}, {})["pose_source"] == "motion_set"
    clip = {**META, "motion": "mocap/take_01", "motion_index": n}
    assert sample_row(clip, {})["pose_source"] == "imported_clip"
    # an imported clip that happens to be called like a motion set sits after the sets
    assert sample_row({**META, "motion": "walk", "motion_index": n + 1}, {})["pose_source"] == "imported_clip"
    assert sample_row({k: v for k, v in META.items() if k != "motion"}, {})["pose_source"] is None


def test_row_of_a_bare_meta_is_all_none():
    row = sample_row({}, {})
    assert all(row[k] is None for k in list(NUMERIC_FIELDS) + list(CATEGORICAL_FIELDS))


def test_focal_falls_back_to_the_drawn_view_and_azimuth_wraps():
    meta = copy.deepcopy(META)
    del meta["camera"]["focal_mm"]
    meta["view"]["azimuth"] = 365.0
    row = sample_row(meta, {})
    assert row["focal_mm"] == pytest.approx(39.848334)
    assert row["azimuth"] == pytest.approx(5.0)


def test_bins_edges_and_out_of_range():
    h = Histograms()
    for vis, elev, lum in ((1.0, -95.0, None), (0.0, 95.0, 0.5), (0.5, 0.0, 1.0)):
        h.add({"keypoint_visibility": vis, "elevation": elev, "fg_luminance": lum, "framing": "head"})
    d = h.to_json()
    vis = d["numeric"]["keypoint_visibility"]
    assert vis["counts"][0] == 1 and vis["counts"][10] == 1 and vis["counts"][-1] == 1  # 1.0 is in the last bin
    elev = d["numeric"]["elevation"]
    assert (elev["under"], elev["over"], sum(elev["counts"])) == (1, 1, 1)
    assert d["numeric"]["fg_luminance"]["missing"] == 1 and d["numeric"]["fg_luminance"]["counts"][-1] == 1
    assert d["numeric"]["azimuth"]["missing"] == 3
    assert d["categorical"]["framing"] == {"counts": {"head": 3}, "missing": 0}
    assert d["categorical"]["expression"]["missing"] == 3
    assert h.mean("elevation") == pytest.approx(0.0) and h.mean("azimuth") is None


def test_json_round_trip_is_exact():
    h = Histograms()
    for i in range(30):
        h.add(sample_row({**META, "fg_luminance": i / 30, "expression": ["angry", "smile"][i % 2]},
                         pose([i % 2, 1, 1])))
    text = json.dumps(h.to_json(), sort_keys=True)
    back = Histograms.from_json(json.loads(text))
    assert back == h and json.dumps(back.to_json(), sort_keys=True) == text
    assert back.to_json()["format"] == STATS_FORMAT and back.to_json()["version"] == STATS_VERSION


_rows = st.lists(st.fixed_dictionaries({
    "azimuth": st.one_of(st.none(), st.floats(-10, 400)),
    "elevation": st.floats(-100, 100),
    "fg_luminance": st.one_of(st.none(), st.floats(0, 1)),
    "keypoint_visibility": st.floats(0, 1),
    "framing": st.sampled_from(["head", "upper_body", "full_body"]),
    "expression": st.one_of(st.none(), st.sampled_from(["neutral", "smile", "angry"])),
}), max_size=12)


def _hist(rows) -> Histograms:
    h = Histograms()
    for r in rows:
        h.add(r)
    return h


@settings(max_examples=60, deadline=None)
@given(_rows, _rows, _rows)
def test_merge_is_adding_in_any_order(a, b, c):
    whole = _hist(a + b + c)
    left = _hist(a).merge(_hist(b)).merge(_hist(c))
    right = _hist(c).merge(_hist(b).merge(_hist(a)))
    # byte-equal documents: what the farm writes does not depend on which shard finished first
    assert json.dumps(left.to_json(), sort_keys=True) == json.dumps(right.to_json(), sort_keys=True)
    assert left == whole


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "not a serialgen.render-stats document"),
    (lambda d: d.update(version=2), "version 2; this code reads version 1"),
    (lambda d: d["numeric"]["azimuth"].update(bins=12), "azimuth has bins"),
    (lambda d: d["numeric"]["focal_mm"]["counts"].__setitem__(0, -1), "malformed"),
    (lambda d: d["numeric"]["focal_mm"].update(under=True), "malformed"),
    (lambda d: d["categorical"].pop("framing"), "malformed"),
    (lambda d: d["categorical"]["framing"].update(counts=[1]), "framing counts"),
])
def test_from_json_refuses_in_one_line(edit, message):
    doc = _hist([{"framing": "head", "focal_mm": 50.0}]).to_json()
    edit(doc)
    with pytest.raises(StatsError, match=message) as err:
        Histograms.from_json(doc, source="x/stats.json")
    assert str(err.value).startswith("x/stats.json: ") and "\n" not in str(err.value)


def test_read_stats_names_the_file(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(_hist([{"framing": "head"}]).to_json()))
    assert read_stats(path).categorical["framing"]["counts"] == {"head": 1}
    path.write_text("{not json")
    with pytest.raises(StatsError, match=f"{path}: cannot read"):
        read_stats(path)
