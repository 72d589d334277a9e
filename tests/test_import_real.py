"""Real characters and motions through the scanners, the Blender probe's workers and the loader (bpy).

Uses ../shared/assets (skips without it) plus files made here: a truncated GLB, a mesh without an
armature, an armature with an unskinned mesh, a glTF whose texture file is missing, copies of
characters under other names and in other encodings (a re-written GLB, a meshopt-compressed GLB,
a .blend), and a .blend whose auto-run text block would write a file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.bone_maps import MIN_JOINTS
from serialgen.assets_manifest.characters_scan import scan_characters
from serialgen.assets_manifest.gltf_probe import MESHOPT_EXT, read_gltf_json, write_glb
from serialgen.assets_manifest.motions_scan import retarget_bvh, scan_motions
from serialgen.render.asset_build import BlenderProbe

pytestmark = pytest.mark.blender
K = {n: i for i, n in enumerate(sk.KEYPOINT_NAMES)}

ACCEPTED = ["CesiumMan.glb", "Knight.glb", "Mage.glb", "Mannequin_Medium.glb",
            "Male_Casual.fbx", "Female_Dress.fbx", "RobotExpressive.glb"]
# One flat untextured colour on every visible material (grey RiggedFigure, white cryptovoxels): accepted
# only with allow_untextured.
UNTEXTURED = ["RiggedFigure.glb", "cryptovoxels.vrm"]

_BPY_FIXTURES = r"""
import sys, bpy
out, marker, knight = sys.argv[1], sys.argv[2], sys.argv[3]
def fresh():
    bpy.ops.wm.read_factory_settings(use_empty=True)
fresh()
bpy.ops.mesh.primitive_cube_add()
bpy.ops.export_scene.gltf(filepath=out + "/no_armature.glb", export_format="GLB")
fresh()
arm_data = bpy.data.armatures.new("Rig")
arm = bpy.data.objects.new("Rig", arm_data)
bpy.context.scene.collection.objects.link(arm)
bpy.context.view_layer.objects.active = arm
bpy.ops.object.mode_set(mode="EDIT")
b = arm_data.edit_bones.new("Hips"); b.head = (0, 0, 1); b.tail = (0, 0, 1.2)
bpy.ops.object.mode_set(mode="OBJECT")
bpy.ops.mesh.primitive_cube_add()
cube = bpy.context.active_object
cube.parent = arm
cube.modifiers.new("Armature", "ARMATURE").object = arm
bpy.ops.wm.save_as_mainfile(filepath=out + "/unskinned.blend")
fresh()
bpy.ops.import_scene.gltf(filepath=knight)
t = bpy.data.texts.new("autorun.py")
t.write("open(%r, 'w').write('ran')\n" % marker)
t.use_module = True
bpy.ops.wm.save_as_mainfile(filepath=out + "/knight_with_script.blend")
"""


def _meshopt_copy(src: Path, dst: Path) -> None:
    """Re-encode a GLB's vertex and index buffer views with EXT_meshopt_compression."""
    import meshopt

    doc, binary = read_gltf_json(src)
    users: dict[int, list] = {}
    for a in doc["accessors"]:
        if "bufferView" in a:
            users.setdefault(a["bufferView"], []).append(a)
    index_accessors = {p["indices"] for m in doc["meshes"] for p in m["primitives"] if "indices" in p}
    ncomp = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
    csize = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
    out = bytearray()
    for k, bv in enumerate(doc["bufferViews"]):
        acc = users.get(k, [])
        raw = binary[bv.get("byteOffset", 0): bv.get("byteOffset", 0) + bv["byteLength"]]
        ext = None
        if len(acc) == 1 and acc[0].get("byteOffset", 0) == 0 and "byteStride" not in bv:
            a = acc[0]
            size = ncomp[a["type"]] * csize[a["componentType"]]
            idx = doc["accessors"].index(a) in index_accessors
            if idx and a["count"] % 3 == 0:
                dtype = np.uint16 if size == 2 else np.uint32
                enc = meshopt.encode_gltf_buffer(np.frombuffer(raw, dtype=dtype)[: a["count"]], "TRIANGLES")
                ext = {"byteStride": size, "count": a["count"], "mode": "TRIANGLES"}
            elif not idx and size % 4 == 0 and a["type"] != "MAT4":
                rows = np.frombuffer(raw[: a["count"] * size], dtype=np.uint8).reshape(a["count"], size)
                enc = meshopt.encode_gltf_buffer(rows, "ATTRIBUTES")
                ext = {"byteStride": size, "count": a["count"], "mode": "ATTRIBUTES"}
        out += b"\0" * ((4 - len(out) % 4) % 4)
        if ext is not None:
            ext.update(buffer=0, byteOffset=len(out), byteLength=len(enc))
            out += enc
            bv.clear()
            bv.update(buffer=1, byteLength=ext["count"] * ext["byteStride"], extensions={MESHOPT_EXT[0]: ext})
        else:
            bv["buffer"], bv["byteOffset"] = 0, len(out)
            out += raw
    doc["buffers"] = [{"byteLength": len(out)},
                      {"byteLength": 1 << 24, "extensions": {MESHOPT_EXT[0]: {"fallback": True}}}]
    doc["extensionsUsed"] = sorted(set(doc.get("extensionsUsed", [])) | {MESHOPT_EXT[0]})
    doc["extensionsRequired"] = sorted(set(doc.get("extensionsRequired", [])) | {MESHOPT_EXT[0]})
    write_glb(dst, doc, bytes(out))


def _gltf_with_external_texture(src: Path, folder: Path) -> Path:
    doc, binary = read_gltf_json(src)
    img = doc["images"][0]
    bv = doc["bufferViews"][img.pop("bufferView")]
    (folder / "knight_texture.png").write_bytes(binary[bv.get("byteOffset", 0): bv.get("byteOffset", 0) + bv["byteLength"]])
    img.pop("mimeType", None)
    img["uri"] = "knight_texture.png"
    (folder / "knight.bin").write_bytes(binary)
    doc["buffers"][0]["uri"] = "knight.bin"
    path = folder / "knight_external.gltf"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def scanned(shared_assets, tmp_path_factory):
    made = tmp_path_factory.mktemp("made")
    marker = made / "SCRIPT_RAN.txt"
    chars = shared_assets / "characters"
    knight = chars / "kaykit/Knight.glb"
    subprocess.run([sys.executable, "-c", _BPY_FIXTURES, str(made), str(marker), str(knight)], check=True,
                   capture_output=True, timeout=120)
    data = (chars / "khronos/CesiumMan.glb").read_bytes()
    (made / "truncated.glb").write_bytes(data[: len(data) // 2])
    shutil.copy(knight, made / "Knight_copy_same_bytes.glb")
    doc, binary = read_gltf_json(knight)
    doc["asset"]["extras"] = {"note": "re-written copy"}
    write_glb(made / "Knight_rewritten.glb", doc, binary)
    _meshopt_copy(chars / "khronos/CesiumMan.glb", made / "CesiumMan_meshopt.glb")
    missing = made / "missing_tex"
    missing.mkdir()
    _gltf_with_external_texture(knight, missing)
    (missing / "knight_texture.png").unlink()
    records = scan_characters([chars, made], probe=BlenderProbe())
    by = {Path(r["path"]).name: r for r in records}
    untextured = scan_characters([chars / "khronos/RiggedFigure.glb", chars / "vrm/cryptovoxels.vrm"],
                                 probe=BlenderProbe(), allow_untextured=True)
    return {"records": records, "by": by, "made": made, "marker": marker, "missing": missing,
            "untextured": untextured}


def test_real_characters_accepted_or_rejected_as_documented(scanned):
    by = scanned["by"]
    for name in ACCEPTED:
        r = by[name]
        assert r["status"] == "accepted", (name, r["reason"], r["detail"])
        assert set(MIN_JOINTS) <= set(r["bone_map"]), name
        assert r["id"].startswith("char-") and r["sha256"].startswith(r["id"][5:17])
        assert 0.4 < r["stats"]["height_m"] < 3.0, name
    assert by["RiggedSimple.glb"]["reason"] == "not_humanoid"
    for name in UNTEXTURED:  # statues of one colour
        assert by[name]["reason"] == "texture_uniform" and "--allow-untextured" in by[name]["detail"], name
    assert by["Knight.glb"]["display_name"] == "Knight-e48437" and by["Knight.glb"]["id"] == "char-e48437073382"
    assert by["License.txt"]["reason"] == "unsupported_format"  # every file under the folder has a record
    # player.glb has one bone per limb: no elbows, knees, hands or feet (bone_maps.MIN_JOINTS).
    assert by["player.glb"]["reason"] == "not_humanoid" and "l_lower_arm" in by["player.glb"]["detail"]
    robot = by["RobotExpressive.glb"]
    assert {"angry", "surprised", "sad"} <= set(robot["expressions"])
    assert {b[1] for b in robot["expressions"]["angry"]} == {"Angry"}
    assert robot["stats"]["expression_families"] == {"angry": ["plain"], "surprised": ["plain"], "sad": ["plain"]}
    assert robot["stats"]["bone_parented_meshes"] > 0 and robot["stats"]["repairs"]["reparent"]
    assert by["Male_Casual.fbx"]["stats"]["alpha_fixed"] > 0 and by["Male_Casual.fbx"]["scale"] < 0.5
    untextured = {Path(r["path"]).name: r for r in scanned["untextured"]}
    assert all(untextured[name]["status"] == "accepted" for name in UNTEXTURED)
    assert untextured["cryptovoxels.vrm"]["stats"]["mapping_method"] == "vrm"
    assert abs(untextured["cryptovoxels.vrm"]["stats"]["yaw_deg"]) == 180.0
    assert untextured["cryptovoxels.vrm"]["stats"]["texture_uniform"][:3] == [1.0, 1.0, 1.0]
    assert untextured["RiggedFigure.glb"]["stats"]["texture_uniform"][:3] == [0.8, 0.8, 0.8]


def test_made_files_get_machine_readable_reasons(scanned):
    by, marker = scanned["by"], scanned["marker"]
    assert by["truncated.glb"]["reason"] == "import_failed" and "truncated" in by["truncated.glb"]["detail"]
    assert by["no_armature.glb"]["reason"] == "no_armature"
    assert by["unskinned.blend"]["reason"] == "unskinned_mesh"
    assert by["knight_external.gltf"]["reason"] == "texture_missing"
    # Copies: same bytes, re-written JSON, meshopt-compressed, and a .blend: all the same geometry.
    for name, original in (("Knight_copy_same_bytes.glb", "Knight.glb"), ("Knight_rewritten.glb", "Knight.glb"),
                           ("CesiumMan_meshopt.glb", "CesiumMan.glb"), ("knight_with_script.blend", "Knight.glb")):
        r = by[name]
        assert r["reason"] == "duplicate", (name, r["reason"], r["detail"])
        assert by[original]["id"] in r["detail"]
    assert by["CesiumMan_meshopt.glb"]["stats"]["meshopt"] is True
    assert by["knight_with_script.blend"]["kind"] == "blend"
    ids = [r["id"] for r in scanned["records"]]
    assert len(ids) == len(set(ids))
    assert not marker.exists(), "a .blend text block ran during the import"


def test_rescan_reuses_and_texture_fallback_is_opt_in(scanned):
    recs = [r for r in scanned["records"] if r["sha256"]]
    again = scan_characters([Path(r["path"]) for r in recs], recs, probe=BlenderProbe())
    assert [(r["id"], r["status"], r["reason"]) for r in again] == [(r["id"], r["status"], r["reason"]) for r in recs]
    # Knight's one material loses its only texture: drawn flat, it is a statue of one colour.
    fb = scan_characters([scanned["missing"]], probe=BlenderProbe(), allow_texture_fallback=True)
    assert next(r for r in fb if r["path"].endswith(".gltf"))["reason"] == "texture_uniform"
    fb = scan_characters([scanned["missing"]], probe=BlenderProbe(), allow_texture_fallback=True,
                         allow_untextured=True)
    rec = next(r for r in fb if r["path"].endswith(".gltf"))
    assert rec["status"] == "accepted" and rec["stats"]["texture_fallback"] is True
    # The colour to draw instead: the material's base colour (Knight's glTF factor is white).
    assert rec["texture_fallback"] == [{"image": "knight_texture", "material": "knight",
                                        "colour": [1.0, 1.0, 1.0, 1.0], "source": "base_colour"}]


def _arm_elevations(rig):
    kp, _ = rig.keypoints()
    out = []
    for s in ("l", "r"):
        d = kp[K[f"{s}_elbow"]] - kp[K[f"{s}_shoulder"]]
        out.append(float(np.degrees(np.arcsin(d[2] / np.linalg.norm(d)))))
    return out


def test_tpose_on_knight_and_a_procedural_character(scanned, shared_assets):
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character
    from serialgen.render.bpy_utils import purge_orphans, reset_scene
    from serialgen.render.characters import load_character
    from serialgen.render.procedural_build import build_character

    tpose, _ = retarget_bvh(shared_assets / "motions/makehuman/tpose.bvh")
    reset_scene()
    rig = load_character(scanned["by"]["Knight.glb"], scanned["made"] / "out")
    lo, _hi = rig.world_bounds()
    assert abs(lo[2]) < 1e-3  # feet on the ground at rest
    rig.apply_pose(tpose.angles[0], tpose.root_translation[0])
    assert all(abs(e) < 10.0 for e in _arm_elevations(rig))
    rig.apply_pose(np.zeros((len(sk.JOINTS), 3)))
    assert all(-55 < e < -35 for e in _arm_elevations(rig))  # the A-pose
    rig.remove()
    purge_orphans()
    prig = build_character(build_mesh_data(describe_character("proc-000007", 0)))
    prig.apply_pose(tpose.angles[0], tpose.root_translation[0])
    assert all(abs(e) < 10.0 for e in _arm_elevations(prig))
    prig.remove()


def test_gltf_actions_are_retargeted(shared_assets, tmp_path):
    recs, extra = scan_motions([shared_assets / "motions/kaykit/Rig_Medium_MovementBasic.glb"], tmp_path,
                               probe=BlenderProbe())
    assert recs[0]["status"] == "accepted" and recs[0]["kind"] == "gltf"
    clips = {e["name"]: e for e in extra}
    assert len(clips) == 11
    walk = clips["Rig_Medium_MovementBasic/Walking_A"]["angles"]
    fwd = []
    for a in walk:
        kp, _ = sk.compute_keypoints(sk.forward_kinematics(a))
        fwd.append(kp[K["l_ankle"], 1] - kp[K["r_ankle"], 1])
    assert min(fwd) < -0.15 and max(fwd) > 0.15
    tp = clips["Rig_Medium_MovementBasic/T-Pose"]["angles"][0]
    kp, _ = sk.compute_keypoints(sk.forward_kinematics(tp))
    d = kp[K["l_elbow"]] - kp[K["l_shoulder"]]
    assert abs(np.degrees(np.arcsin(d[2] / np.linalg.norm(d)))) < 10.0
