"""``Rig``: what the renderer uses of a character in the Blender scene; ``CharacterRig``: the rig of
every real and procedural character, posed through the canonical skeleton.

:class:`Rig` is the interface (a ``typing.Protocol``): the worker (``render/job.py``), the keypoint
projection and the head geometry use only its members. Two classes satisfy it: ``CharacterRig``
(here) and the test ``Mannequin`` (``render/mannequin.py``). Both read the deformed mesh through
:func:`evaluated_vertices`.

``CharacterRig`` is shared by every character kind (procedural, glTF, VRM, FBX, .blend): a loader builds or imports the
objects, then constructs ``CharacterRig(char_id, armature, meshes, bone_map, expressions,
face_landmarks)``. The math (``assets_manifest.rig_alignment``, ``docs/characters.md``):

* at construction, each mapped bone's rest direction is aligned to the canonical A-pose direction
  of its joint (unmapped bones, the pelvis and the fingers inherit their parent's alignment);
* ``apply_pose(angles)`` turns the canonical angles into canonical world rotations (skeleton
  forward kinematics), gives each mapped bone ``W = G[joint] @ A @ R_rest`` and each unmapped bone
  its parent's motion, converts these to pose-bone quaternions in hierarchy order and updates the
  view layer once; zeros = the canonical A-pose whatever the rig's own rest pose;
* ``posed_skeleton()`` reads the posed bones back and recovers the canonical world rotation
  ``W @ R_rest^T @ A^T`` per joint, so ``skeleton.compute_keypoints`` works for any rig;
* at construction the head's geometry is measured on the rest mesh (``head_geometry``, see
  ``assets_manifest/geometry/head.py``); a rig given no face landmarks gets landmarks estimated on it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from serialgen.assets_manifest import rig_alignment as ra
from serialgen.assets_manifest.bone_maps import MIN_JOINTS
from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.geometry.face import TAGS, name_tag, shape_key_tag
from serialgen.assets_manifest.geometry.head import HeadGeometry, measure_head
from serialgen.render.bpy_utils import import_bpy, import_mathutils

__all__ = ["Rig", "CharacterRig", "Expression", "evaluated_vertices"]

#: One expression = shape keys to set: (mesh object name, shape key name, weight).
Expression = list[tuple[str, str, float]]


@runtime_checkable
class Rig(Protocol):
    """One character in the Blender scene, as the renderer uses it.

    Attributes: ``id`` (manifest id); ``armature`` (the bpy armature Object); ``meshes`` (the bpy
    mesh Objects it deforms); ``bone_map`` (canonical joint -> bone name); ``expressions`` (name ->
    shape keys, "neutral" included); ``face_landmarks`` (overrides of
    ``skeleton.FACE_LANDMARK_DEFAULTS`` plus ``mouth``, or None); ``face_landmark_sources``
    (landmark -> where it came from, ``geometry.face.SOURCES``; missing = the defaults); ``head_geometry`` (the measured head, or None:
    the head bone stands for the head, ``geometry.head.head_geometry_of``).
    """

    id: str
    armature: Any
    meshes: list
    bone_map: dict[str, str]
    expressions: dict[str, Expression]
    face_landmarks: dict[str, tuple[float, float, float]] | None
    face_landmark_sources: dict[str, str]
    head_geometry: HeadGeometry | None

    def apply_pose(self, angles, root_translation=(0.0, 0.0, 0.0)) -> None:
        """Pose from canonical angles (J, 3) in degrees and a root translation in metres."""

    def set_expression(self, name: str | None) -> None:
        """Set one expression's shape keys (None or "neutral": all off)."""

    def posed_skeleton(self) -> sk.PosedSkeleton:
        """World heads/tails/canonical rotations of the joints in the current pose."""

    def evaluated_vertices(self, obj=None) -> np.ndarray:
        """World positions (N, 3) of the deformed vertices of one mesh object, or of all stacked."""

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min xyz, max xyz) of the deformed meshes in world space."""

    def remove(self) -> None:
        """Delete the character's objects from the scene (the caller then purges orphans)."""


def evaluated_vertices(meshes) -> np.ndarray:
    """World positions (N, 3) of the evaluated (posed, deformed, shape-keyed) vertices of the mesh
    objects ``meshes``, stacked in order; (0, 3) for none."""
    bpy = import_bpy()
    dg = bpy.context.evaluated_depsgraph_get()
    out = []
    for obj in meshes:
        ev = obj.evaluated_get(dg)
        me = ev.data  # the evaluated mesh (modifiers and shape keys applied), read in place
        position = me.attributes.get("position") if isinstance(me, bpy.types.Mesh) else None
        if position is not None and position.data_type == "FLOAT_VECTOR":
            # float32 straight from the attribute: ~0.2 ms for 15k vertices where a mesh copy
            # read as float64 through ``vertices.co`` took ~1.5 ms (the same values).
            co = np.empty(len(position.data) * 3, dtype=np.float32)
            position.data.foreach_get("vector", co)
            co = co.astype(np.float64)
        else:  # not a mesh (curve, text): a temporary mesh of it
            tmp = ev.to_mesh()
            co = np.empty(len(tmp.vertices) * 3, dtype=np.float64)
            tmp.vertices.foreach_get("co", co)
            ev.to_mesh_clear()
        m = np.array(ev.matrix_world)
        out.append(co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3])
    return np.concatenate(out) if out else np.zeros((0, 3))


def _np(m) -> np.ndarray:
    return np.array([list(row) for row in m], dtype=np.float64)


def _face_evidence(obj, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one mesh object says about the face, per vertex: the ``face.TAGS`` code of its polygons'
    material names (eye beats lips beats mouth beats cover where materials meet), else of the object's name;
    1/2 where an eye/mouth shape key moves it by >= a quarter of that key's largest move, and that
    move in metres (``linear``: the object's world 3x3)."""
    me = obj.data
    nv = len(me.vertices)
    tags = np.full(nv, TAGS[name_tag(obj.name)], dtype=np.int8)
    slot_tags = np.array([TAGS[name_tag(s.material.name if s.material else "")] for s in obj.material_slots],
                         dtype=np.int8)
    if slot_tags.any() and len(me.polygons):
        mat = np.empty(len(me.polygons), dtype=np.int64)
        me.polygons.foreach_get("material_index", mat)
        total = np.empty(len(me.polygons), dtype=np.int64)
        me.polygons.foreach_get("loop_total", total)
        loop_vert = np.empty(len(me.loops), dtype=np.int64)
        me.loops.foreach_get("vertex_index", loop_vert)
        loop_tag = np.repeat(slot_tags[np.clip(mat, 0, len(slot_tags) - 1)], total)
        from_mat = np.zeros(nv, dtype=np.int8)
        for tag in (TAGS["cover"], TAGS["mouth"], TAGS["lips"], TAGS["eye"]):  # later wins
            from_mat[loop_vert[loop_tag == tag]] = tag
        tags = np.where(from_mat > 0, from_mat, tags).astype(np.int8)
    key_tags = np.zeros(nv, dtype=np.int8)
    key_weights = np.zeros(nv)
    keys = me.shape_keys
    if keys is not None and len(keys.key_blocks) > 1:
        basis = np.empty(nv * 3)
        keys.reference_key.data.foreach_get("co", basis)
        basis = basis.reshape(-1, 3)
        for kb in keys.key_blocks:
            code = {"eye": 1, "mouth": 2}.get(shape_key_tag(kb.name))
            if kb == keys.reference_key or code is None:
                continue
            co = np.empty(nv * 3)
            kb.data.foreach_get("co", co)
            d = np.linalg.norm((co.reshape(-1, 3) - basis) @ linear.T, axis=1)
            if d.max() <= 1e-6:
                continue
            moved = (d >= 0.25 * d.max()) & ((key_tags == 0) | (key_tags == code) | (code == 1))
            key_tags[moved] = code
            key_weights[moved] = np.maximum(key_weights[moved], d[moved])
    return tags, key_tags, key_weights


class CharacterRig:
    """One character: its armature, meshes, canonical bone map, expressions and face landmarks.

    Args:
        char_id: manifest id.
        armature: the bpy armature Object (normalised: metres, Z up, facing -Y, feet on z=0).
        meshes: bpy mesh Objects deformed by it (body, clothes, hair, accessories).
        bone_map: canonical joint -> armature bone name; must cover ``bone_maps.MIN_JOINTS``.
        expressions: name -> [(mesh object name, shape key name, weight), ...].
        face_landmarks: overrides of ``skeleton.FACE_LANDMARK_DEFAULTS`` (head-length units);
            None: located on the head mesh (``geometry.face.locate_face``); given ones win, the
            located ones fill the rest (the mouth).
        owned: extra datablock owners to delete in ``remove`` (for example a collection).

    ``head_geometry`` (:class:`~serialgen.assets_manifest.geometry.head.HeadGeometry`): the head region's box
    and points in the head joint's canonical rest frame, measured once here on the rest mesh.
    """

    def __init__(self, char_id: str, armature, meshes, bone_map: dict[str, str],
                 expressions: dict[str, Expression] | None = None,
                 face_landmarks: dict[str, tuple[float, float, float]] | None = None,
                 owned=None):
        self.bpy = import_bpy()
        if armature is None or armature.type != "ARMATURE":
            raise ValueError(f"character {char_id!r}: armature object missing or not an armature")
        # Real rigs often lack clavicles, a neck or a second spine bone (CesiumMan, KayKit); the
        # alignment lets unmapped bones follow their parents, so only bone_maps.MIN_JOINTS (pelvis,
        # head, arms, hands, legs, feet) are required (docs/real_assets.md).
        missing = [j for j in MIN_JOINTS if j not in bone_map]
        if missing:
            raise ValueError(f"character {char_id!r}: bone_map lacks required joints {missing}")
        self.id = char_id
        self.armature = armature
        self.meshes = list(meshes)
        self.bone_map = dict(bone_map)
        self.expressions: dict[str, Expression] = {"neutral": []}
        self.expressions.update({k: [tuple(x) for x in v] for k, v in (expressions or {}).items()})
        self.face_landmarks = dict(face_landmarks) if face_landmarks else None
        self._owned = list(owned or [])

        # Imported animation or constraints would override our pose on every evaluation.
        if armature.animation_data is not None:
            armature.animation_data_clear()
        for pb in armature.pose.bones:
            for con in pb.constraints:
                con.mute = True
            pb.rotation_mode = "QUATERNION"

        bones = list(armature.data.bones)
        self._bone_names = [b.name for b in bones]
        index = {n: i for i, n in enumerate(self._bone_names)}
        parents = np.array([index[b.parent.name] if b.parent else -1 for b in bones])
        mats = np.stack([_np(b.matrix_local) for b in bones])
        heads = mats[:, :3, 3]
        rots = mats[:, :3, :3]
        tails = np.array([list(b.tail_local) for b in bones], dtype=np.float64)
        world = _np(armature.matrix_world)
        lin = world[:3, :3]
        self._scale = float(np.cbrt(abs(np.linalg.det(lin)))) or 1.0
        self._world = world
        rot_world = lin / self._scale  # armature space -> world rotation
        self._al = ra.build_alignment(self._bone_names, parents, heads, tails, rots, self.bone_map,
                                      frame=rot_world.T)
        self._pose_bones = [armature.pose.bones[n] for n in self._bone_names]
        self.head_geometry: HeadGeometry = self._measure_head()
        # Landmarks the record gives (the procedural builder measures its own on the mesh) win;
        # the located ones fill the rest (the mouth, which records do not carry).
        given = self.face_landmarks or {}
        located = self.head_geometry.landmarks
        self.face_landmarks = {**located, **given} or None
        self.face_landmark_sources = {**{k: self.head_geometry.landmark_sources[k] for k in located},
                                      **{k: "record" for k in given}}

    # -- head geometry ------------------------------------------------------------------------

    def _measure_head(self) -> HeadGeometry:
        """Measure the head on the rest mesh (pose-independent: rest bones and undeformed vertices)
        and locate the face on it (``geometry/face.py``).

        A vertex rigid with the head bone is, in any pose, at ``head_w + G @ local`` with ``G`` the
        canonical world rotation of the head joint (``posed_skeleton``); at rest ``G`` is
        ``canonical_rotation_of(rest rotation)``, so ``local = G_rest^T (v_rest - head_rest)``.
        Per vertex it also hands over what names say (``face.name_tag`` of the polygon's material,
        then of the mesh object) and how far eye and mouth shape keys move it.
        """
        al = self._al
        b = al.joint_bone["head"]
        lin, off = self._world[:3, :3], self._world[:3, 3]
        head_w = lin @ al.heads[b] + off
        g_rest = ra.canonical_rotation_of(al, b, al.rest_rots[b])
        length = float(np.linalg.norm(lin @ (al.next_points[b] - al.heads[b])))
        head_bone = self.armature.data.bones[al.bone_names[b]]
        head_set = {head_bone.name, *(c.name for c in head_bone.children_recursive)}
        bone_names = set(self._bone_names)
        locs, dominant, influence, tris, tags, key_tags, key_weights = [], [], [], [], [], [], []
        n = 0
        self.bpy.context.view_layer.update()  # fresh matrix_world for newly linked meshes
        for obj in self.meshes:
            me = obj.data
            nv = len(me.vertices)
            if nv == 0 or not obj.vertex_groups:
                continue
            co = np.empty(nv * 3, dtype=np.float64)
            src = me.shape_keys.reference_key.data if me.shape_keys is not None else me.vertices
            src.foreach_get("co", co)
            m = _np(obj.matrix_world)
            world = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
            groups = [g.name for g in obj.vertex_groups]
            in_head = np.array([g in head_set for g in groups])
            is_bone = np.array([g in bone_names for g in groups])
            dom = np.zeros(nv, dtype=bool)
            inf = np.zeros(nv)
            for v in me.vertices:  # dominant bone per vertex (no vectorised access to weights)
                best_w, best_head, total = 0.0, False, 0.0
                for g in v.groups:
                    gi = g.group
                    if gi >= len(groups) or not is_bone[gi]:
                        continue
                    if in_head[gi]:
                        total += g.weight
                    if g.weight > best_w:
                        best_w, best_head = g.weight, bool(in_head[gi])
                dom[v.index], inf[v.index] = best_head, total
            locs.append((world - head_w) @ g_rest)  # rows: G_rest^T (v - head)
            dominant.append(dom)
            influence.append(inf)
            if dom.any() or (inf >= 0.1).any():
                tag_v, ktag_v, kw_v = _face_evidence(obj, g_rest.T @ m[:3, :3])
                me.calc_loop_triangles()
                t = np.empty(len(me.loop_triangles) * 3, dtype=np.int64)
                me.loop_triangles.foreach_get("vertices", t)
                tris.append(t.reshape(-1, 3) + n)
            else:
                tag_v, ktag_v, kw_v = np.zeros(nv, np.int8), np.zeros(nv, np.int8), np.zeros(nv)
            tags.append(tag_v)
            key_tags.append(ktag_v)
            key_weights.append(kw_v)
            n += nv
        if not locs:
            return HeadGeometry.from_bone(length)
        eyes = {}
        for bone in head_bone.children_recursive:  # eye bones (VRM leftEye, eye.L, ...) fix the eyes
            low = bone.name.lower()
            if "eye" in low and not any(w in low for w in ("brow", "lid", "lash", "end")):
                p = (lin @ np.array(bone.head_local) + off - head_w) @ g_rest
                eyes["l_eye" if p[0] > 0 else "r_eye"] = p
        if len(eyes) < 2:
            eyes = None
        return measure_head(np.concatenate(locs), np.concatenate(dominant), np.concatenate(influence), length,
                            np.concatenate(tris) if tris else None, eyes, np.concatenate(tags),
                            np.concatenate(key_tags), np.concatenate(key_weights))

    # -- posing -------------------------------------------------------------------------------

    def apply_pose(self, angles, root_translation=(0.0, 0.0, 0.0)) -> None:
        """Pose from canonical angles (J, 3) in degrees (skeleton.JOINT_NAMES order) and a root
        translation in metres (world axes). Zeros = the canonical A-pose."""
        mu = import_mathutils()
        angles = np.asarray(angles, dtype=np.float64)
        if angles.shape != (len(sk.JOINTS), 3) or not np.isfinite(angles).all():
            raise ValueError(f"pose angles must be finite with shape ({len(sk.JOINTS)}, 3), got {angles.shape}")
        al = self._al
        g = ra.canonical_world_rotations(angles)
        t = np.asarray(root_translation, dtype=np.float64) / self._scale
        w, h = ra.pose_bones(al, g, t)
        r = al.rest_rots
        for b in al.order:
            p = al.parents[b]
            if p >= 0:
                parent_motion = w[p] @ r[p].T
                basis = r[b].T @ parent_motion.T @ w[b]
                implied = h[p] + parent_motion @ (al.heads[b] - al.heads[p])
                loc = r[b].T @ parent_motion.T @ (h[b] - implied)
            else:
                basis = r[b].T @ w[b]
                loc = r[b].T @ (h[b] - al.heads[b])
            pb = self._pose_bones[b]
            pb.rotation_quaternion = mu.Matrix(basis.tolist()).to_quaternion()
            pb.location = mu.Vector(loc.tolist())
            pb.scale = (1.0, 1.0, 1.0)
        self.bpy.context.view_layer.update()

    def set_expression(self, name: str | None) -> None:
        """Set one expression's shape keys (others 0). None or "neutral": every shape key 0."""
        if name is not None and name not in self.expressions:
            raise ValueError(f"character {self.id!r} has no expression {name!r}; it has {sorted(self.expressions)}")
        for obj in self.meshes:
            keys = obj.data.shape_keys
            if keys is None:
                continue
            for kb in keys.key_blocks[1:]:
                kb.value = 0.0
        for obj_name, key, weight in self.expressions.get(name or "neutral", []):
            obj = self.bpy.data.objects.get(obj_name)
            if obj is None or obj.data.shape_keys is None or key not in obj.data.shape_keys.key_blocks:
                raise ValueError(f"character {self.id!r}: expression {name!r} names missing shape key {obj_name}/{key}")
            obj.data.shape_keys.key_blocks[key].value = float(weight)

    # -- reading back -------------------------------------------------------------------------

    def posed_skeleton(self) -> sk.PosedSkeleton:
        """World heads/tails/rotations of the canonical joints (NaN where the rig has no bone)."""
        al = self._al
        n = len(sk.JOINTS)
        heads = np.full((n, 3), np.nan)
        tails = np.full((n, 3), np.nan)
        rots = np.full((n, 3, 3), np.nan)
        lin, off = self._world[:3, :3], self._world[:3, 3]
        for joint, b in al.joint_bone.items():
            m = _np(self._pose_bones[b].matrix)
            w = m[:3, :3]
            h = m[:3, 3]
            j = sk.JOINT_INDEX[joint]
            tail = h + w @ al.rest_rots[b].T @ (al.next_points[b] - al.heads[b])
            heads[j] = lin @ h + off
            tails[j] = lin @ tail + off
            rots[j] = ra.canonical_rotation_of(al, b, w)
        return sk.PosedSkeleton(list(sk.JOINT_NAMES), heads, tails, rots)

    def keypoints(self) -> tuple[np.ndarray, np.ndarray]:
        """3D keypoints (K, 3) and mask (K,) of the current pose (``skeleton.compute_keypoints``)."""
        return sk.compute_keypoints(self.posed_skeleton(), self.face_landmarks)

    def evaluated_vertices(self, obj=None) -> np.ndarray:
        """World positions (N, 3) of the evaluated (posed, deformed, shape-keyed) mesh vertices of
        one mesh object, or of all meshes stacked."""
        return evaluated_vertices([obj] if obj is not None else self.meshes)

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min xyz, max xyz) of the evaluated meshes in world space."""
        v = self.evaluated_vertices()
        return v.min(axis=0), v.max(axis=0)

    def remove(self) -> None:
        """Delete the character's objects (the caller then purges orphans)."""
        data = self.bpy.data
        for obj in [*self.meshes, self.armature]:
            if obj is not None and obj.name in data.objects:
                data.objects.remove(obj, do_unlink=True)
        for thing in self._owned:
            if thing is not None and thing.name in data.collections:
                data.collections.remove(thing)
        self.meshes = []
        self.armature = None
