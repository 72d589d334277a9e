"""Import users' rigged characters into Blender and normalise them (bpy; used by the inspection worker
``render/inspect_asset.py`` and by the renderer's loader).

Formats: glTF/GLB and VRM 0.x/1.0 (Blender's glTF importer reads ``.vrm`` as GLB; the VRM humanoid
table is read from the JSON by ``assets_manifest.gltf_probe``), meshopt-compressed GLB (decoded to a
plain GLB first), FBX, and ``.blend`` (objects appended through ``bpy.data.libraries.load`` with
script auto-execution off: embedded text blocks and Python drivers never run).

Normalisation (what a loaded character looks like, for every format):

* one armature and its meshes; the armature's and every mesh's object transform is the identity,
  all geometry and bones are baked in world space; empties, bone-shape helpers, cameras, lights and
  meshes that do not follow the armature are removed;
* meshes parented to a bone (RobotExpressive, weapons, helmets) become meshes skinned 100 % to that
  bone, so they follow it exactly as before and everything deforms the same way;
* Z up, metres: the body height is measured from the skeleton (ground to the top of the neck,
  divided by 1.57/1.75, so hats and weapons do not count; the mesh height when no head is mapped);
  outside 0.5-2.6 units the character is scaled to 1.75 m (FBX files 4-8 units tall, centimetre
  files); glTF sizes in range are kept (glTF is metres by specification);
* facing -Y (its left towards +X), from the mapped left/right limbs (VRM 0.x faces +Y);
* feet on z = 0 and the pelvis above the origin;
* no animation or pose (rest pose), FBX materials that imported with alpha 0 get alpha 1;
* rig repairs from the bone mapper: IK-style feet/hands that do not hang from the shin/forearm are
  re-parented to it (keeping their rest), so forward-kinematic posing moves them.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from serialgen.assets_manifest.gltf_probe import GltfError, decode_meshopt, probe_gltf
from serialgen.render.bpy_utils import import_bpy, import_mathutils

bpy = import_bpy()  # this module runs only in Blender processes
Matrix = import_mathutils().Matrix

__all__ = [
    "FORMATS",
    "ImportFailed",
    "format_of",
    "import_objects",
    "collect_character",
    "world_bones",
    "rest_vertices",
    "normalise_character",
    "apply_repairs",
    "fix_material_alpha",
    "PLAUSIBLE_HEIGHT",
    "measured_scale",
    "DEFAULT_HEIGHT_M",
]

FORMATS = {".glb": "gltf", ".gltf": "gltf", ".vrm": "vrm", ".fbx": "fbx", ".blend": "blend"}
PLAUSIBLE_HEIGHT = (0.5, 2.6)
DEFAULT_HEIGHT_M = 1.75
NECK_TOP_M = 1.57  # canonical skeleton: head joint (top of the neck) of the 1.75 m figure


class ImportFailed(RuntimeError):
    """Import failed; ``reason`` is the manifest reason, the message the human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def format_of(path) -> str | None:
    return FORMATS.get(Path(path).suffix.lower())


def _disable_autoexec() -> None:
    try:
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    except AttributeError:  # pragma: no cover - preferences unavailable
        pass


def import_objects(path, workdir: str | None = None) -> list:
    """Import ``path`` into the current scene; return the new objects. Raises :class:`ImportFailed`."""
    path = Path(path)
    kind = format_of(path)
    if kind is None:
        raise ImportFailed("unsupported_format", f"{path.name}: unsupported extension {path.suffix!r}")
    if not path.is_file():
        raise ImportFailed("missing_file", f"{path}: file not found")
    _disable_autoexec()
    before = set(bpy.data.objects)
    try:
        if kind in ("gltf", "vrm"):
            probe = probe_gltf(path)
            if not probe["ok"]:
                raise ImportFailed(probe["reason"], probe["detail"])
            if probe["draco"]:
                pass  # Blender's importer decodes Draco itself
            src = path
            if probe["meshopt"]:
                tmpdir = workdir or tempfile.mkdtemp(prefix="serialgen-meshopt-")
                try:
                    src = decode_meshopt(path, Path(tmpdir) / (path.stem + ".decoded.glb"))
                except GltfError as e:
                    raise ImportFailed("import_failed", f"{path.name}: {e}") from e
            res = bpy.ops.import_scene.gltf(filepath=str(src), disable_bone_shape=True, import_shading="NORMALS",
                                            merge_vertices=False)
        elif kind == "fbx":
            res = bpy.ops.import_scene.fbx(filepath=str(path), use_anim=True, ignore_leaf_bones=False,
                                           use_image_search=False)
        else:
            res = _append_blend(path)
    except ImportFailed:
        raise
    except Exception as e:  # noqa: BLE001 - importers raise anything on bad files
        raise ImportFailed("import_failed", f"{path.name}: {type(e).__name__}: {str(e).strip()[:300]}") from e
    if isinstance(res, set) and "FINISHED" not in res:
        raise ImportFailed("import_failed", f"{path.name}: importer returned {sorted(res)}")
    new = [o for o in bpy.data.objects if o not in before]
    if not new:
        raise ImportFailed("import_failed", f"{path.name}: the file holds no objects")
    return new


def _append_blend(path: Path):
    """Append every object of a .blend without running anything in it (no UI, no scripts)."""
    _disable_autoexec()
    with bpy.data.libraries.load(str(path), link=False) as (src, dst):
        dst.objects = list(src.objects)
    coll = bpy.context.scene.collection
    for ob in dst.objects:
        if ob is not None and ob.name not in coll.objects:
            coll.objects.link(ob)
    # Text blocks are not appended (only objects and what they use), so nothing can be registered.
    return {"FINISHED"}


def _mesh_bone(ob, arm) -> str | None:
    """The bone a mesh follows rigidly through its parent chain (bone parenting), if any."""
    cur = ob
    while cur is not None and cur.parent is not None:
        if cur.parent == arm and cur.parent_type == "BONE" and cur.parent_bone in arm.data.bones:
            return cur.parent_bone
        if cur.parent == arm:
            return None
        cur = cur.parent
    return None


def _under(ob, arm) -> bool:
    cur = ob.parent
    while cur is not None:
        if cur == arm:
            return True
        cur = cur.parent
    return False


def _armature_of(ob):
    for m in ob.modifiers:
        if m.type == "ARMATURE" and m.object is not None:
            return m.object
    return None


def _weighted_bones(ob, arm) -> set[str]:
    """Bones of ``arm`` with a vertex group on ``ob`` carrying any non-zero weight."""
    names = {g.index: g.name for g in ob.vertex_groups if g.name in arm.data.bones}
    if not names:
        return set()
    used = set()
    for v in ob.data.vertices:
        for g in v.groups:
            if g.group in names and g.weight > 0:
                used.add(names[g.group])
        if len(used) == len(names):
            break
    return used


def collect_character(objects) -> dict:
    """Pick the character in ``objects``: the armature that drives the most vertices, and its meshes.

    Returns {"armature": obj | None, "meshes": [obj], "skinned": [names], "bone_parented": {name: bone},
    "unskinned": [names], "armatures": n, "other": [obj]}.
    """
    arms = [o for o in objects if o.type == "ARMATURE"]
    meshes = [o for o in objects if o.type == "MESH"]
    best, best_score, info = None, -1, {}
    for arm in arms:
        skinned, parented, unskinned = [], {}, []
        for ob in meshes:
            if _armature_of(ob) == arm:
                if _weighted_bones(ob, arm):
                    skinned.append(ob)
                else:
                    unskinned.append(ob)
                continue
            bone = _mesh_bone(ob, arm)
            if bone is not None:
                parented[ob] = bone
            elif _under(ob, arm):
                unskinned.append(ob)
        score = sum(len(o.data.vertices) for o in skinned) + sum(len(o.data.vertices) for o in parented)
        if score > best_score:
            best, best_score = arm, score
            info = {"skinned": skinned, "parented": parented, "unskinned": unskinned}
    if best is None:
        return {"armature": None, "meshes": meshes, "skinned": [], "bone_parented": {}, "unskinned": [],
                "armatures": 0, "other": [o for o in objects if o not in meshes]}
    keep = info["skinned"] + list(info["parented"]) + info["unskinned"]
    return {
        "armature": best, "meshes": keep, "skinned": [o.name for o in info["skinned"]],
        "bone_parented": {o.name: b for o, b in info["parented"].items()},
        "unskinned": [o.name for o in info["unskinned"]], "armatures": len(arms),
        "other": [o for o in objects if o is not best and o not in keep],
    }


def world_bones(arm) -> list[dict]:
    """Rest bones in world space: [{"name", "parent", "head", "tail", "deform"}]."""
    mw = arm.matrix_world
    return [{"name": b.name, "parent": b.parent.name if b.parent else None,
             "head": list(mw @ b.head_local), "tail": list(mw @ b.tail_local), "deform": bool(b.use_deform)}
            for b in arm.data.bones]


def rest_vertices(meshes) -> np.ndarray:
    """(N, 3) world positions of the meshes' undeformed vertices."""
    parts = []
    for ob in meshes:
        n = len(ob.data.vertices)
        if n == 0:
            continue
        co = np.empty(n * 3, dtype=np.float64)
        ob.data.vertices.foreach_get("co", co)
        co = co.reshape(n, 3)
        m = np.array(ob.matrix_world, dtype=np.float64)
        parts.append(co @ m[:3, :3].T + m[:3, 3])
    return np.concatenate(parts) if parts else np.zeros((0, 3))


def fix_material_alpha(meshes) -> int:
    """Set alpha 1 on Principled BSDFs whose unlinked Alpha is 0 (FBX imports); returns how many."""
    fixed = 0
    seen = set()
    for ob in meshes:
        for slot in ob.material_slots:
            mat = slot.material
            if mat is None or mat.name in seen or mat.node_tree is None:
                continue
            seen.add(mat.name)
            for node in mat.node_tree.nodes:
                if node.type == "BSDF_PRINCIPLED":
                    a = node.inputs.get("Alpha")
                    if a is not None and not a.is_linked and a.default_value <= 1e-6:
                        a.default_value = 1.0
                        fixed += 1
            if fixed and hasattr(mat, "blend_method"):
                mat.blend_method = "OPAQUE" if mat.blend_method in ("BLEND", "HASHED", "CLIP") else mat.blend_method
    return fixed


def _set_rest(arm) -> None:
    if arm.animation_data is not None:
        arm.animation_data_clear()
    for pb in arm.pose.bones:
        pb.location = (0.0, 0.0, 0.0)
        pb.rotation_quaternion = (1.0, 0.0, 0.0, 0.0)
        pb.rotation_euler = (0.0, 0.0, 0.0)
        pb.rotation_axis_angle = (0.0, 0.0, 1.0, 0.0)
        pb.scale = (1.0, 1.0, 1.0)
        for c in list(pb.constraints):  # IK/copy constraints would fight forward-kinematic posing
            pb.constraints.remove(c)
    arm.data.pose_position = "POSE"


def _skin_to_bone(ob, arm, bone: str) -> None:
    g = ob.vertex_groups.get(bone) or ob.vertex_groups.new(name=bone)
    g.add(list(range(len(ob.data.vertices))), 1.0, "REPLACE")
    if _armature_of(ob) is None:
        mod = ob.modifiers.new("Armature", "ARMATURE")
        mod.object = arm


def normalise_character(arm, meshes, *, yaw_deg: float = 0.0, scale: float | None = None,
                        pelvis_bone: str | None = None, head_bone: str | None = None, others=()) -> dict:
    """Bake transforms (see module doc). ``scale`` None: measured, see :func:`measured_scale`.
    Returns {"scale", "yaw_deg", "height_raw", "body_height_raw", "height_m", "offset"}."""
    bpy.context.view_layer.update()
    _set_rest(arm)
    for ob in meshes:
        if ob.data.shape_keys is not None and ob.data.shape_keys.animation_data is not None:
            ob.data.shape_keys.animation_data_clear()
        if ob.animation_data is not None:
            ob.animation_data_clear()
    bpy.context.view_layer.update()
    verts = rest_vertices(meshes)
    if len(verts) == 0:
        raise ImportFailed("no_mesh", "no mesh vertices")
    height_raw = float(verts[:, 2].max() - verts[:, 2].min())
    body = height_raw
    if head_bone and head_bone in arm.data.bones:
        # Skeleton-based height (ground to the top of the neck, as a fraction of a standing human),
        # so hats, helmets and raised weapons do not change a character's scale.
        neck_top = (arm.matrix_world @ arm.data.bones[head_bone].head_local).z
        body = float(neck_top - verts[:, 2].min()) * DEFAULT_HEIGHT_M / NECK_TOP_M
    if scale is None:
        scale = measured_scale(body)
    rot = Matrix.Rotation(math.radians(yaw_deg), 4, "Z")
    sm = Matrix.Diagonal((scale, scale, scale, 1.0))
    # Translation after rotation+scale: feet at z=0, pelvis (or the bounds' centre) above the origin.
    rs = np.array(rot @ sm, dtype=np.float64)[:3, :3]
    v2 = verts @ rs.T
    if pelvis_bone and pelvis_bone in arm.data.bones:
        ph = np.array(arm.matrix_world @ arm.data.bones[pelvis_bone].head_local)
        cx, cy = (rs @ ph)[:2]
    else:
        cx, cy = (v2[:, :2].min(axis=0) + v2[:, :2].max(axis=0)) / 2
    offset = (-float(cx), -float(cy), -float(v2[:, 2].min()))
    norm = Matrix.Translation(offset) @ rot @ sm

    worlds = {ob.name: ob.matrix_world.copy() for ob in meshes}
    bone_of = {ob.name: _mesh_bone(ob, arm) for ob in meshes}
    arm_world = arm.matrix_world.copy()
    # Detach everything first so changing the armature does not move its children.
    for ob in meshes:
        ob.parent = None
    arm.parent = None
    arm.matrix_world = Matrix.Identity(4)
    arm.data.transform(norm @ arm_world)
    for ob in meshes:
        ob.data.transform(norm @ worlds[ob.name], shape_keys=True)
        if (norm @ worlds[ob.name]).determinant() < 0:
            ob.data.flip_normals()
        ob.matrix_world = Matrix.Identity(4)
        ob.parent = arm
        ob.parent_type = "OBJECT"
        ob.matrix_parent_inverse = Matrix.Identity(4)
        ob.matrix_basis = Matrix.Identity(4)
        if bone_of[ob.name] is not None:
            _skin_to_bone(ob, arm, bone_of[ob.name])
    for ob in others:
        try:
            bpy.data.objects.remove(ob, do_unlink=True)
        except ReferenceError:
            pass
    bpy.context.view_layer.update()
    verts = rest_vertices(meshes)
    return {"scale": float(scale), "yaw_deg": float(yaw_deg), "height_raw": height_raw, "body_height_raw": body,
            "height_m": float(verts[:, 2].max() - verts[:, 2].min()), "offset": list(offset)}


def measured_scale(body_height: float) -> float:
    """1 when ``body_height`` (file units) is a plausible height in metres, else the factor to 1.75 m."""
    lo, hi = PLAUSIBLE_HEIGHT
    return 1.0 if lo <= body_height <= hi else DEFAULT_HEIGHT_M / max(body_height, 1e-9)


def apply_repairs(arm, repairs: dict) -> list[str]:
    """Re-parent bones as ``repairs["reparent"]`` says ({bone: new parent}), keeping their rest."""
    rep = (repairs or {}).get("reparent") or {}
    if not rep:
        return []
    view_layer = bpy.context.view_layer
    prev_active = view_layer.objects.active
    view_layer.objects.active = arm
    done = []
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        eb = arm.data.edit_bones
        for bone, parent in rep.items():
            if bone in eb and parent in eb:
                eb[bone].use_connect = False
                eb[bone].parent = eb[parent]
                done.append(bone)
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = prev_active
    return done
