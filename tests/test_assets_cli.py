"""`serialgen assets build` / `assets poses-preview`: the files of contract 1, incremental re-runs,
determinism, one-line errors (exit 2) for bad input; the build with a fake probe (what it decides
from what the probe reports); and, in the `blender` tier, the Blender probe itself (HDRI views,
a worker that runs past its timeout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serialgen.assets_manifest import backgrounds as bg
from serialgen.assets_manifest import manifest as mf
from serialgen.assets_manifest import poses as pm
from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.bone_maps import map_skeleton
from serialgen.assets_manifest.build import build_assets
from serialgen.assets_manifest.characters_scan import geometry_fingerprint, scan_characters
from serialgen.assets_manifest.motions_scan import scan_motions
from serialgen.assets_manifest.probe import MotionSamples, ProbeError, ProbeFailure
from serialgen.cli import main

N_POSES = 40
SMALL = ["--poses", str(N_POSES), "--procedural-backgrounds", "2", "--no-progress"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One default build without the HDRI views (no Blender) plus a user folder with bad images."""
    root = tmp_path_factory.mktemp("cli")
    photos = root / "photos"
    photos.mkdir()
    Image.new("RGB", (400, 300), (9, 99, 199)).save(photos / "good.png")
    Image.new("RGB", (100, 80)).save(photos / "small.jpg")
    (photos / "bad.webp").write_bytes(b"RIFF0000WEBPjunk")
    out = root / "assets"
    assert main(["assets", "build", "--out", str(out), "--backgrounds", str(photos), "--no-hdri", *SMALL]) == 0
    return root, out


def test_build_writes_every_contract_file(built, capsys):
    _, out = built
    for name in ("characters.jsonl", "motions.jsonl", "poses.npz", "backgrounds.jsonl", "report.json"):
        assert (out / name).is_file(), name
    assert mf.read_jsonl(out / "characters.jsonl", "character") == []
    motions = mf.read_jsonl(out / "motions.jsonl", "motion")
    assert len(motions) == 18 and all(m["stats"]["poses"] > 0 for m in motions)
    lib = pm.load_pose_library(out)
    assert len(lib) == N_POSES and sum(m["stats"]["poses"] for m in motions) == N_POSES
    recs = mf.read_jsonl(out / "backgrounds.jsonl", "background")
    assert {r["kind"] for r in recs if r["status"] == "accepted"} == {"photo", "texture", "procedural", "user"}
    rejected = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in recs if r["status"] == "rejected"}
    assert rejected == {"small.jpg": "image_too_small", "bad.webp": "unreadable_image"}
    report = mf.read_report(out / "report.json")
    assert report["manifests"]["backgrounds"]["by_reason"] == {"image_too_small": 1, "unreadable_image": 1}
    assert report["poses"]["n"] == N_POSES and set(report["timings_s"]) >= {"poses", "backgrounds"}


def test_rerun_is_incremental_and_deterministic(built, tmp_path, capsys):
    root, out = built
    before = {r["id"]: r for r in mf.read_jsonl(out / "backgrounds.jsonl")}
    poses_bytes = (out / "poses.npz").read_bytes()
    assert main(["assets", "build", "--out", str(out), "--backgrounds", str(root / "photos"), "--no-hdri",
                 *SMALL]) == 0
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
    assert f"{N_POSES} poses" in capsys.readouterr().out


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
    assert len(_one_line_error(capsys, ["assets", "build", "--out", out, "--characters", str(tmp_path / "nope")],
                               "--characters")) == 1
    _one_line_error(capsys, ["assets", "build", "--out", out, "--no-such-flag"], "--no-such-flag")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--poses", "0"], "--poses")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--procedural", "-3"], "--procedural")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--min-pose-distance", "90"], "--min-pose-distance")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert len(_one_line_error(capsys, ["assets", "build", "--out", str(f)], "not a folder")) == 1
    assert len(_one_line_error(capsys, ["assets", "poses-preview", str(tmp_path), "--out", "x.png"],
                               "pose library not found")) == 1
    _one_line_error(capsys, ["assets", "poses-preview", str(tmp_path), "--out", "x.png", "--per-motion", "0"],
                    "--per-motion")
    _one_line_error(capsys, ["assets", "build", "--out", out, "--seed", "abc"], "--seed")
    _one_line_error(capsys, ["assets", "build"], "--out")
    # Renamed flags stop with what to use (one line, exit 2).
    assert len(_one_line_error(capsys, ["assets", "build", "--out", out, "--quiet"],
                               "--quiet was renamed: use --no-progress")) == 1


# ---------------------------------------------------------------------------------------------
# The build with a fake probe: the scanners decide from what the probe reports
# ---------------------------------------------------------------------------------------------

_BONES = [{"name": j.name, "parent": j.parent, "head": list(j.head), "tail": list(j.tail)} for j in sk.JOINTS]


def _character_facts(verts: np.ndarray) -> dict:
    """What the Blender worker reports for a clean, skinned humanoid."""
    return {"ok": True, "format": "gltf", "import_s": 0.1, "armatures": 1, "n_objects": 2, "actions": [],
            "armature": True, "n_bones": len(_BONES), "bones": _BONES, "mapping": map_skeleton(_BONES).to_json(),
            "meshes": [{"name": "Body", "vertices": len(verts)}], "n_vertices": len(verts), "skinned": ["Body"],
            "bone_parented": {}, "unskinned": [], "normalise": {"scale": 1.0, "yaw_deg": 0.0, "height_m": 1.75},
            "textures": [{"name": "skin.png", "status": "ok", "size": [512, 512]}],
            "materials": [{"name": "Skin", "linked": True, "images": ["skin.png"], "colour": [1, 1, 1, 1]}],
            "shape_keys": {"Body": ["Smile"]}, "fingerprint": geometry_fingerprint(verts)}


def _walk_samples(frames: int = 12) -> MotionSamples:
    """A clip on the canonical figure itself: the knees and elbows swing."""
    rot, pos = [], []
    for t in range(frames):
        angles = np.zeros((len(sk.JOINTS), 3))
        for side, sign in (("l", 1), ("r", -1)):
            angles[sk.JOINT_INDEX[f"{side}_upper_leg"], 0] = 25 * sign * np.sin(2 * np.pi * t / frames)
            angles[sk.JOINT_INDEX[f"{side}_lower_arm"], 0] = 30 + 20 * np.sin(2 * np.pi * t / frames)
        posed = sk.forward_kinematics(angles)
        rot.append(posed.world_rot)
        pos.append(posed.heads)
    return MotionSamples(bones=_BONES, rest_rot=np.tile(np.eye(3), (len(_BONES), 1, 1)),
                         clips=[{"name": "walk", "fps": 30.0, "frames": frames}],
                         rot=[np.stack(rot).astype(np.float32)], pos=[np.stack(pos).astype(np.float32)])


class FakeProbe:
    """Answers by file name, like the Blender probe would for such files; records every call."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        rng = np.random.default_rng(0)
        self.body = rng.uniform([-0.3, -0.2, 0.0], [0.3, 0.2, 1.75], (500, 3))

    def inspect_character(self, path, max_bytes=None):
        self.calls.append(("character", path.name))
        if path.stem == "hangs":
            return ProbeFailure("import_timeout", "import took longer than 120 s")
        if path.stem == "crashes":
            return ProbeFailure("import_failed", "importer crashed (exit -11): Segmentation fault")
        if path.stem == "statue":
            return {"ok": True, "format": "gltf", "import_s": 0.1, "armatures": 0, "n_objects": 1, "actions": [],
                    "armature": False, "meshes": ["Statue"], "n_vertices": 8}
        return _character_facts(self.body)

    def sample_motions(self, path, max_fps, max_bytes=None):
        self.calls.append(("motions", path.name))
        if path.stem == "still":
            return MotionSamples(bones=_BONES, rest_rot=np.tile(np.eye(3), (len(_BONES), 1, 1)), clips=[], rot=[],
                                 pos=[])
        if path.stem == "hangs":
            return ProbeFailure("import_timeout", "import took longer than 120 s")
        return _walk_samples()

    def read_exrs(self, paths):
        self.calls.append(("exr", len(paths)))
        raise ProbeError("bpy EXR reader failed (exit 1): no Blender here")


def test_build_decides_from_what_the_probe_reports(tmp_path):
    src = tmp_path / "in"
    (src / "chars").mkdir(parents=True)
    (src / "moves").mkdir()
    for name in ("hero.glb", "hero_copy.fbx", "hangs.glb", "crashes.vrm", "statue.glb"):
        (src / "chars" / name).write_bytes(name.encode())  # distinct bytes: duplicates come from geometry
    for name in ("dance.glb", "still.fbx", "hangs.glb"):
        (src / "moves" / name).write_bytes(name.encode())
    probe = FakeProbe()
    summary = build_assets(tmp_path / "out", probe=probe, characters=[src / "chars"], motions=[src / "moves"],
                           poses=20, procedural_backgrounds=1, progress=False)

    by = {Path(r["path"]).name: r for r in summary["manifests"]["characters"]}
    assert by["hero.glb"]["status"] == "accepted" and by["hero.glb"]["bone_map"]["l_hand"] == "l_hand"
    assert by["hero.glb"]["expressions"]["smile"] == [["Body", "Smile", 1.0]]
    assert {n: r["reason"] for n, r in by.items() if r["status"] == "rejected"} == {
        "hero_copy.fbx": "duplicate", "hangs.glb": "import_timeout", "crashes.vrm": "import_failed",
        "statue.glb": "no_armature"}
    assert "Segmentation fault" in by["crashes.vrm"]["detail"]
    motions = {Path(r["path"]).name: r for r in summary["manifests"]["motions"] if r["kind"] != "builtin"}
    assert motions["dance.glb"]["status"] == "accepted" and motions["dance.glb"]["stats"]["clips"][0]["frames"] == 12
    assert motions["still.fbx"]["reason"] == "no_motion" and motions["hangs.glb"]["reason"] == "import_timeout"
    assert summary["poses"]["per_motion"]["dance/walk"] > 0  # the sampled clip is in the pose library
    hdri = [r for r in summary["manifests"]["backgrounds"] if r["kind"] == "hdri"]
    assert hdri and all(r["reason"] == "unreadable_image" for r in hdri)
    assert any("no Blender here" in n for n in summary["notes"])
    assert ("exr", len(list(bg.bpy_hdri_dir().glob("*.exr")))) in probe.calls

    # Scanned again: unchanged files are not read again, and the records are the same.
    again = FakeProbe()
    chars = summary["manifests"]["characters"]
    imported = [r for r in summary["manifests"]["motions"] if r["kind"] != "builtin"]
    assert scan_characters([src / "chars"], chars, probe=again) == chars
    assert scan_motions([src / "moves"], tmp_path / "out", imported, probe=again)[0] == imported
    assert again.calls == []


# ---------------------------------------------------------------------------------------------
# Slower tiers
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.blender
def test_hdri_views_come_from_the_blender_probe(tmp_path, capsys):
    """The default build decodes the bpy wheel's HDRIs in a Blender worker process."""
    out = tmp_path / "assets"
    assert main(["assets", "build", "--out", str(out), *SMALL]) == 0
    recs = mf.read_jsonl(out / "backgrounds.jsonl", "background")
    hdri = [r for r in recs if r["kind"] == "hdri"]
    assert len(hdri) == len(list(bg.bpy_hdri_dir().glob("*.exr"))) * len(bg.HDRI_YAWS)
    assert all(r["status"] == "accepted" for r in hdri)
    with Image.open(out / hdri[0]["path"]) as im:
        assert im.size == (512, 768) and np.asarray(im).std() > 10


@pytest.mark.blender
def test_blender_probe_reports_a_hanging_or_broken_file_as_a_reason(tmp_path):
    from serialgen.render.asset_build import BlenderProbe

    f = tmp_path / "broken.glb"
    f.write_bytes(b"glTF\x02\x00\x00\x00" + b"\x00" * 40)
    slow = BlenderProbe(timeout=0.01).inspect_character(f)
    assert slow == ProbeFailure("import_timeout", "import took longer than 0 s")
    failed = BlenderProbe().inspect_character(f)
    assert isinstance(failed, ProbeFailure) and failed.reason == "import_failed"
    assert isinstance(BlenderProbe().sample_motions(f, 30.0), ProbeFailure)


def test_help_states_the_size_limit_the_build_uses(capsys):
    """--help must not import numpy, so the command spells the default itself: it must agree."""
    import re

    with pytest.raises(SystemExit):
        main(["assets", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown = re.search(r"--max-asset-size SIZE .*?default (\S+)\)", text).group(1)
    assert mf.parse_size(shown) == mf.DEFAULT_MAX_BYTES
