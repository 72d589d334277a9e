"""CharacterRig in real Blender: a procedural character built, posed through the canonical
skeleton, keypoints on the body, expressions on the face, a visible render, clean removal; and a
generic T-pose armature posed exactly like the canonical skeleton."""

from __future__ import annotations

import numpy as np
import pytest

from serialgen.assets_manifest import procedural as pr
from serialgen.assets_manifest import skeleton as sk
from serialgen.errors import UserInputError
from serialgen.render import bpy_utils
from serialgen.render.characters import load_character
from serialgen.render.rig import CharacterRig, Rig

pytestmark = pytest.mark.blender

J = sk.JOINT_INDEX
ZERO = np.zeros((len(sk.JOINTS), 3))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Mesh files of two characters (a skirt and trousers), written like `assets build` does."""
    root = tmp_path_factory.mktemp("assets")
    records = []
    for cid in ("proc-000003", "proc-000009"):
        desc = pr.describe_character(cid, 0)
        pr.save_mesh_data(pr.build_mesh_data(desc), root / "meshes" / f"{cid}.npz")
        records.append({"id": cid, "kind": "procedural", "status": "accepted", "mesh_file": f"meshes/{cid}.npz"})
    return root, records


@pytest.fixture
def rig(assets):
    root, records = assets
    bpy_utils.reset_scene()
    r = load_character(records[0], root)
    yield r
    if r.armature is not None:
        r.remove()
    bpy_utils.purge_orphans()


def _below_horizontal(skel, joint):
    d = skel.tails[J[joint]] - skel.heads[J[joint]]
    return np.degrees(np.arctan2(-d[2], np.hypot(d[0], d[1])))


def test_zero_pose_is_the_canonical_a_pose(rig):
    rig.apply_pose(ZERO)
    skel = rig.posed_skeleton()
    for side in ("l", "r"):
        assert abs(_below_horizontal(skel, f"{side}_upper_arm") - 45.0) < 5.0
        assert abs(_below_horizontal(skel, f"{side}_lower_arm") - 45.0) < 5.0
    lo, hi = rig.world_bounds()
    assert abs(lo[2]) < 0.01 and 1.0 < hi[2] < 2.2  # feet on the ground, plausible height
    # The skeleton reads back the canonical rotations: identity at rest.
    present = ~np.isnan(skel.heads[:, 0])
    assert np.allclose(skel.world_rot[present], np.eye(3), atol=1e-4)


def test_abduction_raises_the_arm_to_horizontal(rig):
    a = ZERO.copy()
    a[J["l_upper_arm"], 1] = 45.0
    a[J["r_upper_arm"], 1] = 45.0
    rig.apply_pose(a)
    skel = rig.posed_skeleton()
    for side in ("l", "r"):
        assert abs(_below_horizontal(skel, f"{side}_upper_arm")) < 5.0
    # The skin follows: the evaluated body reaches out sideways beyond the posed wrist.
    lo, hi = rig.world_bounds()
    assert hi[0] > skel.heads[J["l_hand"], 0] > 0.4 and lo[0] < skel.heads[J["r_hand"], 0] < -0.4


def test_keypoints_land_on_the_posed_body(rig):
    rng = np.random.default_rng(3)
    angles = sk.clamp_to_limits(rng.normal(0.0, 25.0, (len(sk.JOINTS), 3)))
    rig.apply_pose(angles, root_translation=(0.3, -0.2, 0.0))
    kp, mask = rig.keypoints()
    body = slice(0, len(sk.BODY18_NAMES) + len(sk.FOOT6_NAMES))
    assert mask[body].all() and mask.sum() > 60  # fingers mapped too
    verts = rig.evaluated_vertices(rig.meshes[0])
    lo, hi = verts.min(0) - 0.02, verts.max(0) + 0.02
    assert np.all((kp[mask] >= lo) & (kp[mask] <= hi))
    # Every body keypoint is close to the skin (joints sit inside limbs; face points on the face).
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(verts).query(kp[body])
    assert dist.max() < 0.12, dict(zip(sk.KEYPOINT_NAMES, np.round(dist, 3)))
    face = [sk.KEYPOINT_NAMES.index(n) for n in ("nose", "l_eye", "r_eye", "l_ear", "r_ear")]
    assert dist[face].max() < 0.02


def test_smile_moves_only_the_face(rig):
    rig.apply_pose(ZERO)
    rig.set_expression(None)
    base = rig.evaluated_vertices(rig.meshes[0])
    rig.set_expression("smile")
    smile = rig.evaluated_vertices(rig.meshes[0])
    moved = np.linalg.norm(smile - base, axis=1) > 1e-4
    kp, _ = rig.keypoints()
    nose = kp[sk.KEYPOINT_NAMES.index("nose")]
    assert moved.sum() > 50
    assert np.linalg.norm(smile[moved] - nose, axis=1).max() < 0.15
    rig.set_expression("neutral")
    assert np.allclose(rig.evaluated_vertices(rig.meshes[0]), base, atol=1e-6)
    with pytest.raises(ValueError, match="no expression"):
        rig.set_expression("laugh")


def _render_alpha(rig, width, height, path=None):
    bpy = bpy_utils.import_bpy()
    scene = bpy.context.scene
    cam = bpy.data.objects.new("test_cam", bpy.data.cameras.new("test_cam"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    lo, hi = rig.world_bounds()
    centre = (lo + hi) / 2
    cam.data.type = "ORTHO"
    cam.data.ortho_scale = float(hi[2] - lo[2]) * 1.1
    cam.location = (float(centre[0]), float(centre[1]) - 5.0, float(centre[2]))
    cam.rotation_euler = (np.pi / 2, 0.0, 0.0)
    r = scene.render
    r.engine = "BLENDER_WORKBENCH"
    r.resolution_x, r.resolution_y, r.resolution_percentage = width, height, 100
    r.film_transparent = True
    scene.display.shading.light = "STUDIO"
    scene.display.shading.color_type = "TEXTURE"
    scene.view_settings.view_transform = "Standard"
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    r.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGBA"))
    bpy.data.objects.remove(cam, do_unlink=True)
    return img


def test_workbench_render_shows_the_character(rig, tmp_path):
    rig.apply_pose(ZERO)
    img = _render_alpha(rig, 64, 96, tmp_path / "tiny.png")
    coverage = (img[..., 3] > 128).mean()
    assert 0.08 < coverage < 0.6, coverage
    # Clothes and skin differ: the torso row and the face row have different colours.
    rgb = img[..., :3].astype(float)
    assert np.ptp(rgb[img[..., 3] > 128], axis=0).max() > 60


def test_remove_and_purge_leave_nothing(assets):
    bpy = bpy_utils.import_bpy()
    root, records = assets
    bpy_utils.reset_scene()
    for rec in records:
        r = load_character(rec, root)
        assert len(r.meshes) >= 2  # body plus hair and/or skirt
        r.remove()
        bpy_utils.purge_orphans()
    assert len(bpy.data.meshes) == 0 and len(bpy.data.armatures) == 0
    assert len(bpy.data.materials) == 0 and len(bpy.data.images) == 0
    assert len(bpy.data.objects) == 0 and len(bpy.data.collections) == 0


def test_character_rig_and_mannequin_are_rigs(rig):
    """Both rig classes satisfy the ``Rig`` protocol; the mannequin loads through the loader table."""
    from serialgen.render.mannequin import Mannequin

    assert isinstance(rig, CharacterRig) and isinstance(rig, Rig)
    mannequin = load_character({"id": "m", "kind": "mannequin", "variant": "child"}, "/nonexistent")
    try:
        assert isinstance(mannequin, Mannequin) and isinstance(mannequin, Rig)
        assert mannequin.id == "mannequin-child" and mannequin.head_geometry is None
        mannequin.apply_pose(ZERO)
        lo, hi = mannequin.world_bounds()
        verts = mannequin.evaluated_vertices()
        assert np.allclose(lo, verts.min(0)) and 1.0 < hi[2] - lo[2] < 1.3  # the child is 1.15 m
    finally:
        mannequin.remove()
    assert mannequin.armature is None and mannequin.meshes == []
    with pytest.raises(UserInputError, match="unknown mannequin variant 'giant'"):
        load_character({"id": "m", "kind": "mannequin", "variant": "giant"}, "/nonexistent")


def test_load_character_errors(assets, tmp_path):
    root, records = assets
    with pytest.raises(UserInputError, match="unknown kind 'gltf_x'"):
        load_character({"id": "c", "kind": "gltf_x"}, root)
    with pytest.raises(UserInputError, match="not found"):
        load_character({"id": "proc-9", "kind": "procedural", "mesh_file": "meshes/nope.npz"}, root)
    with pytest.raises(UserInputError, match="holds character"):
        load_character(dict(records[0], id="proc-777"), root)


# --- a generic rig: canonical proportions, arms in a T-pose, random bone rolls ----------------


def _t_pose_armature(world=None):
    """Canonical proportions in world space; with ``world`` (4x4) the armature object carries that
    transform (an FBX-like cm, Y-up rig) and its bones are stored in the matching local space."""
    bpy = bpy_utils.import_bpy()
    bpy_utils.reset_scene()
    world = np.eye(4) if world is None else np.asarray(world, dtype=np.float64)
    inv = np.linalg.inv(world)
    data = bpy.data.armatures.new("t_rig")
    obj = bpy.data.objects.new("t_rig", data)
    obj.matrix_world = bpy_utils.import_mathutils().Matrix(world.tolist())
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    rng = np.random.default_rng(0)
    ebs = {}
    for j in sk.JOINTS:
        head, tail = np.array(j.head), np.array(j.tail)
        if j.name[:2] in ("l_", "r_") and not j.name.endswith(("clavicle", "leg", "foot", "toe")):
            sign = 1.0 if j.name.startswith("l_") else -1.0
            pivot = np.array(sk.JOINTS[J[f"{j.name[0]}_upper_arm"]].head)
            rot = sk.axis_angle_matrix([0.0, 1.0, 0.0], -45.0 * sign)
            head, tail = pivot + rot @ (head - pivot), pivot + rot @ (tail - pivot)
        head, tail = (inv @ np.append(head, 1.0))[:3], (inv @ np.append(tail, 1.0))[:3]
        eb = data.edit_bones.new("B_" + j.name)
        eb.head, eb.tail = head.tolist(), tail.tolist()
        eb.roll = float(rng.uniform(-np.pi, np.pi))
        if j.parent:
            eb.parent = ebs[j.parent]
        ebs[j.name] = eb
    bpy.ops.object.mode_set(mode="OBJECT")
    return obj


_FBX_LIKE = np.diag([0.01, 0.01, 0.01, 1.0]) @ np.array(
    [[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])  # cm, Y-up, rotated to Z-up


@pytest.mark.parametrize("world", [None, _FBX_LIKE], ids=["identity", "fbx_cm_y_up"])
def test_generic_t_pose_rig_matches_the_canonical_skeleton(world):
    bpy = bpy_utils.import_bpy()
    arm = _t_pose_armature(world)
    rig = CharacterRig("t-rig", arm, [], {j.name: "B_" + j.name for j in sk.JOINTS})
    rng = np.random.default_rng(5)
    for trial in range(3):
        angles = ZERO if trial == 0 else sk.clamp_to_limits(rng.normal(0.0, 35.0, (len(sk.JOINTS), 3)))
        rig.apply_pose(angles, root_translation=(0.0, 0.1, 0.2))
        ours, mask = rig.keypoints()
        ref, ref_mask = sk.compute_keypoints(sk.forward_kinematics(angles, (0.0, 0.1, 0.2)))
        assert (mask == ref_mask).all()
        assert np.abs(ours[mask] - ref[mask]).max() < 1e-4, trial
    with pytest.raises(ValueError, match="shape"):
        rig.apply_pose(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="lacks required joints"):
        CharacterRig("bad", arm, [], {"pelvis": "B_pelvis"})
    rig.remove()
    bpy_utils.purge_orphans()
    assert len(bpy.data.armatures) == 0
