"""Shape key names -> our expressions (issue 13 item 4): every naming family on keys made here.

The fast tests map name lists; the Blender test puts each family's keys as morph targets on a real
character (Knight), exports it, and scans it through the Blender probe, so the names travel through
glTF, Blender's importer and the worker exactly as a user's file would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serialgen.assets_manifest.expressions import map_expressions, parse_key

ALL = {"smile", "open_mouth", "angry", "surprised", "sad", "blink"}

# family -> (the keys of one rig, the expressions they must give, the family tags of those)
FAMILIES = {
    "namespace_and_suffix": (["Head.MouthOpen_K8", "LsmileOpen_K8", "RsmileOpen_K8", "Head.Angry_K8",
                              "Face:Surprised_K8", "grp|Sad_K8", "Head.Blink_L_K8", "Head.Blink_R_K8"], ALL),
    "facs_separators_words": (["AU_12_LipCornerPuller", "AU_26_JawDrop", "AU_04_BrowLowerer", "AU_01_InnerBrowRaiser",
                               "AU_02_OuterBrowRaiser", "AU_05_UpperLidRaiser", "AU_15_LipCornerDepressor",
                               "AU_45_Blink"], ALL),
    "arkit_numbered": (["AK_44_MouthSmileLeft", "AK_45_MouthSmileRight", "AK_25_JawOpen", "AK_01_BrowDownLeft",
                        "AK_02_BrowDownRight", "AK_30_MouthFrownLeft", "AK_31_MouthFrownRight", "AK_03_BrowInnerUp",
                        "AK_21_EyeWideLeft", "AK_22_EyeWideRight", "AK_09_EyeBlinkLeft", "AK_10_EyeBlinkRight"], ALL),
    "visemes": (["AA_VI_00_sil", "AA_VI_10_aa", "AA_VI_13_oh"], {"open_mouth"}),
    "halves": (["Smile_L", "Smile_R", "Angry.L", "Angry.R", "Left_Sad", "Right_Sad", "eyeBlink_L", "eyeBlink_R"],
               {"smile", "angry", "sad", "blink"}),
    "mmd": (["まばたき", "笑い", "にっこり", "あ", "怒り", "びっくり", "困る", "口角下げ", "ウィンク", "ウィンク右"], ALL),
}
TAGS = {"namespace_and_suffix": "namespaced", "facs_separators_words": "facs", "arkit_numbered": "arkit_numbered",
        "visemes": "viseme", "halves": "halves", "mmd": "mmd"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_maps(family):
    keys, expected = FAMILIES[family]
    out, families = map_expressions({"Face": keys}, with_families=True)
    assert set(out) - {"neutral"} == expected, out
    bound = {k for binds in out.values() for _mesh, k, _w in binds}
    assert bound <= set(keys)
    assert all(TAGS[family] in families[e] for e in expected), families


def test_halves_are_bound_together_and_one_half_alone_is_nothing():
    out = map_expressions({"Face": ["LsmileOpen_x", "RsmileOpen_x"]})
    assert out["smile"] == [["Face", "LsmileOpen_x", 1.0], ["Face", "RsmileOpen_x", 1.0]]
    assert "smile" not in map_expressions({"Face": ["LsmileOpen_x"]})  # a smirk is no smile
    assert map_expressions({"Face": ["ウィンク", "ウィンク右"]})["blink"] == [["Face", "ウィンク", 1.0],
                                                                             ["Face", "ウィンク右", 1.0]]


def test_mmd_names_are_not_empty_any_more():
    assert parse_key("まばたき") == ("blink", None, ["mmd"])
    assert parse_key("ｳｨﾝｸ右") == ("wink", "r", ["mmd"])  # half-width katakana (NFKC)
    out = map_expressions({"Face": ["あ", "にっこり", "笑い"]})
    assert out["open_mouth"] == [["Face", "あ", 1.0]]
    assert out["smile"] == [["Face", "にっこり", 1.0], ["Face", "笑い", 1.0]]  # mouth and eyes


def test_words_that_are_not_our_expressions_stay_unmapped():
    keys = ["Basis", "Eye_Open_L", "Eye_Open_R", "MouthLeft", "jawLeft", "eyeLookInLeft", "Lips_Pucker", "Fun_Hat",
            "A_Pose_Fix", "mouthClose", "cheekPuff"]
    assert map_expressions({"Face": keys}) == {"neutral": []}


def test_earlier_families_still_map():
    arkit = map_expressions({"Face": ["mouthSmileLeft", "mouthSmileRight", "jawOpen", "eyeBlinkLeft", "eyeBlinkRight"]})
    assert [b[1] for b in arkit["smile"]] == ["mouthSmileLeft", "mouthSmileRight"]
    vroid = map_expressions({"M": ["Fcl_ALL_Joy", "Fcl_MTH_A", "Fcl_EYE_Close"]})
    assert vroid["smile"] == [["M", "Fcl_ALL_Joy", 1.0]] and vroid["blink"] == [["M", "Fcl_EYE_Close", 1.0]]
    assert map_expressions({"M": ["AU12", "vrc.v_aa"]})["open_mouth"] == [["M", "vrc.v_aa", 1.0]]


_MAKE = r"""
import json, sys, bpy
knight, out_dir, families = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for family, keys in families.items():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=knight)
    body = max((o for o in bpy.data.objects if o.type == "MESH"), key=lambda o: len(o.data.vertices))
    body.shape_key_add(name="Basis")
    for k, name in enumerate(keys):
        key = body.shape_key_add(name=name)
        key.data[k].co.z += 0.01  # a morph target glTF keeps
    bpy.ops.export_scene.gltf(filepath=f"{out_dir}/{family}.glb", export_format="GLB", export_morph=True)
"""


@pytest.mark.blender
def test_families_survive_a_real_import(shared_assets, tmp_path):
    from serialgen.assets_manifest.characters_scan import scan_characters
    from serialgen.render.asset_build import BlenderProbe

    families = {f: keys for f, (keys, _e) in FAMILIES.items()}
    subprocess.run([sys.executable, "-c", _MAKE, str(shared_assets / "characters/kaykit/Knight.glb"), str(tmp_path),
                    json.dumps(families)], check=True, capture_output=True, timeout=300)
    for family, (keys, expected) in FAMILIES.items():
        rec = scan_characters([tmp_path / f"{family}.glb"], probe=BlenderProbe())[0]
        assert rec["status"] == "accepted", (family, rec["detail"])
        assert set(rec["expressions"]) - {"neutral"} == expected, (family, rec["expressions"])
        assert all(TAGS[family] in rec["stats"]["expression_families"][e] for e in expected), family
        assert {k for ks in rec["stats"]["shape_keys"].values() for k in ks} == set(keys)
        assert Path(rec["path"]).name == f"{family}.glb"
