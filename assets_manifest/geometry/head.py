"""The head's actual geometry, measured once per character, and face landmarks estimated on it.

Why: real characters (KayKit chibis, RobotExpressive, ...) have heads several times bigger than
their head *bone*, so framing, the standard form and face landmarks that assume "head = head bone"
put cameras inside the head and the eyes inside the skull. Pure numpy (no bpy): the Blender side
(``CharacterRig``) hands over rest-pose vertices, weights and triangles.

Frame and units (``docs/characters.md``, head geometry): **local** = the head joint's canonical rest
frame, in metres: origin at the head joint (top of the neck), world axes of the canonical A-pose
(X = the character's left, -Y = its front, Z = up). A point rigid with the head is at
``skel.heads[head] + skel.world_rot[head] @ local`` in any pose, exactly like the face landmarks of
``skeleton.compute_keypoints`` (which are the same frame divided by the head bone length).

Head region = vertices whose dominant skin weight is on the head bone or one of its descendants
(jaw, eyes, hat bones, ...); meshes parented to those bones were turned into meshes skinned 100 %
to them on import, so helmets, hats and hair count as head (the visible head). When that region is
degenerate (fewer than :data:`MIN_VERTICES` vertices or flatter than half a head-bone length: rigs
whose head is mostly weighted to a neck bone, such as RiggedFigure) the region is the vertices with
at least :data:`INFLUENCE_MIN` of their weight on the head set; failing that, a human-proportioned
box around the head bone (:meth:`HeadGeometry.from_bone`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serialgen.assets_manifest.geometry.face import axis_hits, front_depth, locate_face

__all__ = [
    "MIN_VERTICES",
    "INFLUENCE_MIN",
    "MAX_POINTS",
    "FACE_FRACTIONS",
    "BONE_HEAD_CENTER",
    "BONE_HEAD_SIZE",
    "HeadGeometry",
    "measure_head",
    "estimate_face_landmarks",
    "head_geometry_of",
]

MIN_VERTICES = 8
INFLUENCE_MIN = 0.1
MAX_POINTS = 512  # head vertices kept for framing/projection (a deterministic subsample)

# Face layout on the measured head box (fractions of the box size), for rigs without measured
# landmarks: the nose is the front-most point in a band around the box centre height; the eyes are
# EYE_UP box heights above it and EYE_SIDE box widths to each side, on the front surface; the ears
# are the lateral extremes at eye height. Human heads (chin to crown plus hair ~ 0.25 m, eyes 3 cm
# above the nose tip, 6.3 cm apart, ~0.19 m wide) and chibi heads both come out close to these.
# The head box of a rig known only by its head bone, in head-bone lengths (local frame): the
# procedural humans' measured heads (chin to crown, hair included) are 1.5-1.85 lengths tall,
# ~1.25 wide and ~1.45 deep, centred ~0.26 lengths above the head joint.
BONE_HEAD_CENTER = (0.0, 0.0, 0.3)
BONE_HEAD_SIZE = (1.25, 1.45, 1.6)

FACE_FRACTIONS = {"nose_band": (-0.20, 0.10), "nose_half_width": 0.10, "eye_up": 0.15, "eye_side": 0.18,
                  "ear_depth_band": 0.25}


@dataclass(frozen=True)
class HeadGeometry:
    """Measured head: box ``center`` (3,) and ``size`` (3,) = (width X, depth Y, height Z) in the local
    frame (metres, see module doc), ``points`` (M, 3) local head vertices (subsample, M <= MAX_POINTS),
    the head ``bone_length`` (metres), ``source`` ("weights" | "influence" | "bone") and the number of
    head vertices measured."""

    center: np.ndarray
    size: np.ndarray
    points: np.ndarray
    bone_length: float
    source: str
    n_vertices: int = 0
    landmarks: dict = field(default_factory=dict)  # located face landmarks (face.py), head-bone-length units
    landmark_sources: dict = field(default_factory=dict)  # landmark -> face.SOURCES entry

    @classmethod
    def from_bone(cls, bone_length: float) -> "HeadGeometry":
        """A human-proportioned head box from the head bone alone (rigs without head geometry, such
        as the mannequin test character): :data:`BONE_HEAD_CENTER` and :data:`BONE_HEAD_SIZE` in
        head-bone lengths; its points are the box's six face centres."""
        length = float(bone_length)
        c = np.asarray(BONE_HEAD_CENTER, dtype=np.float64) * length
        half = 0.5 * np.asarray(BONE_HEAD_SIZE, dtype=np.float64) * length
        pts = c + np.concatenate([np.diag(half), -np.diag(half)])
        return cls(c, 2.0 * half, pts, length, "bone", 0)

    @property
    def height(self) -> float:
        """Vertical extent (metres) of the head in its rest frame."""
        return float(self.size[2])

    @property
    def radius(self) -> float:
        """Half the box diagonal (metres): a sphere around :attr:`center` that holds the head."""
        return float(0.5 * np.linalg.norm(self.size))

    def world_center(self, skel) -> np.ndarray:
        """(3,) world position of the head centre for a ``skeleton.PosedSkeleton``."""
        head, rot = _head_frame(skel)
        return head + rot @ self.center

    def world_points(self, skel) -> np.ndarray:
        """(M, 3) world positions of the head points (rigid with the head joint)."""
        head, rot = _head_frame(skel)
        return head + self.points @ rot.T

    def world_box(self, skel) -> np.ndarray:
        """(8, 3) world corners of the head box."""
        head, rot = _head_frame(skel)
        signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
        return head + (self.center + signs * self.size) @ rot.T

    def to_json(self) -> dict:
        return {"source": self.source, "center_m": np.round(self.center, 5).tolist(),
                "size_m": np.round(self.size, 5).tolist(), "bone_length_m": round(self.bone_length, 5),
                "vertices": int(self.n_vertices)}


def _head_frame(skel) -> tuple[np.ndarray, np.ndarray]:
    i = skel.joint("head")
    head = np.asarray(skel.heads[i], dtype=np.float64)
    rot = np.asarray(skel.world_rot[i], dtype=np.float64)
    if not (np.isfinite(head).all() and np.isfinite(rot).all()):
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    return head, rot


def head_geometry_of(rig, skel) -> HeadGeometry:
    """``rig.head_geometry`` when the rig measured one, else the head bone as the head."""
    geo = getattr(rig, "head_geometry", None)
    if geo is not None:
        return geo
    i = skel.joint("head")
    length = float(np.linalg.norm(np.asarray(skel.tails[i]) - np.asarray(skel.heads[i])))
    if not np.isfinite(length) or length < 1e-4:
        raise ValueError("the rig has no usable head bone (canonical joint 'head')")
    return HeadGeometry.from_bone(length)


def _subsample(points: np.ndarray, n: int) -> np.ndarray:
    """Deterministic subsample that keeps the extremes along each axis (so the box is exact)."""
    if len(points) <= n:
        return points
    keep = set(np.linspace(0, len(points) - 1, n - 6).round().astype(int).tolist())
    keep |= set(np.argmin(points, 0).tolist()) | set(np.argmax(points, 0).tolist())
    return points[sorted(keep)]


def measure_head(local: np.ndarray, dominant: np.ndarray, influence: np.ndarray, bone_length: float,
                 triangles: np.ndarray | None = None, eye_points: dict | None = None,
                 tags: np.ndarray | None = None, key_tags: np.ndarray | None = None,
                 key_weights: np.ndarray | None = None) -> HeadGeometry:
    """Measure the head from every skinned rest vertex of a character, and locate its face
    (``geometry/face.py``: eye bones, eye/mouth materials and shape keys, the skull under hair and hats).

    Args:
        local: (V, 3) rest vertices in the head's local frame (metres).
        dominant: (V,) bool, the vertex's largest bone weight is on the head bone or a descendant.
        influence: (V,) float, summed weight on the head bone and its descendants.
        bone_length: head bone length in metres (the unit of face landmarks).
        triangles: (T, 3) vertex indices into ``local`` (for face landmarks), or None.
        eye_points: {"l_eye"/"r_eye": (3,) local eye-bone head} when the rig has eye bones.
        tags: (V,) int8 ``face.TAGS`` codes from material/mesh names (None: nothing known).
        key_tags, key_weights: (V,) vertices moved by eye (1) / mouth (2) shape keys and how far.
    """
    local = np.asarray(local, dtype=np.float64).reshape(-1, 3)
    dominant = np.asarray(dominant, dtype=bool)
    influence = np.asarray(influence, dtype=np.float64)
    length = float(bone_length)

    def usable(mask):
        return mask.sum() >= MIN_VERTICES and np.ptp(local[mask, 2]) >= 0.5 * length

    mask, source = dominant, "weights"
    if not usable(mask):
        mask, source = influence >= INFLUENCE_MIN, "influence"
    if not usable(mask):
        return HeadGeometry.from_bone(length)
    pts = local[mask]
    lo, hi = pts.min(0), pts.max(0)
    geo = HeadGeometry(0.5 * (lo + hi), hi - lo, _subsample(pts, MAX_POINTS), length, source, int(mask.sum()))
    if tags is None:
        tags = np.zeros(len(local), dtype=np.int8)
    marks, sources = locate_face(local, mask, tags, length, triangles, eye_points, key_tags, key_weights,
                                 surface_estimate=estimate_face_landmarks)
    return HeadGeometry(geo.center, geo.size, geo.points, length, source, geo.n_vertices, marks, sources)


def estimate_face_landmarks(center: np.ndarray, size: np.ndarray,
                            tris: np.ndarray | None) -> dict[str, np.ndarray]:
    """Nose, eyes and ears on a head surface whose box is ``center``/``size`` (``FACE_FRACTIONS``),
    in metres in the local frame: the fallback of ``face.locate_face`` for faces no name, bone or
    shape key describes.

    ``tris``: (T, 3, 3) local head triangles (surface queries by axis-parallel rays); without them
    the box faces stand in for the surface.
    """
    f = FACE_FRACTIONS
    c, s = np.asarray(center, dtype=np.float64), np.asarray(size, dtype=np.float64)
    front_y = c[1] - 0.5 * s[1]
    # Nose: front-most point of a grid in the band around the centre height (ties: nearest the
    # band's centre line, so a flat face gets its nose in the middle).
    zs = c[2] + s[2] * np.linspace(*f["nose_band"], 13)
    xs = c[0] + s[0] * np.linspace(-f["nose_half_width"], f["nose_half_width"], 5)
    nose = np.array([c[0], front_y, c[2]])
    if tris is not None:
        grid = np.array([[x, z] for z in zs for x in xs])
        hits = axis_hits(tris, 1, grid)
        ys = np.where(np.isnan(hits), np.inf, hits).min(axis=1)  # inf: the ray misses the head
        ys[ys > c[1]] = np.inf  # a hit in the back half: the face is not there (a hole)
        if np.isfinite(ys).any():
            near = ys <= ys.min() + 0.01 * s[1]
            mid = np.array([c[0], c[2] + s[2] * np.mean(f["nose_band"])])
            k = np.flatnonzero(near)[np.argmin(np.linalg.norm(grid[near] - mid, axis=1))]
            nose = np.array([grid[k, 0], ys[k], grid[k, 1]])
    eye_z = min(nose[2] + f["eye_up"] * s[2], c[2] + 0.45 * s[2])
    out = {"nose": nose}
    for side, sign in (("l_eye", 1.0), ("r_eye", -1.0)):
        ex, ez = nose[0] + sign * f["eye_side"] * s[0], eye_z
        y = front_depth(tris, ex, ez)
        out[side] = np.array([ex, nose[1] if y is None else y, ez])
    ear_z = 0.5 * (out["l_eye"][2] + out["r_eye"][2])
    for side, sign in (("l_ear", 1.0), ("r_ear", -1.0)):
        ear = np.array([c[0] + sign * 0.5 * s[0], c[1], ear_z])
        if tris is not None:
            ys = c[1] + s[1] * np.linspace(-f["ear_depth_band"], f["ear_depth_band"], 7)
            hits = axis_hits(tris, 0, np.stack([ys, np.full_like(ys, ear_z)], 1))
            if not np.isnan(hits).all():
                side_x = np.where(np.isnan(hits), -np.inf, sign * hits).max(axis=1)  # (7,) -inf: miss
                ok = np.isfinite(side_x)
                best = side_x[ok].max()
                # Flat sides tie: take the outermost depth nearest the box's middle.
                near = ok & (side_x >= best - 0.01 * s[0])
                k = np.flatnonzero(near)[np.argmin(np.abs(ys[near] - c[1]))]
                ear = np.array([sign * side_x[k], ys[k], ear_z])
        out[side] = ear
    return out
