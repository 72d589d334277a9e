"""A small test character built from the canonical skeleton: an armature plus one skinned ellipsoid per bone.

The mannequin exists so the renderer (scene, cameras, keypoints, standard form, shards) can be built
and tested without the procedural or imported characters. It is a :class:`~serialgen.render.rig.Rig`
like ``CharacterRig``, and loads through the same loader table (``render/characters.py``, kind
``"mannequin"``, record field ``variant``). Its armature rest pose *is* the canonical A-pose, scaled by ``height / 1.75`` (and the
head by ``head_scale``), so posing needs no retargeting: each pose bone gets the canonical world
rotation directly.

Variants used by the tests: ``MANNEQUIN_VARIANTS`` (adult, child, heavy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.errors import UserInputError
from serialgen.render.bpy_utils import import_bmesh, import_bpy, import_mathutils
from serialgen.render.rig import evaluated_vertices

bpy = import_bpy()  # this module runs only in Blender processes
bmesh = import_bmesh()
Matrix, Vector = import_mathutils().Matrix, import_mathutils().Vector

__all__ = ["MannequinSpec", "MANNEQUIN_VARIANTS", "Mannequin", "build_mannequin"]


@dataclass(frozen=True)
class MannequinSpec:
    """Body proportions: ``height`` in metres, ``head_scale`` (head bone length factor), ``girth``
    (limb and torso radius factor) and RGBA colours for skin, top, bottom and shoes."""

    char_id: str = "mannequin-adult"
    height: float = 1.75
    head_scale: float = 1.0
    girth: float = 1.0
    skin: tuple[float, float, float, float] = (0.85, 0.66, 0.53, 1.0)
    top: tuple[float, float, float, float] = (0.15, 0.35, 0.75, 1.0)
    bottom: tuple[float, float, float, float] = (0.25, 0.22, 0.2, 1.0)
    shoes: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 1.0)


MANNEQUIN_VARIANTS = {
    "adult": MannequinSpec(),
    "child": MannequinSpec("mannequin-child", height=1.15, head_scale=1.35, girth=0.8,
                           top=(0.8, 0.3, 0.2, 1.0)),
    "heavy": MannequinSpec("mannequin-heavy", height=1.8, girth=1.8, top=(0.2, 0.6, 0.3, 1.0)),
}

# Joints the mannequin has: the required ones plus toes (no fingers: hand keypoints stay masked).
_JOINTS = [j for j in sk.JOINTS if j.required or j.name.endswith("_toe")]
# Ellipsoid radius per bone as a fraction of 1.75 m body (before girth), and its colour slot
# (0 top, 1 bottom, 2 shoes, 3 skin): a texel of the one palette texture.
_RADIUS = {
    "pelvis": (0.15, 1), "spine": (0.14, 0), "chest": (0.16, 0), "neck": (0.05, 3), "head": (0.0, 3),
    "clavicle": (0.05, 0), "upper_arm": (0.05, 0), "lower_arm": (0.04, 3), "hand": (0.035, 3),
    "upper_leg": (0.075, 1), "lower_leg": (0.055, 1), "foot": (0.045, 2), "toe": (0.035, 2),
}
_EXPRESSIONS = ("smile", "open_mouth")


def _rest_joints(spec: MannequinSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rest heads/tails (metres) for the variant: the canonical skeleton scaled, head bone rescaled."""
    s = spec.height / 1.75
    out = {}
    for j in _JOINTS:
        head, tail = np.array(j.head) * s, np.array(j.tail) * s
        if j.name == "head":
            tail = head + (tail - head) * spec.head_scale
        out[j.name] = (head, tail)
    return out


def _bone_radius(name: str, spec: MannequinSpec) -> tuple[float, int]:
    key = name[2:] if name[:2] in ("l_", "r_") else name
    r, slot = _RADIUS[key]
    return r * spec.height / 1.75 * spec.girth, slot


def _add_ellipsoid(bm, deform, group: int, centre, axis, half_length: float, radius: float, slot: int):
    """Add a UV ellipsoid (long axis ``axis``) to ``bm``, all its vertices weighted 1 to ``group``."""
    z = np.asarray(axis, dtype=np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    mat = Matrix.Identity(4)
    for r in range(3):
        mat[r][0], mat[r][1], mat[r][2], mat[r][3] = x[r] * radius, y[r] * radius, z[r] * half_length, centre[r]
    geom = bmesh.ops.create_uvsphere(bm, u_segments=16, v_segments=10, radius=1.0, matrix=mat)
    uv_layer = bm.loops.layers.uv.verify()
    for v in geom["verts"]:
        v[deform][group] = 1.0
        for loop in v.link_loops:
            loop[uv_layer].uv = ((slot + 0.5) / 4.0, 0.5)
    return geom["verts"]


class Mannequin:
    """One mannequin in the scene (a :class:`~serialgen.render.rig.Rig`)."""

    def __init__(self, spec: MannequinSpec, collection=None):
        self.spec = spec
        self.id = spec.char_id
        self.face_landmarks = None
        self.face_landmark_sources: dict[str, str] = {}  # the skeleton's defaults
        self.head_geometry = None  # the head bone is the head (geometry.head.head_geometry_of)
        self._rest = _rest_joints(spec)
        collection = collection or bpy.context.scene.collection
        self.bone_map = {name: name for name in self._rest}
        self.armature = self._build_armature(collection)
        body = self._build_body(collection)
        self.meshes = [body]
        self.expressions = {name: [(body.name, name, 1.0)] for name in _EXPRESSIONS}

    # -- construction -----------------------------------------------------------------------------

    def _build_armature(self, collection):
        data = bpy.data.armatures.new(f"{self.id}-armature")
        arm = bpy.data.objects.new(f"{self.id}-armature", data)
        collection.objects.link(arm)
        # Edit bones need edit mode on an active object; the factory scene has a view layer.
        bpy.context.view_layer.objects.active = arm
        bpy.ops.object.mode_set(mode="EDIT")
        for j in _JOINTS:
            head, tail = self._rest[j.name]
            eb = data.edit_bones.new(j.name)
            eb.head, eb.tail = Vector(head), Vector(tail)
            eb.roll = 0.0
            if j.parent:
                eb.parent = data.edit_bones[j.parent]
        bpy.ops.object.mode_set(mode="OBJECT")
        return arm

    def _build_body(self, collection):
        spec = self.spec
        mesh = bpy.data.meshes.new(f"{self.id}-body")
        obj = bpy.data.objects.new(f"{self.id}-body", mesh)
        collection.objects.link(obj)
        groups = {name: obj.vertex_groups.new(name=name).index for name in self._rest}
        bm = bmesh.new()
        deform = bm.verts.layers.deform.verify()
        head_verts = []
        for name, (head, tail) in self._rest.items():
            length = float(np.linalg.norm(tail - head))
            if name == "head":
                # Skull: an ellipsoid centred on the head bone, plus a nose bump facing -Y.
                centre = (head + tail) / 2
                # Big enough to hold the default face landmarks (skeleton.FACE_LANDMARK_DEFAULTS).
                head_verts = _add_ellipsoid(bm, deform, groups[name], centre, tail - head, length * 0.6,
                                            length * 0.5, 3)
                nose = head + np.array([0.0, -0.55 * length, 0.30 * length])
                _add_ellipsoid(bm, deform, groups[name], nose, [0, -1, 0], 0.11 * length, 0.08 * length, 3)
                continue
            if name.endswith("_foot"):
                # Heel to toes (the foot keypoints lie 0.35 foot lengths behind the ankle).
                s = spec.height / 1.75
                centre = head + np.array([0.0, -0.08, -0.04]) * s
                _add_ellipsoid(bm, deform, groups[name], centre, [0, -1, 0], 0.16 * s,
                               0.052 * s * max(spec.girth, 1.0) ** 0.5, 2)
                continue
            if name.endswith("_toe"):
                continue  # the foot ellipsoid reaches past the toes already
            radius, slot = _bone_radius(name, spec)
            _add_ellipsoid(bm, deform, groups[name], (head + tail) / 2, tail - head, length * 0.6, radius, slot)
        head_ids = [v.index for v in head_verts]
        bm.to_mesh(mesh)
        bm.free()
        mesh.shade_smooth()
        mesh.materials.append(self._palette_material())
        self._add_expression_keys(obj, head_ids)
        mod = obj.modifiers.new("armature", "ARMATURE")
        mod.object = self.armature
        obj.parent = self.armature
        return obj

    def _palette_material(self):
        """One material whose colour comes from a 4x1 palette texture (top, bottom, shoes, skin).

        One material, not four: Workbench draws per-material batches in an order that varies
        between runs, so where two differently coloured parts intersect, a pixel could flip.
        """
        spec = self.spec
        img = bpy.data.images.new(f"{self.id}-palette", 4, 1, alpha=True)
        img.pixels[:] = np.array([spec.top, spec.bottom, spec.shoes, spec.skin], dtype=np.float64).ravel().tolist()
        img.pack()  # keep the pixels (a generated image would be regenerated blank)
        img.colorspace_settings.name = "sRGB"
        mat = bpy.data.materials.new(f"{self.id}-mat")
        mat.use_nodes = True
        nodes = mat.node_tree.nodes
        tex = nodes.new("ShaderNodeTexImage")
        tex.image, tex.interpolation = img, "Closest"
        bsdf = nodes.get("Principled BSDF")
        mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
        nodes.active = tex
        return mat

    def _add_expression_keys(self, obj, head_ids: list[int]) -> None:
        """Shape keys that move only the lower front of the skull (a mouth region)."""
        head, tail = self._rest["head"]
        length = float(np.linalg.norm(tail - head))
        obj.shape_key_add(name="Basis", from_mix=False)
        co = np.array([obj.data.vertices[i].co[:] for i in head_ids])
        front = (co[:, 1] < head[1] - 0.15 * length) & (co[:, 2] < head[2] + 0.45 * length)
        for name in _EXPRESSIONS:
            key = obj.shape_key_add(name=name, from_mix=False)
            for i, vid in enumerate(head_ids):
                if not front[i]:
                    continue
                dz = -0.12 * length if name == "open_mouth" else 0.05 * length
                dx = 0.0 if name == "open_mouth" else 0.08 * length * np.sign(co[i, 0])
                key.data[vid].co = Vector(co[i] + np.array([dx, -0.06 * length, dz]))

    # -- the Rig interface -------------------------------------------------------------------------

    def apply_pose(self, angles, root_translation=(0.0, 0.0, 0.0)) -> None:
        """Pose with canonical angles (J, 3) degrees in ``skeleton.JOINT_NAMES`` order."""
        angles = np.asarray(angles, dtype=np.float64)
        local = sk.local_rotations(angles)
        world_rot: dict[str, np.ndarray] = {}
        heads: dict[str, np.ndarray] = {}
        pose_mats: dict[str, Matrix] = {}
        bones = self.armature.data.bones
        for j in _JOINTS:  # parents come first
            ji = sk.JOINT_INDEX[j.name]
            rest_head = self._rest[j.name][0]
            if j.parent is None:
                world_rot[j.name] = local[ji]
                heads[j.name] = rest_head + np.asarray(root_translation, dtype=np.float64)
            else:
                p = j.parent
                world_rot[j.name] = world_rot[p] @ local[ji]
                heads[j.name] = heads[p] + world_rot[p] @ (rest_head - self._rest[p][0])
            rest = bones[j.name].matrix_local
            rot = Matrix(world_rot[j.name].tolist()) @ rest.to_3x3()
            pose = rot.to_4x4()
            pose.translation = Vector(heads[j.name])
            pose_mats[j.name] = pose
            pb = self.armature.pose.bones[j.name]
            if j.parent is None:
                pb.matrix_basis = rest.inverted() @ pose
            else:
                prest = bones[j.parent].matrix_local
                pb.matrix_basis = (prest.inverted() @ rest).inverted() @ pose_mats[j.parent].inverted() @ pose

    def set_expression(self, name: str | None) -> None:
        keys = self.meshes[0].data.shape_keys.key_blocks
        for kb in keys[1:]:
            kb.value = 0.0
        if name not in (None, "neutral"):
            for _, key_name, weight in self.expressions[name]:
                keys[key_name].value = weight

    def posed_skeleton(self) -> sk.PosedSkeleton:
        bpy.context.view_layer.update()
        n = len(sk.JOINT_NAMES)
        heads = np.full((n, 3), np.nan)
        tails = np.full((n, 3), np.nan)
        rots = np.full((n, 3, 3), np.nan)
        world = self.armature.matrix_world
        for canon, bone in self.bone_map.items():
            pb = self.armature.pose.bones[bone]
            i = sk.JOINT_INDEX[canon]
            heads[i] = np.array(world @ pb.head)
            tails[i] = np.array(world @ pb.tail)
            rest = pb.bone.matrix_local.to_3x3()
            rots[i] = np.array((world.to_3x3() @ pb.matrix.to_3x3() @ rest.inverted()))
        return sk.PosedSkeleton(list(sk.JOINT_NAMES), heads, tails, rots)

    def evaluated_vertices(self, obj=None) -> np.ndarray:
        return evaluated_vertices([obj] if obj is not None else self.meshes)

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        v = self.evaluated_vertices()
        return v.min(axis=0), v.max(axis=0)

    def remove(self) -> None:
        for obj in [*self.meshes, self.armature]:
            bpy.data.objects.remove(obj, do_unlink=True)
        self.meshes = []
        self.armature = None


def build_mannequin(variant: str | MannequinSpec = "adult") -> Mannequin:
    """Build a mannequin (``"adult"``, ``"child"``, ``"heavy"`` or a spec) in the current scene."""
    if isinstance(variant, str):
        if variant not in MANNEQUIN_VARIANTS:
            raise UserInputError(f"unknown mannequin variant {variant!r}; known: {', '.join(MANNEQUIN_VARIANTS)}")
        variant = MANNEQUIN_VARIANTS[variant]
    return Mannequin(variant)
