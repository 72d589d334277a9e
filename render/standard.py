"""The standard form: canonical A-pose, front view, neutral expression, white background, and the
head at a fixed place and size in the frame for every character.

Head placement (``docs/rendering.md``): the head bone (canonical joint ``head``: from the top of the
neck to the top of the skull) is vertical in the A-pose. Its midpoint lands at
``STANDARD_HEAD_CENTER`` (fractions of width, height) and its length spans ``STANDARD_HEAD_HEIGHT``
of the frame height. The camera looks along +Y, level, from the head's height, at focal length
``STANDARD_FOCAL_MM``, with a vertical lens shift that puts the head centre where it belongs, so
both numbers are exact for the head bone (which lies in one depth plane) whatever the body below.
An adult (~9.7 head-bone lengths tall, arm span ~7.7) then fills the frame down to ~81% of its
height and ~87% of a 2:3 frame's width; a child's
body ends higher; unusually tall or small-headed characters are cut at the feet.
"""

from __future__ import annotations

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.render.camera import CameraSpec, look_rotation

__all__ = [
    "STANDARD_HEAD_CENTER",
    "STANDARD_HEAD_HEIGHT",
    "STANDARD_FOCAL_MM",
    "STANDARD_EXPRESSION",
    "standard_angles",
    "standard_camera",
    "head_box",
    "on_white",
]

STANDARD_HEAD_CENTER = (0.5, 0.12)
STANDARD_HEAD_HEIGHT = 0.075
STANDARD_FOCAL_MM = 85.0
STANDARD_EXPRESSION = "neutral"


def standard_angles() -> np.ndarray:
    """The canonical A-pose: every joint angle zero, (J, 3) degrees (skeleton.py rest pose)."""
    return np.zeros((len(sk.JOINT_NAMES), 3), dtype=np.float32)


def _head_bone(skel: sk.PosedSkeleton) -> tuple[np.ndarray, np.ndarray]:
    i = skel.joint("head")
    head, tail = np.asarray(skel.heads[i], dtype=np.float64), np.asarray(skel.tails[i], dtype=np.float64)
    if not (np.isfinite(head).all() and np.isfinite(tail).all()) or np.linalg.norm(tail - head) < 1e-4:
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    return head, tail


def standard_camera(skel: sk.PosedSkeleton, width: int, height: int) -> CameraSpec:
    """Front camera that puts the head bone of ``skel`` (posed in the A-pose) at the standard place."""
    head, tail = _head_bone(skel)
    centre = 0.5 * (head + tail)
    length = float(np.linalg.norm(tail - head))
    cam = CameraSpec(np.zeros(3), look_rotation(np.array([0.0, 1.0, 0.0])), STANDARD_FOCAL_MM, width, height)
    distance = cam.focal_px * length / (STANDARD_HEAD_HEIGHT * height)
    long_side = max(width, height)
    cam.location = centre - np.array([0.0, distance, 0.0])
    # Principal point at the head centre: cx = W/2 - shift_x * L, cy = H/2 + shift_y * L.
    cam.shift_x = (width / 2.0 - STANDARD_HEAD_CENTER[0] * width) / long_side
    cam.shift_y = (STANDARD_HEAD_CENTER[1] * height - height / 2.0) / long_side
    return cam


def head_box(skel: sk.PosedSkeleton, camera: CameraSpec) -> dict:
    """Projected head bone: centre (x, y) and height in pixels (recorded in meta.json)."""
    head, tail = _head_bone(skel)
    uv, _ = camera.project(np.stack([head, tail, 0.5 * (head + tail)]))
    return {"center": [round(float(uv[2, 0]), 3), round(float(uv[2, 1]), 3)],
            "height": round(float(np.linalg.norm(uv[0] - uv[1])), 3)}


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha uint8 (H, W, 4) over white -> uint8 (H, W, 3), integer maths."""
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)
