"""Bone-name maps, the heuristic matcher and the acceptance rule (Blender-free, synthetic rigs)."""

from __future__ import annotations

import numpy as np
import pytest

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.bone_maps import MIN_JOINTS, facing_yaw_degrees, map_skeleton, split_name
from serialgen.assets_manifest.expressions import map_expressions

CORE = ["pelvis", "spine", "chest", "neck", "head", "l_clavicle", "l_upper_arm", "l_lower_arm", "l_hand",
        "r_clavicle", "r_upper_arm", "r_lower_arm", "r_hand", "l_upper_leg", "l_lower_leg", "l_foot", "l_toe",
        "r_upper_leg", "r_lower_leg", "r_foot", "r_toe"]


def _rig(names: dict[str, str], *, rotate_z: float = 0.0, scale: float = 1.0, extra=()) -> list[dict]:
    """Canonical A-pose skeleton renamed by ``names`` (canonical joint -> bone name); joints not in
    ``names`` are dropped (children re-hung on the nearest kept ancestor)."""
    c, s = np.cos(np.deg2rad(rotate_z)), np.sin(np.deg2rad(rotate_z))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    joints = {j.name: j for j in sk.JOINTS}
    out = []
    for j in sk.JOINTS:
        if j.name not in names:
            continue
        p = j.parent
        while p is not None and p not in names:
            p = joints[p].parent
        out.append({"name": names[j.name], "parent": names.get(p) if p else None,
                    "head": (rz @ np.array(j.head) * scale).tolist(), "tail": (rz @ np.array(j.tail) * scale).tolist()})
    return out + list(extra)


MIXAMO = {"pelvis": "mixamorig:Hips", "spine": "mixamorig:Spine", "chest": "mixamorig:Spine2",
          "neck": "mixamorig:Neck", "head": "mixamorig:Head"}
for _s, _w in (("l", "Left"), ("r", "Right")):
    MIXAMO.update({f"{_s}_clavicle": f"mixamorig:{_w}Shoulder", f"{_s}_upper_arm": f"mixamorig:{_w}Arm",
                   f"{_s}_lower_arm": f"mixamorig:{_w}ForeArm", f"{_s}_hand": f"mixamorig:{_w}Hand",
                   f"{_s}_upper_leg": f"mixamorig:{_w}UpLeg", f"{_s}_lower_leg": f"mixamorig:{_w}Leg",
                   f"{_s}_foot": f"mixamorig:{_w}Foot", f"{_s}_toe": f"mixamorig:{_w}ToeBase",
                   f"{_s}_index1": f"mixamorig:{_w}HandIndex1", f"{_s}_index2": f"mixamorig:{_w}HandIndex2"})
BIPED = {"pelvis": "Bip01 Pelvis", "spine": "Bip01 Spine", "chest": "Bip01 Spine1", "neck": "Bip01 Neck",
         "head": "Bip01 Head"}
for _s in ("l", "r"):
    S = _s.upper()
    BIPED.update({f"{_s}_clavicle": f"Bip01 {S} Clavicle", f"{_s}_upper_arm": f"Bip01 {S} UpperArm",
                  f"{_s}_lower_arm": f"Bip01 {S} Forearm", f"{_s}_hand": f"Bip01 {S} Hand",
                  f"{_s}_upper_leg": f"Bip01 {S} Thigh", f"{_s}_lower_leg": f"Bip01 {S} Calf",
                  f"{_s}_foot": f"Bip01 {S} Foot", f"{_s}_toe": f"Bip01 {S} Toe0",
                  f"{_s}_thumb1": f"Bip01 {S} Finger0", f"{_s}_thumb2": f"Bip01 {S} Finger01",
                  f"{_s}_index1": f"Bip01 {S} Finger1"})
RIGIFY = {"pelvis": "DEF-spine", "spine": "DEF-spine.001", "chest": "DEF-spine.003", "neck": "DEF-spine.004",
          "head": "DEF-spine.006"}
for _s in ("l", "r"):
    S = _s.upper()
    RIGIFY.update({f"{_s}_clavicle": f"DEF-shoulder.{S}", f"{_s}_upper_arm": f"DEF-upper_arm.{S}",
                   f"{_s}_lower_arm": f"DEF-forearm.{S}", f"{_s}_hand": f"DEF-hand.{S}",
                   f"{_s}_upper_leg": f"DEF-thigh.{S}", f"{_s}_lower_leg": f"DEF-shin.{S}",
                   f"{_s}_foot": f"DEF-foot.{S}", f"{_s}_toe": f"DEF-toe.{S}"})
UNREAL = {"pelvis": "pelvis", "spine": "spine_01", "chest": "spine_03", "neck": "neck_01", "head": "head"}
KAYKIT = {"pelvis": "hips", "spine": "spine", "chest": "chest", "head": "head"}
VROID = {"pelvis": "J_Bip_C_Hips", "spine": "J_Bip_C_Spine", "chest": "J_Bip_C_UpperChest",
         "neck": "J_Bip_C_Neck", "head": "J_Bip_C_Head"}
for _s in ("l", "r"):
    KAYKIT.update({f"{_s}_upper_arm": f"upperarm.{_s}", f"{_s}_lower_arm": f"lowerarm.{_s}",
                   f"{_s}_hand": f"wrist.{_s}", f"{_s}_upper_leg": f"upperleg.{_s}",
                   f"{_s}_lower_leg": f"lowerleg.{_s}", f"{_s}_foot": f"foot.{_s}", f"{_s}_toe": f"toes.{_s}"})
    UNREAL.update({f"{_s}_clavicle": f"clavicle_{_s}", f"{_s}_upper_arm": f"upperarm_{_s}",
                   f"{_s}_lower_arm": f"lowerarm_{_s}", f"{_s}_hand": f"hand_{_s}", f"{_s}_upper_leg": f"thigh_{_s}",
                   f"{_s}_lower_leg": f"calf_{_s}", f"{_s}_foot": f"foot_{_s}", f"{_s}_toe": f"ball_{_s}"})
    S = _s.upper()
    VROID.update({f"{_s}_clavicle": f"J_Bip_{S}_Shoulder", f"{_s}_upper_arm": f"J_Bip_{S}_UpperArm",
                  f"{_s}_lower_arm": f"J_Bip_{S}_LowerArm", f"{_s}_hand": f"J_Bip_{S}_Hand",
                  f"{_s}_upper_leg": f"J_Bip_{S}_UpperLeg", f"{_s}_lower_leg": f"J_Bip_{S}_LowerLeg",
                  f"{_s}_foot": f"J_Bip_{S}_Foot", f"{_s}_toe": f"J_Bip_{S}_ToeBase"})
QUATERNIUS = {"pelvis": "Hips", "spine": "Abdomen", "chest": "Torso", "neck": "Neck", "head": "Head"}
for _s in ("l", "r"):
    S = _s.upper()
    QUATERNIUS.update({f"{_s}_clavicle": f"Shoulder.{S}", f"{_s}_upper_arm": f"UpperArm.{S}",
                       f"{_s}_lower_arm": f"LowerArm.{S}", f"{_s}_hand": f"Palm.{S}", f"{_s}_upper_leg": f"UpperLeg.{S}",
                       f"{_s}_lower_leg": f"LowerLeg.{S}", f"{_s}_foot": f"Foot.{S}"})
UNPREFIXED = {k: v.split(":")[1] for k, v in MIXAMO.items()}


@pytest.mark.parametrize("table", [MIXAMO, UNPREFIXED, BIPED, RIGIFY, UNREAL, KAYKIT, VROID, QUATERNIUS],
                         ids=["mixamo", "mixamo_unprefixed", "biped", "rigify", "unreal", "kaykit", "vroid", "quaternius"])
def test_name_conventions_map_exactly(table):
    bones = _rig(table, extra=[{"name": "HeadTop_End", "parent": table["head"], "head": [0, 0, 1.75],
                                "tail": [0, 0, 1.8]}])
    res = map_skeleton(bones)
    assert res.accepted, res.detail
    assert res.method == "names"
    for joint, bone in table.items():
        assert res.bone_map.get(joint) == bone, (joint, res.bone_map.get(joint), bone)
    assert "HeadTop_End" not in res.bone_map.values()
    assert res.yaw_deg == 0.0


def test_generic_names_are_split_by_geometry_and_torso_from_structure():
    # CesiumMan-style: arm_joint_L_1..3, leg_joint_L_1..4, torso_joint_1..3, neck_joint_1..2 (no head).
    names = {"pelvis": "torso_joint_1", "spine": "torso_joint_2", "chest": "torso_joint_3",
             "neck": "neck_joint_1", "head": "neck_joint_2"}
    for s in ("l", "r"):
        S = s.upper()
        names.update({f"{s}_upper_arm": f"arm_joint_{S}_1", f"{s}_lower_arm": f"arm_joint_{S}_2",
                      f"{s}_hand": f"arm_joint_{S}_3", f"{s}_upper_leg": f"leg_joint_{S}_1",
                      f"{s}_lower_leg": f"leg_joint_{S}_2", f"{s}_foot": f"leg_joint_{S}_3",
                      f"{s}_toe": f"leg_joint_{S}_5"})
    res = map_skeleton(_rig(names))
    assert res.accepted, res.detail
    assert res.bone_map == names


def test_unknown_names_use_the_heuristic_and_facing_is_found():
    rename = {j: f"b{k:02d}" for k, j in enumerate(CORE)}
    res = map_skeleton(_rig(rename))
    assert res.accepted and res.method == "heuristic", res.detail
    for j in MIN_JOINTS:
        assert res.bone_map[j] == rename[j], j
    # The same rig facing +Y: toes point +Y, so sides swap and the yaw is 180 degrees.
    res2 = map_skeleton(_rig(rename, rotate_z=180.0))
    assert res2.accepted, res2.detail
    assert res2.bone_map["l_hand"] == rename["l_hand"]
    assert abs(abs(res2.yaw_deg) - 180.0) < 1e-6


def test_vrm_humanoid_table_wins_and_vrm0_faces_plus_y():
    names = {"pelvis": "Hips", "spine": "Spine", "chest": "Chest", "neck": "Neck", "head": "Head"}
    for s, word in (("l", "Left"), ("r", "Right")):
        names.update({f"{s}_clavicle": f"{word} shoulder", f"{s}_upper_arm": f"{word} arm",
                      f"{s}_lower_arm": f"{word} elbow", f"{s}_hand": f"{word} wrist",
                      f"{s}_upper_leg": f"{word} leg", f"{s}_lower_leg": f"{word} knee", f"{s}_foot": f"{word} ankle"})
    bones = _rig(names, rotate_z=180.0)
    human = {"hips": "Hips", "spine": "Spine", "chest": "Chest", "neck": "Neck", "head": "Head"}
    for word, s in (("left", "l"), ("right", "r")):
        human.update({f"{word}Shoulder": names[f"{s}_clavicle"], f"{word}UpperArm": names[f"{s}_upper_arm"],
                      f"{word}LowerArm": names[f"{s}_lower_arm"], f"{word}Hand": names[f"{s}_hand"],
                      f"{word}UpperLeg": names[f"{s}_upper_leg"], f"{word}LowerLeg": names[f"{s}_lower_leg"],
                      f"{word}Foot": names[f"{s}_foot"]})
    res = map_skeleton(bones, vrm_humanoid=human)
    assert res.accepted and res.method == "vrm"
    assert res.bone_map == names
    assert abs(res.yaw_deg) == 180.0
    # Names alone resolve the ambiguous "Left leg" (thigh, since "Left knee" is below it) too.
    res_names = map_skeleton(bones)
    assert res_names.accepted and res_names.bone_map["l_upper_leg"] == "Left leg"
    assert res_names.bone_map["l_lower_leg"] == "Left knee"


def test_mixamo_leg_is_the_shin_when_upleg_exists():
    res = map_skeleton(_rig(UNPREFIXED))
    assert res.bone_map["l_lower_leg"] == "LeftLeg" and res.bone_map["l_upper_leg"] == "LeftUpLeg"


def test_missing_clavicles_and_neck_are_allowed():
    res = map_skeleton(_rig(KAYKIT))
    assert res.accepted
    assert "neck" not in res.bone_map and "l_clavicle" not in res.bone_map


def test_seven_bone_block_character_is_rejected():
    # Kenney player.glb layout: root, torso, head and one bone per limb.
    bones = [
        {"name": "root", "parent": None, "head": [0, 0, 0], "tail": [0, 0, 0.18]},
        {"name": "leg-left", "parent": "root", "head": [0.08, 0, 0.18], "tail": [0.08, 0, 0.35]},
        {"name": "leg-right", "parent": "root", "head": [-0.08, 0, 0.18], "tail": [-0.08, 0, 0.35]},
        {"name": "torso", "parent": "root", "head": [0, 0, 0.18], "tail": [0, 0, 0.33]},
        {"name": "arm-left", "parent": "torso", "head": [0.1, 0, 0.29], "tail": [0.1, 0, 0.44]},
        {"name": "arm-right", "parent": "torso", "head": [-0.1, 0, 0.29], "tail": [-0.1, 0, 0.44]},
        {"name": "head", "parent": "torso", "head": [0, 0, 0.34], "tail": [0, 0, 0.49]},
    ]
    res = map_skeleton(bones)
    assert not res.accepted and res.reason == "not_humanoid"
    assert "l_lower_arm" in res.missing and "l_lower_leg" in res.missing


def test_quadruped_and_bent_cylinder_are_rejected():
    # A dog: spine horizontal, four legs down to the ground, named like a humanoid would be.
    def bone(n, p, h, t):
        return {"name": n, "parent": p, "head": h, "tail": t}

    dog = [bone("hips", None, [0, 0.3, 0.5], [0, 0.1, 0.5]), bone("spine", "hips", [0, 0.1, 0.5], [0, -0.2, 0.5]),
           bone("chest", "spine", [0, -0.2, 0.5], [0, -0.35, 0.55]), bone("neck", "chest", [0, -0.35, 0.55], [0, -0.45, 0.7]),
           bone("head", "neck", [0, -0.45, 0.7], [0, -0.6, 0.7])]
    for s, x in (("l", 0.1), ("r", -0.1)):
        for part, y, parent in (("upperarm", -0.3, "chest"), ("upperleg", 0.3, "hips")):
            low = part.replace("upper", "lower")
            end = "hand" if "arm" in part else "foot"
            dog += [bone(f"{part}.{s}", parent, [x, y, 0.5], [x, y, 0.3]), bone(f"{low}.{s}", f"{part}.{s}", [x, y, 0.3], [x, y, 0.08]),
                    bone(f"{end}.{s}", f"{low}.{s}", [x, y, 0.08], [x, y - 0.05, 0.0])]
    res = map_skeleton(dog)
    assert not res.accepted and res.reason == "not_humanoid"
    cyl = [bone("Bone", None, [0, 0, 0], [0, 4.2, 0]), bone("Bone.001", "Bone", [0, 4.2, 0], [0, 8.4, 0])]
    res = map_skeleton(cyl)
    assert not res.accepted and res.reason == "not_humanoid"


def test_split_name_reads_sides_and_stems():
    cases = {
        "mixamorig:LeftUpLeg": ("l", "upleg"), "Bip01 R Forearm": ("r", "forearm"), "upperarm.l": ("l", "upperarm"),
        "UpperArmL": ("l", "upperarm"), "DEF-forearm.R": ("r", "forearm"), "J_Bip_L_Hand": ("l", "hand"),
        "lShldr": ("l", "shldr"), "LHipJoint": ("l", "hip"), "leg-left": ("l", "leg"), "Left knee": ("l", "knee"),
        "thigh_r": ("r", "thigh"), "arm_joint_L__4_": ("l", "arm"), "Hips": (None, "hips"),
    }
    for name, (side, stem) in cases.items():
        info = split_name(name)
        assert (info.side, info.stem) == (side, stem), name
    assert split_name("HeadTop_End").ignored and split_name("__Clavicle_L").ignored
    assert split_name("PoleTarget.L").ignored and split_name("handslot.r").ignored


def test_facing_yaw_snaps_to_quarter_turns():
    heads = {"l_upper_arm": np.array([0.0, 0.2, 1.4]), "r_upper_arm": np.array([0.0, -0.2, 1.4])}
    assert facing_yaw_degrees(heads) == -90.0  # left at +Y: turn -90 degrees to bring it to +X


def test_expression_names_map_to_our_set():
    keys = {"Face": ["Basis", "mouthSmileLeft", "mouthSmileRight", "jawOpen", "eyeBlinkLeft", "eyeBlinkRight",
                     "browDownLeft", "browDownRight", "mouthFrownLeft", "mouthFrownRight", "browInnerUp",
                     "eyeWideLeft", "eyeWideRight"],
            "Head_2": ["Angry", "Surprised", "Sad"]}
    out = map_expressions(keys)
    assert out["neutral"] == []
    assert [b[1] for b in out["smile"]] == ["mouthSmileLeft", "mouthSmileRight"]
    assert [b[1] for b in out["open_mouth"]] == ["jawOpen"]
    assert [b[1] for b in out["blink"]] == ["eyeBlinkLeft", "eyeBlinkRight"]
    assert {b[0] for b in out["angry"]} == {"Face"}  # ARKit rule first, on the mesh that has it
    assert map_expressions({"M": ["Fcl_ALL_Joy", "Fcl_MTH_A", "Fcl_EYE_Close"]})["smile"] == [["M", "Fcl_ALL_Joy", 1.0]]
    plain = map_expressions({"Head_2": ["Angry", "Surprised", "Sad"]})
    assert set(plain) == {"neutral", "angry", "surprised", "sad"}
    vrm = map_expressions({"Body": ["Fcl_X"]}, [{"preset": "joy", "binds": [{"mesh": "Body", "key": "Fcl_X", "weight": 1.0}]}])
    assert vrm["smile"] == [["Body", "Fcl_X", 1.0]]
