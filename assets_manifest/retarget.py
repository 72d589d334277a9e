"""Retarget a motion from any mapped skeleton onto the canonical skeleton. Blender-free.

Method (rest-pose aligned rotation transfer), per frame t and canonical joint j mapped to source
bone b (see ``docs/real_assets.md``):

1. The source is turned to face -Y (the yaw found by the bone mapper), so "forward" agrees.
2. ``D_b(t) = G_b(t) G_b(rest)^T``: the world rotation that carries bone b from its rest pose to
   frame t (G: the bone's world orientation; for BVH the rest orientation is the identity). This is
   independent of how the source rig rolls its bone axes.
3. ``A_j``: the rotation that carries the canonical A-pose rest of joint j onto the source's rest:
   for limbs the smallest rotation taking the canonical bone direction onto the source bone
   direction (head to the next mapped joint's head), which absorbs T-pose vs A-pose differences;
   for the torso (pelvis, spine, chest, neck, head) the identity, since both rests stand upright
   facing -Y and aligning directions there would turn anatomical differences into a lean.
4. The canonical joint's world rotation is ``W_j(t) = D_b(t) A_j``: the canonical bone points where
   the source bone points. Its local rotation is ``W_parent(t)^T W_j(t)`` (W_parent as actually
   reached after clamping the parent), decomposed by ``skeleton.angles_from_rotation`` into
   (flex, abduct, twist), choosing between the two Euler solutions the one inside the limits (then
   the one nearest the previous frame, so arms raised past 90 degrees do not flip), and clamped
   to the joint limits. Unmapped canonical joints keep a zero local rotation.
5. The root translation: vertical = the pelvis height above the clip's lowest ankle, scaled by the
   ratio of the canonical hip-to-ankle height to the source's at rest, minus the canonical hip
   height (0 when standing straight); horizontal = the pelvis motion relative to the clip's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import skeleton as sk
from .bone_maps import MappingResult, effective_tails, map_skeleton

__all__ = ["SourceMotion", "RetargetedMotion", "retarget", "decompose_joint"]


@dataclass
class SourceMotion:
    """A source clip in a Z-up frame.

    names (B,), parents (B,) index or -1, rest_heads (B, 3), rest_tails (B, 3), rest_rot (B, 3, 3)
    the bones' world orientations at rest (identity for BVH), world_rot (F, B, 3, 3),
    world_pos (F, B, 3) joint positions, fps.
    """

    name: str
    names: list[str]
    parents: np.ndarray
    rest_heads: np.ndarray
    rest_tails: np.ndarray
    rest_rot: np.ndarray
    world_rot: np.ndarray
    world_pos: np.ndarray
    fps: float

    def bones(self) -> list[dict]:
        return [{"name": n, "parent": None if p < 0 else self.names[p], "head": self.rest_heads[i].tolist(),
                 "tail": self.rest_tails[i].tolist()} for i, (n, p) in enumerate(zip(self.names, self.parents))]


@dataclass
class RetargetedMotion:
    """angles (F, J, 3) degrees in JOINT_NAMES order, root_translation (F, 3) metres, fps."""

    name: str
    angles: np.ndarray
    root_translation: np.ndarray
    fps: float
    mapped_joints: list[str]

    def as_extra_motion(self) -> dict:
        return {"name": self.name, "angles": self.angles.astype(np.float32),
                "root_translation": self.root_translation.astype(np.float32), "fps": float(self.fps)}


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 1e-12 else v * 0.0


def _rotation_between(a, b) -> np.ndarray:
    """The smallest rotation (3, 3) taking direction ``a`` to direction ``b``."""
    a, b = _unit(a), _unit(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    s = float(np.linalg.norm(v))
    if s < 1e-9:
        if c > 0:
            return np.eye(3)
        # Opposite: half turn about any axis perpendicular to a.
        axis = _unit(np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0]))
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    k = v / s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * kx + (1 - c) * kx @ kx


def _frame(primary, secondary) -> np.ndarray:
    """Orthonormal frame (columns) from a primary direction and a secondary hint."""
    z = _unit(primary)
    x = _unit(np.asarray(secondary) - np.dot(secondary, z) * z)
    if np.linalg.norm(x) < 1e-9:
        return _rotation_between([0, 0, 1], z)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


_JOINT = {j.name: j for j in sk.JOINTS}
_LIMITS = {j.name: np.array(j.limits, dtype=np.float64) for j in sk.JOINTS}


def _wrap(a):
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


def decompose_joint(joint: str, rotation: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """(flex, abduct, twist) for a local rotation, picking the Euler solution inside the limits.

    A rotation has two intrinsic XYZ decompositions, (f, a, t) and (f+180, 180-a, t+180); the one
    ``angles_from_rotation`` returns keeps |a| <= 90 and would flip an arm raised above the
    shoulder. We take the one whose clamping moves it least, then the one nearest ``previous``.
    """
    f, a, t = sk.angles_from_rotation(joint, rotation)
    sols = [np.array([f, a, t]), _wrap(np.array([f + 180.0, 180.0 - a, t + 180.0]))]
    lim = _LIMITS[joint]

    def cost(s):
        clamped = np.clip(s, lim[:, 0], lim[:, 1])
        c = float(np.abs(clamped - s).sum())
        if previous is not None:
            c += 1e-3 * float(np.abs(_wrap(s - previous)).sum())
        return c

    return min(sols, key=cost)


def _local_matrix(joint: str, angles: np.ndarray) -> np.ndarray:
    ax = _JOINT[joint].axes
    return (sk.axis_angle_matrix(ax[:, 0], angles[0]) @ sk.axis_angle_matrix(ax[:, 1], angles[1])
            @ sk.axis_angle_matrix(ax[:, 2], angles[2]))


# The canonical child whose head fixes each joint's rest direction (first mapped one wins).
_DIR_CHILD = {
    "pelvis": ("spine", "chest", "neck", "head"),
    "spine": ("chest", "neck", "head"),
    "chest": ("neck", "head"),
    "neck": ("head",),
}
for _s in ("l", "r"):
    _DIR_CHILD.update({
        f"{_s}_clavicle": (f"{_s}_upper_arm",), f"{_s}_upper_arm": (f"{_s}_lower_arm",),
        f"{_s}_lower_arm": (f"{_s}_hand",), f"{_s}_hand": (f"{_s}_middle1", f"{_s}_index1", f"{_s}_ring1"),
        f"{_s}_upper_leg": (f"{_s}_lower_leg",), f"{_s}_lower_leg": (f"{_s}_foot",),
        f"{_s}_foot": (f"{_s}_toe",),
    })
    for _f in ("thumb", "index", "middle", "ring", "pinky"):
        _DIR_CHILD[f"{_s}_{_f}1"] = (f"{_s}_{_f}2",)
        _DIR_CHILD[f"{_s}_{_f}2"] = (f"{_s}_{_f}3",)

_CENTRAL = ("pelvis", "spine", "chest", "neck", "head")
_CAN_HEAD = {j.name: np.asarray(j.head, dtype=np.float64) for j in sk.JOINTS}
_CAN_TAIL = {j.name: np.asarray(j.tail, dtype=np.float64) for j in sk.JOINTS}


def _alignments(mapping: dict[str, str], heads: dict[str, np.ndarray], ends: dict[str, np.ndarray]) -> dict:
    """A_j for every mapped joint (canonical rest -> source rest), source already turned to face -Y.

    The direction of joint j is taken to the first mapped canonical child (``_DIR_CHILD``) whose
    source head is not (nearly) on top of j's: CMU ``Hips`` and ``LowerBack`` share a head, so the
    pelvis direction goes to the next joint up.
    """
    src_h = [heads[mapping[j]] for j in ("pelvis", "head") if j in mapping]
    can_h = np.linalg.norm(_CAN_HEAD["head"] - _CAN_HEAD["pelvis"])
    scale = float(np.linalg.norm(src_h[1] - src_h[0]) / can_h) if len(src_h) == 2 else 1.0
    out = {}
    for j, b in mapping.items():
        if j in _CENTRAL:
            # Both rests stand upright facing -Y: the torso's rotation transfers as is. (Aligning
            # directions here would turn anatomical differences, e.g. hip joints in front of the
            # spine in real captures, into a permanent lean.)
            out[j] = np.eye(3)
            continue
        d_src = d_can = None
        for c in _DIR_CHILD.get(j, ()):
            if c not in mapping:
                continue
            dc = _CAN_HEAD[c] - _CAN_HEAD[j]
            ds = heads[mapping[c]] - heads[b]
            if np.linalg.norm(ds) > 0.25 * np.linalg.norm(dc) * scale:
                d_src, d_can = ds, dc
                break
        if j == "pelvis" and "l_upper_leg" in mapping and "r_upper_leg" in mapping:
            # Pelvis "up" from the middle of the hip joints to the chest (or neck/head): where the
            # root bone's own head sits varies a lot between rigs (MakeHuman's is behind the spine).
            for c in ("chest", "neck", "head"):
                if c in mapping:
                    mid_s = (heads[mapping["l_upper_leg"]] + heads[mapping["r_upper_leg"]]) / 2
                    mid_c = (_CAN_HEAD["l_upper_leg"] + _CAN_HEAD["r_upper_leg"]) / 2
                    d_src, d_can = heads[mapping[c]] - mid_s, _CAN_HEAD[c] - mid_c
                    break
        if d_src is None:
            d_src = ends[b] - heads[b]
            d_can = _CAN_TAIL[j] - _CAN_HEAD[j]
            if np.linalg.norm(d_src) < 1e-9:
                out[j] = np.eye(3)
                continue
        lateral = None
        if j == "pelvis" and "l_upper_leg" in mapping and "r_upper_leg" in mapping:
            lateral = heads[mapping["l_upper_leg"]] - heads[mapping["r_upper_leg"]]
        elif j in ("chest", "spine", "neck", "head") and "l_upper_arm" in mapping and "r_upper_arm" in mapping:
            lateral = heads[mapping["l_upper_arm"]] - heads[mapping["r_upper_arm"]]
        if lateral is not None:
            out[j] = _frame(d_src, lateral) @ _frame(d_can, np.array([1.0, 0.0, 0.0])).T
        else:
            out[j] = _rotation_between(d_can, d_src)
    return out


def _rz(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def retarget(src: SourceMotion, mapping: MappingResult | None = None) -> RetargetedMotion:
    """Retarget ``src`` onto the canonical skeleton (see the module docstring for the method).

    Raises ValueError when the source skeleton is not a mappable humanoid.
    """
    mapping = mapping or map_skeleton(src.bones())
    if not mapping.accepted:
        raise ValueError(f"{src.name}: skeleton not mappable ({mapping.detail})")
    idx = {n: i for i, n in enumerate(src.names)}
    bm = {j: b for j, b in mapping.bone_map.items() if b in idx}
    yaw = _rz(mapping.yaw_deg)
    ends_raw = effective_tails(src.bones())
    heads = {n: yaw @ src.rest_heads[i] for n, i in idx.items()}
    ends = {n: yaw @ np.asarray(ends_raw[n]) for n in idx}
    align = _alignments(bm, heads, ends)

    n_f = src.world_rot.shape[0]
    joints = [j for j in sk.JOINT_NAMES]
    angles = np.zeros((n_f, len(joints), 3))
    prev: dict[str, np.ndarray] = {}
    for t in range(n_f):
        actual: dict[str, np.ndarray] = {}
        for k, j in enumerate(joints):
            parent = _JOINT[j].parent
            w_parent = actual[parent] if parent else np.eye(3)
            if j not in bm:
                actual[j] = w_parent
                continue
            i = idx[bm[j]]
            delta = yaw @ src.world_rot[t, i] @ src.rest_rot[i].T @ yaw.T
            target = delta @ align[j]
            local = w_parent.T @ target
            ang = decompose_joint(j, local, prev.get(j))
            ang = np.clip(ang, _LIMITS[j][:, 0], _LIMITS[j][:, 1])
            prev[j] = ang
            angles[t, k] = ang
            actual[j] = w_parent @ _local_matrix(j, ang)

    # Root translation: the pelvis height above the clip's lowest ankle, in canonical proportions
    # (so a crouch lowers and a jump raises the root), horizontal motion relative to the clip mean.
    pel = idx[bm["pelvis"]]
    pos = src.world_pos[:, pel] @ yaw.T
    feet = [idx[bm[f"{s}_foot"]] for s in ("l", "r")]
    ankle_z = src.world_pos[:, feet, 2]
    floor = float(ankle_z.min())
    rest_hip = heads[bm["pelvis"]][2] - min(heads[bm["l_foot"]][2], heads[bm["r_foot"]][2])
    can_ankle = _CAN_HEAD["l_foot"][2]
    scale = (_CAN_HEAD["pelvis"][2] - can_ankle) / max(rest_hip, 1e-9)
    trans = np.zeros((n_f, 3))
    trans[:, :2] = (pos[:, :2] - pos[:, :2].mean(axis=0, keepdims=True)) * scale
    trans[:, 2] = (pos[:, 2] - floor) * scale + can_ankle - _CAN_HEAD["pelvis"][2]
    return RetargetedMotion(src.name, angles.astype(np.float32), trans.astype(np.float32), src.fps, sorted(bm))
