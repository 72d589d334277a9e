"""Face landmarks from what a rig and its mesh say about the face, and the face box of the standard form.

Why: the standard image fixes the *face* (the paper: "the face scaled to a fixed position"), so its
landmarks must be on the face, not on a hat's snout or a helmet's brow. Pure numpy (no bpy):
``CharacterRig`` hands over the head region's rest vertices, each tagged by the names of its mesh
object and material (:func:`name_tag`), the vertices that eye and mouth shape keys move, eye
bones and triangles.

Evidence, most specific first (each landmark records where it came from, ``SOURCES``):

* **eyes**: eye bones (VRM ``leftEye``, ``eye.L``: their heads are the eyeballs' centres), then
  vertices of eye materials or meshes (``Eyes``, ``iris``, ``pupil``, ``sclera``, ``EyeWhite``),
  then the vertices eye shape keys move (``eyeBlinkLeft``, ``blink``, ``EyeClose``: the lids lie on
  the eyes), then the surface of the **skull**, then the surface of the whole head;
* **mouth**: vertices of lip materials or meshes (``lips``), then of mouth ones (``mouth``,
  ``teeth``, ``tongue``: a mouth's inside reaches deep and high), then the vertices mouth shape keys move (``jawOpen``, ``mouthSmile``, visemes ``aa``/``oh``),
  then an estimate from the eyes and the nose (``MOUTH_DROP``);
* **nose**: the front-most point of the skull between the eyes and the mouth;
* **ears**: the skull's lateral extremes at eye height.

The **skull** is the head region without the vertices of hair, hats, helmets, visors and hoods
(tagged ``cover`` by their mesh or material names: ``Knight_Helmet``, ``Mage_Hat``, ``Hair``), so
a hat's front never becomes the face. A rig whose head mesh says nothing falls back to the whole
head (``geometry/head.py``'s fractions, calibrated on human heads).

Frame: the head joint's canonical rest frame in metres (``geometry/head.py``), X = the character's
left, -Y = its front, Z = up. Landmarks are returned in head-bone lengths (the unit of
``skeleton.FACE_LANDMARK_DEFAULTS``), with ``mouth`` besides the skeleton's five.

**Face box** (:func:`face_box`): the square crop of the FFHQ face alignment (Karras et al. 2019),
made from the eyes and the mouth in the image: centre = eye midpoint + 0.1 x (mouth - eye
midpoint), side = 2 x max(2.0 x eye distance, 1.8 x eye-to-mouth distance). A human face gives a
box about as tall as the head (0.25 m); a big-eyed chibi face a bigger one. The standard camera
puts its centre and side at fixed places in the frame (``standard_form.py``).
"""

from __future__ import annotations

import re

import numpy as np

__all__ = [
    "TAGS",
    "SOURCES",
    "MOUTH_DEFAULT",
    "MOUTH_DROP",
    "name_tag",
    "shape_key_tag",
    "locate_face",
    "face_box",
    "axis_hits",
    "front_depth",
]

#: Vertex tags (int codes in the per-vertex arrays): what a mesh or material name says it is.
TAGS = {"none": 0, "eye": 1, "mouth": 2, "cover": 3, "lips": 4}

#: Where a landmark came from, most specific first.
SOURCES = ("record", "eye_bones", "eye_material", "eye_shape_keys", "mouth_material", "mouth_shape_keys",
           "skull_surface", "head_surface", "estimate", "defaults")

#: The mouth of a rig known only by its head bone (head-bone lengths; the reference figure's mouth,
#: 7 cm below its eyes at a 0.18 m head bone: ``skeleton.FACE_LANDMARK_DEFAULTS`` has no mouth).
MOUTH_DEFAULT = (0.0, -0.52, 0.12)
#: Without mouth evidence the mouth sits this many eye-to-nose heights below the eyes (measured:
#: 1.55 procedural humans, 1.70-1.84 Quaternius and KayKit faces; 1.75 errs by < 8% of the face).
MOUTH_DROP = 1.75

_EYE = {"eye", "eyes", "eyeball", "eyeballs", "iris", "irides", "irises", "pupil", "pupils", "sclera", "cornea",
        "eyewhite"}
_NOT_EYE = {"brow", "brows", "eyebrow", "eyebrows", "lash", "lashes", "eyelash", "eyelashes", "lid", "lids",
            "eyelid", "eyelids", "line", "liner", "eyeline", "eyeliner", "shadow", "eyeshadow", "socket", "end",
            "glasses", "glass", "goggles", "patch"}
_MOUTH = {"mouth", "teeth", "tooth", "tongue", "gum", "gums"}
_LIPS = {"lip", "lips"}
_COVER = {"hair", "hairs", "bangs", "fringe", "ponytail", "pigtail", "pigtails", "braid", "braids", "bun", "wig",
          "ahoge", "hat", "hats", "cap", "helmet", "helm", "visor", "hood", "crown", "tiara", "beanie",
          "headband", "horn", "horns", "veil", "headwear", "headgear", "hairband", "bandana", "turban"}
# Shape-key words (after splitting): blink/close keys move the lids over the eyes; mouth keys the lips.
_EYE_KEY = {"blink", "wink", "eyeblink", "eyeclose", "eyelid", "close", "closed"}
_MOUTH_KEY = {"mouth", "jaw", "jawopen", "smile", "lip", "lips", "aa", "ih", "ou", "ee", "oh", "viseme", "vrc",
              "pucker", "funnel", "grin", "frown"}


def _words(name: str) -> list[str]:
    """Lower-case words of a name: split at separators, digits and camelCase (``FaceMouth_00`` ->
    face, mouth; ``eyeBlinkLeft`` -> eye, blink, left)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return [w for w in re.split(r"[^A-Za-z]+", spaced.lower()) if w]


def name_tag(*names: str) -> str:
    """What mesh-object or material names say a surface is: "eye", "lips", "mouth" (teeth, tongue,
    the mouth's inside), "cover" (hair, hats, helmets: not the face) or "none". The first name that says something wins (material before
    object: ``Knight_Head`` with material ``Eyes`` is an eye)."""
    for name in names:
        words = set(_words(name or ""))
        joined = "".join(_words(name or ""))
        if words & _NOT_EYE and not words & _COVER:
            continue
        if words & _COVER:
            return "cover"
        if words & _EYE or joined in _EYE:
            return "eye"
        if words & _LIPS:
            return "lips"
        if words & _MOUTH:
            return "mouth"
    return "none"


def shape_key_tag(name: str) -> str:
    """"eye" for keys that close the eyes, "mouth" for keys that move the mouth or jaw, else "none"."""
    words = _words(name)
    joined = "".join(words)
    if any(w in ("brow", "brows", "eyebrow", "cheek", "nose") for w in words):
        return "none"
    if set(words) & _EYE_KEY or joined in _EYE_KEY or ("eye" in words and ("close" in joined or "blink" in joined)):
        return "eye"
    if set(words) & _MOUTH_KEY or joined in _MOUTH_KEY or re.fullmatch(r"[aiueo]", name.strip().lower() or "-"):
        return "mouth"
    return "none"


def axis_hits(tris: np.ndarray, axis: int, queries: np.ndarray) -> np.ndarray:
    """For rays parallel to ``axis`` through 2D ``queries`` (Q, 2) (the other two coordinates in
    increasing axis order), the ``axis`` coordinate of every hit: (Q, T) with NaN where a ray misses."""
    others = [a for a in range(3) if a != axis]
    p = tris[:, :, others]  # (T, 3, 2)
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    v0, v1 = b - a, c - a
    den = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]  # (T,)
    ok = np.abs(den) > 1e-12
    den = np.where(ok, den, 1.0)
    q = queries[:, None, :] - a[None]  # (Q, T, 2)
    u = (q[..., 0] * v1[:, 1] - q[..., 1] * v1[:, 0]) / den
    v = (v0[:, 0] * q[..., 1] - v0[:, 1] * q[..., 0]) / den
    inside = ok & (u >= -1e-9) & (v >= -1e-9) & (u + v <= 1 + 1e-9)
    d = tris[:, :, axis]
    depth = d[:, 0] + u * (d[:, 1] - d[:, 0]) + v * (d[:, 2] - d[:, 0])
    return np.where(inside, depth, np.nan)


def front_depth(tris, x, z) -> float | None:
    """Front-most (minimum Y) surface point's Y at (x, z), or None where the surface is not there."""
    if tris is None or not len(tris):
        return None
    hits = axis_hits(tris, 1, np.array([[x, z]]))[0]
    return None if np.isnan(hits).all() else float(np.nanmin(hits))


def _front_cap(pts: np.ndarray) -> np.ndarray:
    """The visible centre of a set of points seen from the front: mean X/Z of the front 30% (by depth)
    of them, at their front-most depth (the pupil of an eyeball, the middle of painted lips)."""
    y = pts[:, 1]
    cap = pts[y <= y.min() + 0.3 * max(float(np.ptp(y)), 1e-9)]
    return np.array([cap[:, 0].mean(), y.min(), cap[:, 2].mean()])


def _pair(pts: np.ndarray, mid_x: float, weights: np.ndarray | None = None, front=True) -> dict | None:
    """Left/right eye points from tagged vertices on both sides of ``mid_x``; None unless both sides
    hold >= 3 vertices and the two lie level (height difference < half their distance)."""
    out = {}
    for side, mask in (("l_eye", pts[:, 0] > mid_x), ("r_eye", pts[:, 0] < mid_x)):
        if mask.sum() < 3:
            return None
        p = pts[mask]
        if front:
            out[side] = _front_cap(p)
        else:
            w = weights[mask] if weights is not None else np.ones(len(p))
            c = (p * w[:, None]).sum(0) / w.sum()
            out[side] = np.array([c[0], p[:, 1].min(), c[2]])
    d = out["l_eye"] - out["r_eye"]
    if abs(d[2]) > 0.5 * abs(d[0]) or d[0] <= 0:
        return None
    return out


def locate_face(local: np.ndarray, region: np.ndarray, tags: np.ndarray, bone_length: float,
                triangles: np.ndarray | None = None, eye_bones: dict | None = None,
                key_tags: np.ndarray | None = None, key_weights: np.ndarray | None = None,
                surface_estimate=None) -> tuple[dict, dict]:
    """Face landmarks of one head from its evidence (see module doc).

    Args:
        local: (V, 3) rest vertices in the head's local frame (metres).
        region: (V,) bool, the head region (``head.measure_head``).
        tags: (V,) int8 :data:`TAGS` codes from the vertex's material/mesh names.
        bone_length: head bone length (metres), the unit of the result.
        triangles: (T, 3) vertex indices into ``local`` (surface queries), or None.
        eye_bones: {"l_eye"/"r_eye": (3,) local eye-bone head} when the rig has eye bones.
        key_tags: (V,) int8, 1 = moved by an eye shape key, 2 = by a mouth shape key, else 0.
        key_weights: (V,) how far the tagged shape keys move each vertex (metres).
        surface_estimate: ``(box_centre, box_size, tris (T, 3, 3)) -> landmarks in metres`` for the
            surface fallback (``head.estimate_face_landmarks`` applied to a box).

    Returns (landmarks in head-bone lengths: nose, l_eye, r_eye, l_ear, r_ear, mouth; sources:
    landmark -> one of :data:`SOURCES`).
    """
    local = np.asarray(local, dtype=np.float64).reshape(-1, 3)
    region = np.asarray(region, dtype=bool)
    tags = np.asarray(tags, dtype=np.int8)
    length = float(bone_length)
    cover = tags == TAGS["cover"]
    skull = region & ~cover
    head_pts = local[region]
    usable = skull.sum() >= 8 and np.ptp(local[skull, 2]) >= 0.25 * np.ptp(head_pts[:, 2])
    face_mask = skull if usable else region
    surface_source = "skull_surface" if usable and cover[region].any() else "head_surface"
    pts = local[face_mask]
    lo, hi = pts.min(0), pts.max(0)
    centre, size = 0.5 * (lo + hi), hi - lo
    tris = None
    if triangles is not None and len(triangles):
        tri = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
        tri = tri[face_mask[tri].any(axis=1) & ~cover[tri].any(axis=1)] if usable else tri[face_mask[tri].any(axis=1)]
        tris = local[tri] if len(tri) else None
    mid_x = float(centre[0])
    sources: dict[str, str] = {}

    # Eyes.
    eyes = None
    if eye_bones and {"l_eye", "r_eye"} <= set(eye_bones):
        eyes = {}
        for side in ("l_eye", "r_eye"):
            p = np.asarray(eye_bones[side], dtype=np.float64)
            near = local[(tags == TAGS["eye"]) & region]
            near = near[np.linalg.norm(near[:, [0, 2]] - p[[0, 2]], axis=1) < 0.5 * size[0]] if len(near) else near
            y = float(near[:, 1].min()) if len(near) else front_depth(tris, p[0], p[2])
            eyes[side] = np.array([p[0], p[1] if y is None else y, p[2]])
        sources.update(l_eye="eye_bones", r_eye="eye_bones")
    if eyes is None:
        eyes = _pair(local[(tags == TAGS["eye"]) & region], mid_x)
        if eyes is not None:
            sources.update(l_eye="eye_material", r_eye="eye_material")
    if eyes is None and key_tags is not None:
        moved = (np.asarray(key_tags) == 1) & region
        w = np.asarray(key_weights, dtype=np.float64)[moved] if key_weights is not None else None
        eyes = _pair(local[moved], mid_x, w, front=False)
        if eyes is not None:
            for side, p in eyes.items():
                y = front_depth(tris, p[0], p[2])
                eyes[side] = np.array([p[0], p[1] if y is None else y, p[2]])
            sources.update(l_eye="eye_shape_keys", r_eye="eye_shape_keys")

    # Mouth (from evidence only here; the estimate needs the nose).
    mouth = None
    mouth_pts = local[(tags == TAGS["lips"]) & region]
    if len(mouth_pts) < 3:
        mouth_pts = local[(tags == TAGS["mouth"]) & region]
    if len(mouth_pts) >= 3:
        mouth = _front_cap(mouth_pts)
        sources["mouth"] = "mouth_material"
    elif key_tags is not None:
        moved = (np.asarray(key_tags) == 2) & region
        if moved.sum() >= 3:
            w = np.asarray(key_weights, dtype=np.float64)[moved] if key_weights is not None else np.ones(moved.sum())
            p = local[moved]
            c = (p * w[:, None]).sum(0) / w.sum()
            y = front_depth(tris, c[0], c[2])
            mouth = np.array([c[0], p[:, 1].min() if y is None else y, c[2]])
            sources["mouth"] = "mouth_shape_keys"

    surface = surface_estimate(centre, size, tris) if surface_estimate is not None else {}
    out: dict[str, np.ndarray] = {}
    if eyes is not None:
        out.update(eyes)
        # Nose: front-most skull point on the midline between the eye line and the mouth (or 1.2
        # eye distances below the eyes), nearest the middle of that band where the face is flat.
        iod = float(np.linalg.norm(eyes["l_eye"] - eyes["r_eye"]))
        eye_mid = 0.5 * (eyes["l_eye"] + eyes["r_eye"])
        bottom = mouth[2] if mouth is not None else eye_mid[2] - 1.2 * iod
        nose = None
        if tris is not None:
            zs = np.linspace(eye_mid[2] - 0.25 * (eye_mid[2] - bottom), bottom + 0.15 * (eye_mid[2] - bottom), 13)
            xs = eye_mid[0] + iod * np.linspace(-0.12, 0.12, 5)
            grid = np.array([[x, z] for z in zs for x in xs])
            hits = axis_hits(tris, 1, grid)
            ys = np.where(np.isnan(hits), np.inf, hits).min(axis=1)
            if np.isfinite(ys).any():
                near = ys <= ys.min() + 0.01 * size[1]
                mid = np.array([eye_mid[0], 0.5 * (zs[0] + zs[-1])])
                k = np.flatnonzero(near)[np.argmin(np.linalg.norm(grid[near] - mid, axis=1))]
                nose = np.array([grid[k, 0], ys[k], grid[k, 1]])
        if nose is None:
            nose = np.array([eye_mid[0], eye_mid[1], eye_mid[2] - 0.6 * iod])
        out["nose"] = nose
        sources["nose"] = surface_source
    else:
        for side in ("nose", "l_eye", "r_eye"):
            if side in surface:
                out[side] = np.asarray(surface[side], dtype=np.float64)
                sources[side] = surface_source
    for side in ("l_ear", "r_ear"):
        if side in surface:
            out[side] = np.asarray(surface[side], dtype=np.float64)
            sources[side] = surface_source
    if eyes is not None and tris is not None:
        ear_z = 0.5 * (eyes["l_eye"][2] + eyes["r_eye"][2])
        for side, sign in (("l_ear", 1.0), ("r_ear", -1.0)):
            ys = centre[1] + size[1] * np.linspace(-0.25, 0.25, 7)
            hits = axis_hits(tris, 0, np.stack([ys, np.full_like(ys, ear_z)], 1))
            if not np.isnan(hits).all():
                side_x = np.where(np.isnan(hits), -np.inf, sign * hits).max(axis=1)
                ok = np.isfinite(side_x)
                near = ok & (side_x >= side_x[ok].max() - 0.01 * size[0])
                k = np.flatnonzero(near)[np.argmin(np.abs(ys[near] - centre[1]))]
                out[side] = np.array([sign * side_x[k], ys[k], ear_z])
                sources[side] = surface_source
    if mouth is None and "nose" in out and "l_eye" in out and "r_eye" in out:
        eye_mid = 0.5 * (out["l_eye"] + out["r_eye"])
        z = eye_mid[2] - MOUTH_DROP * max(eye_mid[2] - out["nose"][2], 1e-6)
        z = max(z, float(lo[2]) + 0.02 * size[2])  # never below the chin
        y = front_depth(tris, eye_mid[0], z)
        mouth = np.array([eye_mid[0], out["nose"][1] if y is None else y, z])
        sources["mouth"] = "estimate"
    if mouth is not None:
        out["mouth"] = mouth
    return ({k: tuple(round(float(x) / length, 5) for x in v) for k, v in out.items()},
            {k: sources[k] for k in out})


def face_box(uv: dict[str, np.ndarray]) -> dict:
    """The FFHQ-style face box (see module doc) of projected landmarks ``uv`` (name -> (2,) pixels:
    ``l_eye``, ``r_eye``, ``mouth``): {"center": (2,), "side": float, "eye_distance", "eye_to_mouth"}."""
    l, r, m = (np.asarray(uv[k], dtype=np.float64) for k in ("l_eye", "r_eye", "mouth"))
    eye_mid = 0.5 * (l + r)
    e2e = float(np.linalg.norm(l - r))
    e2m = float(np.linalg.norm(m - eye_mid))
    return {"center": eye_mid + 0.1 * (m - eye_mid), "side": 2.0 * max(2.0 * e2e, 1.8 * e2m),
            "eye_distance": e2e, "eye_to_mouth": e2m}
