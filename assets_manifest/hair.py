"""Hair proxies for procedural characters: simple skinned shells shaped on the character's own head.

A lat-long grid around the cranium centre is pushed out to the head's support radius (the farthest
head vertex within a small cone of each direction) plus a thickness, then cut by a hairline that
depends on the style. Long styles add a vertical curtain at the back and sides (kept behind the
back/shoulders), ``bun`` and ``ponytail`` add a sphere or a tapered tube. Pure numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hair_part", "STYLE_PARAMS"]

# thickness (m, adult head), front hairline / side / back heights relative to the eyes (m),
# curtain end ("none", "jaw", "chest"), face opening half-angle (deg).
STYLE_PARAMS = {
    "buzz": dict(thick=0.003, front=0.050, side=0.030, back=-0.050, curtain="none"),
    "short": dict(thick=0.011, front=0.048, side=0.025, back=-0.055, curtain="none"),
    "afro": dict(thick=0.045, front=0.045, side=0.015, back=-0.050, curtain="none"),
    "bob": dict(thick=0.013, front=0.024, side=0.030, back=-0.050, curtain="jaw"),
    "long": dict(thick=0.013, front=0.040, side=0.030, back=-0.050, curtain="chest"),
    "bun": dict(thick=0.008, front=0.048, side=0.028, back=-0.045, curtain="none"),
    "ponytail": dict(thick=0.008, front=0.048, side=0.028, back=-0.045, curtain="none"),
    "bald": dict(thick=0.006, front=0.048, side=0.028, back=-0.050, curtain="none"),
}


def _grid_faces(rows: int, cols: int, keep: np.ndarray, offset: int = 0) -> list[tuple[int, int, int]]:
    faces = []
    for i in range(rows - 1):
        for j in range(cols):
            a, b = i * cols + j, i * cols + (j + 1) % cols
            c, d = a + cols, b + cols
            if keep[a] and keep[b] and keep[c] and keep[d]:
                faces += [(a + offset, c + offset, d + offset), (a + offset, d + offset, b + offset)]
    return faces


def _sphere(centre: np.ndarray, radius: np.ndarray, n_u: int = 16, n_v: int = 10):
    u = np.linspace(0, 2 * np.pi, n_u, endpoint=False)
    v = np.linspace(0.15, np.pi - 0.15, n_v)
    uu, vv = np.meshgrid(u, v)
    pts = np.stack([np.sin(vv) * np.cos(uu), np.sin(vv) * np.sin(uu), np.cos(vv)], -1).reshape(-1, 3)
    verts = centre + pts * radius
    faces = _grid_faces(n_v, n_u, np.ones(len(verts), dtype=bool))
    # Close the poles with fans.
    top, bot = len(verts), len(verts) + 1
    verts = np.vstack([verts, centre + [0, 0, radius[2]], centre - [0, 0, radius[2]]])
    for j in range(n_u):
        faces.append((top, j, (j + 1) % n_u))
        faces.append((bot, (n_v - 1) * n_u + (j + 1) % n_u, (n_v - 1) * n_u + j))
    uvs = np.zeros((len(verts), 2))
    uvs[:-2] = np.stack([uu.ravel() / (2 * np.pi), vv.ravel() / np.pi], 1)
    return verts, faces, uvs


def hair_part(desc: dict, geo, index: dict[str, int]):
    """(vertices, faces, uvs, weight_indices, weight_values) of the hair proxy, or None."""
    hair = desc["hair"]
    style = hair["style"]
    if style not in STYLE_PARAMS:
        raise ValueError(f"unknown hair style {style!r}; expected one of {sorted(STYLE_PARAMS)}")
    p = STYLE_PARAMS[style]
    s = geo.scale
    vol = float(hair.get("volume", 1.0))
    gi = {n: i for i, n in enumerate(geo.group_names)}
    head_w = geo.vertex_group_weight[:, gi["head"]]
    head_pts = geo.verts[head_w > 0.5]
    eye_z = 0.5 * (geo.joints["l_eye"][2] + geo.joints["r_eye"][2])
    upper = head_pts[head_pts[:, 2] > eye_z]
    centre = np.array([0.0, 0.5 * (upper[:, 1].min() + upper[:, 1].max()), eye_z + 0.012 * s])
    thick = p["thick"] * s * (vol if style != "buzz" else 1.0)

    # Dome: polar angle from the top (3..100 deg), azimuth 0 = front (-Y), +90 = character's left.
    cols, n_pol = 56, 30
    theta = np.deg2rad(np.linspace(3.0, 100.0, n_pol))
    phi = np.linspace(0.0, 2 * np.pi, cols, endpoint=False)
    tt, pp = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(tt) * np.sin(pp), -np.sin(tt) * np.cos(pp), np.cos(tt)], -1).reshape(-1, 3)
    rel = head_pts - centre
    rel_n = rel / np.linalg.norm(rel, axis=1, keepdims=True)
    proj = rel @ dirs.T  # (H, D)
    cone = (rel_n @ dirs.T) > np.cos(np.deg2rad(14.0))
    r = np.where(cone, proj, -np.inf).max(axis=0)
    # Directions with no head vertex in their cone (below the skull): fall back to the row above.
    r = r.reshape(n_pol, cols)
    for i in range(n_pol):
        bad = ~np.isfinite(r[i])
        if bad.any():
            r[i, bad] = r[i - 1, bad] if i else np.nanmax(r[np.isfinite(r)])
    dome = centre + dirs * (r.reshape(-1, 1) + thick)

    # Hairline: front / side / back heights blended by azimuth.
    a = (1.0 + np.cos(pp.ravel())) / 2.0  # 1 front, 0 back
    z_line = eye_z + s * (p["front"] * a ** 2 + p["side"] * 2 * a * (1 - a) + p["back"] * (1 - a) ** 2)
    keep = dome[:, 2] >= z_line
    if style == "bald":  # a horseshoe fringe at the sides and back
        keep &= (dome[:, 2] <= eye_z + 0.03 * s) & (np.abs(np.cos(pp.ravel())) < 0.55)
        keep |= (dome[:, 2] >= z_line) & (np.cos(pp.ravel()) < -0.55) & (dome[:, 2] <= eye_z + 0.03 * s)

    open_face = np.cos(phi) > np.cos(np.deg2rad(58.0))
    if p["curtain"] != "none":  # long styles cover the sides and back down to the curtain
        keep |= ~np.tile(open_face, n_pol) & (dome[:, 2] < eye_z + p["side"] * s)

    verts = [dome]
    uvs = [np.stack([pp.ravel() / (2 * np.pi), tt.ravel() / np.pi], 1)]
    faces = _grid_faces(n_pol, cols, keep)
    # Pole fan closes the crown.
    if style != "bald":
        pole = len(dome)
        verts.append((centre + np.array([0, 0, r[0].mean() + thick]))[None])
        uvs.append(np.array([[0.5, 0.0]]))
        faces += [(pole, j, (j + 1) % cols) for j in range(cols)]
    keep_all = [keep, np.array([True]) if style != "bald" else np.zeros(0, bool)]

    if p["curtain"] != "none":
        # Vertical curtain below the last dome row, at the back and sides only (face open).
        last = dome[(n_pol - 1) * cols:]
        neck_z = geo.joints["neck"][2]
        end_z = eye_z - 0.075 * s if p["curtain"] == "jaw" else geo.joints["chest"][2] - 0.04 * s * vol
        side_only = np.cos(phi) > np.cos(np.deg2rad(115.0))  # columns that stop at the neck
        zs = np.arange(last[:, 2].min() - 0.012, end_z, -0.012)
        body = geo.verts[geo.vertex_group_weight[:, gi["torso"]] + geo.vertex_group_weight[:, gi["neck"]] > 0.5]
        rows = []
        for k, z in enumerate(zs):
            ring = last.copy()
            flare = 1.0 + 0.08 * min(1.0, k / 8.0)
            ring[:, :2] = centre[:2] + (last[:, :2] - centre[:2]) * flare
            ring[:, 2] = z
            rows.append(ring)
        if rows:
            curtain = np.concatenate(rows)
            n_rows = len(rows)
            col = np.tile(np.arange(cols), n_rows)
            ok = ~open_face[col]
            stop = side_only[col] & (curtain[:, 2] < neck_z + 0.02 * s) & (p["curtain"] == "chest")
            ok &= ~stop
            # Keep the curtain behind the back and shoulders.
            low = curtain[:, 2] < neck_z + 0.03
            if low.any() and len(body):
                for i in np.nonzero(low)[0]:
                    q = curtain[i]
                    near = body[(np.abs(body[:, 0] - q[0]) < 0.03) & (np.abs(body[:, 2] - q[2]) < 0.03)]
                    if len(near):
                        back = near[:, 1].max() + 0.012
                        if q[1] > centre[1] - 0.02 and q[1] < back:
                            curtain[i, 1] = back
            # Join the curtain to the last dome row.
            stack = np.vstack([last, curtain])
            keep_stack = np.concatenate([keep[(n_pol - 1) * cols:], ok])
            off = sum(len(v) for v in verts)
            verts.append(curtain)
            uvs.append(np.stack([col / cols, np.repeat(0.6 + 0.4 * np.arange(n_rows) / max(n_rows, 1), cols)], 1))
            keep_all.append(ok)
            f = _grid_faces(n_rows + 1, cols, keep_stack)
            # Map local stack indices: row 0 -> the dome's last row, others -> the curtain.
            dome_last0 = (n_pol - 1) * cols
            for tri in f:
                faces.append(tuple(dome_last0 + t if t < cols else off + t - cols for t in tri))

    extra = []
    if style == "bun":
        d = np.array([0.0, 0.6, 0.8])
        d /= np.linalg.norm(d)
        # Seat the bun on the scalp: the head's own support radius in that direction.
        r_d = float((rel @ d)[(rel_n @ d) > np.cos(np.deg2rad(14.0))].max())
        radius = np.array([0.045, 0.04, 0.04]) * s * vol
        extra.append(_sphere(centre + d * (r_d + thick + 0.6 * radius[1]), radius))
    if style == "ponytail":
        base = centre + np.array([0.0, np.max(r) + thick * 0.5, 0.01 * s])
        length = 0.22 * s * vol
        n_ring, n_seg = 10, 12
        ang = np.linspace(0, 2 * np.pi, n_ring, endpoint=False)
        pts = []
        for k in range(n_seg):
            t = k / (n_seg - 1)
            c = base + np.array([0.0, 0.03 * s * np.sin(np.pi * t * 0.8) + 0.01, -length * t])
            rad = (0.024 - 0.014 * t) * s * vol
            pts.append(c + np.stack([rad * np.cos(ang), rad * np.sin(ang), np.zeros(n_ring)], 1))
        pts = np.concatenate(pts)
        f = _grid_faces(n_seg, n_ring, np.ones(len(pts), bool))
        u = np.stack([np.tile(ang / (2 * np.pi), n_seg), np.repeat(np.linspace(0, 1, n_seg), n_ring)], 1)
        extra.append((pts, f, u))
    for ev, ef, eu in extra:
        off = sum(len(v) for v in verts)
        verts.append(ev)
        uvs.append(eu)
        keep_all.append(np.ones(len(ev), bool))
        faces += [tuple(off + t for t in tri) for tri in ef]

    verts = np.concatenate(verts)
    uvs = np.concatenate(uvs)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        return None
    # Drop unused vertices.
    used = np.unique(faces)
    remap = -np.ones(len(verts), dtype=np.int64)
    remap[used] = np.arange(len(used))
    verts, uvs, faces = verts[used], uvs[used], remap[faces]

    # Weights: the head, blending into neck and chest down the curtain.
    neck_z = geo.joints["head"][2]
    chest_z = geo.joints["chest"][2] + 0.5 * (geo.joints["neck"][2] - geo.joints["chest"][2])
    z = verts[:, 2]
    w_head = np.clip((z - chest_z) / max(neck_z - chest_z, 1e-3), 0.0, 1.0)
    w_chest = 1.0 - w_head
    idx = np.tile(np.array([index["head"], index["spine01"], index["head"], index["head"]]), (len(verts), 1))
    val = np.stack([w_head, w_chest, np.zeros(len(z)), np.zeros(len(z))], 1)
    return (verts.astype(np.float32), faces.astype(np.int32), uvs.astype(np.float32),
            idx.astype(np.int16), val.astype(np.float32), np.zeros((0, 0, 3), np.uint8))
