"""The canonical humanoid skeleton: joints, hierarchy, rest A-pose, anatomical axes, joint limits,
forward kinematics and keypoint definitions. Pure numpy; documented in ``docs/skeleton.md``.

Conventions (schema ``SKELETON_VERSION``):

* Metres, Z up, the character faces -Y (Blender's front view looks along +Y), so the character's
  left is +X.
* The reference figure is 1.75 m tall and stands in the **A-pose**: upper arms 45 degrees below the
  horizontal in the frontal plane, elbows and wrists straight, palms down, legs 3 degrees apart,
  feet pointing forward. Every character is posed *relative to this rest pose*: the rest pose is
  the standard pose (all joint angles zero).
* A pose is, per joint, three angles in degrees ``(flex, abduct, twist)`` about that joint's three
  *anatomical axes* (world vectors at rest, right-handed). The local rotation of a joint is
  ``R = Rot(flex_axis, flex) @ Rot(abduct_axis, abduct) @ Rot(twist_axis, twist)``, a rotation in the
  world-aligned rest frame. Right-side axes are the mirror images of the left-side ones, so equal
  angles on both sides give mirrored motion. Sign meanings are in ``Joint.doc``.
* The root joint ``pelvis`` also carries a translation (metres) in a pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SKELETON_VERSION",
    "Joint",
    "JOINTS",
    "JOINT_NAMES",
    "JOINT_INDEX",
    "REQUIRED_JOINTS",
    "HAND_JOINTS",
    "KEYPOINT_NAMES",
    "BODY18_NAMES",
    "FOOT6_NAMES",
    "HAND21_NAMES",
    "Keypoint",
    "KEYPOINTS",
    "FACE_LANDMARK_DEFAULTS",
    "axis_angle_matrix",
    "local_rotations",
    "forward_kinematics",
    "PosedSkeleton",
    "compute_keypoints",
    "clamp_to_limits",
    "within_limits",
    "angles_from_rotation",
]

SKELETON_VERSION = 1

_S45 = float(np.sqrt(0.5))


@dataclass(frozen=True)
class Joint:
    """One canonical joint: a bone from ``head`` to ``tail`` at rest (A-pose, metres)."""

    name: str
    parent: str | None
    head: tuple[float, float, float]
    tail: tuple[float, float, float]
    # Anatomical axes (world, at rest), right-handed: flex x abduct = twist.
    flex_axis: tuple[float, float, float]
    abduct_axis: tuple[float, float, float]
    # Limits in degrees: ((flex_min, flex_max), (abd_min, abd_max), (twist_min, twist_max)).
    limits: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    required: bool = True
    doc: str = ""

    @property
    def twist_axis(self) -> tuple[float, float, float]:
        return tuple(np.cross(self.flex_axis, self.abduct_axis).tolist())  # type: ignore[return-value]

    @property
    def axes(self) -> np.ndarray:
        """(3, 3) matrix whose columns are the flex, abduct and twist axes."""
        return np.stack([self.flex_axis, self.abduct_axis, self.twist_axis], axis=1).astype(np.float64)


def _mirror_point(p):
    return (-p[0], p[1], p[2])


def _mirror_axis(a):
    # A reflection turns a rotation about k by theta into one about M k by -theta, i.e. about -M k
    # by theta; negating all three axes also keeps the frame right-handed.
    return (a[0], -a[1], -a[2])


_CENTRAL = "flex +: bend forward; abduct +: lean to the character's left; twist +: turn left"
_CENTRAL_AXES = dict(flex_axis=(1.0, 0.0, 0.0), abduct_axis=(0.0, 1.0, 0.0))
_ARM = (
    "flex +: raise forward / bend the elbow forward; abduct +: raise sideways (up and out); "
    "twist +: about the bone towards the back"
)
# Upper-arm direction at rest (left): out and down at 45 degrees.
_ARM_DIR = (_S45, 0.0, -_S45)
_ARM_AXES = dict(flex_axis=(-_S45, 0.0, -_S45), abduct_axis=(0.0, -1.0, 0.0))


def _left_side() -> list[Joint]:
    sh = (0.18, 0.0, 1.45)
    el = (sh[0] + 0.29 * _S45, 0.0, sh[2] - 0.29 * _S45)
    wr = (el[0] + 0.26 * _S45, 0.0, el[2] - 0.26 * _S45)
    hand_tip = (wr[0] + 0.18 * _S45, 0.0, wr[2] - 0.18 * _S45)
    hip, knee, ankle = (0.09, 0.0, 0.93), (0.112, 0.0, 0.50), (0.134, 0.0, 0.08)
    toe_base, toe_tip = (0.134, -0.13, 0.02), (0.134, -0.19, 0.01)
    legs = dict(flex_axis=(-1.0, 0.0, 0.0), abduct_axis=(0.0, -1.0, 0.0))
    leg_doc = "flex +: leg forward (hip flexion); abduct +: leg out to the side; twist +: toes out"
    return [
        Joint("l_clavicle", "chest", (0.02, 0.0, 1.45), sh, (0.0, 0.0, -1.0), (0.0, -1.0, 0.0),
              ((-15, 25), (-10, 30), (-5, 5)),
              doc="flex +: shoulder forward (protraction); abduct +: shrug up"),
        Joint("l_upper_arm", "l_clavicle", sh, el, **_ARM_AXES,
              limits=((-60, 170), (-40, 130), (-80, 80)), doc=_ARM),
        Joint("l_lower_arm", "l_upper_arm", el, wr, **_ARM_AXES,
              limits=((0, 150), (-5, 5), (-80, 80)), doc="flex +: bend the elbow; twist: forearm roll"),
        Joint("l_hand", "l_lower_arm", wr, hand_tip, **_ARM_AXES,
              limits=((-70, 80), (-30, 30), (-10, 10)), doc="flex +: wrist flexion"),
        Joint("l_upper_leg", "pelvis", hip, knee, **legs,
              limits=((-30, 130), (-25, 60), (-40, 50)), doc=leg_doc),
        Joint("l_lower_leg", "l_upper_leg", knee, ankle, flex_axis=(1.0, 0.0, 0.0),
              abduct_axis=(0.0, 0.0, -1.0), limits=((0, 150), (-5, 5), (-20, 20)),
              doc="flex +: bend the knee (shank backward)"),
        Joint("l_foot", "l_lower_leg", ankle, toe_base, flex_axis=(-1.0, 0.0, 0.0),
              abduct_axis=(0.0, 0.0, 1.0), limits=((-45, 30), (-25, 25), (-20, 20)),
              doc="flex +: toes up (dorsiflexion)"),
        Joint("l_toe", "l_foot", toe_base, toe_tip, flex_axis=(-1.0, 0.0, 0.0),
              abduct_axis=(0.0, 0.0, 1.0), limits=((-30, 60), (0, 0), (0, 0)),
              required=False, doc="flex +: toes up"),
    ]


def _hand_joints(side: str) -> list[Joint]:
    """Optional finger joints (3 segments x 5 fingers) hanging from the hand, for hand keypoints.

    Rest positions are only nominal (a fan along the hand); real rigs supply their own.
    """
    joints = []
    wr = np.array([0.18 + 0.55 * _S45, 0.0, 1.45 - 0.55 * _S45])
    along = np.array(_ARM_DIR)
    for f, finger in enumerate(("thumb", "index", "middle", "ring", "pinky")):
        base = wr + along * (0.03 if finger == "thumb" else 0.09) + np.array([0.0, -0.04 + 0.02 * f, 0.0])
        seg = 0.03 if finger != "pinky" else 0.022
        parent = f"{side}_hand"
        for s in range(1, 4):
            head = base + along * seg * (s - 1)
            tail = head + along * seg
            name = f"{side}_{finger}{s}"
            joints.append(Joint(name, parent, tuple(head.tolist()), tuple(tail.tolist()), **_ARM_AXES,
                                limits=((-10, 100), (-20, 20), (-10, 10)), required=False,
                                doc="flex +: curl"))
            parent = name
    return joints


def _mirror(j: Joint) -> Joint:
    swap = (lambda n: None if n is None else n.replace("l_", "r_", 1) if n.startswith("l_") else n)
    return Joint(swap(j.name), swap(j.parent), _mirror_point(j.head), _mirror_point(j.tail),
                 _mirror_axis(j.flex_axis), _mirror_axis(j.abduct_axis), j.limits, j.required, j.doc)


def _build() -> list[Joint]:
    central = [
        Joint("pelvis", None, (0.0, 0.0, 0.95), (0.0, 0.0, 1.05), **_CENTRAL_AXES,
              limits=((-90, 90), (-45, 45), (-180, 180)), doc="root; " + _CENTRAL),
        Joint("spine", "pelvis", (0.0, 0.0, 1.05), (0.0, 0.0, 1.25), **_CENTRAL_AXES,
              limits=((-30, 60), (-30, 30), (-40, 40)), doc=_CENTRAL),
        Joint("chest", "spine", (0.0, 0.0, 1.25), (0.0, 0.0, 1.48), **_CENTRAL_AXES,
              limits=((-20, 40), (-20, 20), (-30, 30)), doc=_CENTRAL),
        Joint("neck", "chest", (0.0, 0.0, 1.48), (0.0, 0.0, 1.57), **_CENTRAL_AXES,
              limits=((-40, 50), (-35, 35), (-60, 60)), doc=_CENTRAL),
        Joint("head", "neck", (0.0, 0.0, 1.57), (0.0, 0.0, 1.75), **_CENTRAL_AXES,
              limits=((-30, 30), (-20, 20), (-30, 30)), doc=_CENTRAL),
    ]
    left = _left_side() + _hand_joints("l")
    # Mirror after building the left-hand fingers so the right fingers get r_ names.
    return central + left + [_mirror(j) for j in left]


JOINTS: list[Joint] = _build()
JOINT_NAMES: list[str] = [j.name for j in JOINTS]
JOINT_INDEX: dict[str, int] = {n: i for i, n in enumerate(JOINT_NAMES)}
REQUIRED_JOINTS: list[str] = [j.name for j in JOINTS if j.required]
HAND_JOINTS: list[str] = [j.name for j in JOINTS if any(f in j.name for f in ("thumb", "index", "middle", "ring", "pinky"))]

# ---------------------------------------------------------------------------------------------
# Keypoints: OpenPose-18 body order, then 6 foot points (COCO-WholeBody order), then 21 points per
# hand (OpenPose hand order) where the rig has finger bones.
# ---------------------------------------------------------------------------------------------

BODY18_NAMES = [
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
]
FOOT6_NAMES = ["l_big_toe", "l_small_toe", "l_heel", "r_big_toe", "r_small_toe", "r_heel"]
_FINGERS = ("thumb", "index", "middle", "ring", "pinky")
HAND21_NAMES = {
    side: [f"{side}_hand_root"] + [f"{side}_{f}_{k}" for f in _FINGERS for k in range(1, 5)]
    for side in ("l", "r")
}
KEYPOINT_NAMES: list[str] = BODY18_NAMES + FOOT6_NAMES + HAND21_NAMES["l"] + HAND21_NAMES["r"]

# Face landmarks in the head joint's rest frame, as fractions of the head bone length (head joint
# at the top of the neck, tail at the top of the skull). A character may override them with
# measured values (``face_landmarks`` in its manifest record, same frame and units).
FACE_LANDMARK_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "nose": (0.0, -0.62, 0.30),
    "l_eye": (0.18, -0.47, 0.50),
    "r_eye": (-0.18, -0.47, 0.50),
    "l_ear": (0.43, 0.0, 0.40),
    "r_ear": (-0.43, 0.0, 0.40),
}


@dataclass(frozen=True)
class Keypoint:
    """How one keypoint follows from the posed skeleton.

    kind: ``head``/``tail`` of ``joint``; ``mid`` of two joints' heads; ``face`` (a face landmark
    in the head frame); ``offset``: ``joint``'s head plus ``offset`` (fractions of that bone's
    length, in its rest frame, X towards the character's own side).
    """

    name: str
    kind: str
    joint: str
    other: str | None = None
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    required_joints: tuple[str, ...] = field(default=())


def _keypoints() -> list[Keypoint]:
    kps = [
        Keypoint("nose", "face", "head"),
        Keypoint("neck", "mid", "l_upper_arm", "r_upper_arm"),
    ]
    for side in ("r", "l"):
        kps += [
            Keypoint(f"{side}_shoulder", "head", f"{side}_upper_arm"),
            Keypoint(f"{side}_elbow", "head", f"{side}_lower_arm"),
            Keypoint(f"{side}_wrist", "head", f"{side}_hand"),
        ]
    for side in ("r", "l"):
        kps += [
            Keypoint(f"{side}_hip", "head", f"{side}_upper_leg"),
            Keypoint(f"{side}_knee", "head", f"{side}_lower_leg"),
            Keypoint(f"{side}_ankle", "head", f"{side}_foot"),
        ]
    kps += [Keypoint(n, "face", "head") for n in ("r_eye", "l_eye", "r_ear", "l_ear")]
    for side in ("l", "r"):
        kps += [
            # Along the foot bone (ankle -> toe base), offsets in foot-length units.
            Keypoint(f"{side}_big_toe", "offset", f"{side}_foot", offset=(-0.12, -1.45, -0.50)),
            Keypoint(f"{side}_small_toe", "offset", f"{side}_foot", offset=(0.30, -1.15, -0.50)),
            Keypoint(f"{side}_heel", "offset", f"{side}_foot", offset=(0.0, 0.35, -0.40)),
        ]
    for side in ("l", "r"):
        kps.append(Keypoint(f"{side}_hand_root", "head", f"{side}_hand"))
        for f in _FINGERS:
            for k in range(1, 4):
                kps.append(Keypoint(f"{side}_{f}_{k}", "head", f"{side}_{f}{k}"))
            kps.append(Keypoint(f"{side}_{f}_4", "tail", f"{side}_{f}3"))
    return kps


KEYPOINTS: list[Keypoint] = _keypoints()
assert [k.name for k in KEYPOINTS] == KEYPOINT_NAMES  # invariant: definitions follow the order


# ---------------------------------------------------------------------------------------------
# Rotations and forward kinematics
# ---------------------------------------------------------------------------------------------


def axis_angle_matrix(axis, degrees) -> np.ndarray:
    """Rotation matrices for unit ``axis`` (..., 3) by ``degrees`` (...), Rodrigues' formula."""
    axis = np.asarray(axis, dtype=np.float64)
    theta = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    axis, theta = np.broadcast_arrays(axis, theta[..., None])
    theta = theta[..., 0]
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    c, s = np.cos(theta), np.sin(theta)
    C = 1.0 - c
    m = np.stack([
        c + x * x * C, x * y * C - z * s, x * z * C + y * s,
        y * x * C + z * s, c + y * y * C, y * z * C - x * s,
        z * x * C - y * s, z * y * C + x * s, c + z * z * C,
    ], axis=-1)
    return m.reshape(theta.shape + (3, 3))


_AXES = np.stack([j.axes for j in JOINTS])  # (J, 3, 3): columns flex, abduct, twist


def local_rotations(angles: np.ndarray) -> np.ndarray:
    """Angles (..., J, 3) in degrees -> local rotations (..., J, 3, 3) in the rest frame."""
    angles = np.asarray(angles, dtype=np.float64)
    r_f = axis_angle_matrix(_AXES[:, :, 0], angles[..., 0])
    r_a = axis_angle_matrix(_AXES[:, :, 1], angles[..., 1])
    r_t = axis_angle_matrix(_AXES[:, :, 2], angles[..., 2])
    return r_f @ r_a @ r_t


def angles_from_rotation(joint: str, rotation: np.ndarray) -> np.ndarray:
    """Inverse of ``local_rotations`` for one joint: a rest-frame rotation -> (flex, abduct, twist).

    In the joint's anatomical basis B the rotation is ``B^T R B = Rx(f) Ry(a) Rz(t)``, an intrinsic
    XYZ Euler decomposition (used by motion retargeting).
    """
    b = JOINTS[JOINT_INDEX[joint]].axes
    m = b.T @ np.asarray(rotation, dtype=np.float64) @ b
    # Rx(f) Ry(a) Rz(t): m[0,2] = sin(a); m[1,2] = -sin f cos a; m[2,2] = cos f cos a;
    # m[0,1] = -cos a sin t; m[0,0] = cos a cos t.
    a = np.arcsin(np.clip(m[0, 2], -1.0, 1.0))
    f = np.arctan2(-m[1, 2], m[2, 2])
    t = np.arctan2(-m[0, 1], m[0, 0])
    return np.rad2deg(np.array([f, a, t]))


_LIMITS = np.array([j.limits for j in JOINTS], dtype=np.float64)  # (J, 3, 2)


def clamp_to_limits(angles: np.ndarray) -> np.ndarray:
    """Clamp (..., J, 3) angles into the joint limits."""
    return np.clip(angles, _LIMITS[:, :, 0], _LIMITS[:, :, 1])


def within_limits(angles: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Boolean (...) : every joint angle inside its limits."""
    angles = np.asarray(angles)
    ok = (angles >= _LIMITS[:, :, 0] - tol) & (angles <= _LIMITS[:, :, 1] + tol)
    return ok.all(axis=(-1, -2))


_PARENT = np.array([JOINT_INDEX[j.parent] if j.parent else -1 for j in JOINTS])
_REST_HEAD = np.array([j.head for j in JOINTS], dtype=np.float64)
_REST_TAIL = np.array([j.tail for j in JOINTS], dtype=np.float64)


@dataclass
class PosedSkeleton:
    """World-space heads/tails (J, 3), rotations relative to rest (J, 3, 3), and the names.

    ``world_rot[j]`` rotates vectors of joint j's rest frame into the posed world. The renderer
    builds the same structure from a posed Blender armature (only joints the rig has: missing
    joints are NaN), so keypoints are computed by one function for every character.
    """

    names: list[str]
    heads: np.ndarray
    tails: np.ndarray
    world_rot: np.ndarray

    def joint(self, name: str) -> int:
        return self.names.index(name)


def forward_kinematics(angles: np.ndarray, root_translation=(0.0, 0.0, 0.0), scale: float = 1.0) -> PosedSkeleton:
    """Pose the reference figure: angles (J, 3) degrees -> PosedSkeleton (metres)."""
    local = local_rotations(angles)
    n = len(JOINTS)
    world = np.zeros((n, 3, 3))
    heads = np.zeros((n, 3))
    tails = np.zeros((n, 3))
    rest_head, rest_tail = _REST_HEAD * scale, _REST_TAIL * scale
    for j in range(n):  # JOINTS lists every parent before its children
        p = _PARENT[j]
        if p < 0:
            world[j] = local[j]
            heads[j] = rest_head[j] + np.asarray(root_translation, dtype=np.float64)
        else:
            world[j] = world[p] @ local[j]
            heads[j] = heads[p] + world[p] @ (rest_head[j] - rest_head[p])
        tails[j] = heads[j] + world[j] @ (rest_tail[j] - rest_head[j])
    return PosedSkeleton(list(JOINT_NAMES), heads, tails, world)


def compute_keypoints(
    skel: PosedSkeleton,
    face_landmarks: dict[str, tuple[float, float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3D keypoints (K, 3) in KEYPOINT_NAMES order and a mask (K,) of which ones the rig defines.

    Face landmarks are fractions of the head bone length in the head's rest frame; side offsets are
    mirrored so +X means "towards the character's own side" for both sides.
    """
    face = dict(FACE_LANDMARK_DEFAULTS)
    face.update(face_landmarks or {})
    idx = {n: i for i, n in enumerate(skel.names)}
    out = np.full((len(KEYPOINTS), 3), np.nan)

    def present(name):
        i = idx.get(name)
        return i is not None and np.isfinite(skel.heads[i]).all()

    for k, kp in enumerate(KEYPOINTS):
        if not present(kp.joint) or (kp.other and not present(kp.other)):
            continue
        j = idx[kp.joint]
        head, tail, rot = skel.heads[j], skel.tails[j], skel.world_rot[j]
        length = float(np.linalg.norm(tail - head))
        if kp.kind == "head":
            out[k] = head
        elif kp.kind == "tail":
            out[k] = tail
        elif kp.kind == "mid":
            out[k] = 0.5 * (head + skel.heads[idx[kp.other]])
        elif kp.kind == "face":
            out[k] = head + rot @ (np.asarray(face[kp.name]) * length)
        elif kp.kind == "offset":
            off = np.asarray(kp.offset, dtype=np.float64)
            if kp.joint.startswith("r_"):
                off = off * np.array([-1.0, 1.0, 1.0])
            out[k] = head + rot @ (off * length)
        else:  # pragma: no cover - definitions are fixed above
            raise ValueError(f"unknown keypoint kind {kp.kind!r}")
    mask = np.isfinite(out).all(axis=1)
    return out, mask
