"""Procedural characters (anny): deterministic descriptions and meshes, visible variety, the baked
canonical A-pose, the bone map, sparse expressions, the npz format; and the Blender-free
rig-alignment math that CharacterRig uses."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from serialgen.assets_manifest import procedural as pr
from serialgen.assets_manifest import rig_alignment as ra
from serialgen.assets_manifest import skeleton as sk

IDS = [f"proc-{i:06d}" for i in range(8)]


@pytest.fixture(scope="module")
def built():
    """Eight characters, described and built once per test module (one anny model per process).
    ~3.5 s, about a minute more on a machine without anny's cache (~/.cache/anny): the tests that use
    it are ``slow``."""
    out = {}
    for cid in IDS:
        desc = pr.describe_character(cid, 7)
        out[cid] = (desc, pr.build_mesh_data(desc))
    return out


def test_description_is_deterministic_and_json():
    a = pr.describe_character("proc-000123", 0)
    b = pr.describe_character("proc-000123", 0)
    assert a == b
    assert json.loads(json.dumps(a)) == a
    assert pr.describe_character("proc-000124", 0) != a
    assert pr.describe_character("proc-000123", 1) != a
    assert set(a["phenotype"]) == {"gender", "age", "muscle", "weight", "height", "proportions"}
    assert all(0.0 <= v <= 1.0 for v in a["phenotype"].values())
    assert {"neutral", "smile", "open_mouth"} <= set(a["expressions"]) and len(a["expressions"]) >= 4


def test_descriptions_cover_ages_styles_and_outfits():
    descs = [pr.describe_character(f"proc-{i:06d}", 0) for i in range(200)]
    groups = {d["age_group"] for d in descs}
    assert groups == {"child", "teen", "adult", "elderly"}
    assert {d["hair"]["style"] for d in descs} == set(pr.HAIR_STYLES)
    assert {d["clothing"]["outfit"] for d in descs} == {"dress", "top_bottom"}
    assert {d["clothing"]["top"]["pattern"] for d in descs} == set(pr.PATTERNS)
    ages = np.array([d["age_years"] for d in descs])
    assert ages.min() < 8 and ages.max() > 75
    assert len({d["skin"]["tone_index"] for d in descs}) == len(pr.SKIN_TONES)


def test_bad_id_is_rejected():
    with pytest.raises(ValueError, match="non-empty string"):
        pr.describe_character("", 0)


@pytest.mark.slow
def test_same_id_and_seed_give_the_same_mesh(built):
    desc, mesh = built[IDS[0]]
    again = pr.build_mesh_data(pr.describe_character(IDS[0], 7))
    assert pr.mesh_hash(again) == pr.mesh_hash(mesh)
    assert pr.mesh_hash(built[IDS[1]][1]) != pr.mesh_hash(mesh)


@pytest.mark.slow
def test_eight_characters_differ_measurably(built):
    stats = {cid: pr.mesh_stats(m) for cid, (_, m) in built.items()}
    heights = np.array([s["height_m"] for s in stats.values()])
    assert heights.max() - heights.min() > 0.15, heights
    assert np.all((heights > 0.9) & (heights < 2.15)), heights
    hips = np.array([s["hip_width_m"] for s in stats.values()])
    assert hips.max() - hips.min() > 0.03, hips
    for a, b in combinations(IDS, 2):
        sa, sb = stats[a], stats[b]
        ma, mb = built[a][1], built[b][1]
        shape = max(abs(sa["height_m"] - sb["height_m"]), abs(sa["hip_width_m"] - sb["hip_width_m"]),
                    abs(sa["shoulder_width_m"] - sb["shoulder_width_m"]))
        colour = np.abs(ma.region_colors - mb.region_colors).max()
        assert shape > 0.01 or colour > 0.1, (a, b)
    tops = {tuple(np.round(m.region_colors[pr.REGION_NAMES.index("top")], 2)) for _, m in built.values()}
    skins = {tuple(np.round(m.region_colors[0], 2)) for _, m in built.values()}
    assert len(tops) >= 5 and len(skins) >= 4


@pytest.mark.slow
def test_mesh_is_in_the_canonical_a_pose_feet_down_facing_minus_y(built):
    for cid, (desc, m) in built.items():
        idx = {n: i for i, n in enumerate(m.bone_names)}
        assert abs(float(m.vertices[:, 2].min())) < 1e-5
        for side in ("L", "R"):
            d = m.bone_heads[idx[f"lowerarm01.{side}"]] - m.bone_heads[idx[f"upperarm01.{side}"]]
            below = np.degrees(np.arctan2(-d[2], np.hypot(d[0], d[1])))
            assert abs(below - 45.0) < 1.0, (cid, side, below)
            assert (d[0] > 0) == (side == "L")  # character's left is +X
        assert m.face_landmarks["nose"][1] < -0.3  # the face looks along -Y
        assert m.face_landmarks["l_eye"][0] > 0 > m.face_landmarks["r_eye"][0]


@pytest.mark.slow
def test_bone_map_covers_required_joints_and_fingers(built):
    _, m = built[IDS[0]]
    assert set(sk.REQUIRED_JOINTS) <= set(m.bone_map)
    assert set(sk.HAND_JOINTS) <= set(m.bone_map)
    assert set(m.bone_map.values()) <= set(m.bone_names)
    assert len(set(m.bone_map.values())) == len(m.bone_map)
    assert (m.weight_indices.max() < len(m.bone_names)) and np.allclose(m.weight_values.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_expressions_are_sparse_and_on_the_face(built):
    _, m = built[IDS[2]]
    idx = {n: i for i, n in enumerate(m.bone_names)}
    shoulder_z = m.bone_heads[idx["upperarm01.L"], 2]
    for name in ("smile", "open_mouth", "blink"):
        vi, delta = m.expression(name)
        assert 30 < len(vi) < len(m.vertices) // 4, name
        assert np.all(m.vertices[vi, 2] > shoulder_z), name
        assert np.linalg.norm(delta, axis=1).max() > 0.003, name


@pytest.mark.slow
def test_regions_and_parts(built):
    for cid, (desc, m) in built.items():
        present = {pr.REGION_NAMES[r] for r in np.unique(m.face_region)}
        assert {"skin", "top", "bottom", "shoes", "iris", "pupil", "sclera"} <= present, (cid, present)
        names = {p.name for p in m.parts}
        assert ("hair" in names) == (desc["hair"]["style"] != "bald" or "hair" in names)
        assert ("skirt" in names) == (desc["clothing"]["bottom"]["style"] == "skirt")
        for p in m.parts:
            assert p.faces.max() < len(p.vertices) and np.allclose(p.weight_values.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_save_load_round_trip_and_bad_files(built, tmp_path):
    _, m = built[IDS[3]]
    path = pr.save_mesh_data(m, tmp_path / "m.npz")
    again = pr.load_mesh_data(path)
    assert pr.mesh_hash(again) == pr.mesh_hash(m)
    assert path.stat().st_size < 2_500_000
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        pr.load_mesh_data(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="meta_json"):
        pr.load_mesh_data(tmp_path / "other.npz")


# --- rig alignment (pure numpy) ---------------------------------------------------------------


def _t_pose_rig(rng):
    """The canonical skeleton with the arms raised to a T-pose and random bone rolls."""
    names = list(sk.JOINT_NAMES)
    parents = np.array([sk.JOINT_INDEX[j.parent] if j.parent else -1 for j in sk.JOINTS])
    heads = np.array([j.head for j in sk.JOINTS], dtype=np.float64)
    tails = np.array([j.tail for j in sk.JOINTS], dtype=np.float64)
    for side, sign in (("l", 1.0), ("r", -1.0)):
        pivot = heads[sk.JOINT_INDEX[f"{side}_upper_arm"]].copy()
        rot = sk.axis_angle_matrix([0.0, 1.0, 0.0], -45.0 * sign)  # arm up to horizontal
        for j, name in enumerate(names):
            if name.startswith(side + "_") and any(k in name for k in ("arm", "hand", "thumb", "index",
                                                                         "middle", "ring", "pinky")):
                heads[j] = pivot + rot @ (heads[j] - pivot)
                tails[j] = pivot + rot @ (tails[j] - pivot)
    rots = []
    for h, t in zip(heads, tails):
        y = (t - h) / np.linalg.norm(t - h)
        x = np.cross(y, rng.normal(size=3))
        x /= np.linalg.norm(x)
        rots.append(np.stack([x, y, np.cross(x, y)], axis=1))
    return names, parents, heads, tails, np.array(rots)


def test_swing_rotation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = ra.swing_rotation(a, b)
        assert np.allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b), atol=1e-9)
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-9)
    assert np.allclose(ra.swing_rotation([1, 0, 0], [-1, 0, 0]) @ [1, 0, 0], [-1, 0, 0])


def test_alignment_poses_a_t_pose_rig_like_the_canonical_skeleton():
    rng = np.random.default_rng(1)
    names, parents, heads, tails, rots = _t_pose_rig(rng)
    al = ra.build_alignment(names, parents, heads, tails, rots, {n: n for n in names})
    for trial in range(5):
        angles = np.zeros((len(sk.JOINTS), 3)) if trial == 0 else sk.clamp_to_limits(rng.normal(0, 40, (len(sk.JOINTS), 3)))
        w, h = ra.pose_bones(al, ra.canonical_world_rotations(angles), (0.1, 0.0, 0.05))
        ref = sk.forward_kinematics(angles, (0.1, 0.0, 0.05))
        body = [sk.JOINT_INDEX[j] for j in sk.REQUIRED_JOINTS]
        assert np.allclose(h[body], ref.heads[body], atol=1e-6), trial
        for j in body:
            assert np.allclose(ra.canonical_rotation_of(al, j, w[j]), ref.world_rot[j], atol=1e-6)


def test_alignment_rejects_unknown_bones():
    names, parents, heads, tails, rots = _t_pose_rig(np.random.default_rng(2))
    with pytest.raises(ValueError, match="not_a_bone"):
        ra.build_alignment(names, parents, heads, tails, rots, {"pelvis": "not_a_bone"})
    with pytest.raises(ValueError, match="unknown canonical joint"):
        ra.build_alignment(names, parents, heads, tails, rots, {"tail": "pelvis"})


def test_spine_rotation_is_spread_over_unmapped_segments():
    """An extra unmapped bone between pelvis and spine turns by half the spine's rotation."""
    names, parents, heads, tails, rots = _t_pose_rig(np.random.default_rng(3))
    p, sp = sk.JOINT_INDEX["pelvis"], sk.JOINT_INDEX["spine"]
    names = names + ["lumbar"]
    parents = np.append(parents, p)
    heads = np.vstack([heads, heads[sp]])
    tails = np.vstack([tails, heads[sp] + [0.0, 0.0, 0.05]])
    rots = np.concatenate([rots, np.eye(3)[None]])
    parents[sp] = len(names) - 1
    al = ra.build_alignment(names, parents, heads, tails, rots, {n: n for n in sk.JOINT_NAMES})
    angles = np.zeros((len(sk.JOINTS), 3))
    angles[sp, 0] = 60.0
    w, _ = ra.pose_bones(al, ra.canonical_world_rotations(angles))
    lumbar = len(names) - 1
    rel = w[lumbar] @ rots[lumbar].T
    assert np.isclose(np.degrees(np.arccos((np.trace(rel) - 1) / 2)), 30.0, atol=1e-6)
    assert np.allclose(ra.canonical_rotation_of(al, sp, w[sp]), sk.axis_angle_matrix([1, 0, 0], 60.0), atol=1e-9)
    r = sk.axis_angle_matrix([0.3, -0.5, 0.8] / np.linalg.norm([0.3, -0.5, 0.8]), 170.0)
    assert np.allclose(ra.fractional_rotation(r, 1.0), r, atol=1e-9)
    half = ra.fractional_rotation(r, 0.5)
    assert np.allclose(half @ half, r, atol=1e-9)


_FIRST_RUN = """
import sys, time
from serialgen.assets_manifest import procedural as pr
t0 = time.perf_counter()
pr.anny_model(progress=True)
print(f"{time.perf_counter() - t0:.2f}")
"""


@pytest.mark.slow
def test_first_run_announces_the_anny_cache_build_and_keeps_only_what_is_read_again(tmp_path):
    """A cold anny cache (a fresh machine): one announcement line, a stage bar, and only the compacted
    model kept; the next process loads it without a word. ~76 CPU-seconds (the real cold build)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ANNY_CACHE_DIR=str(tmp_path / "anny"))
    first = subprocess.run([sys.executable, "-c", _FIRST_RUN], capture_output=True, text=True, env=env, timeout=1800)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "anny: first run on this machine: building its model cache" in first.stderr
    assert "anny cache: parsing MakeHuman data 0/3" in first.stderr and "anny cache: done 3/3" in first.stderr
    assert "anny: model cache built in" in first.stderr
    kept = sorted(p.name for p in (tmp_path / "anny").rglob("*") if p.is_file())
    assert len(kept) == 1 and kept[0].startswith("build_compact_model_data_"), kept
    assert not list((tmp_path / "anny").glob(".build-*"))
    again = subprocess.run([sys.executable, "-c", _FIRST_RUN], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "anny" not in again.stderr, again.stderr[-2000:]
    assert float(again.stdout.split()[-1]) < float(first.stdout.split()[-1]) / 5
