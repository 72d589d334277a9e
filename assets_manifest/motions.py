"""The 18 built-in parametric motion sets on the canonical skeleton (``skeleton.py``).

Each motion set is a vectorised function of a phase in [0, 1) and a few shape parameters, given as
uniform numbers ``u`` in [0, 1) that the function maps to its own ranges (stride, depth, height...).
It returns joint angles ``(M, J, 3)`` in degrees (flex, abduct, twist; zeros = the A-pose rest) in
``skeleton.JOINT_NAMES`` order, clamped into the joint limits, and an extra root offset ``(M, 3)``
in metres (only what ground contact cannot derive, e.g. the flight height of a jump; the pose
library puts the lowest point of the body on the floor itself).

Asymmetric motions (wave with one hand, kick with one leg...) are written for one side and mirrored
for half of the samples by the sampler (``mirror_pose``), so both sides are covered.

The list and the meaning of each parameter are documented in ``docs/poses.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from serialgen.assets_manifest import skeleton as sk

__all__ = [
    "MotionSet",
    "MOTION_SETS",
    "MOTION_NAMES",
    "arm_angles",
    "mirror_pose",
    "sample_motion",
]

J = len(sk.JOINT_NAMES)
_IDX = sk.JOINT_INDEX
_FINGERS = list(sk.HAND_JOINTS)
_TAU = 2.0 * np.pi


# ---------------------------------------------------------------------------------------------
# Small vectorised helpers
# ---------------------------------------------------------------------------------------------


def _lerp(u, lo, hi):
    return lo + (hi - lo) * u


def _ease(t):
    """Smoothstep: zero velocity at keyframes, so interpolated motions have no kinks."""
    return t * t * (3.0 - 2.0 * t)


def _keys(phase: np.ndarray, times, values) -> np.ndarray:
    """Eased piecewise interpolation. ``times`` (K,) ascending in [0, 1]; ``values`` K scalars or
    (M,) arrays (per-sample keyframe values). Returns (M,)."""
    phase = np.asarray(phase, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    vals = np.stack(np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in values], phase))[:-1]
    k = np.clip(np.searchsorted(times, phase, side="right") - 1, 0, len(times) - 2)
    t0, t1 = times[k], times[k + 1]
    t = _ease(np.clip((phase - t0) / np.maximum(t1 - t0, 1e-9), 0.0, 1.0))
    cols = np.arange(phase.shape[0])
    return vals[k, cols] * (1.0 - t) + vals[k + 1, cols] * t


def _relu(x):
    return np.maximum(x, 0.0)


_S45 = float(np.sqrt(0.5))
_ARM_FLEX = np.array([-_S45, 0.0, -_S45])  # left upper-arm flex axis at rest
_ARM_REST = np.array([_S45, 0.0, -_S45])  # left upper-arm direction at rest
_ARM_UP = np.array([_S45, 0.0, _S45])  # abduct axis x rest direction
_BEND_REST = np.array([0.0, -1.0, 0.0])  # where the forearm goes when the elbow flexes at rest
_ARM_ABD = np.array([0.0, -1.0, 0.0])  # left upper-arm abduct axis


def _rodrigues(v, axis, theta):
    """Rotate vectors v (M, 3) about unit axes (M, 3) by theta (M,) radians."""
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    return v * c + np.cross(axis, v) * s + axis * (np.sum(axis * v, axis=1, keepdims=True)) * (1 - c)


def arm_angles(forward, side, bend=None):
    """Left upper-arm (flex, abduct, twist) in degrees that point the arm in a world direction.

    The direction is the hanging arm (straight down) rotated ``forward`` degrees towards the front
    (-Y; 90 = horizontal forward, 180 = straight up) and then ``side`` degrees out to the left
    (+X). ``bend`` (M, 3) or (3,), optional: the world direction the forearm should move to when the
    elbow flexes (the twist is solved for it). Arrays broadcast to (M,). The right arm uses the
    same angles (the skeleton mirrors them).
    """
    fw = np.deg2rad(np.asarray(forward, dtype=np.float64))
    sd = np.deg2rad(np.asarray(side, dtype=np.float64))
    fw, sd = np.broadcast_arrays(np.atleast_1d(fw), np.atleast_1d(sd))
    t = np.stack([np.sin(sd), -np.sin(fw) * np.cos(sd), -np.cos(fw) * np.cos(sd)], axis=1)
    # R = Rot(flex axis, f) Rot(abduct axis, a): the flex rotation keeps the component along its
    # axis, and Rot(abduct, a) rest . flex_axis = -sin(a), so a follows from t alone.
    a = np.arcsin(np.clip(-(t @ _ARM_FLEX), -1.0, 1.0))
    d1 = np.cos(a)[:, None] * _ARM_REST + np.sin(a)[:, None] * _ARM_UP
    p1 = d1 - np.outer(d1 @ _ARM_FLEX, _ARM_FLEX)
    pt = t - np.outer(t @ _ARM_FLEX, _ARM_FLEX)
    f = np.arctan2(np.cross(p1, pt) @ _ARM_FLEX, np.sum(p1 * pt, axis=1))
    twist = np.zeros_like(f)
    if bend is not None:
        bend = np.broadcast_to(np.asarray(bend, dtype=np.float64), t.shape)
        # Where the bend direction goes with twist 0: rotate the rest bend by the same R.
        n = t.shape[0]
        b0 = _rodrigues(_rodrigues(np.broadcast_to(_BEND_REST, (n, 3)), np.broadcast_to(_ARM_ABD, (n, 3)), a),
                        np.broadcast_to(_ARM_FLEX, (n, 3)), f)
        bd = bend - t * np.sum(bend * t, axis=1, keepdims=True)
        bd /= np.maximum(np.linalg.norm(bd, axis=1, keepdims=True), 1e-9)
        # The twist axis is -(bone direction): a positive twist turns b0 about -t.
        twist = np.arctan2(np.sum(np.cross(b0, bd) * -t, axis=1), np.sum(b0 * bd, axis=1))
    return np.rad2deg(f), np.rad2deg(a), np.rad2deg(twist)


class _Pose:
    """A batch of M poses under construction."""

    def __init__(self, m: int):
        self.m = m
        self.angles = np.zeros((m, J, 3))
        self.root = np.zeros((m, 3))

    def set(self, joint, flex=None, abduct=None, twist=None):
        j = _IDX[joint]
        for c, v in enumerate((flex, abduct, twist)):
            if v is not None:
                self.angles[:, j, c] = v
        return self

    def add(self, joint, flex=0.0, abduct=0.0, twist=0.0):
        self.angles[:, _IDX[joint]] += np.stack(np.broadcast_arrays(flex, abduct, twist, np.zeros(self.m)))[:3].T
        return self

    def both(self, base, flex=None, abduct=None, twist=None):
        for side in ("l", "r"):
            self.set(f"{side}_{base}", flex, abduct, twist)
        return self

    def arm(self, side, forward, out, bend=None, elbow=None, twist_add=0.0):
        f, a, t = arm_angles(forward, out, bend)
        self.set(f"{side}_upper_arm", f, a, t + twist_add)
        if elbow is not None:
            self.set(f"{side}_lower_arm", elbow)
        return self

    def leg(self, side, hip=None, knee=None, ankle=None, out=None, turn=None):
        self.set(f"{side}_upper_leg", hip, out, turn)
        self.set(f"{side}_lower_leg", knee)
        self.set(f"{side}_foot", ankle)
        return self

    def fingers(self, side, curl, thumb=None):
        curl = np.asarray(curl, dtype=np.float64)
        for name in _FINGERS:
            if name.startswith(f"{side}_"):
                self.angles[:, _IDX[name], 0] = (0.6 * curl if thumb is None else thumb) if "thumb" in name else curl
        return self

    def done(self):
        return sk.clamp_to_limits(self.angles), self.root


def _mirror_perm() -> tuple[np.ndarray, np.ndarray]:
    perm = np.arange(J)
    for i, n in enumerate(sk.JOINT_NAMES):
        if n.startswith("l_"):
            perm[i] = _IDX["r_" + n[2:]]
        elif n.startswith("r_"):
            perm[i] = _IDX["l_" + n[2:]]
    sign = np.ones((J, 3))
    for n in ("pelvis", "spine", "chest", "neck", "head"):
        sign[_IDX[n], 1:] = -1.0  # lean and turn change direction in a mirror; bending does not
    return perm, sign


_PERM, _SIGN = _mirror_perm()


def mirror_pose(angles: np.ndarray, root: np.ndarray | None = None):
    """Left/right mirror image of poses (..., J, 3) (and root offsets (..., 3): x negated)."""
    out = angles[..., _PERM, :] * _SIGN
    if root is None:
        return out
    return out, root * np.array([-1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# The motion sets. Conventions (skeleton.py): central joints flex + = bend forward, abduct + =
# lean left, twist + = turn left; hips flex + = thigh forward, knees flex + = bend; ankles flex + =
# toes up; arms are placed by world direction through ``arm_angles`` (forward/out degrees).
# Asymmetric sets act with the RIGHT limb (mirrored for half the samples).
# ---------------------------------------------------------------------------------------------

_DOWN_OUT = 8.0  # hanging arms sit a little away from the thighs


def _walk(p, u):
    w = _TAU * p
    st, arm, lean = _lerp(u[:, 0], 0.6, 1.3), _lerp(u[:, 1], 0.4, 1.6), _lerp(u[:, 2], -4, 10)
    s = np.sin(w)
    x = _Pose(len(p))
    for side, sg in (("l", 1.0), ("r", -1.0)):
        ws = w if sg > 0 else w + np.pi
        x.leg(side, hip=4 + 24 * st * np.sin(ws), knee=5 + 55 * st * _relu(np.cos(ws)) ** 1.5,
              ankle=10 * np.sin(ws) - 3)
        x.arm(side, forward=-18 * arm * np.sin(ws), out=_DOWN_OUT, bend=[0, -1, 0],
              elbow=10 + 18 * arm * _relu(-np.sin(ws)))
        x.fingers(side, 25)
    x.set("pelvis", flex=lean * 0.3, twist=6 * st * s)
    x.set("spine", flex=lean * 0.7, twist=-4 * st * s)
    x.set("chest", twist=-4 * st * s)
    return x.done()


def _run(p, u):
    w = _TAU * p
    st, lean, elbow = _lerp(u[:, 0], 0.7, 1.3), _lerp(u[:, 1], 5, 20), _lerp(u[:, 2], 70, 110)
    s = np.sin(w)
    x = _Pose(len(p))
    for side, sg in (("l", 1.0), ("r", -1.0)):
        ws = w if sg > 0 else w + np.pi
        x.leg(side, hip=20 + 40 * st * np.sin(ws), knee=20 + 90 * st * _relu(np.cos(ws - 0.4)),
              ankle=12 * np.sin(ws) - 8)
        x.arm(side, forward=10 - 45 * st * np.sin(ws), out=12, bend=[0, -1, 0.3], elbow=elbow)
        x.fingers(side, 60)
    x.set("pelvis", flex=lean * 0.4, twist=10 * st * s)
    x.set("spine", flex=lean * 0.6, twist=-8 * st * s)
    x.set("chest", twist=-6 * st * s)
    x.set("neck", flex=-lean * 0.5)
    # A short flight phase twice per cycle, while both legs pass each other.
    x.root[:, 2] = 0.06 * st * _relu(np.sin(2 * w - 0.8))
    return x.done()


def _jump(p, u):
    depth, height, arms = u[:, 0], _lerp(u[:, 1], 0.15, 0.55), u[:, 2]
    t = [0.0, 0.25, 0.4, 0.55, 0.75, 0.9, 1.0]
    x = _Pose(len(p))
    hip = _keys(p, t, [5, 40 + 40 * depth, 0, 30 + 50 * u[:, 3], 10, 40 + 30 * depth, 10])
    knee = _keys(p, t, [8, 60 + 50 * depth, 0, 40 + 70 * u[:, 3], 15, 60 + 40 * depth, 10])
    ankle = _keys(p, t, [0, 25, -40, -10, -20, 20, 0])
    x.both("upper_leg", flex=hip)
    x.both("lower_leg", flex=knee)
    x.both("foot", flex=ankle)
    fwd = _keys(p, t, [10, -45, 150 + 20 * arms, 150 - 40 * arms, 110, 40, 10])
    out = _lerp(arms, 5, 35)
    for side in ("l", "r"):
        x.arm(side, forward=fwd, out=out, bend=[0, -1, 0], elbow=_keys(p, t, [10, 20, 5, 30, 20, 30, 10]))
        x.fingers(side, _keys(p, t, [20, 40, 5, 20, 10, 40, 20]))
    x.set("spine", flex=_keys(p, t, [0, 25 + 15 * depth, -10, 15, 0, 25, 5]))
    x.set("neck", flex=_keys(p, t, [0, -15, -10, 5, 0, -10, 0]))
    x.root[:, 2] = height * np.sin(np.pi * np.clip((p - 0.4) / 0.4, 0, 1))
    return x.done()


def _wave(p, u):
    w = _TAU * p
    amp, high, tilt = _lerp(u[:, 0], 10, 30), _lerp(u[:, 1], 0, 1), _lerp(u[:, 2], -10, 10)
    x = _Pose(len(p))
    # Right hand waves: upper arm up and out, forearm vertical, swinging side to side.
    x.arm("r", forward=_lerp(high, 40, 150), out=_lerp(high, 70, 15), bend=[0, 0, 1],
          elbow=_lerp(high, 100, 40) + amp * np.sin(w))
    x.add("r_lower_arm", twist=amp * np.sin(w))
    x.set("r_hand", abduct=20 * np.sin(w))
    x.fingers("r", 0)
    x.arm("l", forward=5 + 10 * u[:, 3], out=_DOWN_OUT, bend=[0, -1, 0], elbow=15 + 30 * u[:, 3])
    x.fingers("l", 30)
    x.set("head", abduct=tilt, twist=-10 + 20 * u[:, 3])
    x.set("spine", abduct=-tilt * 0.3)
    x.both("upper_leg", flex=3, abduct=2)
    return x.done()


def _sit(p, u):
    # Phase 0..0.4: sitting down from standing; 0.4..1: seated, leaning back and forth.
    lean, cross, hands = _lerp(u[:, 0], -10, 25), u[:, 1], u[:, 2]
    x = _Pose(len(p))
    down = _keys(p, [0.0, 0.4, 1.0], [0, 1, 1])
    sway = np.where(p > 0.4, np.sin(_TAU * (p - 0.4) / 0.6), 0.0)
    hip = 5 + 85 * down
    knee = 5 + _lerp(u[:, 3], 70, 100) * down
    x.leg("l", hip=hip, knee=knee, ankle=10 * down * (1 - u[:, 3]), out=4 + 10 * u[:, 4])
    # One leg crosses over the other in the seated part for some samples.
    cr = np.where(cross > 0.6, down, 0.0)
    x.leg("r", hip=hip + 15 * cr, knee=knee - 30 * cr, ankle=0, out=4 + 10 * u[:, 4] - 20 * cr, turn=-10 * cr)
    x.set("spine", flex=(lean + 8 * sway) * down + 20 * _keys(p, [0, 0.2, 0.4], [0, 1, 0]))
    x.set("chest", flex=5 * down)
    x.set("neck", flex=-0.5 * lean * down)
    for side in ("l", "r"):
        x.arm(side, forward=_lerp(hands, 15, 55) * down + 5, out=_lerp(hands, 25, 5),
              bend=[0, -1, 0.2], elbow=_lerp(hands, 80, 20) * down + 10)
        x.fingers(side, 35)
    return x.done()


def _squat(p, u):
    d = 0.5 - 0.5 * np.cos(_TAU * p)  # down and up again
    deep, arms, toes = _lerp(u[:, 0], 0.5, 1.0), u[:, 1], _lerp(u[:, 2], 0, 20)
    x = _Pose(len(p))
    x.both("upper_leg", flex=5 + 110 * deep * d, abduct=5 + toes * 0.5, twist=toes)
    x.both("lower_leg", flex=5 + 135 * deep * d)
    x.both("foot", flex=30 * deep * d)
    x.set("spine", flex=10 + 30 * deep * d)
    x.set("chest", flex=5 * d)
    x.set("neck", flex=-25 * deep * d)
    for side in ("l", "r"):
        x.arm(side, forward=_lerp(arms, 10, 90) * d + 10, out=_lerp(arms, 10, 5),
              bend=[-1, 0, 1], elbow=_lerp(arms, 60, 10) * d + 10)
        x.fingers(side, 20 + 40 * arms * d)
    return x.done()


def _kneel(p, u):
    # The right knee goes down: phase 0..0.5 going down, then kneeling with the torso moving.
    down = _keys(p, [0.0, 0.5, 1.0], [0, 1, 1])
    look = np.where(p > 0.5, np.sin(_TAU * (p - 0.5) / 0.5), 0.0)
    both = u[:, 0] > 0.7  # kneeling on both knees
    x = _Pose(len(p))
    x.leg("l", hip=np.where(both, 0 + 10 * down, 5 + 85 * down), knee=np.where(both, 5 + 95 * down, 5 + 85 * down),
          ankle=np.where(both, -40 * down, 5 * down), out=5)
    x.leg("r", hip=np.where(both, 0 + 10 * down, -5 + 0 * down), knee=5 + 95 * down, ankle=-40 * down, out=3)
    x.set("r_toe", flex=60 * down * (~both))
    x.set("spine", flex=_lerp(u[:, 1], -5, 25) * down + 5 * look)
    x.set("neck", flex=-10 * look * u[:, 2], twist=25 * look * u[:, 2])
    for side in ("l", "r"):
        x.arm(side, forward=_lerp(u[:, 3], 5, 60) * down + 5, out=_lerp(u[:, 3], 15, 5), bend=[0, -1, 0],
              elbow=_lerp(u[:, 4], 10, 90) * down)
        x.fingers(side, 30)
    return x.done()


def _kick(p, u):
    t = [0.0, 0.3, 0.5, 0.7, 1.0]
    high, guard = _lerp(u[:, 0], 45, 110), u[:, 1]
    x = _Pose(len(p))
    x.leg("r", hip=_keys(p, t, [5, 60 + 0.3 * high, high, 60, 5]),
          knee=_keys(p, t, [5, 110, 5, 100, 5]), ankle=_keys(p, t, [0, -20, -35 + 45 * u[:, 2], -20, 0]))
    x.leg("l", hip=_keys(p, t, [5, 10, 20, 10, 5]), knee=_keys(p, t, [5, 20, 15, 20, 5]), out=5,
          turn=_keys(p, t, [0, 15, 30, 15, 0]))
    x.set("spine", flex=_keys(p, t, [0, -5, -15 - 0.1 * high, -5, 0]), twist=_keys(p, t, [0, 5, 10, 5, 0]))
    for side in ("l", "r"):
        x.arm(side, forward=_lerp(guard, 20, 70), out=_lerp(guard, 35, 10), bend=[-1, 0, 1],
              elbow=_lerp(guard, 30, 120))
        x.fingers(side, 90 * guard)
    return x.done()


def _punch(p, u):
    # Boxing stance; the right fist extends at phase 0.5 and comes back.
    ext = np.sin(np.pi * p) ** 2
    hook, height = u[:, 0] > 0.6, _lerp(u[:, 1], 70, 105)
    x = _Pose(len(p))
    x.leg("l", hip=20, knee=20, ankle=5, out=8, turn=10)
    x.leg("r", hip=-10, knee=25, ankle=10, out=8, turn=20)
    x.set("pelvis", twist=-10 - 10 * ext)
    x.set("spine", flex=10, twist=-5 - 20 * ext)
    x.set("chest", twist=-15 * ext)
    x.arm("l", forward=65, out=15, bend=[-1, 0, 1], elbow=125)
    x.arm("r", forward=55 + (height - 55) * ext, out=np.where(hook, 15 + 55 * ext, 15 - 5 * ext),
          bend=[-1, 0, 1], elbow=np.where(hook, 125 - 35 * ext, 125 - 120 * ext))
    x.fingers("l", 95, thumb=60)
    x.fingers("r", 95, thumb=60)
    x.set("neck", flex=_lerp(u[:, 2], -5, 15))
    return x.done()


_ARM_BEND_UP_BACK = np.array([0.0, 0.3, 1.0])  # a throwing forearm cocks up and back


def _throw(p, u):
    # Overhand throw with the right arm: wind-up, release, follow-through; step with the left leg.
    t = [0.0, 0.35, 0.6, 0.8, 1.0]
    power = _lerp(u[:, 0], 0.6, 1.0)
    x = _Pose(len(p))
    x.arm("r", forward=_keys(p, t, [10, -40 * power, 140, 60, 20]), out=_keys(p, t, [10, 70, 20, -10, 5]),
          bend=_ARM_BEND_UP_BACK, elbow=_keys(p, t, [20, 100, 30, 20, 30]))
    x.arm("l", forward=_keys(p, t, [10, 80, 40, 10, 10]), out=_keys(p, t, [10, 30, 30, 20, 10]),
          bend=[0, -1, 0], elbow=_keys(p, t, [10, 30, 60, 60, 20]))
    x.leg("l", hip=_keys(p, t, [5, 40 * power, 30, 25, 5]), knee=_keys(p, t, [5, 40, 20, 15, 5]), ankle=10)
    x.leg("r", hip=_keys(p, t, [5, -10, -20, -25, 5]), knee=_keys(p, t, [5, 20, 20, 30, 5]),
          turn=_keys(p, t, [0, 30, 20, 10, 0]))
    x.set("spine", flex=_keys(p, t, [0, -10, 15, 30 * power, 5]), twist=_keys(p, t, [0, -30, 10, 25, 0]))
    x.set("chest", twist=_keys(p, t, [0, -20, 5, 15, 0]))
    x.fingers("r", _keys(p, t, [50, 60, 10, 10, 30]))
    x.fingers("l", 30)
    x.set("neck", twist=_keys(p, t, [0, 20, 0, -5, 0]) * u[:, 1])
    return x.done()



def _dance(p, u):
    w = _TAU * p
    style = u[:, 0]
    amp = _lerp(u[:, 1], 0.6, 1.2)
    x = _Pose(len(p))
    s, c = np.sin(w), np.cos(w)
    bounce = 0.5 - 0.5 * np.cos(2 * w)
    # Style mixes a disco point (style ~ 0), arms-up sway (~0.5) and a side-step groove (~1).
    disco = _relu(1 - 2 * style)
    up = 1 - np.abs(2 * style - 1)
    groove = _relu(2 * style - 1)
    x.arm("r", forward=20 + amp * (disco * (120 + 40 * s) + up * (130 + 20 * s) + groove * (40 + 40 * s)),
          out=10 + amp * (disco * 30 + up * 30 + groove * (30 - 20 * c)), bend=[0, 0, 1],
          elbow=20 + 60 * groove * bounce + 30 * up * bounce)
    x.arm("l", forward=20 + amp * (disco * (20 - 10 * s) + up * (130 - 20 * s) + groove * (40 - 40 * s)),
          out=10 + amp * (disco * 20 + up * 30 + groove * (30 + 20 * c)), bend=[0, 0, 1],
          elbow=30 + 60 * disco + 60 * groove * bounce + 30 * up * bounce)
    x.fingers("r", 40 * disco)
    x.fingers("l", 40)
    x.set("pelvis", abduct=8 * amp * s, twist=10 * groove * c)
    x.set("spine", abduct=-10 * amp * s, twist=-15 * groove * c)
    x.set("chest", abduct=-5 * amp * s)
    x.set("head", abduct=10 * up * s, flex=-10 * disco)
    for side, sg in (("l", 1.0), ("r", -1.0)):
        x.leg(side, hip=10 + 15 * bounce + 25 * groove * _relu(sg * s), knee=10 + 30 * bounce + 40 * groove * _relu(sg * s),
              ankle=-5 * bounce, out=5 + 10 * amp * _relu(sg * c))
    return x.done()


def _stretch(p, u):
    w = _TAU * p
    side_bend = _lerp(u[:, 0], 10, 30)
    overhead = u[:, 1] > 0.35  # else arms out to the sides (T) with a twist
    x = _Pose(len(p))
    s = np.sin(w)
    for side in ("l", "r"):
        x.arm(side, forward=np.where(overhead, 165, 90), out=np.where(overhead, 8, 80), bend=[0, 0, 1],
              elbow=np.where(overhead, 10 + 20 * u[:, 2], 5))
        x.fingers(side, np.where(overhead, 10, 0))
    x.set("spine", abduct=np.where(overhead, side_bend * s, 0), twist=np.where(overhead, 0, 35 * s),
          flex=-8 * u[:, 2])
    x.set("chest", abduct=np.where(overhead, side_bend * 0.6 * s, 0), twist=np.where(overhead, 0, 25 * s))
    x.set("neck", flex=-15 * u[:, 2])
    x.both("upper_leg", abduct=_lerp(u[:, 3], 2, 20))
    x.both("foot", flex=-25 * (u[:, 4] > 0.5) * (0.5 - 0.5 * np.cos(2 * w)))  # up on the toes
    return x.done()


def _bow(p, u):
    d = np.sin(np.pi * p)  # down and back up
    depth = _lerp(u[:, 0], 30, 95)
    hands = u[:, 1]
    x = _Pose(len(p))
    x.set("spine", flex=0.55 * depth * d)
    x.set("chest", flex=0.3 * depth * d)
    x.set("pelvis", flex=0.1 * depth * d)
    x.set("neck", flex=_lerp(u[:, 2], -10, 25) * d)
    x.both("upper_leg", flex=0)
    x.both("lower_leg", flex=5)
    for side in ("l", "r"):
        # Hands at the sides (Japanese bow) or folded in front (hands > 0.5).
        x.arm(side, forward=np.where(hands > 0.5, 35, 5) + 0.2 * depth * d, out=np.where(hands > 0.5, -5, _DOWN_OUT),
              bend=[-1, 0, 0.3], elbow=np.where(hands > 0.5, 60, 5))
        x.fingers(side, 10)
    return x.done()


def _crouch(p, u):
    # Sneaking in a low crouch: alternating steps, torso forward, arms ready.
    w = _TAU * p
    low, step = _lerp(u[:, 0], 0.6, 1.0), _lerp(u[:, 1], 5, 25)
    x = _Pose(len(p))
    s = np.sin(w)
    for side, sg in (("l", 1.0), ("r", -1.0)):
        x.leg(side, hip=80 * low + step * sg * s, knee=100 * low + 0.5 * step * _relu(sg * np.cos(w)) + 10,
              ankle=25 * low, out=8)
        x.arm(side, forward=_lerp(u[:, 2], 20, 70) - 10 * sg * s, out=15, bend=[-1, -0.5, 1],
              elbow=_lerp(u[:, 3], 30, 100))
        x.fingers(side, 40)
    x.set("spine", flex=35 * low)
    x.set("chest", flex=5)
    x.set("neck", flex=-30 * low, twist=20 * np.sin(w * 0.5) * u[:, 4])
    return x.done()


def _reach(p, u):
    # The right hand reaches to a target (high/forward/side), phase = arm extension out and back.
    ext = np.sin(np.pi * p)
    fwd, out = _lerp(u[:, 0], 60, 175), _lerp(u[:, 1], 0, 70)
    x = _Pose(len(p))
    x.arm("r", forward=5 + (fwd - 5) * ext, out=_DOWN_OUT + (out - _DOWN_OUT) * ext, bend=[0, -1, 0],
          elbow=_lerp(u[:, 2], 40, 90) * (1 - ext) + 5)
    x.fingers("r", 30 * (1 - ext))
    high = _relu(fwd - 120) / 55
    x.arm("l", forward=5 + 30 * u[:, 3] * ext, out=_DOWN_OUT + 20 * u[:, 3] * ext, bend=[0, -1, 0], elbow=20)
    x.fingers("l", 30)
    x.set("spine", flex=(15 * (1 - high) - 5 * high) * ext, abduct=-10 * out / 70 * ext, twist=-10 * ext)
    x.set("chest", abduct=-8 * high * ext)
    x.set("neck", flex=-20 * high * ext)
    x.both("foot", flex=-30 * high * ext)  # tiptoe for high reaches
    x.leg("r", hip=10 * (1 - high) * ext, knee=5)
    x.leg("l", hip=-5 * ext, knee=5 + 10 * ext)
    return x.done()


def _turn(p, u):
    # Looking back over the left shoulder: the twist travels up the spine, one foot pivots.
    t = _keys(p, [0.0, 0.6, 1.0], [0, 1, 0.8])
    amount = _lerp(u[:, 0], 0.5, 1.0)
    x = _Pose(len(p))
    x.set("pelvis", twist=35 * amount * t)
    x.set("spine", twist=30 * amount * t)
    x.set("chest", twist=25 * amount * t)
    x.set("neck", twist=55 * amount * t, flex=-10 * u[:, 1] * t)
    x.set("head", twist=25 * amount * t)
    x.leg("l", hip=5, knee=10 * t, turn=-20 * t)
    x.leg("r", hip=5 + 10 * t, knee=10 + 20 * t, ankle=-20 * t, turn=35 * t)
    for side in ("l", "r"):
        x.arm(side, forward=10 + 20 * u[:, 2] * t, out=_DOWN_OUT + 10 * t, bend=[0, -1, 0], elbow=10 + 30 * u[:, 3] * t)
        x.fingers(side, 30)
    return x.done()


def _clap(p, u):
    # Hands meet in front of the chest (or above the head) and part again.
    apart = 0.5 - 0.5 * np.cos(_TAU * p)
    high = u[:, 0] > 0.7
    x = _Pose(len(p))
    for side in ("l", "r"):
        x.arm(side, forward=np.where(high, 150, _lerp(u[:, 1], 45, 75)), out=np.where(high, 5 + 20 * apart, -5 + 35 * apart),
              bend=[-1.0, 0, 0.3], elbow=np.where(high, 40, 75 - 20 * apart))
        x.set(f"{side}_hand", flex=-20, abduct=10)
        x.fingers(side, 5)
    x.set("spine", flex=_lerp(u[:, 2], -5, 15))
    x.set("head", flex=_lerp(u[:, 3], -15, 10))
    x.both("upper_leg", abduct=3)
    x.both("lower_leg", flex=_lerp(u[:, 2], 0, 20) * apart)
    return x.done()


def _recline(p, u):
    # From reclining on the elbows (phase 0) to lying flat on the back (phase 1). The pelvis tilts
    # back 90 degrees, so the body lies along Y (head at +Y) and hip flexion lifts the thighs.
    up = 1.0 - p
    knees = u[:, 0]
    x = _Pose(len(p))
    x.set("pelvis", flex=-90)
    x.set("spine", flex=_lerp(u[:, 4], 25, 45) * up)
    x.set("chest", flex=_lerp(u[:, 4], 10, 25) * up)
    x.set("neck", flex=15 * up + 25 * u[:, 1] * p, twist=_lerp(u[:, 2], -30, 30))
    # Legs straight along the floor, or the left / both knees drawn up.
    lk = np.where(knees > 0.35, knees, 0.0)
    rk = np.where(knees > 0.7, knees, 0.0)
    x.leg("l", hip=70 * lk, knee=5 + 120 * lk, ankle=-20 + 20 * lk, out=5)
    x.leg("r", hip=70 * rk, knee=5 + 120 * rk, ankle=-20 + 20 * rk, out=5)
    behind_head = u[:, 3] > 0.65
    for side in ("l", "r"):
        # Elbows on the floor behind the shoulders while reclining, by the sides when flat; or
        # hands behind the head.
        x.arm(side, forward=np.where(behind_head, 165, -35 * up), out=np.where(behind_head, 40, 12 + 25 * p),
              bend=np.where(behind_head[:, None], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]),
              elbow=np.where(behind_head, 135, 85 * up + 5))
        x.fingers(side, 20)
    return x.done()


@dataclass(frozen=True)
class MotionSet:
    """One parametric motion: ``fn(phase (M,), u (M, n_params) in [0,1)) -> (angles (M,J,3), root (M,3))``."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    n_params: int
    asymmetric: bool
    doc: str


MOTION_SETS: list[MotionSet] = [
    MotionSet("walk", _walk, 3, False, "gait cycle; stride, arm swing, forward lean"),
    MotionSet("run", _run, 3, False, "running cycle with flight phase; stride, lean, elbow bend"),
    MotionSet("jump", _jump, 4, False, "crouch, take-off, flight (tuck), landing; depth, height, arm style, tuck"),
    MotionSet("wave", _wave, 4, True, "waving one hand; amplitude, hand height, head tilt, idle arm"),
    MotionSet("sit", _sit, 5, True, "sitting down on a chair, then seated sway; lean, crossed legs, hands, knee angle, stance"),
    MotionSet("squat", _squat, 3, False, "squat down and up; depth, arm reach, toe-out"),
    MotionSet("kneel", _kneel, 5, True, "going down on one knee (or both), then looking around; torso, look, arms"),
    MotionSet("kick", _kick, 3, True, "front kick: chamber, extend, retract; height, guard, foot point"),
    MotionSet("punch", _punch, 3, True, "boxing stance with straight punch or hook; style, height, head"),
    MotionSet("throw", _throw, 2, True, "overhand throw: wind-up, release, follow-through; power, head"),
    MotionSet("dance", _dance, 2, False, "three dance styles blended (disco point, arms-up sway, side groove); amplitude"),
    MotionSet("stretch", _stretch, 5, False, "overhead side bends or T-arm twists; bend, style, arch, stance, tiptoe"),
    MotionSet("bow", _bow, 3, False, "bowing down and up; depth, hands at sides or folded, head"),
    MotionSet("crouch", _crouch, 5, False, "sneaking in a low crouch; height, step, arm height, elbow, look"),
    MotionSet("reach", _reach, 4, True, "one hand reaching up/forward/sideways; target direction, elbow, other arm"),
    MotionSet("turn", _turn, 4, True, "turning to look back over the shoulder; amount, head, arms"),
    MotionSet("clap", _clap, 4, False, "clapping in front of the chest or overhead; height, torso, head"),
    MotionSet("recline", _recline, 5, False, "reclining on the elbows to lying on the back; knees, head, arms, torso"),
]
MOTION_NAMES: list[str] = [m.name for m in MOTION_SETS]


def sample_motion(motion: MotionSet, phase: np.ndarray, u: np.ndarray, mirror: np.ndarray | None = None):
    """Evaluate a motion set: phase (M,), u (M, n_params) -> angles (M, J, 3), root offset (M, 3).

    ``mirror`` (M,) bool flips those samples left/right (asymmetric sets only matter)."""
    angles, root = motion.fn(np.asarray(phase, dtype=np.float64), np.asarray(u, dtype=np.float64))
    if mirror is not None and motion.asymmetric:
        ma, mr = mirror_pose(angles, root)
        angles = np.where(mirror[:, None, None], ma, angles)
        root = np.where(mirror[:, None], mr, root)
    return sk.clamp_to_limits(angles), root
