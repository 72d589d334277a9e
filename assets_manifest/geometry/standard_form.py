"""The standard form: canonical A-pose, front view, neutral expression, white background, and the
head at a fixed place and size in the frame for every character.

Head placement (``docs/rendering.md``): the head is the character's measured head geometry
(``CharacterRig.head_geometry``: the vertices skinned to the head bone and its descendants, hats and
helmets included; see ``geometry/head.py``), posed rigidly with the head joint. The centre of
its projected bounding box lands at ``STANDARD_HEAD_CENTER`` (fractions of width, height) and its
projected height spans ``STANDARD_HEAD_HEIGHT`` of the frame height. The camera looks along +Y,
level, from the head centre's height, at focal length ``STANDARD_FOCAL_MM``; its distance is solved
so the projected height is exact (a few fixed-point steps: projected size ~ 1/depth), then a lens
shift moves the projected centre to its place (a shift does not change sizes), so both numbers
hold exactly. Rigs without head geometry (the mannequin test character) use the head bone: centre
= its midpoint, height = its length. A procedural adult (~7 measured heads tall, hair included)
then ends at ~86% of the frame height; a child's body ends higher; tall characters are cut at the
feet; big-headed characters (chibis, robots) are small below their head.
"""

from __future__ import annotations

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.geometry.camera import CameraSpec, look_rotation
from serialgen.assets_manifest.geometry.head import HeadGeometry

__all__ = [
    "STANDARD_HEAD_CENTER",
    "STANDARD_HEAD_HEIGHT",
    "STANDARD_FOCAL_MM",
    "STANDARD_EXPRESSION",
    "standard_angles",
    "standard_camera",
    "head_box",
    "reference_standard_keypoints",
]

STANDARD_HEAD_CENTER = (0.5, 0.12)
STANDARD_HEAD_HEIGHT = 0.11
STANDARD_FOCAL_MM = 85.0
STANDARD_EXPRESSION = "neutral"


def standard_angles() -> np.ndarray:
    """The canonical A-pose: every joint angle zero, (J, 3) degrees (skeleton.py rest pose)."""
    return np.zeros((len(sk.JOINT_NAMES), 3), dtype=np.float32)


def _head(skel: sk.PosedSkeleton, head: HeadGeometry | None) -> HeadGeometry:
    if head is not None:
        return head
    i = skel.joint("head")
    a, b = np.asarray(skel.heads[i], dtype=np.float64), np.asarray(skel.tails[i], dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.linalg.norm(b - a) < 1e-4:
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    return HeadGeometry.from_bone(float(np.linalg.norm(b - a)))


def _extent(camera: CameraSpec, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uv, _ = camera.project(pts)
    return uv.min(0), uv.max(0)


def standard_camera(skel: sk.PosedSkeleton, width: int, height: int,
                    head: HeadGeometry | None = None, iterations: int = 8) -> CameraSpec:
    """Front camera that puts the head of ``skel`` (posed in the A-pose) at the standard place.

    ``head``: the rig's measured head (``head_geometry.head_geometry_of``); None = the head bone.
    """
    geo = _head(skel, head)
    pts = geo.world_points(skel)
    centre = geo.world_center(skel)
    target = STANDARD_HEAD_HEIGHT * height
    cam = CameraSpec(np.zeros(3), look_rotation(np.array([0.0, 1.0, 0.0])), STANDARD_FOCAL_MM, width, height)
    # Distance from the centre's depth plane; the nearest head point stays >= 1 head size away.
    front = float(centre[1] - pts[:, 1].min())
    distance = max(cam.focal_px * geo.height / target, front + geo.height)
    for _ in range(iterations):
        cam.location = centre - np.array([0.0, distance, 0.0])
        lo, hi = _extent(cam, pts)
        span = float(hi[1] - lo[1])
        if span <= 0:
            break
        # Projected size ~ 1 / depth: scale the depth of the head's nearest point.
        distance = front + (distance - front) * span / target
    cam.location = centre - np.array([0.0, distance, 0.0])
    lo, hi = _extent(cam, pts)
    mid = 0.5 * (lo + hi)  # projected box centre with no shift
    long_side = max(width, height)
    # Shift moves the principal point: cx = W/2 - shift_x * L, cy = H/2 + shift_y * L.
    cam.shift_x = (mid[0] - STANDARD_HEAD_CENTER[0] * width) / long_side
    cam.shift_y = (STANDARD_HEAD_CENTER[1] * height - mid[1]) / long_side
    return cam


def head_box(skel: sk.PosedSkeleton, camera: CameraSpec, head: HeadGeometry | None = None) -> dict:
    """Projected head (recorded in meta.json): box centre (x, y) and height in pixels, the head's
    source ("weights" | "influence" | "bone") and its measured size in metres."""
    geo = _head(skel, head)
    lo, hi = _extent(camera, geo.world_points(skel))
    return {"center": [round(float(0.5 * (lo[0] + hi[0])), 3), round(float(0.5 * (lo[1] + hi[1])), 3)],
            "height": round(float(hi[1] - lo[1]), 3), "width": round(float(hi[0] - lo[0]), 3),
            "source": geo.source, "size_m": [round(float(x), 4) for x in geo.size]}


def reference_standard_keypoints(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical standard pose: the reference figure (``skeleton.py``, 1.75 m, A-pose, head =
    its head bone) seen by :func:`standard_camera` in a ``width`` x ``height`` standard image.

    Returns (K, 2) float32 pixel positions (0 where not visible) and (K,) bool visibility (defined and
    inside the frame), in ``skeleton.KEYPOINT_NAMES`` order. This is the standard pose a model gets
    at inference on a picture, where no character of ours defines one.
    """
    skel = sk.forward_kinematics(np.zeros((len(sk.JOINTS), 3)))
    kp3, defined = sk.compute_keypoints(skel)
    uv, z = standard_camera(skel, width, height).project(kp3)
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    vis = defined & inside
    return np.where(vis[:, None], uv, 0).astype(np.float32), vis
