"""The standard form: canonical A-pose, front view, neutral expression, white background, and the
**face** at a fixed place and size in the frame for every character (the paper: "the face scaled to
a fixed position").

Face placement (``docs/rendering.md``): the face box (``geometry/face.py``: the FFHQ alignment's
square from the eyes and the mouth) of the character in the A-pose, seen from the front, has its
centre at ``STANDARD_FACE_CENTER`` (fractions of width, height) and its side at
``STANDARD_FACE_SIDE`` of the frame height. The camera looks along +Y, level, from the face
centre's height, at focal length ``STANDARD_FOCAL_MM``; its distance is solved so the side is exact
(a few fixed-point steps: projected size ~ 1/depth), then a lens shift moves the centre to its
place (a shift does not change sizes), so both numbers hold exactly. Hair, hats and helmets change
neither: they are not face landmarks. Rigs without landmarks of their own (the mannequin test
character, the reference figure) use ``skeleton.FACE_LANDMARK_DEFAULTS`` and ``face.MOUTH_DEFAULT``.

The reference figure then stands from 0.09 H (crown) to 0.84 H (toes). The head box (the
visible head, hair and hats included: ``head_box``) is what close-ups frame and what "does it fit"
asks (:func:`standard_fit`): a tall hat or a tall figure is cut at the frame's edge, a big-headed
chibi is small below its face; the image is never rescaled to fit, since the face's place and size
are what the model learns.
"""

from __future__ import annotations

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.geometry.camera import CameraSpec, look_rotation
from serialgen.assets_manifest.geometry.face import MOUTH_DEFAULT, face_box
from serialgen.assets_manifest.geometry.head import HeadGeometry

__all__ = [
    "STANDARD_FACE_CENTER",
    "STANDARD_FACE_SIDE",
    "STANDARD_FOCAL_MM",
    "STANDARD_EXPRESSION",
    "standard_angles",
    "face_points",
    "standard_camera",
    "standard_face_box",
    "head_box",
    "standard_fit",
    "reference_standard_keypoints",
]

# The reference figure (1.75 m, hair not counted) stands from 0.09 H to 0.84 H (toes); 84 px at 768.
STANDARD_FACE_CENTER = (0.5, 0.13)
STANDARD_FACE_SIDE = 0.11
STANDARD_FOCAL_MM = 85.0
STANDARD_EXPRESSION = "neutral"
_FACE = ("l_eye", "r_eye", "mouth")


def standard_angles() -> np.ndarray:
    """The canonical A-pose: every joint angle zero, (J, 3) degrees (skeleton.py rest pose)."""
    return np.zeros((len(sk.JOINT_NAMES), 3), dtype=np.float32)


def face_points(skel: sk.PosedSkeleton, landmarks: dict | None = None) -> dict[str, np.ndarray]:
    """World positions (3,) of the face box's landmarks (eyes, mouth) for a posed skeleton.

    ``landmarks``: the rig's face landmarks in head-bone lengths (``Rig.face_landmarks``); missing
    ones come from ``skeleton.FACE_LANDMARK_DEFAULTS`` and ``face.MOUTH_DEFAULT``.
    """
    i = skel.joint("head")
    head, tail = np.asarray(skel.heads[i], dtype=np.float64), np.asarray(skel.tails[i], dtype=np.float64)
    rot = np.asarray(skel.world_rot[i], dtype=np.float64)
    length = float(np.linalg.norm(tail - head))
    if not (np.isfinite(head).all() and np.isfinite(rot).all()) or not length > 1e-4:
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    marks = {**sk.FACE_LANDMARK_DEFAULTS, "mouth": MOUTH_DEFAULT, **(landmarks or {})}
    return {k: head + rot @ (np.asarray(marks[k], dtype=np.float64) * length) for k in _FACE}


def standard_face_box(camera: CameraSpec, points: dict[str, np.ndarray]) -> dict:
    """The face box of world face ``points`` (:func:`face_points`) seen by ``camera``, in pixels."""
    uv, _ = camera.project(np.stack([points[k] for k in _FACE]))
    return face_box(dict(zip(_FACE, uv)))


def standard_camera(skel: sk.PosedSkeleton, width: int, height: int, landmarks: dict | None = None,
                    iterations: int = 8) -> CameraSpec:
    """Front camera that puts the face of ``skel`` (posed in the A-pose) at the standard place.

    ``landmarks``: the rig's face landmarks (``Rig.face_landmarks``; None = the defaults).
    """
    pts = face_points(skel, landmarks)
    stacked = np.stack(list(pts.values()))
    target = STANDARD_FACE_SIDE * height
    cam = CameraSpec(np.zeros(3), look_rotation(np.array([0.0, 1.0, 0.0])), STANDARD_FOCAL_MM, width, height)
    # The box side in metres in the front plane gives the first distance; the steps make it exact.
    e2e = np.linalg.norm((pts["l_eye"] - pts["r_eye"])[[0, 2]])
    e2m = np.linalg.norm((pts["mouth"] - 0.5 * (pts["l_eye"] + pts["r_eye"]))[[0, 2]])
    side_m = 2.0 * max(2.0 * e2e, 1.8 * e2m)
    if not side_m > 1e-6:
        raise ValueError("the face landmarks coincide: no face box")
    eye_mid = 0.5 * (pts["l_eye"] + pts["r_eye"])
    centre = eye_mid + 0.1 * (pts["mouth"] - eye_mid)
    depth_plane = float(stacked[:, 1].min())  # the face's nearest landmark
    distance = cam.focal_px * side_m / target
    for _ in range(iterations):
        cam.location = np.array([centre[0], depth_plane - distance, centre[2]])
        side = standard_face_box(cam, pts)["side"]
        if not side > 0:
            break
        distance *= side / target  # projected size ~ 1 / depth
    cam.location = np.array([centre[0], depth_plane - distance, centre[2]])
    mid = standard_face_box(cam, pts)["center"]
    long_side = max(width, height)
    # Shift moves the principal point: cx = W/2 - shift_x * L, cy = H/2 + shift_y * L.
    cam.shift_x = (mid[0] - STANDARD_FACE_CENTER[0] * width) / long_side
    cam.shift_y = (STANDARD_FACE_CENTER[1] * height - mid[1]) / long_side
    return cam


def _head(skel: sk.PosedSkeleton, head: HeadGeometry | None) -> HeadGeometry:
    if head is not None:
        return head
    i = skel.joint("head")
    a, b = np.asarray(skel.heads[i], dtype=np.float64), np.asarray(skel.tails[i], dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.linalg.norm(b - a) < 1e-4:
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    return HeadGeometry.from_bone(float(np.linalg.norm(b - a)))


def head_box(skel: sk.PosedSkeleton, camera: CameraSpec, head: HeadGeometry | None = None) -> dict:
    """Projected head, hair and hats included (recorded in meta.json): box centre (x, y), height and
    width in pixels, the head's source ("weights" | "influence" | "bone") and its size in metres."""
    geo = _head(skel, head)
    uv, _ = camera.project(geo.world_points(skel))
    lo, hi = uv.min(0), uv.max(0)
    return {"center": [round(float(0.5 * (lo[0] + hi[0])), 3), round(float(0.5 * (lo[1] + hi[1])), 3)],
            "height": round(float(hi[1] - lo[1]), 3), "width": round(float(hi[0] - lo[0]), 3),
            "source": geo.source, "size_m": [round(float(x), 4) for x in geo.size]}


def standard_fit(camera: CameraSpec, head_points: np.ndarray, body_points: np.ndarray) -> dict:
    """Does the character fit the standard frame? ``head_points``: the visible head (world, hats
    included); ``body_points``: every mesh vertex. Returns the projected body's top and bottom rows
    (pixels; may lie outside 0..H), the figure's height as a fraction of the frame height, and
    whether the head and the whole body are inside the frame (recorded as ``std.fit``)."""
    h = camera.height
    head_uv, _ = camera.project(head_points)
    body_uv, _ = camera.project(body_points)
    top, bottom = float(body_uv[:, 1].min()), float(body_uv[:, 1].max())
    inside = lambda uv: bool((uv[:, 0] >= 0).all() and (uv[:, 0] <= camera.width).all()  # noqa: E731
                             and (uv[:, 1] >= 0).all() and (uv[:, 1] <= h).all())
    return {"top_px": round(top, 2), "bottom_px": round(bottom, 2),
            "fill": round((min(bottom, h) - max(top, 0.0)) / h, 4),
            "head_inside": inside(head_uv), "body_inside": inside(body_uv)}


def reference_standard_keypoints(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical standard pose: the reference figure (``skeleton.py``, 1.75 m, A-pose, default
    face landmarks) seen by :func:`standard_camera` in a ``width`` x ``height`` standard image.

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
