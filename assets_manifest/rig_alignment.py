"""Posing any rig through the canonical skeleton: rest alignment and per-bone world rotations.

Pure numpy (no bpy), so the same math serves the procedural generator (which bakes the canonical
A-pose into its rest mesh) and ``serialgen.render.rig.CharacterRig`` (which poses Blender
armatures). Documented in ``docs/characters.md``.

Notation, all in the rig's *armature space* (``frame`` maps world vectors into it):

* ``R[b]`` (3, 3): rest orientation of bone ``b`` (columns = the bone's axes), ``h[b]`` its rest
  head. A bone mapped to canonical joint ``j`` has a *next point*: the rest head of the bone mapped
  to ``NEXT_JOINT[j]`` when that joint is mapped, else its own tail.
* ``A[b]`` (3, 3): the *alignment* at rest. For a mapped bone, the swing that turns its rest
  direction (head -> next point), as already carried by its ancestors' alignment, onto the canonical
  A-pose direction of ``j``, composed with the inherited alignment; unmapped bones, the root
  (``pelvis``) and fingers inherit their parent's alignment unchanged. Inheriting keeps the rest
  twist between parent and child, so a T-pose rig reaches the A-pose without candy-wrapping.
* Posing with canonical world rotations ``G[j]`` (``skeleton.forward_kinematics``): a mapped bone
  gets ``W[b] = G[j] @ A[b] @ R[b]``; an unmapped bone follows its parent rigidly,
  ``W[b] = W[p] @ R[p].T @ R[b]``. Heads follow the parents' posed transforms; the root
  translation moves the top ancestor of the pelvis bone.
* Central joints (``SPREAD_JOINTS``: spine, chest, neck, head) spread their local rotation over
  the unmapped bones between them and their parent joint's bone (lumbar and neck segments of
  detailed rigs): the i-th of k such bones turns by ``L ** (i / (k + 1))``, so a bow bends the
  whole back instead of kinking at one vertebra. Limb twist bones are not spread.
* The canonical world rotation recovered from a posed bone is ``W[b] @ R[b].T @ A[b].T``, which
  is what ``skeleton.PosedSkeleton.world_rot`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serialgen.assets_manifest import skeleton as sk

__all__ = [
    "NEXT_JOINT",
    "SPREAD_JOINTS",
    "fractional_rotation",
    "swing_rotation",
    "RigAlignment",
    "build_alignment",
    "canonical_world_rotations",
    "pose_bones",
    "canonical_rotation_of",
]


def _next_joint() -> dict[str, str | None]:
    nxt: dict[str, str | None] = {"pelvis": "spine", "spine": "chest", "chest": "neck", "neck": "head", "head": None}
    for s in ("l", "r"):
        nxt.update({
            f"{s}_clavicle": f"{s}_upper_arm", f"{s}_upper_arm": f"{s}_lower_arm",
            f"{s}_lower_arm": f"{s}_hand", f"{s}_hand": f"{s}_middle1",
            f"{s}_upper_leg": f"{s}_lower_leg", f"{s}_lower_leg": f"{s}_foot",
            f"{s}_foot": f"{s}_toe", f"{s}_toe": None,
        })
        for f in ("thumb", "index", "middle", "ring", "pinky"):
            nxt.update({f"{s}_{f}1": f"{s}_{f}2", f"{s}_{f}2": f"{s}_{f}3", f"{s}_{f}3": None})
    return nxt


#: Canonical joint -> the joint whose head ends its bone (None: the bone's own tail).
NEXT_JOINT: dict[str, str | None] = _next_joint()
assert set(NEXT_JOINT) == set(sk.JOINT_NAMES)  # invariant: every joint has an entry

#: Joints that never get an alignment of their own: the root (the whole character is already
#: normalised to face -Y, Z up) and the fingers (canonical finger rest positions are nominal only).
_NO_OWN_ALIGNMENT: frozenset[str] = frozenset({"pelvis", *sk.HAND_JOINTS})

#: Joints whose rotation is shared with the unmapped bones just above them (spine segments).
SPREAD_JOINTS: frozenset[str] = frozenset({"spine", "chest", "neck", "head"})

#: Canonical A-pose bone direction (unit, world) per joint.
_CANONICAL_DIRECTIONS: dict[str, np.ndarray] = {
    j.name: (np.subtract(j.tail, j.head) / np.linalg.norm(np.subtract(j.tail, j.head))) for j in sk.JOINTS
}


def swing_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation (3, 3) taking direction ``a`` onto direction ``b``."""
    a = np.asarray(a, dtype=np.float64) / np.linalg.norm(a)
    b = np.asarray(b, dtype=np.float64) / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if c < -1.0 + 1e-9:  # opposite: half turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(axis) < 1e-6:
            axis = np.cross(a, [0.0, 1.0, 0.0])
        return sk.axis_angle_matrix(axis / np.linalg.norm(axis), 180.0)
    k = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def fractional_rotation(r: np.ndarray, t: float) -> np.ndarray:
    """``r ** t`` for a rotation matrix (same axis, angle scaled by t)."""
    r = np.asarray(r, dtype=np.float64)
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    if angle < 1e-9:
        return np.eye(3)
    if np.pi - angle < 1e-6:  # half turn: axis from the symmetric part
        b = (r + np.eye(3)) / 2.0
        axis = b[:, int(np.argmax(np.diag(b)))]
    else:
        axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return sk.axis_angle_matrix(axis / np.linalg.norm(axis), np.rad2deg(angle) * t)


def _topological_order(parents: np.ndarray) -> list[int]:
    children: dict[int, list[int]] = {}
    for b, p in enumerate(parents):
        children.setdefault(int(p), []).append(b)
    order, stack = [], list(reversed(children.get(-1, [])))
    while stack:
        b = stack.pop()
        order.append(b)
        stack.extend(reversed(children.get(b, [])))
    if len(order) != len(parents):
        raise ValueError("bone hierarchy has a cycle or a parent index out of range")
    return order


@dataclass
class RigAlignment:
    """Rest data of one rig plus its per-bone alignment (armature space; see module doc)."""

    bone_names: list[str]
    parents: np.ndarray  # (B,) int, -1 for roots
    heads: np.ndarray  # (B, 3) rest heads
    rest_rots: np.ndarray  # (B, 3, 3) rest orientations
    align: np.ndarray  # (B, 3, 3)
    next_points: np.ndarray  # (B, 3): rest next point (tail for unmapped bones)
    bone_joint: list[str | None]  # canonical joint of each bone, or None
    joint_bone: dict[str, int]  # canonical joint -> bone index (mapped joints only)
    order: list[int]  # parents before children
    frame: np.ndarray  # (3, 3) world -> armature-space rotation
    translate_bone: int  # bone that carries the root translation (-1 if no pelvis)
    spread: dict[int, tuple[str, float]]  # unmapped bone -> (joint whose rotation it shares, fraction)

    def rest_length(self, b: int) -> float:
        return float(np.linalg.norm(self.next_points[b] - self.heads[b]))


def build_alignment(
    bone_names: list[str],
    parents,
    heads,
    tails,
    rest_rots,
    bone_map: dict[str, str],
    frame=None,
) -> RigAlignment:
    """Compute the alignment of a rig to the canonical A-pose.

    bone_names (B,), parents (B,) int (-1 for roots), heads/tails (B, 3), rest_rots (B, 3, 3), all in
    armature space; bone_map: canonical joint -> bone name (unknown joints/bones raise ValueError);
    frame: (3, 3) rotation taking world vectors into armature space (identity by default).
    """
    parents = np.asarray(parents, dtype=np.int64)
    heads = np.asarray(heads, dtype=np.float64)
    tails = np.asarray(tails, dtype=np.float64)
    rest_rots = np.asarray(rest_rots, dtype=np.float64)
    frame = np.eye(3) if frame is None else np.asarray(frame, dtype=np.float64)
    index = {n: i for i, n in enumerate(bone_names)}
    joint_bone: dict[str, int] = {}
    for joint, bone in bone_map.items():
        if joint not in sk.JOINT_INDEX:
            raise ValueError(f"bone_map names unknown canonical joint {joint!r}")
        if bone not in index:
            raise ValueError(f"bone_map maps {joint!r} to {bone!r}, which the armature does not have")
        joint_bone[joint] = index[bone]
    bone_joint: list[str | None] = [None] * len(bone_names)
    for joint, b in joint_bone.items():
        bone_joint[b] = joint

    order = _topological_order(parents)
    align = np.tile(np.eye(3), (len(bone_names), 1, 1))
    next_points = tails.copy()
    for b in order:
        p = parents[b]
        inherited = align[p] if p >= 0 else np.eye(3)
        joint = bone_joint[b]
        if joint is not None:
            nxt = NEXT_JOINT[joint]
            if nxt is not None and nxt in joint_bone:
                next_points[b] = heads[joint_bone[nxt]]
        align[b] = inherited
        if joint is None or joint in _NO_OWN_ALIGNMENT:
            continue
        d = next_points[b] - heads[b]
        if np.linalg.norm(d) < 1e-6:
            continue
        target = frame @ _CANONICAL_DIRECTIONS[joint]
        align[b] = swing_rotation(inherited @ d, target) @ inherited

    spread: dict[int, tuple[str, float]] = {}
    for joint in SPREAD_JOINTS:
        parent_joint = sk.JOINTS[sk.JOINT_INDEX[joint]].parent
        if joint not in joint_bone or parent_joint not in joint_bone:
            continue
        chain, b = [], int(parents[joint_bone[joint]])
        while b >= 0 and b != joint_bone[parent_joint] and bone_joint[b] is None:
            chain.append(b)
            b = int(parents[b])
        if b == joint_bone[parent_joint]:  # only a clean unmapped chain between the two
            for i, bone in enumerate(reversed(chain), start=1):
                spread[bone] = (joint, i / (len(chain) + 1))

    translate_bone = -1
    if "pelvis" in joint_bone:
        translate_bone = joint_bone["pelvis"]
        while parents[translate_bone] >= 0:
            translate_bone = int(parents[translate_bone])
    return RigAlignment(list(bone_names), parents, heads, rest_rots, align, next_points, bone_joint,
                        joint_bone, order, frame, translate_bone, spread)


def canonical_world_rotations(angles) -> np.ndarray:
    """Angles (J, 3) degrees -> canonical world rotations (J, 3, 3) (forward kinematics)."""
    return sk.forward_kinematics(np.asarray(angles, dtype=np.float64)).world_rot


def pose_bones(al: RigAlignment, world_rots: np.ndarray, root_translation=(0.0, 0.0, 0.0)):
    """Posed bone orientations W (B, 3, 3) and heads (B, 3) in armature space.

    world_rots: canonical world rotations (J, 3, 3) in world axes; root_translation in armature
    units along world axes (the caller divides by the armature's scale).
    """
    g = al.frame @ np.asarray(world_rots, dtype=np.float64) @ al.frame.T
    t = al.frame @ np.asarray(root_translation, dtype=np.float64)
    n = len(al.bone_names)
    w = np.zeros((n, 3, 3))
    h = np.zeros((n, 3))
    r = al.rest_rots
    for b in al.order:
        p = al.parents[b]
        joint = al.bone_joint[b]
        if joint is not None:
            w[b] = g[sk.JOINT_INDEX[joint]] @ al.align[b] @ r[b]
        elif b in al.spread:
            sj, frac = al.spread[b]
            j = sk.JOINT_INDEX[sj]
            gp = g[sk.JOINT_INDEX[sk.JOINTS[j].parent]]
            w[b] = gp @ fractional_rotation(gp.T @ g[j], frac) @ al.align[b] @ r[b]
        elif p >= 0:
            w[b] = w[p] @ r[p].T @ r[b]
        else:
            w[b] = r[b]
        if p >= 0:
            h[b] = h[p] + w[p] @ r[p].T @ (al.heads[b] - al.heads[p])
        else:
            h[b] = al.heads[b]
        if b == al.translate_bone:
            h[b] = h[b] + t
    return w, h


def canonical_rotation_of(al: RigAlignment, b: int, posed_rot: np.ndarray) -> np.ndarray:
    """Canonical world rotation (3, 3), world axes, from a posed bone orientation (armature space)."""
    return al.frame.T @ (posed_rot @ al.rest_rots[b].T @ al.align[b].T) @ al.frame
