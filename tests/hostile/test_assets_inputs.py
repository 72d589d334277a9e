"""Hostile and broken input files for `serialgen assets build` (issue 12, items 6-9). Every case is
generated here (no binary blobs committed):

* 6: glTF image and buffer URIs that leave the asset's folder (``../``, absolute, ``file://``,
  percent-encoded, backslashes, a symlinked folder) are ``resource_outside_asset``, with the same
  answer whether the outside file exists or not; so are FBX/.blend image paths outside (Blender
  tier), and the render path's importer refuses such a glTF too;
* 7: the 91-byte BVH with ``CHANNELS -2`` (it made the parser loop forever inside the build) and
  other malformed headers are rejected at once; BVH files are read in a worker process with the
  import timeout;
* 8: a 3 GiB (sparse) buffer, main file, BVH or background image is ``too_large`` without being
  read, and the limit is a flag;
* 9: every file under an input folder gets a record: symlink loops, dangling links, FIFOs (never
  opened), links leading out, other formats.

The fuzzing of the BVH parser and the glTF probe is tests/hostile/test_assets_fuzz.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serialgen.assets_manifest import backgrounds as bg
from serialgen.assets_manifest import manifest as mf
from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.bone_maps import map_skeleton
from serialgen.assets_manifest.build import print_summary
from serialgen.assets_manifest.bvh import BvhError, parse_bvh
from serialgen.assets_manifest.characters_scan import geometry_fingerprint, scan_characters
from serialgen.assets_manifest.gltf_probe import GltfError, decode_meshopt, probe_gltf, write_glb
from serialgen.assets_manifest.motions_scan import scan_motions
from serialgen.assets_manifest.probe import ProbeFailure
from serialgen.cli import main
from serialgen.render.asset_build import BlenderProbe

from _bounds import within

GiB = 1 << 30


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Item 6: resources outside the asset's folder
# ---------------------------------------------------------------------------------------------


def _gltf(folder: Path, images=(), buffers=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"asset": {"version": "2.0"}, "images": [{"uri": u} for u in images],
           "buffers": [{"uri": u, "byteLength": 4} for u in buffers]}
    path = folder / "char.gltf"
    path.write_text(json.dumps(doc))
    return path


def _outside_uris(tmp_path: Path) -> dict[str, str]:
    """URI forms that reach tmp_path/elsewhere/x.png from tmp_path/asset/char.gltf."""
    target = tmp_path / "elsewhere" / "x.png"
    (tmp_path / "asset").mkdir(exist_ok=True)
    link = tmp_path / "asset" / "linked"
    if not link.is_symlink():
        link.symlink_to(tmp_path / "elsewhere")  # a folder inside that is a link to outside
    return {
        "dotdot": "../../../../" + str(target.relative_to("/")),
        "relative": "../elsewhere/x.png",
        "absolute": str(target),
        "file_scheme": "file://" + str(target),
        "percent_encoded": "..%2Felsewhere%2Fx.png",
        "backslashes": "..\\elsewhere\\x.png",
        "through_a_subfolder": "sub/../../elsewhere/x.png",
        "symlinked_folder": "linked/x.png",
    }


@pytest.mark.parametrize("form", ["dotdot", "relative", "absolute", "file_scheme", "percent_encoded", "backslashes",
                                  "through_a_subfolder", "symlinked_folder"])
@pytest.mark.parametrize("what", ["image", "buffer"])
def test_uri_outside_the_asset_folder_is_rejected_whether_or_not_it_exists(tmp_path, form, what):
    uri = _outside_uris(tmp_path)[form]
    gltf = _gltf(tmp_path / "asset", **{f"{what}s": [uri]})
    target = tmp_path / "elsewhere" / "x.png"
    answers = []
    for exists in (True, False):
        if exists:
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"\x89PNG secret pixels")
        else:
            shutil.rmtree(target.parent)
            target.parent.mkdir()  # the symlinked folder must still resolve to the same place
        answers.append(probe_gltf(gltf, max_bytes=GiB))
    assert answers[0]["ok"] is False and answers[0]["reason"] == "resource_outside_asset", answers[0]
    # The reason text is the same whether the outside file exists or not: nothing about it leaks.
    assert answers[0] == answers[1]
    assert "exist" not in answers[0]["detail"] and "missing" not in answers[0]["detail"]


def test_uris_inside_the_folder_are_fine(tmp_path):
    folder = tmp_path / "asset"
    (folder / "tex").mkdir(parents=True)
    (folder / "tex" / "skin.png").write_bytes(b"png")
    (folder / "body.bin").write_bytes(b"\0" * 64)
    gltf = _gltf(folder, images=["tex/skin.png", "./tex/../tex/skin.png", "tex%2Fskin.png", "gone.png"],
                 buffers=["body.bin", "data:application/octet-stream;base64,AAAA"])
    res = probe_gltf(gltf, max_bytes=GiB)
    assert res["ok"] is True and res["missing_images"] == ["gone.png"]
    assert res["resource_bytes"] == gltf.stat().st_size + 3 * 3 + 64


def test_meshopt_decoder_refuses_an_outside_buffer(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\1" * 16)
    folder = tmp_path / "asset"
    folder.mkdir()
    doc = {"asset": {"version": "2.0"}, "buffers": [{"uri": "../secret.bin", "byteLength": 16}],
           "bufferViews": [{"buffer": 0, "byteLength": 16}]}
    write_glb(folder / "m.glb", doc, b"")
    pytest.importorskip("meshopt")
    with pytest.raises(GltfError, match="does not resolve inside"):
        decode_meshopt(folder / "m.glb", tmp_path / "out.glb")


# ---------------------------------------------------------------------------------------------
# Item 7: BVH files that once hung the build
# ---------------------------------------------------------------------------------------------

_HANGING_BVH = "HIERARCHY\nROOT Hips\n{\nOFFSET 0 0 0\nCHANNELS -2 Xrotation\n}\nMOTION\nFrames: 1\nFrame Time: 1\n0\n"


def _bvh_91_bytes() -> str:
    text = _HANGING_BVH.replace("Hips", "H" * (4 + 91 - len(_HANGING_BVH)))
    assert len(text.encode()) == 91
    return text


def _good_bvh(frames: int = 2) -> str:
    rows = "\n".join(" ".join(["0"] * 9) for _ in range(frames))
    return ("HIERARCHY\nROOT Hips\n{\nOFFSET 0 0 0\nCHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation "
            "Yrotation\nJOINT Spine\n{\nOFFSET 0 1 0\nCHANNELS 3 Zrotation Xrotation Yrotation\nEnd Site\n{\n"
            f"OFFSET 0 1 0\n}}\n}}\n}}\nMOTION\nFrames: {frames}\nFrame Time: 0.0333\n{rows}\n")


def test_the_91_byte_bvh_is_rejected_at_once():
    with within(2.0):  # it looped forever before
        with pytest.raises(BvhError, match="CHANNELS count"):
            parse_bvh(_bvh_91_bytes(), "hang.bvh")


MALFORMED = {
    "channels_negative": ("CHANNELS 6", "CHANNELS -1"),
    "channels_huge": ("CHANNELS 6", "CHANNELS 99999999999"),
    "channels_not_a_number": ("CHANNELS 3", "CHANNELS three"),
    "channels_unknown_name": ("Zrotation Xrotation Yrotation\nEnd", "Zrotation Xrotation Wrotation\nEnd"),
    "channels_repeated": ("Zrotation Xrotation Yrotation\nEnd", "Zrotation Zrotation Yrotation\nEnd"),
    "channels_cut_short": ("CHANNELS 3 Zrotation Xrotation Yrotation\nEnd Site\n{\nOFFSET 0 1 0\n}\n}\n}\nMOTION",
                           "CHANNELS 3"),
    "offset_not_a_number": ("OFFSET 0 1 0\nCHANNELS", "OFFSET 0 nan 0\nCHANNELS"),
    "unbalanced_open": ("}\n}\n}\nMOTION", "}\n}\nMOTION"),
    "unbalanced_close": ("}\n}\n}\nMOTION", "}\n}\n}\n}\nMOTION"),
    "brace_missing": ("JOINT Spine\n{", "JOINT Spine\n"),
    "end_without_site": ("End Site", "End Zone"),
    "joint_outside": ("ROOT Hips\n{", "JOINT Hips\n{"),
    "frames_negative": ("Frames: 2", "Frames: -2"),
    "frames_not_a_number": ("Frames: 2", "Frames: many"),
    "frame_time_zero": ("Frame Time: 0.0333", "Frame Time: 0"),
    "frame_time_nan": ("Frame Time: 0.0333", "Frame Time: nan"),
    "data_not_numbers": ("MOTION\nFrames: 2\nFrame Time: 0.0333\n0", "MOTION\nFrames: 2\nFrame Time: 0.0333\nzero"),
    "no_motion_header": ("MOTION\nFrames: 2", "MOTION\nFrame: 2"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bvh_headers_are_rejected_with_a_reason(case):
    old, new = MALFORMED[case]
    text = _good_bvh()
    assert old in text, case
    with within(2.0):
        parse_bvh(text, "good.bvh")  # the unbroken file parses
        with pytest.raises(BvhError) as err:
            parse_bvh(text.replace(old, new, 1), f"{case}.bvh")
    assert err.value.reason == "import_failed" and f"{case}.bvh" in str(err.value)


def test_a_bvh_asking_for_too_many_frames_is_not_allocated():
    # 100 joints without channels and one channel: every number of the data is a frame.
    joints = "".join(f"JOINT J{k}\n{{\nOFFSET 0 1 0\nCHANNELS 0\n" for k in range(100)) + "}\n" * 100
    text = (f"HIERARCHY\nROOT R\n{{\nOFFSET 0 0 0\nCHANNELS 1 Xrotation\n{joints}}}\nMOTION\nFrames: 300000\n"
            f"Frame Time: 0.01\n" + "0 " * 300000)
    with within(5.0), pytest.raises(BvhError) as err:
        parse_bvh(text, "wide.bvh")
    assert err.value.reason == "too_large"


def test_bvh_files_are_read_in_a_worker_with_the_import_timeout(tmp_path):
    """The real worker process (``motion_worker``): the hanging file is a reason, not a hang; a worker
    slower than the timeout is ``import_timeout``."""
    hang = tmp_path / "hang.bvh"
    hang.write_text(_bvh_91_bytes())
    with within(60):
        failed = BlenderProbe().retarget_bvh(hang, 30.0)
    assert isinstance(failed, ProbeFailure) and failed.reason == "import_failed" and "CHANNELS" in failed.detail
    slow = BlenderProbe(timeout=0.05).retarget_bvh(hang, 30.0)
    assert slow == ProbeFailure("import_timeout", "import took longer than 0 s")


@pytest.mark.slow
def test_a_build_with_the_hanging_bvh_finishes(tmp_path, capsys):
    moves = tmp_path / "moves"
    moves.mkdir()
    (moves / "hang.bvh").write_text(_bvh_91_bytes())
    (moves / "stick.bvh").write_text(_good_bvh())
    with within(120):
        assert main(["assets", "build", "--out", str(tmp_path / "out"), "--motions", str(moves), "--no-hdri",
                     "--poses", "20", "--procedural-backgrounds", "1", "--no-progress"]) == 0
    recs = {Path(r["path"]).name: r for r in mf.read_jsonl(tmp_path / "out" / "motions.jsonl", "motion")
            if r["kind"] != "builtin"}
    assert recs["hang.bvh"]["reason"] == "import_failed" and "CHANNELS" in recs["hang.bvh"]["detail"]
    assert recs["stick.bvh"]["reason"] == "not_humanoid"  # parsed fine: two bones are no human
    assert "import_failed 1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Item 8: size limits (sparse files: nothing is written to disk, nothing may be read)
# ---------------------------------------------------------------------------------------------


def _sparse(path: Path, size: int = 3 * GiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def test_a_3_gib_buffer_is_too_large_without_being_read(tmp_path):
    folder = tmp_path / "asset"
    _sparse(folder / "big.bin")
    gltf = _gltf(folder, buffers=["big.bin"])
    before, t0 = _peak_rss(), time.perf_counter()
    res = probe_gltf(gltf, max_bytes=GiB)
    assert time.perf_counter() - t0 < 1.0 and _peak_rss() - before < 200 << 20
    assert res["ok"] is False and res["reason"] == "too_large" and "3.0 GiB" in res["detail"]
    assert probe_gltf(gltf, max_bytes=4 * GiB)["ok"] is True  # the limit is a parameter


def test_big_files_are_too_large_before_any_read_or_hash(tmp_path):
    folder = tmp_path / "in"
    for name in ("huge.glb", "huge.bvh", "huge.png"):
        _sparse(folder / name)
    t0 = time.perf_counter()
    entries = {e.path.name: e for e in mf.walk_inputs([folder], [".glb", ".bvh", ".png"], GiB)}
    assert time.perf_counter() - t0 < 1.0
    assert {n: e.reason for n, e in entries.items()} == {n: "too_large" for n in ("huge.glb", "huge.bvh", "huge.png")}
    recs, _ = bg.scan_user_backgrounds([folder / "huge.png"], max_bytes=GiB)
    assert recs[0]["reason"] == "too_large" and recs[0]["sha256"] is None  # never hashed
    motions, _ = scan_motions([folder / "huge.bvh"], tmp_path / "out", probe=_NoReads(), max_bytes=GiB)
    assert motions[0]["reason"] == "too_large"


def test_the_size_limit_is_a_flag(tmp_path, capsys):
    chars = tmp_path / "chars"
    chars.mkdir()
    (chars / "a.glb").write_bytes(b"x" * 2048)
    out = tmp_path / "out"
    args = ["assets", "build", "--out", str(out), "--characters", str(chars), "--no-hdri", "--poses", "20",
            "--procedural-backgrounds", "1", "--no-progress"]
    assert main(args + ["--max-asset-size", "1K"]) == 0
    rec = mf.read_jsonl(out / "characters.jsonl", "character")[0]
    assert rec["reason"] == "too_large" and "over the limit of 1.0 KiB" in rec["detail"]
    assert "too_large 1" in capsys.readouterr().out
    for bad in ("lots", "0", "-5M"):
        with pytest.raises(SystemExit) as exc:
            main(args + ["--max-asset-size", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--max-asset-size" in err[0], err


# ---------------------------------------------------------------------------------------------
# Item 9: every file under an input folder gets a record
# ---------------------------------------------------------------------------------------------

_BONES = [{"name": j.name, "parent": j.parent, "head": list(j.head), "tail": list(j.tail)} for j in sk.JOINTS]


class _NoReads:
    """A probe that answers for ``good.*`` files like the Blender one for a clean character, and fails
    the test for anything else: entries that are not files must never reach a reader."""

    def __init__(self):
        self.calls = []
        self.body = np.random.default_rng(0).uniform([-0.3, -0.2, 0.0], [0.3, 0.2, 1.75], (300, 3))

    def _check(self, path):
        self.calls.append(Path(path).name)
        assert Path(path).stem == "good", f"the probe was asked to read {path}"

    def inspect_character(self, path, max_bytes=None):
        self._check(path)
        return {"ok": True, "format": "gltf", "armature": True, "n_bones": len(_BONES), "bones": _BONES,
                "mapping": map_skeleton(_BONES).to_json(), "meshes": [{"name": "Body", "vertices": 300}],
                "skinned": ["Body"], "bone_parented": {}, "unskinned": [], "normalise": {"scale": 1.0},
                "textures": [], "materials": [{"name": "Skin", "linked": True, "images": ["skin.png"],
                                               "colour": [1, 1, 1, 1]}],
                "fingerprint": geometry_fingerprint(self.body)}

    def sample_motions(self, path, max_fps, max_bytes=None):
        self._check(path)
        return ProbeFailure("no_armature", "no armature in the file")

    def retarget_bvh(self, path, max_fps, max_bytes=None):
        self._check(path)
        return ProbeFailure("not_humanoid", "two bones")


def _hostile_folder(tmp_path: Path, good: str) -> Path:
    d = tmp_path / "in"
    (d / "nested" / ".hidden").mkdir(parents=True)
    (tmp_path / "outside.glb").write_bytes(b"someone else's file")
    (d / good).write_bytes(b"a file the probe reads")
    (d / "mesh.obj").write_text("v 0 0 0\n")
    (d / "nested" / "dance.vrma").write_bytes(b"glTF")
    (d / "nested" / ".hidden" / "notes.txt").write_text("hidden")
    (d / "loop.glb").symlink_to("loop.glb")
    (d / "dangling.glb").symlink_to(d / "gone.glb")
    (d / "nested" / "out.glb").symlink_to(tmp_path / "outside.glb")
    (d / "nested" / "alias.glb").symlink_to(d / good)  # inside: its target has its own record
    (d / "nested" / "up").symlink_to(d)  # a folder link back up: no endless walk
    os.mkfifo(d / "pipe.glb")
    return d


EXPECTED = {"mesh.obj": "unsupported_format", "dance.vrma": "unsupported_format", "notes.txt": "unsupported_format",
            "loop.glb": "broken_link", "dangling.glb": "broken_link", "out.glb": "resource_outside_asset",
            "pipe.glb": "not_a_file"}


@pytest.mark.parametrize("scanner", ["characters", "motions", "backgrounds"])
def test_every_file_under_a_folder_gets_a_record(tmp_path, scanner):
    good = {"characters": "good.glb", "motions": "good.bvh", "backgrounds": "good.png"}[scanner]
    folder = _hostile_folder(tmp_path, good)
    probe = _NoReads()
    with within(20):  # opening the FIFO would block forever
        if scanner == "characters":
            recs = scan_characters([folder], probe=probe)
        elif scanner == "motions":
            recs, _ = scan_motions([folder], tmp_path / "out", probe=probe)
        else:
            recs, _ = bg.scan_user_backgrounds([folder])
    by = {Path(r["path"]).name: r for r in recs}
    assert len(by) == len(recs) == len(EXPECTED) + 1
    assert {n: r["reason"] for n, r in by.items() if n != good} == EXPECTED
    assert by[good]["sha256"] is not None and probe.calls in ([good], [])
    assert len({r["id"] for r in recs}) == len(recs)
    assert "outside.glb" not in by["out.glb"]["detail"]  # where the link leads is not told
    if scanner == "characters":
        assert by[good]["status"] == "accepted" and by[good]["display_name"] == f"good-{by[good]['sha256'][:6]}"


def test_the_summary_table_counts_every_reason(tmp_path, capsys):
    folder = _hostile_folder(tmp_path, "good.glb")
    with within(20):
        records = scan_characters([folder], probe=_NoReads())
    print_summary({"manifests": {"characters": records, "motions": [], "backgrounds": []}, "out": str(tmp_path),
                   "poses": {"n": 0, "per_motion": {}, "min_distance_deg": 4.0}, "timings_s": {}, "notes": []})
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if ln.startswith("characters"))
    for part in ("broken_link 2", "not_a_file 1", "resource_outside_asset 1", "unsupported_format 3"):
        assert part in row, row
    assert row.split()[1:3] == ["1", "7"]  # accepted, rejected


# ---------------------------------------------------------------------------------------------
# Blender tier: the real worker and the render path's importer
# ---------------------------------------------------------------------------------------------

_BLEND_OUTSIDE = r"""
import sys, bpy
knight, texture, out, fbx = sys.argv[1:5]
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=knight)
for img in bpy.data.images:
    if img.packed_file is not None:
        img.filepath_raw = texture   # an absolute path outside the asset's folder
        img.unpack(method="REMOVE")
        img.filepath = texture
bpy.ops.wm.save_as_mainfile(filepath=out)
bpy.ops.export_scene.fbx(filepath=fbx, path_mode="RELATIVE", embed_textures=False)  # "../private/secret.png"
"""


@pytest.mark.blender
def test_real_files_pointing_outside_are_rejected_and_never_loaded(shared_assets, tmp_path):
    from serialgen.assets_manifest.gltf_probe import read_gltf_json

    knight = shared_assets / "characters/kaykit/Knight.glb"
    doc, binary = read_gltf_json(knight)
    img = doc["images"][0]
    view = doc["bufferViews"][img.pop("bufferView")]
    pixels = binary[view.get("byteOffset", 0): view.get("byteOffset", 0) + view["byteLength"]]
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(pixels)
    img.pop("mimeType", None)
    img["uri"] = "../private/secret.png"
    doc["buffers"][0]["uri"] = "knight.bin"
    chars = tmp_path / "chars"
    chars.mkdir()
    (chars / "knight.bin").write_bytes(binary)
    (chars / "knight.gltf").write_text(json.dumps(doc))
    doc["images"][0]["uri"] = str(tmp_path / "private" / "gone.png")  # absolute, and missing
    (chars / "knight_abs.gltf").write_text(json.dumps(doc))
    blend_dir = tmp_path / "blend"
    blend_dir.mkdir()
    subprocess.run([sys.executable, "-c", _BLEND_OUTSIDE, str(knight), str(secret), str(blend_dir / "knight.blend"),
                    str(blend_dir / "knight.fbx")], check=True, capture_output=True, timeout=120)
    records = scan_characters([chars, blend_dir], probe=BlenderProbe())
    by = {Path(r["path"]).name: r for r in records}
    for name in ("knight.gltf", "knight_abs.gltf", "knight.blend", "knight.fbx"):
        assert by[name]["reason"] == "resource_outside_asset", (name, by[name]["detail"])
        assert "secret" not in json.dumps(by[name]["stats"]) and "textures" not in by[name]["stats"]
    # The render path reads the file again: its importer refuses it too.
    from serialgen.render import importers as imp

    with pytest.raises(imp.ImportFailed) as err:
        imp.import_objects(chars / "knight.gltf")
    assert err.value.reason == "resource_outside_asset"


@pytest.mark.blender
def test_worker_rejects_a_gltf_whose_resources_are_too_large(tmp_path):
    folder = tmp_path / "asset"
    _sparse(folder / "big.bin")
    gltf = _gltf(folder, buffers=["big.bin"])
    res = BlenderProbe().inspect_character(gltf, max_bytes=GiB)
    assert isinstance(res, ProbeFailure) and res.reason == "too_large"


def _knight_with_external_texture(knight: Path, folder: Path) -> Path:
    from serialgen.assets_manifest.gltf_probe import read_gltf_json

    folder.mkdir(parents=True)
    doc, binary = read_gltf_json(knight)
    img = doc["images"][0]
    view = doc["bufferViews"][img.pop("bufferView")]
    (folder / "skin.png").write_bytes(binary[view.get("byteOffset", 0): view.get("byteOffset", 0) + view["byteLength"]])
    img.pop("mimeType", None)
    img["uri"] = "skin.png"
    (folder / "knight.bin").write_bytes(binary)
    doc["buffers"][0]["uri"] = "knight.bin"
    (folder / "knight.gltf").write_text(json.dumps(doc))
    return folder / "knight.gltf"


@pytest.mark.blender
def test_a_rescan_notices_a_texture_deleted_or_swapped_for_a_link_out(shared_assets, tmp_path):
    """The character file is unchanged, its texture is not: the earlier record is not reused. A
    deleted texture falls back to the mean colour the earlier scan measured; a texture swapped for a
    link leading out is resource_outside_asset."""
    gltf = _knight_with_external_texture(shared_assets / "characters/kaykit/Knight.glb", tmp_path / "chars")
    opts = dict(probe=BlenderProbe(), allow_texture_fallback=True, allow_untextured=True)
    first = [r for r in scan_characters([gltf], **opts)]
    assert first[0]["status"] == "accepted" and first[0]["texture_fallback"] is None
    assert {r["path"] for r in first[0]["stats"]["resources"]} == {str(gltf.parent / "skin.png"),
                                                                   str(gltf.parent / "knight.bin")}
    assert scan_characters([gltf], first, **opts) == first  # nothing changed: reused
    mean = next(t["mean_linear"] for t in first[0]["stats"]["textures"] if t["status"] == "ok")
    (gltf.parent / "skin.png").unlink()
    second = scan_characters([gltf], first, **opts)
    assert second[0]["stats"]["texture_fallback"] is True
    assert second[0]["texture_fallback"][0]["colour"] == mean and second[0]["texture_fallback"][0]["source"] == "image_mean"
    (tmp_path / "private.png").write_bytes(b"\x89PNG not yours")
    (gltf.parent / "skin.png").symlink_to(tmp_path / "private.png")
    third = scan_characters([gltf], second, **opts)
    assert third[0]["reason"] == "resource_outside_asset"
