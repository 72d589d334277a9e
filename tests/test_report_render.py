"""The report of a set rendered by Blender: the field names sample_row reads are the ones the render
job writes, and what the farm records at render time (code fingerprint, stats.json, the asset
summary) reaches the page without the asset folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from serialgen.dataset import tarset
from serialgen.dataset.render_stats import CATEGORICAL_FIELDS, NUMERIC_FIELDS, read_stats, sample_row
from serialgen.dataset.report.shards_report import build_shards_report

pytestmark = [pytest.mark.blender, pytest.mark.slow]


def serialgen(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "serialgen.cli", *args], check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("render")
    assets, out = tmp / "assets", tmp / "shards"
    serialgen("assets", "build", "--out", str(assets), "--procedural", "2", "--poses", "120", "--no-hdri",
              "--procedural-backgrounds", "2", "--no-progress")
    serialgen("render", "--assets", str(assets), "--out", str(out), "--poses-per-character", "4",
              "--resolution", "128x192", "--workers", "0", "--no-progress")
    return out


def test_every_row_field_comes_from_the_rendered_records(rendered):
    rows = []
    for shard in sorted(rendered.glob("*/*.tar")):
        for _key, sample in tarset.iter_samples(shard):
            rows.append(sample_row(json.loads(sample["meta.json"]), json.loads(sample["ref_pose.json"])))
    assert len(rows) == 8
    for row in rows:
        missing = [k for k in list(NUMERIC_FIELDS) + list(CATEGORICAL_FIELDS) if row[k] is None]
        assert missing == [], f"fields the render job does not write: {missing}"
        assert row["pose_source"] == "motion_set" and 0.0 <= row["fg_luminance"] <= 1.0


def test_the_page_reads_what_the_render_recorded(rendered, tmp_path):
    stats = read_stats(rendered / "stats.json")
    assert stats.samples == 8
    run = json.loads((rendered / "run.json").read_text())
    html = build_shards_report(rendered, tmp_path / "report").read_text()
    assert run["code_fingerprint"] in html
    assert "stats.json, written at render time: every one of 8 samples" in html
    assert "2 characters accepted, 0 rejected" in html
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert len(srcs) == 9 + 2 * (1 + 4)  # the charts; per character its standard image and 4 references
    assert all((tmp_path / "report" / s).is_file() for s in srcs)
