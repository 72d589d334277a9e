"""Clothing for procedural characters: material regions on the anny body, a skirt mesh, the
pattern texture atlas and measured face landmarks. Pure numpy (plus Pillow/scipy for the atlas).

Regions are decided per face from anny's UV body-part segmentation (head, hands, feet, eyes,
mouth) and, on the rest of the body, from the face's dominant bone group plus a coordinate along
the limb (0 at the shoulder/hip, 1 at the elbow/knee, 2 at the wrist/ankle), so sleeve and
trouser lengths are continuous parameters of the description.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATLAS_SIZE",
    "ATLAS_REGIONS",
    "BodyGeometry",
    "assign_regions",
    "region_colours",
    "skirt_part",
    "pattern_atlas",
    "face_landmarks",
]

ATLAS_SIZE = 1024


@dataclass
class BodyGeometry:
    """The baked rest body (A-pose, feet on z=0) and the landmarks clothing needs (metres)."""

    verts: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    centres: np.ndarray  # (F, 3) face centroids
    face_seg: np.ndarray  # (F,) index into seg_names
    seg_names: list[str]
    face_group: np.ndarray  # (F,) index into group_names
    vertex_group_weight: np.ndarray  # (V, G)
    group_names: list[str]
    joints: dict[str, np.ndarray]  # named joint positions
    scale: float  # head size relative to an adult (eye distance / 63 mm)
    neck_radius: float  # median distance of neck-base vertices from the neck axis

    @classmethod
    def from_arrays(cls, verts, topo, heads, index) -> "BodyGeometry":
        j = {}
        for side, s in (("l", "L"), ("r", "R")):
            j[f"{side}_shoulder"] = heads[index[f"upperarm01.{s}"]]
            j[f"{side}_elbow"] = heads[index[f"lowerarm01.{s}"]]
            j[f"{side}_wrist"] = heads[index[f"wrist.{s}"]]
            j[f"{side}_hip"] = heads[index[f"upperleg01.{s}"]]
            j[f"{side}_knee"] = heads[index[f"lowerleg01.{s}"]]
            j[f"{side}_ankle"] = heads[index[f"foot.{s}"]]
            j[f"{side}_eye"] = heads[index[f"eye.{s}"]]
        j["root"] = heads[index["root"]]
        j["waist"] = heads[index["spine04"]]
        j["chest"] = heads[index["spine01"]]
        j["neck"] = heads[index["neck01"]]
        j["head"] = heads[index["head"]]
        ipd = float(np.linalg.norm(j["l_eye"] - j["r_eye"]))
        neck_g = topo.group_names.index("neck")
        nv = verts[(topo.vertex_group_weight[:, neck_g] > 0.5)]
        nv = nv[np.abs(nv[:, 2] - (j["neck"][2] + 0.03)) < 0.02]
        radius = float(np.median(np.hypot(nv[:, 0] - j["neck"][0], nv[:, 1] - j["neck"][1]))) if len(nv) else 0.055
        return cls(verts, topo.faces, verts[topo.faces].mean(axis=1), topo.face_seg, topo.seg_names,
                   topo.face_group, topo.vertex_group_weight, topo.group_names, j, ipd / 0.063, radius)

    def seg(self, *names: str) -> np.ndarray:
        ids = [self.seg_names.index(n) for n in names]
        return np.isin(self.face_seg, ids)

    def group(self, *names: str) -> np.ndarray:
        ids = [self.group_names.index(n) for n in names]
        return np.isin(self.face_group, ids)


def _limb_coordinate(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """0 at a, 1 at b, 2 at c along the polyline a -> b -> c (nearest segment)."""
    def project(s, e):
        d = e - s
        t = np.clip(((p - s) @ d) / max(float(d @ d), 1e-12), 0.0, 1.0)
        return t, np.linalg.norm(p - (s + t[:, None] * d), axis=1)

    t1, d1 = project(a, b)
    t2, d2 = project(b, c)
    return np.where(d1 <= d2, t1, 1.0 + t2)


def limb_coordinates(geo: BodyGeometry, points: np.ndarray, limb: str) -> np.ndarray:
    """Arm or leg coordinate (0..2) of points, each measured on its own side (x sign)."""
    names = ("shoulder", "elbow", "wrist") if limb == "arm" else ("hip", "knee", "ankle")
    left = _limb_coordinate(points, *(geo.joints[f"l_{n}"] for n in names))
    right = _limb_coordinate(points, *(geo.joints[f"r_{n}"] for n in names))
    return np.where(points[:, 0] >= 0, left, right)


def _region_ids():
    from serialgen.assets_manifest.procedural import REGION_NAMES

    return {n: i for i, n in enumerate(REGION_NAMES)}


def _clothing_regions(desc: dict, geo: BodyGeometry, points: np.ndarray, face_idx: np.ndarray,
                     arm_s: np.ndarray | None = None, leg_s: np.ndarray | None = None) -> np.ndarray:
    """Region id (N,) (skin, top, bottom or shoes) of surface points (N, 3) lying on faces
    ``face_idx`` (N,): continuous rules in 3D (waist and neckline heights, limb coordinates), so the
    per-texel atlas draws smooth garment edges while faces get the same rule at their centroids.
    ``arm_s``/``leg_s`` (N,): limb coordinates when already known (else computed)."""
    R = _region_ids()
    c = points
    s = geo.scale
    clothing = desc["clothing"]
    top, bottom, shoes = clothing["top"], clothing["bottom"], clothing["shoes"]
    region = np.full(len(c), R["skin"], dtype=np.int64)
    body = geo.seg("body")[face_idx]
    group = geo.face_group[face_idx]
    gid = {n: i for i, n in enumerate(geo.group_names)}

    # Torso: top above the waist line (minus the neckline), bottom below it.
    # The neck group joins the torso so the neckline follows the height rule, not the bone groups.
    torso = body & np.isin(group, [gid["torso"], gid["neck"]])
    waist_z = geo.joints["waist"][2] - float(top.get("length", 0.0))
    # Neckline: a collar around the neck axis, lower in front than at the back (a plane alone
    # would cut the sloping trapezius into a ragged line), plus an optional V in front.
    neck = geo.joints["neck"]
    rho = np.hypot(c[:, 0] - neck[0], c[:, 1] - neck[1])
    collar = geo.neck_radius + 0.022 * s
    cut = neck[2] - 0.012 * s + 0.02 * s * np.clip((c[:, 1] - neck[1]) / (0.05 * s), -1.0, 1.0)
    neck_skin = (rho < collar) & (c[:, 2] > cut - 0.01 * s * np.clip(collar - rho, 0, None) / collar)
    neck_skin |= c[:, 2] > neck[2] + 0.03 * s
    if top.get("neckline") == "v":
        depth = 0.085 * s
        below = np.clip((neck[2] - c[:, 2]) / depth, 0.0, 1.0)  # 0 at the neck base, 1 at the V tip
        half_w = (0.055 * s) * (1.0 - below)
        neck_skin |= (c[:, 1] < neck[1]) & (np.abs(c[:, 0]) < half_w) & (c[:, 2] > neck[2] - depth)
    region[torso & (c[:, 2] > waist_z) & ~neck_skin] = R["top"]
    region[torso & (c[:, 2] <= waist_z)] = R["bottom"]
    if top.get("style") == "tank":
        sh_x = abs(geo.joints["l_shoulder"][0])
        bare = torso & (np.abs(c[:, 0]) > 0.72 * sh_x) & (c[:, 2] > geo.joints["l_shoulder"][2] - 0.1 * s)
        region[bare & (region == R["top"])] = R["skin"]

    # Arms: sleeves.
    arms = body & np.isin(group, [gid["upper_arm"], gid["lower_arm"]])
    if arm_s is None:
        arm_s = limb_coordinates(geo, c, "arm")
    sleeve = float(top.get("sleeve", 0.5))
    region[arms & (arm_s < sleeve)] = R["top"]

    # Legs: trousers/shorts; under a skirt only a short brief (the skirt is a mesh of its own).
    legs = body & np.isin(group, [gid["upper_leg"], gid["lower_leg"], gid["foot"]])
    if leg_s is None:
        leg_s = limb_coordinates(geo, c, "leg")
    leg_len = 0.15 if bottom.get("style") == "skirt" else float(bottom.get("length", 1.97))
    region[legs & (leg_s < leg_len)] = R["bottom"]

    # Shoes: the feet and the ankle (boots: up the shin).
    shoe_from = 1.55 if shoes.get("style") == "boots" else 1.93
    region[geo.seg("foot.L", "foot.R")[face_idx]] = R["shoes"]
    region[legs & (leg_s >= shoe_from)] = R["shoes"]
    return region


def assign_regions(desc: dict, geo: BodyGeometry, topo) -> np.ndarray:
    """Material region id (F,) per body face (see ``procedural.REGION_NAMES``)."""
    R = _region_ids()
    c = geo.centres
    s = geo.scale
    region = _clothing_regions(desc, geo, c, np.arange(len(c)))

    # Eyes: sclera, iris and pupil by the angle from the eye's forward axis.
    eyes = geo.seg("eye_front.L", "eye_front.R", "eye_back.L", "eye_back.R")
    region[eyes] = R["sclera"]
    for side in ("l", "r"):
        centre = geo.joints[f"{side}_eye"]
        on_side = eyes & ((c[:, 0] >= 0) == (side == "l"))
        d = c - centre
        cosang = -d[:, 1] / np.maximum(np.linalg.norm(d, axis=1), 1e-9)
        region[on_side & (cosang > np.cos(np.deg2rad(34)))] = R["iris"]
        region[on_side & (cosang > np.cos(np.deg2rad(14)))] = R["pupil"]
    region[geo.seg("mouth_cavity", "tongue", "eye_cavity.L", "eye_cavity.R")] = R["mouth"]

    # Lips: head faces around the mouth opening, in front.
    head = geo.seg("head")
    mouth_faces = geo.seg("mouth_cavity")
    mouth_verts = np.unique(geo.faces[mouth_faces])
    head_verts = np.unique(geo.faces[head])
    rim = np.intersect1d(mouth_verts, head_verts)
    if len(rim):
        rim_p = geo.verts[rim]
        centre = rim_p.mean(axis=0)
        half_w = 0.5 * np.ptp(rim_p[:, 0]) + 0.002 * s
        d = c - centre
        ellipse = (d[:, 0] / max(half_w, 1e-3)) ** 2 + (d[:, 2] / (0.012 * s)) ** 2
        region[head & (ellipse < 1.0) & (c[:, 1] < centre[1] + 0.004)] = R["lips"]

    # Eyebrows: a band above each eye on the front of the head.
    if desc["hair"]["style"] != "bald" or desc["age_years"] < 70:
        for side in ("l", "r"):
            e = geo.joints[f"{side}_eye"]
            dx = (c[:, 0] - e[0]) * (1 if side == "l" else -1)
            band = (c[:, 2] > e[2] + 0.011 * s + 0.002 * np.clip(dx / 0.02, -1, 1) * s) & (c[:, 2] < e[2] + 0.021 * s)
            region[head & band & (dx > -0.016 * s) & (dx < 0.026 * s) & (c[:, 1] < e[1] + 0.005)] = R["brows"]
    return region


def region_colours(desc: dict) -> dict[str, list[float]]:
    """sRGB colour per region name."""
    skin = np.asarray(desc["skin"]["colour"])
    hair = np.asarray(desc["hair"]["colour"])
    cl = desc["clothing"]
    brows = hair if desc["hair"]["style"] != "bald" else hair * 0.6
    if desc["hair"]["colour_name"] in ("blonde", "platinum", "white", "grey"):
        brows = 0.7 * brows + 0.3 * skin * 0.6
    return {
        "skin": skin.tolist(),
        "top": list(cl["top"]["colour"]),
        "bottom": list(cl["bottom"]["colour"]),
        "shoes": list(cl["shoes"]["colour"]),
        "sclera": [0.93, 0.91, 0.88],
        "iris": list(desc["eyes"]["colour"]),
        "pupil": [0.02, 0.02, 0.02],
        "mouth": [0.32, 0.08, 0.08],
        "brows": (brows * 0.85).tolist(),
        "hair": hair.tolist(),
        "lips": (0.75 * skin + 0.25 * np.array([0.72, 0.30, 0.30])).clip(0, 1).tolist(),
    }


def _support_ring(points_xy: np.ndarray, centre: np.ndarray, n: int) -> np.ndarray:
    """Support radius of a 2D point set around ``centre`` in n directions (convex drape)."""
    ang = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    dirs = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if len(points_xy) == 0:
        return np.zeros(n)
    return np.maximum(((points_xy - centre) @ dirs.T).max(axis=0), 0.0)


def skirt_part(desc: dict, geo: BodyGeometry, index: dict[str, int]):
    """A skirt or the skirt of a dress: (vertices, faces, uvs, weight_indices, weight_values, texture)
    or None (texture (T, T, 3) uint8 over the skirt UVs when patterned, else empty).

    Rings from the waist to the hem; each ring is the convex support of the body slice (torso and
    legs) plus a margin, never narrower than the ring above below the hips (so it drapes across
    the gap between the legs). Weights blend from the root to the upper legs with depth.
    """
    bottom = desc["clothing"]["bottom"]
    if bottom.get("style") != "skirt":
        return None
    s = geo.scale
    hem_s = float(bottom.get("length", 0.8))
    knee_z = geo.joints["l_knee"][2]
    hip_z = geo.joints["l_hip"][2]
    ankle_z = geo.joints["l_ankle"][2]
    hem_z = np.interp(hem_s, [0.0, 1.0, 2.0], [hip_z, knee_z, ankle_z])
    top_z = geo.joints["waist"][2] + (0.02 * s if desc["clothing"]["outfit"] == "dress" else 0.0)
    vg = geo.vertex_group_weight
    gi = {n: i for i, n in enumerate(geo.group_names)}
    keep = (vg[:, gi["torso"]] + vg[:, gi["upper_leg"]] + vg[:, gi["lower_leg"]]) > 0.5
    pts = geo.verts[keep]
    rings, n_around = 16, 48
    zs = np.linspace(top_z, hem_z, rings)
    centre = np.array([0.0, float(np.median(pts[np.abs(pts[:, 2] - top_z) < 0.03][:, 1]))
                       if np.any(np.abs(pts[:, 2] - top_z) < 0.03) else 0.0])
    radii = []
    widest = None
    for k, z in enumerate(zs):
        sl = pts[np.abs(pts[:, 2] - z) < 0.02]
        r = _support_ring(sl[:, :2], centre, n_around) + 0.01 + 0.025 * k / rings
        if z < hip_z:
            widest = r if widest is None else np.maximum(widest, r)
            r = np.maximum(r, widest * (1.0 + 0.012 * (k - rings / 4)))
        elif widest is None or k == 0:
            widest = r
        else:
            widest = np.maximum(widest, r)
        radii.append(r)
    ang = np.linspace(0.0, 2 * np.pi, n_around, endpoint=False)
    verts = []
    for z, r in zip(zs, radii):
        verts.append(np.stack([centre[0] + r * np.cos(ang), centre[1] + r * np.sin(ang), np.full(n_around, z)], 1))
    verts = np.concatenate(verts)
    faces = []
    for k in range(rings - 1):
        for i in range(n_around):
            a, b = k * n_around + i, k * n_around + (i + 1) % n_around
            c, d = a + n_around, b + n_around
            faces += [(a, c, d), (a, d, b)]
    faces = np.asarray(faces, dtype=np.int32)
    u = np.tile(ang / (2 * np.pi), rings)
    v = np.repeat(np.linspace(1.0, 0.0, rings), n_around)
    uvs = np.stack([u, v], 1).astype(np.float32)
    depth = np.clip((top_z - verts[:, 2]) / max(top_z - hem_z, 1e-3), 0.0, 1.0)
    # Legs carry most of the skirt near the hem (a lifted leg pushes the skirt along instead of
    # going through it); between the legs the two share, so the hem stays between them.
    w_legs = np.clip(2.0 * depth, 0.0, 1.0) ** 0.7 * 0.95
    side = np.clip(0.5 + verts[:, 0] / (0.12 * s), 0.0, 1.0)
    side = side * side * (3 - 2 * side)
    w_root = 1.0 - w_legs
    idx = np.tile(np.array([index["root"], index["upperleg01.L"], index["upperleg01.R"], index["root"]]), (len(verts), 1))
    val = np.stack([w_root, w_legs * side, w_legs * (1.0 - side), np.zeros(len(verts))], 1)
    texture = np.zeros((0, 0, 3), np.uint8)
    if bottom.get("pattern", "solid") != "solid":
        size = 256
        uu, vv = np.meshgrid((np.arange(size) + 0.5) / size, 1.0 - (np.arange(size) + 0.5) / size)
        z = hem_z + vv * (top_z - hem_z)
        perimeter = float(np.mean([2 * np.pi * np.mean(r) for r in radii]))
        pts = np.stack([uu.ravel() * perimeter, np.zeros(uu.size), z.ravel()], 1)
        second = _pattern(bottom["pattern"], pts, float(bottom.get("period", 0.05)))
        rgb = np.where(second[:, None], np.asarray(bottom["colour2"]), np.asarray(bottom["colour"]))
        texture = (rgb.reshape(size, size, 3) * 255).round().clip(0, 255).astype(np.uint8)
    return verts.astype(np.float32), faces, uvs, idx.astype(np.int16), val.astype(np.float32), texture


def _pattern(kind: str, p: np.ndarray, period: float) -> np.ndarray:
    """Boolean mask (N,) of the second colour at 3D points p (rest pose, metres)."""
    if kind == "stripes":
        return np.mod(p[:, 2] / period, 1.0) < 0.45
    if kind == "checks":
        k = np.floor(p[:, 0] / period) + np.floor(p[:, 1] / period) + np.floor(p[:, 2] / period)
        return np.mod(k, 2) == 1
    return np.zeros(len(p), dtype=bool)


#: Regions whose materials sample the body atlas (per-texel garment edges and patterns).
ATLAS_REGIONS = ("skin", "top", "bottom", "shoes")


class _Raster:
    """Which body face covers each atlas texel, with barycentric weights, and for every texel the
    nearest covered texel (to fill the gaps). The topology is fixed, so this is computed once per
    process and atlas size."""

    def __init__(self, topo, size: int):
        from PIL import Image, ImageDraw
        from scipy import ndimage

        uv = topo.uv_coords[topo.face_uvs] * size  # (F, 3, 2) texel units
        uv[..., 1] = size - uv[..., 1]  # image rows go down
        ids = Image.new("I", (size, size), 0)
        draw = ImageDraw.Draw(ids)
        for k, tri in enumerate(uv.tolist()):
            draw.polygon([tuple(q) for q in tri], fill=k + 1)
        id_img = np.asarray(ids, dtype=np.int64)
        self.ys, self.xs = np.nonzero(id_img)
        self.face = id_img[self.ys, self.xs] - 1
        t = uv[self.face]
        q = np.stack([self.xs + 0.5, self.ys + 0.5], 1)
        v0, v1, v2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], q - t[:, 0]
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        den = np.where(np.abs(den) < 1e-12, 1e-12, den)
        b1 = np.clip((v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den, 0, 1)
        b2 = np.clip((v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den, 0, 1 - b1)
        self.bary = np.stack([1 - b1 - b2, b1, b2], 1)
        self.corners = topo.faces[self.face]  # (M, 3) vertex ids
        covered = np.zeros((size, size), dtype=bool)
        covered[self.ys, self.xs] = True
        _, (self.fill_y, self.fill_x) = ndimage.distance_transform_edt(~covered, return_indices=True)

    def interpolate(self, per_vertex: np.ndarray) -> np.ndarray:
        return (per_vertex[self.corners] * self.bary.reshape(self.bary.shape + (1,) * (per_vertex.ndim - 1))).sum(1)


_RASTERS: dict[tuple[int, int], _Raster] = {}


def _raster(topo, size: int) -> _Raster:
    key = (id(topo), size)
    if key not in _RASTERS:
        _RASTERS[key] = _Raster(topo, size)
    return _RASTERS[key]


#: Regions whose materials sample the body atlas (per-texel garment edges and patterns).
ATLAS_REGIONS = ("skin", "top", "bottom", "shoes")


def pattern_atlas(desc: dict, geo: BodyGeometry, topo, face_region: np.ndarray, colours: dict):
    """(ATLAS_SIZE, ATLAS_SIZE, 3) uint8 sRGB texture over the body UVs and the regions that use it.

    Each covered texel gets its 3D rest position and limb coordinates by barycentric interpolation
    and its garment by the same 3D rules as the faces (``_clothing_regions``), so garment edges are
    smooth at texel resolution rather than following triangles, and stripes/checks are evaluated in
    3D (stripes run horizontally whatever the UV layout). Texels of eyes, mouth, lips and brows
    (their own flat materials) get skin; uncovered texels take the nearest covered colour, so
    sampling across an island edge never shows a seam.
    """
    R = _region_ids()
    cl = desc["clothing"]
    size = ATLAS_SIZE
    ras = _raster(topo, size)
    p3 = ras.interpolate(geo.verts)
    arm_s = ras.interpolate(limb_coordinates(geo, geo.verts, "arm"))
    leg_s = ras.interpolate(limb_coordinates(geo, geo.verts, "leg"))
    region = _clothing_regions(desc, geo, p3, ras.face, arm_s, leg_s)
    colour = np.zeros((len(p3), 3))
    for name in ATLAS_REGIONS:
        sel = region == R[name]
        colour[sel] = np.asarray(colours[name])
        spec = cl.get(name) if name in ("top", "bottom") else None
        if spec and spec.get("pattern", "solid") != "solid":
            second = _pattern(spec["pattern"], p3[sel], float(spec.get("period", 0.05)))
            colour[sel] = np.where(second[:, None], np.asarray(spec["colour2"]), np.asarray(spec["colour"]))
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[ras.ys, ras.xs] = (colour * 255).round().clip(0, 255).astype(np.uint8)
    return img[ras.fill_y, ras.fill_x], list(ATLAS_REGIONS)


def face_landmarks(geo: BodyGeometry, head_head: np.ndarray, head_tail: np.ndarray) -> dict[str, list[float]]:
    """Nose tip, eyes (front of the eyeball) and ears measured on the rest mesh, in the head joint's
    rest frame (world axes at rest) as fractions of the head bone length (skeleton convention)."""
    length = float(np.linalg.norm(head_tail - head_head))
    v = geo.verts
    head_faces = geo.seg("head")
    head_v = np.unique(geo.faces[head_faces])
    hp = v[head_v]
    eye_z = 0.5 * (geo.joints["l_eye"][2] + geo.joints["r_eye"][2])
    s = geo.scale
    nose_band = hp[(np.abs(hp[:, 0]) < 0.006 * s) & (hp[:, 2] < eye_z - 0.005 * s) & (hp[:, 2] > eye_z - 0.07 * s)]
    out = {}
    if len(nose_band):
        out["nose"] = nose_band[np.argmin(nose_band[:, 1])]
    for side, seg in (("l", "eye_front.L"), ("r", "eye_front.R")):
        ev = v[np.unique(geo.faces[geo.seg(seg)])] if geo.seg(seg).any() else np.zeros((0, 3))
        out[f"{side}_eye"] = ev[np.argmin(ev[:, 1])] if len(ev) else geo.joints[f"{side}_eye"]
    ear_band = hp[(np.abs(hp[:, 2] - (eye_z - 0.02 * s)) < 0.015 * s)]
    if len(ear_band):
        mid_y = 0.5 * (ear_band[:, 1].min() + ear_band[:, 1].max())
        ear_band = ear_band[np.abs(ear_band[:, 1] - (mid_y + 0.01 * s)) < 0.03 * s]
    if len(ear_band):
        out["l_ear"] = ear_band[np.argmax(ear_band[:, 0])]
        out["r_ear"] = ear_band[np.argmin(ear_band[:, 0])]
    return {k: [round(float(x), 5) for x in (p - head_head) / length] for k, p in out.items()}
