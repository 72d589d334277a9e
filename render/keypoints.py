"""2D keypoints: the posed skeleton's keypoints projected through the camera, with visibility.

``compute_keypoints(rig.posed_skeleton(), rig.face_landmarks)`` gives 3D points (K, 3) in
``skeleton.KEYPOINT_NAMES`` order; :func:`project` turns them into pixels (camera.py conventions).

Visibility (``docs/rendering.md``): a keypoint is visible when the rig defines it, it projects inside
the frame in front of the camera, and it is not occluded. Joints lie *inside* the body, so a ray
from the camera to a joint always meets the body's own surface first; the occlusion test therefore
asks *whose* surface it meets. A ray is cast from the camera towards the keypoint against the
evaluated (posed, deformed) meshes (``scene.ray_cast``); the keypoint is occluded when the first hit
lies more than ``surface_tolerance`` in front of it **and** belongs to a body part more than two
bones away from the keypoint's joint in the canonical skeleton (a hand in front of the face hides
the nose; the forearm's own skin does not hide the wrist). Face landmarks (nose, eyes, ears) lie
on the surface, not inside, so for them any hit more than ``face_tolerance`` (0.15 head-bone
lengths) in front hides them, whoever it belongs to: seen from behind, the skull hides the eyes. A face's body part is the canonical joint
of the bone that weighs most on its first vertex (unmapped bones resolve to their nearest mapped
ancestor); meshes with no vertex groups belong to their parent bone, or to no part (always occlude).
"""

from __future__ import annotations

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.render.bpy_utils import import_mathutils

__all__ = ["project", "PartLookup", "occluded", "keypoints_2d", "pose_record"]

_HOPS = 2


def _neighbourhoods(hops: int = _HOPS) -> dict[str, set[str]]:
    """Canonical joint -> the joints within ``hops`` bones of it (itself included)."""
    adj: dict[str, set[str]] = {j.name: set() for j in sk.JOINTS}
    for j in sk.JOINTS:
        if j.parent:
            adj[j.name].add(j.parent)
            adj[j.parent].add(j.name)
    out = {}
    for name in adj:
        seen, frontier = {name}, {name}
        for _ in range(hops):
            frontier = {n for f in frontier for n in adj[f]} - seen
            seen |= frontier
        out[name] = seen
    return out


_NEAR = _neighbourhoods()
# Keypoint -> the joints whose surface may cover it without hiding it.
_KP_PARTS = []
for _kp in sk.KEYPOINTS:
    parts = set(_NEAR[_kp.joint])
    if _kp.other:
        parts |= _NEAR[_kp.other]
    _KP_PARTS.append(parts)


def project(points: np.ndarray, camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (K, 3) -> pixels (K, 2), depth (K,), in-frame mask (K,) for a ``CameraSpec``."""
    uv, z = camera.project(points)
    finite = np.isfinite(points).all(axis=1)
    inside = finite & (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < camera.width) & (uv[:, 1] >= 0) & (uv[:, 1] < camera.height)
    return uv, z, inside


class PartLookup:
    """Face -> canonical joint name, per mesh object of one character (built once per character)."""

    def __init__(self, rig):
        self._by_object: dict[str, np.ndarray | str | None] = {}
        self._names: dict[str, list[str | None]] = {}
        bone_to_canon = {bone: canon for canon, bone in rig.bone_map.items()}
        arm = rig.armature
        # Unmapped bones (twist, extra spine, accessories) resolve to the nearest mapped ancestor.
        resolve: dict[str, str | None] = {}
        for bone in arm.data.bones:
            b, canon = bone, None
            while b is not None and canon is None:
                canon = bone_to_canon.get(b.name)
                b = b.parent
            resolve[bone.name] = canon
        for obj in rig.meshes:
            groups = [resolve.get(g.name) for g in obj.vertex_groups]
            mesh = obj.data
            if not groups or len(mesh.vertices) == 0:
                parent_bone = obj.parent_bone if obj.parent_type == "BONE" else None
                self._by_object[obj.name] = resolve.get(parent_bone) if parent_bone else None
                continue
            n = len(mesh.vertices)
            best = np.full(n, -1, dtype=np.int64)
            best_w = np.zeros(n)
            for v in mesh.vertices:
                for g in v.groups:
                    if g.weight > best_w[v.index] and groups[g.group] is not None:
                        best_w[v.index], best[v.index] = g.weight, g.group
            loop_start = np.empty(len(mesh.polygons), dtype=np.int64)
            mesh.polygons.foreach_get("loop_start", loop_start)
            loop_vert = np.empty(len(mesh.loops), dtype=np.int64)
            mesh.loops.foreach_get("vertex_index", loop_vert)
            self._by_object[obj.name] = best[loop_vert[loop_start]] if len(loop_start) else None
            self._names[obj.name] = groups

    def part(self, obj_name: str, face_index: int) -> str | None:
        entry = self._by_object.get(obj_name)
        if entry is None or isinstance(entry, str):
            return entry
        if not 0 <= face_index < len(entry):  # topology changed by a modifier: no part known
            return None
        g = int(entry[face_index])
        return self._names[obj_name][g] if g >= 0 else None


_FACE = np.array([kp.kind == "face" for kp in sk.KEYPOINTS])


def occluded(scene, depsgraph, origin: np.ndarray, points: np.ndarray, candidates: np.ndarray,
             parts: PartLookup, surface_tolerance: float, face_tolerance: float) -> np.ndarray:
    """Boolean (K,): keypoints hidden by another body part or object, by ray casting (see module doc).

    ``candidates`` (K,) limits the casts to keypoints that are defined and in frame.
    """
    Vector = import_mathutils().Vector
    out = np.zeros(len(points), dtype=bool)
    o = Vector(origin.tolist())
    for k in np.flatnonzero(candidates):
        d = points[k] - origin
        dist = float(np.linalg.norm(d))
        if dist <= 1e-6:
            continue
        hit, loc, _n, face, obj, _m = scene.ray_cast(depsgraph, o, Vector((d / dist).tolist()), distance=dist)
        if not hit:
            continue
        t_hit = (Vector(loc) - o).length
        if _FACE[k]:
            out[k] = t_hit < dist - face_tolerance
            continue
        if t_hit >= dist - surface_tolerance:
            continue
        part = parts.part(obj.original.name if obj is not None else "", face)
        out[k] = part not in _KP_PARTS[k]
    return out


def keypoints_2d(scene, depsgraph, rig, camera, parts: PartLookup, surface_tolerance: float = 0.02,
                 skel=None):
    """Project the rig's keypoints for ``camera``: (K, 3) float [x, y, visible] and (K,) defined mask.

    Undefined keypoints (the rig lacks the joint) are [0, 0, 0]. ``skel``: the rig's current
    ``posed_skeleton()`` if the caller has it already.
    """
    skel = skel if skel is not None else rig.posed_skeleton()
    pts, defined = sk.compute_keypoints(skel, rig.face_landmarks)
    uv, _z, inside = project(np.where(np.isfinite(pts), pts, 0.0), camera)
    inside &= defined
    h = skel.joint("head")
    head_length = float(np.linalg.norm(skel.tails[h] - skel.heads[h]))
    hidden = occluded(scene, depsgraph, np.asarray(camera.location, dtype=np.float64), pts, inside, parts,
                      surface_tolerance, 0.15 * head_length)
    visible = inside & ~hidden
    out = np.zeros((len(pts), 3))
    out[defined, :2] = uv[defined]
    out[:, 2] = visible
    return out, defined


def pose_record(keypoints: np.ndarray, defined: np.ndarray, width: int, height: int) -> dict:
    """The pose JSON of a shard sample (``docs/shard_format.md``)."""
    kp = [[round(float(x), 2), round(float(y), 2), int(v)] for x, y, v in keypoints]
    return {
        "width": int(width),
        "height": int(height),
        "names": list(sk.KEYPOINT_NAMES),
        "keypoints": kp,
        "defined": [int(d) for d in defined],
    }
