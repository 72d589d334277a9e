"""`serialgen render` end to end on a local Ray cluster (real Blender workers), then `shards verify`
and `shards preview`; bad input fails in one line before any work."""

from __future__ import annotations

import json

import pytest

from serialgen.cli import main


def _assets(root, variants=("adult", "child"), extra=()):
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library

    root.mkdir(parents=True, exist_ok=True)
    save_pose_library(build_pose_library(30, seed=0), root / "poses.npz")
    records = [{"schema": "serialgen.character/1", "id": f"mannequin-{v}", "kind": "mannequin", "variant": v,
                "status": "accepted"} for v in variants]
    records += list(extra)
    (root / "characters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.mark.blender
def test_render_end_to_end_with_ray(tmp_path, capsys):
    import webdataset as wds

    bad = {"id": "mannequin-broken", "kind": "mannequin", "variant": "missing", "status": "accepted"}
    rejected = {"id": "char-000000000000", "kind": "gltf", "status": "rejected", "reason": "not_humanoid"}
    assets = _assets(tmp_path / "assets", extra=[bad, rejected])
    out = tmp_path / "shards"
    args = ["render", "--assets", str(assets), "--out", str(out), "--poses-per-character", "3",
            "--resolution", "128x192", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 pairs" in printed and "failures: 1 characters" in printed

    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 6 and len(index["shards"]) == 2
    assert [f["character"] for f in index["failures"]] == ["mannequin-broken"]
    assert index["config"]["rejected_characters"] == 1
    assert main(["shards", "verify", str(out)]) == 0

    urls = [str(out / s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 6
    assert all({"ref.png", "std.png", "ref_pose.json", "std_pose.json", "meta.json"} <= set(s) for s in samples)
    meta = json.loads(samples[0]["meta.json"])
    assert meta["engine"] == "workbench" and meta["resolution"] == [128, 192]
    assert meta["framing"] in ("full_body", "upper_body", "head") and meta["key"] == samples[0]["__key__"]

    sheet = tmp_path / "sheet.png"
    assert main(["shards", "preview", str(out), "--out", str(sheet)]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 200

    # Same command again: a finished run renders nothing, says so, and writes nothing.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to render" in capsys.readouterr().out
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A flipped byte in one shard makes verify fail, naming the shard.
    path = out / index["shards"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(out)]) == 1
    assert index["shards"][0]["path"] in capsys.readouterr().err


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    assets = tmp_path / "assets"
    assets.mkdir()
    out = tmp_path / "shards"
    base = ["render", "--assets", str(assets), "--out", str(out), "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "characters.jsonl not found" in err[0]
    (assets / "characters.jsonl").write_text(json.dumps({"id": "x", "status": "rejected"}) + "\n")
    assert main(base) == 2
    assert "no accepted characters" in capsys.readouterr().err
    assert main(base + ["--resolution", "12x34x5"]) == 2
    assert "--resolution" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--engine", "povray"])
    assert not out.exists()  # nothing was started or written
