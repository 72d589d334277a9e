"""`serialgen assets build` / `assets poses-preview`: the files of contract 1, incremental re-runs,
determinism, and one-line errors (exit 2) for bad input."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from serialgen.assets_manifest import backgrounds as bg
from serialgen.assets_manifest import manifest as mf
from serialgen.assets_manifest import poses as pm
from serialgen.cli import main

SMALL = ["--poses", "300", "--procedural-backgrounds", "3", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full default build (with the bpy HDRI conversion) plus a user folder with bad images."""
    root = tmp_path_factory.mktemp("cli")
    photos = root / "photos"
    photos.mkdir()
    Image.new("RGB", (400, 300), (9, 99, 199)).save(photos / "good.png")
    Image.new("RGB", (100, 80)).save(photos / "small.jpg")
    (photos / "bad.webp").write_bytes(b"RIFF0000WEBPjunk")
    out = root / "assets"
    assert main(["assets", "build", "--out", str(out), "--backgrounds", str(photos), *SMALL]) == 0
    return root, out


def test_build_writes_every_contract_file(built, capsys):
    _, out = built
    for name in ("characters.jsonl", "motions.jsonl", "poses.npz", "backgrounds.jsonl", "report.json"):
        assert (out / name).is_file(), name
    assert mf.read_jsonl(out / "characters.jsonl", "character") == []
    motions = mf.read_jsonl(out / "motions.jsonl", "motion")
    assert len(motions) == 18 and all(m["stats"]["poses"] > 0 for m in motions)
    lib = pm.load_pose_library(out)
    assert len(lib) == 300 and sum(m["stats"]["poses"] for m in motions) == 300
    recs = mf.read_jsonl(out / "backgrounds.jsonl", "background")
    kinds = {r["kind"] for r in recs if r["status"] == "accepted"}
    assert {"photo", "texture", "procedural", "user"} <= kinds
    if bg.bpy_hdri_dir() is not None:  # the bpy wheel's HDRIs, converted in a subprocess
        hdri = [r for r in recs if r["kind"] == "hdri"]
        assert hdri and all(r["status"] == "accepted" for r in hdri)
        with Image.open(out / hdri[0]["path"]) as im:
            assert im.size == (512, 768) and np.asarray(im).std() > 10
    rejected = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in recs if r["status"] == "rejected"}
    assert rejected == {"small.jpg": "image_too_small", "bad.webp": "unreadable_image"}
    report = mf.read_report(out / "report.json")
    assert report["manifests"]["backgrounds"]["by_reason"] == {"image_too_small": 1, "unreadable_image": 1}
    assert report["poses"]["n"] == 300 and set(report["timings_s"]) >= {"poses", "backgrounds"}


def test_rerun_is_incremental_and_deterministic(built, tmp_path, capsys):
    root, out = built
    before = {r["id"]: r for r in mf.read_jsonl(out / "backgrounds.jsonl")}
    poses_bytes = (out / "poses.npz").read_bytes()
    assert main(["assets", "build", "--out", str(out), "--backgrounds", str(root / "photos"), *SMALL]) == 0
    table = capsys.readouterr().out
    assert "backgrounds" in table and "image_too_small 1" in table
    after = {r["id"]: r for r in mf.read_jsonl(out / "backgrounds.jsonl")}
    assert after == before  # nothing regenerated: same files, same mtimes
    assert (out / "poses.npz").read_bytes() == poses_bytes
    # A fresh folder with the same seed gives the same files.
    other = tmp_path / "again"
    assert main(["assets", "build", "--out", str(other), "--no-hdri", *SMALL]) == 0
    assert (other / "poses.npz").read_bytes() == poses_bytes
    again = {r["id"]: r["sha256"] for r in mf.read_jsonl(other / "backgrounds.jsonl")}
    assert all(again[k] == before[k]["sha256"] for k in again)


def test_poses_preview_command(built, tmp_path, capsys):
    _, out = built
    assert main(["assets", "poses-preview", str(out), "--out", str(tmp_path / "s.png"), "--per-motion", "2"]) == 0
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[1] > 18 * 50
    assert "300 poses" in capsys.readouterr().out


def _one_line_error(capsys, argv, needle):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("serialgen") and needle in err[-1], err
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "o")
    err = _one_line_error(capsys, ["assets", "build", "--out", out, "--backgrounds", str(tmp_path / "missing")],
                          "missing: no such file or folder")
    assert len(err) == 1
    _one_line_error(capsys, ["assets", "build", "--out", out, "--no-such-flag"], "--no-such-flag")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--poses", "0"], "--poses")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--procedural", "-3"], "--procedural")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert len(_one_line_error(capsys, ["assets", "build", "--out", str(f)], "not a folder")) == 1
    assert len(_one_line_error(capsys, ["assets", "poses-preview", str(tmp_path), "--out", "x.png"],
                               "pose library not found")) == 1
    if importlib.util.find_spec("serialgen.assets_manifest.characters_scan") is None:
        err = _one_line_error(capsys, ["assets", "build", "--out", out, "--characters", str(tmp_path)],
                              "real character import not available")
        assert len(err) == 1


@pytest.mark.skipif(importlib.util.find_spec("serialgen.assets_manifest.procedural") is None,
                    reason="procedural characters not written yet")
def test_procedural_characters_records_and_reuse(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["assets", "build", "--out", str(out), "--procedural", "2", "--no-hdri", *SMALL]
    assert main(args) == 0
    recs = mf.read_jsonl(out / "characters.jsonl", "character")
    assert [r["id"] for r in recs] == ["proc-000000", "proc-000001"]
    for r in recs:
        assert r["status"] == "accepted" and r["kind"] == "procedural"
        assert (out / r["mesh_file"]).is_file() and r["sha256"] == mf.sha256_file(out / r["mesh_file"])
        assert r["generator"]["id"] == r["id"] and "neutral" in r["expressions"]
        assert r["stats"]["height_m"] > 0.5
    assert recs[0]["mesh_hash"] != recs[1]["mesh_hash"]
    mtimes = [(out / r["mesh_file"]).stat().st_mtime_ns for r in recs]
    assert main(args) == 0  # unchanged: meshes are not rebuilt
    assert [(out / r["mesh_file"]).stat().st_mtime_ns for r in recs] == mtimes
    assert json.loads((out / "report.json").read_text())["manifests"]["characters"]["by_status"]["accepted"] == 2
