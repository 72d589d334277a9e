"""Cameras: the pinhole model shared by rendering and keypoint projection, random views, framing.

Pure numpy (no bpy), so the geometry is testable without Blender; ``render/camera.py`` applies a
:class:`CameraSpec` to a Blender camera.

Conventions (documented in ``docs/rendering.md``):

* World: metres, Z up, the character faces -Y (skeleton.py).
* A Blender camera looks along its local -Z with +Y up. ``CameraSpec.rotation`` is the (3, 3)
  world rotation of the camera object (columns: camera right, up, backward).
* The sensor is 36 mm wide on the image's *longer* side (Blender ``sensor_fit='AUTO'``), so a focal
  length in mm means what it means on a full-frame camera. Square pixels.
* Pixels: x to the right, y down, origin at the top-left corner of the top-left pixel (a pixel's
  centre is at +0.5). Intrinsics ``K`` and extrinsics ``world_to_camera`` follow OpenCV (camera x
  right, y down, z forward).
* Azimuth 0 = camera in front of the character (on the -Y side, looking +Y); 90 = on the character's
  left (+X); elevation > 0 = camera above, looking down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "SENSOR_MM",
    "FRAMING_SHARES",
    "ViewRanges",
    "ViewSample",
    "CameraSpec",
    "look_rotation",
    "sample_view",
    "fit_camera",
    "keep_clear",
    "clearance_for",
    "CLIP_START",
    "CLEARANCE_FRACTION",
    "view_direction",
    "view_to_json",
]

SENSOR_MM = 36.0
CLIP_START = 0.01  # metres, the Blender camera's near clip distance
# The camera keeps this fraction of the character's height (plus 2 near-clip distances) away from
# the character's evaluated mesh bounds: a close-up never starts inside the body or the head.
CLEARANCE_FRACTION = 0.05

# Share of each framing among non-standard images (sums to 1): mostly full body, as the standard
# image is full body; close-ups teach the model to complete a body it does not see.
FRAMING_SHARES: dict[str, float] = {"full_body": 0.5, "upper_body": 0.3, "head": 0.2}


@dataclass(frozen=True)
class ViewRanges:
    """Ranges the random views are drawn from (uniform). Angles in degrees, focal length in mm.

    ``fill`` is, per framing, the fraction of the frame (the limiting dimension) the framed region
    covers; ``jitter`` moves the framed region off-centre by up to that fraction of the free margin.
    """

    azimuth: tuple[float, float] = (0.0, 360.0)
    elevation: tuple[float, float] = (-10.0, 35.0)
    focal_mm: tuple[float, float] = (35.0, 85.0)
    framing_shares: dict[str, float] = field(default_factory=lambda: dict(FRAMING_SHARES))
    fill: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "full_body": (0.70, 0.95), "upper_body": (0.80, 1.0), "head": (0.40, 0.70)})
    jitter: float = 0.5


@dataclass(frozen=True)
class ViewSample:
    """One drawn view: where the camera looks from and how tightly it frames."""

    azimuth: float
    elevation: float
    focal_mm: float
    framing: str
    fill: float
    offset: tuple[float, float]  # (-1..1, -1..1): position of the framed region in the free margin


@dataclass
class CameraSpec:
    """A pinhole camera: world ``location`` (3,), world ``rotation`` (3, 3) of the Blender camera
    object, ``focal_mm``, image ``width``/``height`` in pixels, lens ``shift_x``/``shift_y``
    (Blender units: fractions of the longer image side)."""

    location: np.ndarray
    rotation: np.ndarray
    focal_mm: float
    width: int
    height: int
    shift_x: float = 0.0
    shift_y: float = 0.0
    pushed_back_m: float = 0.0  # how far keep_clear moved the camera back (0: the fit was clear)

    @property
    def focal_px(self) -> float:
        return self.focal_mm / SENSOR_MM * max(self.width, self.height)

    def intrinsics(self) -> np.ndarray:
        """(3, 3) OpenCV intrinsics in pixels."""
        long_side = max(self.width, self.height)
        cx = self.width / 2.0 - self.shift_x * long_side
        cy = self.height / 2.0 + self.shift_y * long_side
        f = self.focal_px
        return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])

    def world_to_camera(self) -> np.ndarray:
        """(4, 4) world -> OpenCV camera coordinates (x right, y down, z forward), metres."""
        flip = np.diag([1.0, -1.0, -1.0])
        r = flip @ self.rotation.T
        out = np.eye(4)
        out[:3, :3] = r
        out[:3, 3] = -r @ self.location
        return out

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (N, 3) -> pixels (N, 2) and depth along the view axis (N,), metres.

        Points behind the camera get depth <= 0 (their pixels are meaningless).
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        m = self.world_to_camera()
        cam = points @ m[:3, :3].T + m[:3, 3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = (cam[:, :2] / z[:, None]) @ self.intrinsics()[:2, :2].T + self.intrinsics()[:2, 2]
        return uv, z

    def to_json(self) -> dict:
        """Intrinsics, extrinsics and Blender parameters as plain lists (for meta.json)."""
        return {
            "model": "pinhole",
            "width": self.width,
            "height": self.height,
            "K": np.round(self.intrinsics(), 6).tolist(),
            "world_to_camera": np.round(self.world_to_camera(), 6).tolist(),
            "location": np.round(self.location, 6).tolist(),
            "focal_mm": round(float(self.focal_mm), 6),
            "sensor_mm": SENSOR_MM,
            "shift": [round(float(self.shift_x), 6), round(float(self.shift_y), 6)],
            "pushed_back_m": round(float(self.pushed_back_m), 6),
        }


def look_rotation(forward: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera object rotation (3, 3) looking along ``forward`` with the world ``up`` kept upright."""
    f = np.asarray(forward, dtype=np.float64)
    f = f / np.linalg.norm(f)
    right = np.cross(f, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight up/down: any right vector will do
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, f)
    return np.stack([right, cam_up, -f], axis=1)


def view_direction(azimuth: float, elevation: float) -> np.ndarray:
    """Unit vector from the subject to the camera for ``azimuth``/``elevation`` in degrees."""
    a, e = np.deg2rad(azimuth), np.deg2rad(elevation)
    return np.array([np.sin(a) * np.cos(e), -np.cos(a) * np.cos(e), np.sin(e)])


def _choice(rng: np.random.Generator, shares: dict[str, float]) -> str:
    names = sorted(shares)
    p = np.array([shares[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_view(rng: np.random.Generator, ranges: ViewRanges = ViewRanges()) -> ViewSample:
    """Draw one random view (the draw order is fixed, so a seed fixes the view)."""
    framing = _choice(rng, ranges.framing_shares)
    lo, hi = ranges.fill[framing]
    return ViewSample(
        azimuth=float(rng.uniform(*ranges.azimuth)) % 360.0,
        elevation=float(rng.uniform(*ranges.elevation)),
        focal_mm=float(rng.uniform(*ranges.focal_mm)),
        framing=framing,
        fill=float(rng.uniform(lo, hi)),
        offset=(float(rng.uniform(-1, 1) * ranges.jitter), float(rng.uniform(-1, 1) * ranges.jitter)),
    )


def clearance_for(lo: np.ndarray, hi: np.ndarray) -> float:
    """Clearance (metres) kept between the camera and mesh bounds ``lo``/``hi`` (3,) of a character."""
    return CLEARANCE_FRACTION * float(hi[2] - lo[2]) + 2.0 * CLIP_START


def keep_clear(cam: CameraSpec, back: np.ndarray, lo: np.ndarray, hi: np.ndarray, clearance: float) -> float:
    """Move ``cam`` back along ``back`` (unit, subject -> camera) until it is outside the box
    ``[lo - clearance, hi + clearance]``; returns the distance moved (0 when it already was).

    Moving along the optical axis keeps the framed region centred on the same image point and
    only makes it smaller, so a close-up that would start inside the body becomes a wider shot.
    """
    lo = np.asarray(lo, dtype=np.float64) - clearance
    hi = np.asarray(hi, dtype=np.float64) + clearance
    p = np.asarray(cam.location, dtype=np.float64)
    if not ((p > lo).all() and (p < hi).all()):
        return 0.0
    back = np.asarray(back, dtype=np.float64)
    with np.errstate(divide="ignore"):
        exits = np.where(back > 1e-12, (hi - p) / back, np.where(back < -1e-12, (lo - p) / back, np.inf))
    t = float(exits.min()) + 1e-6
    cam.location = p + back * t
    return t


def fit_camera(view: ViewSample, points: np.ndarray, width: int, height: int, iterations: int = 6,
               bounds: tuple[np.ndarray, np.ndarray] | None = None, clearance: float | None = None) -> CameraSpec:
    """Place a camera for ``view`` so that ``points`` (N, 3) fill ``view.fill`` of the frame.

    The look direction is fixed by azimuth/elevation; distance and a sideways/vertical offset are
    solved by a few fixed-point steps (projected size scales with 1/depth), then the framed region
    is moved off-centre by ``view.offset`` times the free margin. ``bounds``: the character's
    evaluated mesh bounds (min xyz, max xyz); the camera then ends outside them by ``clearance``
    metres (default :func:`clearance_for`), pushed back along the view axis if needed
    (``CameraSpec.pushed_back_m``).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    back = view_direction(view.azimuth, view.elevation)
    rot = look_rotation(-back)
    right, up = rot[:, 0], rot[:, 1]
    centre = 0.5 * (points.min(0) + points.max(0))
    radius = max(float(np.linalg.norm(points - centre, axis=1).max()), 1e-3)
    cam = CameraSpec(centre + back * 3.0 * radius, rot, view.focal_mm, width, height)
    fx = cam.focal_px
    distance = fx * radius / (view.fill * 0.5 * min(width, height)) + radius
    cam.location = centre + back * distance
    target_w, target_h = view.fill * width, view.fill * height
    for _ in range(iterations):
        uv, z = cam.project(points)
        if (z <= 1e-3).any():  # a point behind the camera: back off and retry
            cam.location = cam.location + back * radius
            continue
        lo, hi = uv.min(0), uv.max(0)
        mean_z = float(np.median(z))
        scale = max((hi[0] - lo[0]) / target_w, (hi[1] - lo[1]) / target_h)
        du, dv = (lo + hi) / 2 - np.array([width / 2, height / 2])
        # Centre the region (pixels -> metres at the median depth), then scale the distance.
        cam.location = cam.location + right * du * mean_z / fx - up * dv * mean_z / fx
        cam.location = cam.location + back * mean_z * (scale - 1.0)
    uv, z = cam.project(points)
    lo, hi = uv.min(0), uv.max(0)
    free = np.maximum(np.array([width, height]) - (hi - lo), 0.0) / 2
    shift_px = np.asarray(view.offset) * free
    mean_z = float(np.median(z))
    cam.location = cam.location - right * shift_px[0] * mean_z / fx + up * shift_px[1] * mean_z / fx
    if bounds is not None:
        b_lo, b_hi = (np.asarray(b, dtype=np.float64) for b in bounds)
        margin = clearance_for(b_lo, b_hi) if clearance is None else float(clearance)
        cam.pushed_back_m = keep_clear(cam, back, b_lo, b_hi, margin)
    return cam


def view_to_json(view: ViewSample) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(view).items()}
