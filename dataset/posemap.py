"""Pose maps in the OpenPose / DWPose colour scheme, drawn from keypoints with PIL (no cv2, no model).

A pose map is what a pose detector (DWPose) draws for a real image at inference time; for rendered
data the keypoints are exact, so the loader draws the same picture from them. Conventions match
DWPose's ``draw_bodypose`` / ``draw_handpose`` (as shipped in ControlNet's annotators):

* **Body** (OpenPose-18): 17 limbs as filled ellipses of half-width ``stickwidth`` (4 px at 512 px)
  in 60 % of the limb colour, then 18 joint discs of radius 4 px in the full joint colour.
* **Feet** (our 6 extra points): OpenPose BODY_25's foot colours, left foot blue (0, 0, 255), right
  foot cyan (0, 255, 255); limbs ankle-big toe, big toe-small toe, ankle-heel, drawn like body limbs.
* **Hands** (OpenPose hand order, 21 per hand): 20 edges 2 px wide, coloured by HSV hue
  ``edge / 20``, then blue (0, 0, 255) discs of radius 4 px.
* **Face** (any keypoint whose name starts with ``face``): white discs of radius 3 px.

Every width and radius is scaled by ``min(W, H) / 512``, so a map at 1024 px looks like DWPose's at
1024 px downscaled. Colours are RGB. Keypoints are continuous pixel coordinates (pixel ``i`` spans
``[i, i + 1)``); invisible points (``visible == 0``) and limbs touching one are not drawn.

Shapes: keypoints ``(K, 2)`` float, visible ``(K,)`` bool, maps ``(H, W, 3)`` uint8.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES

__all__ = [
    "BODY_COLOURS",
    "BODY_LIMBS",
    "FOOT_COLOURS",
    "HAND_EDGES",
    "HAND_EDGE_COLOURS",
    "HAND_POINT_COLOUR",
    "FACE_POINT_COLOUR",
    "LIMB_DIM",
    "Pose",
    "parse_pose",
    "draw_pose_map",
    "draw_pose_image",
    "draw_pose_region",
    "RegionImage",
]

# OpenPose-18 joint colours (index = keypoint), as in DWPose / ControlNet's util.draw_bodypose.
BODY_COLOURS: list[tuple[int, int, int]] = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]
# The 17 limbs DWPose draws (0-based OpenPose-18 indices); limb i has colour BODY_COLOURS[i].
# (OpenPose's list has 19; DWPose draws the first 17, leaving out the two shoulder-ear links.)
BODY_LIMBS: list[tuple[int, int]] = [
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
]
LIMB_DIM = 0.6  # DWPose multiplies the limb layer by 0.6 before drawing joints on top

# Feet: keypoints 18..23 = l_big_toe, l_small_toe, l_heel, r_big_toe, r_small_toe, r_heel.
# (limb, colour): BODY_25 renders the left foot blue and the right foot cyan.
_L_ANKLE, _R_ANKLE = 13, 10
FOOT_LIMBS: list[tuple[int, int]] = [(_L_ANKLE, 18), (18, 19), (_L_ANKLE, 20), (_R_ANKLE, 21), (21, 22), (_R_ANKLE, 23)]
FOOT_COLOURS: list[tuple[int, int, int]] = [(0, 0, 255)] * 3 + [(0, 255, 255)] * 3

# Hands: 21 points, OpenPose order (wrist, then 4 per finger thumb..pinky); offsets 24 (left), 45 (right).
HAND_EDGES: list[tuple[int, int]] = [
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
    (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
]
HAND_EDGE_COLOURS: list[tuple[int, int, int]] = [
    tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(len(HAND_EDGES))
]
HAND_POINT_COLOUR = (0, 0, 255)
FACE_POINT_COLOUR = (255, 255, 255)
_HAND_OFFSETS = (24, 45)
_N_CANONICAL = len(KEYPOINT_NAMES)  # 66

# Unit ellipse outline (cv2.ellipse2Poly draws ~36-72 vertices; 20 is indistinguishable at 4 px).
_T = np.linspace(0, 2 * np.pi, 20, endpoint=False)
_UNIT = np.stack([np.cos(_T), np.sin(_T)], axis=1)


@dataclass
class Pose:
    """Keypoints of one image in the canonical order.

    xy: (66, 2) float32 pixels; visible: (66,) bool; face: (F, 2) float32 extra face points (visible
    only); size: (width, height) of the image the coordinates refer to.
    """

    xy: np.ndarray
    visible: np.ndarray
    size: tuple[int, int]
    face: np.ndarray

    def transformed(self, sx: float, sy: float, tx: float, ty: float, size: tuple[int, int]) -> "Pose":
        """x' = sx x + tx, y' = sy y + ty; points that leave the new image become invisible."""
        xy = self.xy * np.array([sx, sy], np.float32) + np.array([tx, ty], np.float32)
        w, h = size
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        face = self.face * np.array([sx, sy], np.float32) + np.array([tx, ty], np.float32)
        return Pose(xy, self.visible & inside, size, face)

    def as_array(self) -> np.ndarray:
        """(66, 3) float32 rows [x, y, visible]; invisible rows are (0, 0, 0)."""
        out = np.zeros((_N_CANONICAL, 3), np.float32)
        out[:, :2] = np.where(self.visible[:, None], self.xy, 0)
        out[:, 2] = self.visible
        return out


_NAME_INDEX = {n: i for i, n in enumerate(KEYPOINT_NAMES)}


def parse_pose(data: bytes | str | dict) -> Pose:
    """Parse a ``*_pose.json`` ({"width", "height", "names", "keypoints": [[x, y, visible], ...]}).

    Points are matched by name, so files may list extra points (``face*`` points are kept for the
    face layer, others ignored) or omit some (then invisible). Raises ValueError on a malformed file.
    """
    obj = json.loads(data) if isinstance(data, (bytes, str)) else data
    try:
        w, h = int(obj["width"]), int(obj["height"])
        names, kps = obj["names"], obj["keypoints"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"pose json lacks width/height/names/keypoints ({exc})") from None
    if len(names) != len(kps):
        raise ValueError(f"pose json has {len(names)} names but {len(kps)} keypoints")
    arr = np.asarray(kps, dtype=np.float32).reshape(-1, 3) if kps else np.zeros((0, 3), np.float32)
    if not np.isfinite(arr[arr[:, 2] > 0]).all():
        raise ValueError("pose json has non-finite visible keypoints")
    if names == KEYPOINT_NAMES:  # the common case: already canonical
        xy, vis, face = arr[:, :2].copy(), arr[:, 2] > 0, np.zeros((0, 2), np.float32)
    else:
        xy = np.zeros((_N_CANONICAL, 2), np.float32)
        vis = np.zeros(_N_CANONICAL, bool)
        face_rows = []
        for name, row in zip(names, arr):
            i = _NAME_INDEX.get(name)
            if i is not None:
                xy[i], vis[i] = row[:2], row[2] > 0
            elif str(name).startswith("face") and row[2] > 0:
                face_rows.append(row[:2])
        face = np.asarray(face_rows, np.float32).reshape(-1, 2)
    return Pose(xy, vis, (w, h), face)


def line_scale(size: tuple[int, int]) -> float:
    """Factor applied to DWPose's pixel widths: 1 at 512 px on the short side."""
    return min(size) / 512.0


def _limb_polygons(a: np.ndarray, b: np.ndarray, half_width: float) -> np.ndarray:
    """(N, 20, 2) outlines of ellipses spanning a->b with the given half-width (DWPose's limb shape)."""
    centre = (a + b) / 2
    d = b - a
    half_len = np.hypot(d[:, 0], d[:, 1]) / 2
    ang = np.arctan2(d[:, 1], d[:, 0])
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    ex = _UNIT[None, :, 0] * half_len[:, None]
    ey = _UNIT[None, :, 1] * half_width
    return np.stack([centre[:, None, 0] + ex * c - ey * s, centre[:, None, 1] + ex * s + ey * c], axis=2)


def _dim(colour):
    return tuple(int(v * LIMB_DIM) for v in colour)


_BODY_LIMB_FILL = [_dim(BODY_COLOURS[i]) for i in range(len(BODY_LIMBS))]
_FOOT_LIMB_FILL = [_dim(c) for c in FOOT_COLOURS]
_LIMBS_A = np.array([a for a, _ in BODY_LIMBS + FOOT_LIMBS])
_LIMBS_B = np.array([b for _, b in BODY_LIMBS + FOOT_LIMBS])
_LIMB_FILL = _BODY_LIMB_FILL + _FOOT_LIMB_FILL


@dataclass
class RegionImage:
    """An (H, W, 3) uint8 image that is black outside ``region`` (h, w, 3), placed at (x0, y0).

    Pose maps are mostly black; keeping only the drawn box saves drawing, copying and, above all,
    float conversion of the black part (the loader fills it with -1 directly).
    """

    region: np.ndarray
    x0: int
    y0: int
    size: tuple[int, int]

    def full(self) -> np.ndarray:
        w, h = self.size
        out = np.zeros((h, w, 3), np.uint8)
        rh, rw = self.region.shape[:2]
        out[self.y0:self.y0 + rh, self.x0:self.x0 + rw] = self.region
        return out


def draw_pose_region(pose: Pose, size: tuple[int, int] | None = None, *, feet: bool = True, hands: bool = True,
                     face: bool = True) -> RegionImage:
    """Draw ``pose`` (see module doc) on a black canvas of ``size``; only the box around the visible
    keypoints is materialised."""
    size = tuple(size or pose.size)
    w, h = size
    k = line_scale(size)
    drawn = pose.visible.copy()
    drawn[18:24] &= feet
    drawn[24:] &= hands
    pts = np.concatenate([pose.xy[drawn], pose.face if face else pose.face[:0]])
    if len(pts) == 0:
        return RegionImage(np.zeros((0, 0, 3), np.uint8), 0, 0, size)
    margin = 4.0 * k + 2
    x0 = int(max(0, np.floor(pts[:, 0].min() - margin)))
    y0 = int(max(0, np.floor(pts[:, 1].min() - margin)))
    x1 = int(min(w, np.ceil(pts[:, 0].max() + margin)))
    y1 = int(min(h, np.ceil(pts[:, 1].max() + margin)))
    if x1 <= x0 or y1 <= y0:
        return RegionImage(np.zeros((0, 0, 3), np.uint8), 0, 0, size)
    img = Image.new("RGB", (x1 - x0, y1 - y0))
    # PIL puts integer coordinates at pixel centres; ours put pixel centres at i + 0.5.
    _draw(ImageDraw.Draw(img), pose, np.array([x0 + 0.5, y0 + 0.5], np.float32), k, feet, hands, face)
    return RegionImage(np.asarray(img), x0, y0, size)


def _draw(d: ImageDraw.ImageDraw, pose: Pose, origin: np.ndarray, k: float, feet: bool, hands: bool, face: bool) -> None:
    # Coordinates go to PIL as Python floats (numpy scalars in these loops cost more than drawing).
    xy_arr, vis = pose.xy - origin, pose.visible
    xy = xy_arr.tolist()
    n_limbs = len(BODY_LIMBS) + (len(FOOT_LIMBS) if feet else 0)
    ok = vis[_LIMBS_A[:n_limbs]] & vis[_LIMBS_B[:n_limbs]]
    if ok.any():
        idx = np.flatnonzero(ok)
        polys = _limb_polygons(xy_arr[_LIMBS_A[idx]], xy_arr[_LIMBS_B[idx]], 4.0 * k).reshape(len(idx), -1).tolist()
        for j, poly in zip(idx.tolist(), polys):
            d.polygon(poly, fill=_LIMB_FILL[j])
    r = 4.0 * k
    n_points = 24 if feet else 18
    for i in np.flatnonzero(vis[:n_points]).tolist():
        x, y = xy[i]
        d.ellipse((x - r, y - r, x + r, y + r), fill=BODY_COLOURS[i] if i < 18 else FOOT_COLOURS[i - 18])
    if hands:
        w = max(1, int(round(2 * k)))
        for off in _HAND_OFFSETS:
            hv = vis[off:off + 21].tolist()
            if not any(hv):
                continue
            hxy = xy[off:off + 21]
            for e, (a, b) in enumerate(HAND_EDGES):
                if hv[a] and hv[b]:
                    d.line((*hxy[a], *hxy[b]), fill=HAND_EDGE_COLOURS[e], width=w)
            for (x, y), v in zip(hxy, hv):
                if v:
                    d.ellipse((x - r, y - r, x + r, y + r), fill=HAND_POINT_COLOUR)
    if face and len(pose.face):
        rf = 3.0 * k
        for x, y in (pose.face - origin).tolist():
            d.ellipse((x - rf, y - rf, x + rf, y + rf), fill=FACE_POINT_COLOUR)


def draw_pose_image(pose: Pose, size: tuple[int, int] | None = None, **kw) -> Image.Image:
    """Draw ``pose`` on a black RGB canvas of ``size`` (default: the pose's own size); see module doc."""
    return Image.fromarray(draw_pose_region(pose, size, **kw).full())


def draw_pose_map(pose: Pose, size: tuple[int, int] | None = None, **kw) -> np.ndarray:
    """The pose map as an (H, W, 3) uint8 array."""
    return draw_pose_region(pose, size, **kw).full()
