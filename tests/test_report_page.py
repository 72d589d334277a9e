"""`serialgen report`: the HTML page of a shard set and of an asset folder, built from sets written
in tmp_path with the real shard writer (no Blender), read back as HTML and files. The browser's view
of the same pages is tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from serialgen.assets_manifest import manifest, poses
from serialgen.cli import main
from serialgen.dataset import shards
from serialgen.dataset.render_stats import Histograms, sample_row
from serialgen.dataset.report.assets_report import build_assets_report
from serialgen.dataset.report.shards_report import build_shards_report
from serialgen.errors import UserInputError

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _png(w: int, h: int, rgba: bool, value: int) -> bytes:
    img = np.full((h, w, 4 if rgba else 3), value, dtype=np.uint8)
    if rgba:
        img[: h // 2, :, 3] = 0  # a transparent top half: the mask
    return shards.encode_png(img)


def _pose(n_visible: int, n: int = 6) -> dict:
    return {"width": 32, "height": 48, "names": [f"k{i}" for i in range(n)],
            "keypoints": [[5.0, 5.0, int(i < n_visible)] for i in range(n)], "defined": [1] * n}


def _meta(character: str, split: str, key: str, i: int) -> dict:
    return {"schema": shards.SAMPLE_SCHEMA, "key": key, "character": character, "split": split,
            "expression": ["neutral", "smile", "angry"][i % 3], "framing": ["full_body", "head"][i % 2],
            "motion": "walk", "motion_index": 0,
            "view": {"azimuth": 30.0 * i, "elevation": 5.0, "focal_mm": 50.0, "framing": "head"},
            "camera": {"focal_mm": 50.0}, "resolution": [32, 48]}


def write_set(root: Path, characters: dict[str, tuple[str, int]], *, failures=(), index_names=None,
              shard_size: int | None = None, version: int = 3) -> Path:
    """A render-pair set: ``{id: (split, pairs)}``, one shard per character (or per ``shard_size``).
    Format 3 stores each standard image once in its own tar; format 2 repeats it in every pair."""
    summaries, chars, standards = [], {}, []
    for cid, (split, n) in characters.items():
        size = shard_size or max(n, 1)
        for start in range(0, n, size):
            rel = f"{split}/{cid}-p{start:06d}-{min(n, start + size):06d}.tar"
            with shards.ShardWriter(root, rel, split) as w:
                for i in range(start, min(n, start + size)):
                    key = shards.sample_key(cid, i, 0)
                    members = {"ref.png": _png(32, 48, True, 40 + 20 * i),
                               "ref_pose.json": shards.json_bytes(_pose(i % 7)),
                               "std_pose.json": shards.json_bytes(_pose(6)),
                               "meta.json": shards.json_bytes(_meta(cid, split, key, i))}
                    if version == 2:
                        members["std.png"] = _png(32, 48, False, 200)
                    w.write(key, members)
                summaries.append(w.close())
        if version == 3:
            standards.append(shards.write_standard(root, split, cid, _png(32, 48, False, 200), _pose(6), {}))
        chars[cid] = {"split": split, "standard_pose": _pose(6)}
        if index_names and cid in index_names:
            chars[cid]["name"] = index_names[cid]
    shards.write_index(root, summaries, {"per_character": 3, "settings": {"engine": "workbench", "width": 32,
                                                                            "height": 48}},
                       list(failures), standard_pose=_pose(6), characters=chars,
                       standards=standards if version == 3 else None)
    return root


# run.json as the farm writes it (format 2): the config, rendering version, code fingerprint and
# the asset folder's summary.
RUN_JSON = {"format": "serialgen.render-run/2", "rendering_version": 2, "code_fingerprint": "0123456789abcdef",
            "config": {"per_character": 4, "seed": 7, "settings": {"engine": "workbench", "width": 32, "height": 48}},
            "splits": {"char-a": "train", "char-b": "test"},
            "assets": {"path": "/data/assets", "characters_accepted": 3, "characters_rejected": 1,
                       "rejected_by_reason": {"import_failed": 1},
                       "rejected": [{"id": "char-z", "name": "Zombie-9f8e7d", "reason": "import_failed",
                                     "detail": "Zombie.fbx: Blender could not read it"}],
                       "manifests": None}}


@pytest.fixture(scope="module")
def full_set(tmp_path_factory) -> tuple[Path, Path]:
    """A set with everything a page shows: run.json, the render's report.json, a failed sample, a
    quarantined character, a rejected one (asset folder), hostile names; and its report."""
    root = tmp_path_factory.mktemp("set") / "shards"
    failures = [{"character": "char-b", "key": "char-b_p00002_v0", "error": "render crashed " + HOSTILE},
                {"character": "char-q", "key": None, "error": "Blender died 3 times"}]
    write_set(root, {"char-a": ("train", 4), "char-b": ("test", 3)}, failures=failures,
              index_names={"char-a": "Knight-a1b2c3", "char-b": HOSTILE})
    (root / "run.json").write_text(json.dumps(RUN_JSON))
    (root / "report.json").write_text(json.dumps({"status": "complete", "seconds": 1.5, "pairs_per_s": 4.7,
                                                  "workers": 1, "retries": [],
                                                  "quarantined": {"char-q": {"reason": "Blender died 3 times"}}}))
    assets = root.parent / "assets"
    assets.mkdir()
    manifest.write_jsonl(assets / "characters.jsonl", [
        manifest.make_record("character", "char-a", "gltf", path="/in/Knight.glb"),
        manifest.make_record("character", "char-b", "gltf", path="/in/b.glb"),
        manifest.reject(manifest.make_record("character", "char-r", "fbx", path="/in/Broken Robot.fbx"),
                        "no_armature", "Broken Robot.fbx: no armature " + HOSTILE),
    ])
    page = build_shards_report(root, root / "report", assets=assets)
    return root, page


def _srcs(html: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]*)"', html)


def test_page_shows_run_counts_failures_and_cards(full_set):
    root, page = full_set
    html = page.read_text()
    assert page == root / "report" / "index.html"
    assert "0123456789abcdef" in html and "rendering version" in html
    assert "7 pairs" in html and "Knight-a1b2c3" in html and "Knight.glb" in html
    assert "Blender died 3 times" in html and "render crashed" in html
    assert "Broken Robot.fbx" in html and "no_armature" in html
    # cards: problem characters first (quarantined, failures, rejected), then the rest
    order = [html.index(f'data-status="{s}"') for s in ("quarantined", "failures", "rejected", "ok")]
    assert order == sorted(order)
    assert "From all 7 samples&#x27; meta.json (stats.json not recorded)" in html


def test_every_image_is_a_file_in_the_folder(full_set):
    root, page = full_set
    srcs = _srcs(page.read_text())
    # 8 numeric+categorical plots + 1, 2 cards x (standard + 4 or 3 references)
    assert len(srcs) == 9 + (1 + 4) + (1 + 3)
    for src in srcs:
        assert not re.match(r"^[a-z]+:", src) and ".." not in src  # relative, inside the folder
        assert (page.parent / src).is_file() and (page.parent / src).stat().st_size > 0
    assert {p.name for p in (page.parent / "img").iterdir()} == {Path(s).name for s in srcs}


def test_data_never_becomes_markup(full_set):
    html = full_set[1].read_text()
    assert HOSTILE not in html and "<script>alert" not in html
    assert html.count("<script>") == 1  # the page's own filter script
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_asset_rejections_recorded_at_render_time_need_no_asset_folder(tmp_path):
    root = write_set(tmp_path / "s", {"char-a": ("train", 2)})
    (root / "run.json").write_text(json.dumps(RUN_JSON))
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "asset summary recorded in run.json at render time" in html
    assert "Zombie-9f8e7d" in html and "Zombie.fbx: Blender could not read it" in html
    assert "/data/assets: 3 characters accepted, 1 rejected (import_failed 1)" in html
    assert 'data-status="rejected"' in html and "0123456789abcdef" in html and "seed" in html
    assert "earlier runs" not in html


def test_a_folder_rendered_by_several_codes_says_so(tmp_path):
    root = write_set(tmp_path / "s", {"char-a": ("train", 1)})
    (root / "run.json").write_text(json.dumps({**RUN_JSON, "code_fingerprints": ["0123456789abcdef", "fedcba9876543210"]}))
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "shards of earlier runs on this folder come from <code>fedcba9876543210</code>" in html


def test_a_format_2_set_shows_the_standard_its_pairs_carry(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 2)}, version=2)
    page = build_shards_report(root, tmp_path / "out")
    html = page.read_text()
    assert "serialgen.shards version 2" in html and 'alt="standard image"' in html
    assert "0 B</td><td class=\"n\">" in html  # no standard tar bytes in a format 2 set


def test_a_bare_set_says_what_is_not_recorded(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 2)})
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "not recorded (rendered before run.json held it)" in html
    assert "pass --assets DIR to show the asset folder&#x27;s rejections" in html
    assert "No failed samples, no quarantined characters." in html


def test_stats_json_is_read_instead_of_the_samples(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 3)})
    h = Histograms()
    for i in range(1234):
        h.add(sample_row({"framing": "head", "fg_luminance": 0.5}, _pose(3)))
    (root / "stats.json").write_text(json.dumps(h.to_json()))
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "stats.json, written at render time: every one of 1,234 samples" in html


def test_a_damaged_stats_json_falls_back_to_a_sample_with_a_note(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 3)})
    (root / "stats.json").write_text('{"format": "serialgen.render-stats", "version": 99}')
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "version 99; this code reads version 1; the distributions come from a sample instead" in html
    assert "From all 3 samples" in html


def test_a_large_set_is_sampled_not_read_whole(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 12), "c2": ("test", 12)}, shard_size=4)
    html = build_shards_report(root, tmp_path / "out", sample=5, max_characters=1).read_text()
    assert "a sample of 5 of 24 samples" in html
    assert "1 more characters not shown (--max-characters 1)" in html


def test_a_damaged_shard_is_a_note_not_a_failure(tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 3), "c2": ("train", 2)})
    bad = root / "train" / "c2-p000000-000002.tar"
    bad.write_bytes(b"\0garbage" * 10)
    (root / "train" / "standard" / "c1.tar").write_bytes(b"")
    html = build_shards_report(root, tmp_path / "out").read_text()
    assert "train/c2-p000000-000002.tar: " in html and "From all 3 samples" not in html
    assert "c1: standard image left out (" in html and "standard/c1.tar" in html
    assert "train/c2-p000000-000002.tar: unreadable" in html and "its character is shown without pictures" in html
    assert html.count('alt="reference') == 3  # c1's references still shown


def test_rerun_replaces_the_report_and_a_foreign_folder_is_refused(full_set, tmp_path):
    root, page = full_set
    out = tmp_path / "out"
    shutil.copytree(page.parent, out)  # an earlier report
    (out / "img" / "stale.png").write_bytes(b"x")
    build_shards_report(root, out)
    assert not (out / "img" / "stale.png").exists() and (out / "index.html").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="holds no serialgen report"):
        build_shards_report(root, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def asset_folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("assets")
    (root / "backgrounds").mkdir()
    bgs = []
    for i in range(3):
        Image.new("RGB", (64, 96), (40 * i, 90, 160)).save(root / "backgrounds" / f"bg{i}.png")
        bgs.append(manifest.make_record("background", f"bg-{i}", "procedural", path=f"backgrounds/bg{i}.png"))
    bgs.append(manifest.reject(manifest.make_record("background", "user-tiny", "user", path="/in/tiny.png"),
                               "image_too_small", "tiny.png: 20x20"))
    manifest.write_jsonl(root / "backgrounds.jsonl", bgs)
    manifest.write_jsonl(root / "characters.jsonl", [
        manifest.make_record("character", "proc-000000", "procedural", path="meshes/proc-000000.npz",
                             stats={"height_m": 1.71}),
        manifest.reject(manifest.make_record("character", "char-x", "gltf", path="/in/Statue.glb"),
                        "no_armature", "Statue.glb: no armature " + HOSTILE)])
    manifest.write_jsonl(root / "motions.jsonl", [
        manifest.make_record("motion", "builtin-walk", "builtin"),
        manifest.reject(manifest.make_record("motion", "bvh-bad", "bvh", path="/in/bad.bvh"),
                        "no_motion", "bad.bvh: no frames")])
    # a small hand-made library (building one takes a second): walk covers every phase bin, run and
    # an imported clip do not
    phase = np.array([k / 10 + 0.05 for k in range(10)] + [0.1, 0.5, 0.9] + [0.0, 0.2, 0.4, 0.6], dtype=np.float32)
    index = np.array([0] * 10 + [1] * 3 + [2] * 4)
    n, joints = len(phase), len(poses.PoseLibrary(np.zeros((0, 0, 3)), None, None, None, []).joint_names)
    poses.save_pose_library(poses.PoseLibrary(np.zeros((n, joints, 3), np.float32), np.zeros((n, 3), np.float32),
                                              index, phase, ["walk", "run", "mocap/take_01"]), root / "poses.npz")
    return root


def test_asset_page_counts_rejections_and_pose_coverage(asset_folder, tmp_path):
    page = build_assets_report(asset_folder, tmp_path / "out")
    html = page.read_text()
    assert "Statue.glb" in html and "no_armature" in html and "image_too_small" in html and "bad.bvh" in html
    assert "17 poses" in html and "from 2 motion sets and 1 imported clip." in html
    assert "phase bins without a pose: run, mocap/take_01 (clip)" in html
    assert HOSTILE not in html
    srcs = _srcs(html)
    assert len(srcs) == 3 + 3  # poses per motion, phase coverage, pose sheet; 3 background thumbnails
    assert all((page.parent / s).is_file() for s in srcs)


def test_cli_writes_the_page_and_prints_its_path(asset_folder, tmp_path, capsys):
    root = write_set(tmp_path / "s", {"c1": ("train", 2)})
    assert main(["report", str(root)]) == 0
    assert capsys.readouterr().out.startswith(f"report: {root / 'report' / 'index.html'} (")
    assert main(["report", str(asset_folder), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "index.html").is_file()


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether argparse exits (usage errors) or the handler returns."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "nope: no such folder"),
    (["{tmp}"], "neither a shard set (no index.json) nor an asset folder"),
    (["{set}", "--sample", "0"], "argument --sample: must be at least 1, got 0"),
    (["{set}", "--assets", "{tmp}"], "no characters.jsonl there (not an asset folder)"),
    (["{set}", "--out", "{set}/index.json"], "is a file, not a folder"),
])
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    root = write_set(tmp_path / "s", {"c1": ("train", 2)})
    assert run_cli(["report"] + [a.format(tmp=tmp_path, set=root) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_damaged_index_is_exit_1(tmp_path, capsys):
    root = tmp_path / "s"
    root.mkdir()
    (root / "index.json").write_text("{broken")
    assert run_cli(["report", str(root)]) == 1
    err = capsys.readouterr().err
    assert "index.json" in err and err.count("\n") == 1
