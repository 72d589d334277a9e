"""Synthetic shards in the render farm's format, for the loader tests and benchmarks.

A figure is the canonical skeleton posed by ``forward_kinematics`` with random angles, seen by an
orthographic camera turned about the vertical axis, and drawn with PIL as thick round-capped limbs
between keypoints: every visible keypoint therefore lies on the figure by construction, which the
loader tests rely on. The standard image is the same character (same colours) in the rest A-pose,
front view, on white, with the nose at a fixed place. Members and layout follow the shard format
(``synth_pair``: ``ref.png`` RGBA, ``std.png`` RGB, ``ref_pose.json``, ``std_pose.json``,
``meta.json``; ``write_synthetic_shards``: format 3 sets, ``train/*.tar``, ``test/*.tar``, the
standards in ``<split>/standard/*.tar`` and ``index.json``, or format 2 sets).

This module also tests the generator itself (the premise every loader test stands on).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serialgen.assets_manifest import skeleton as sk

__all__ = ["LIMBS", "synth_pair", "write_synthetic_shards", "synth_background"]

_N = {n: i for i, n in enumerate(sk.KEYPOINT_NAMES)}
# Limbs drawn for the figure (pairs of keypoint names): body, feet, face and fingers.
LIMBS = [
    ("neck", "r_shoulder"), ("neck", "l_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"),
    ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist"), ("neck", "r_hip"), ("neck", "l_hip"),
    ("r_hip", "l_hip"), ("r_hip", "r_knee"), ("r_knee", "r_ankle"), ("l_hip", "l_knee"),
    ("l_knee", "l_ankle"), ("neck", "nose"), ("nose", "r_eye"), ("nose", "l_eye"), ("r_eye", "r_ear"),
    ("l_eye", "l_ear"),
] + [(f"{s}_ankle", f"{s}_{p}") for s in "lr" for p in ("big_toe", "small_toe", "heel")] + [
    (f"{s}_hand_root" if k == 1 else f"{s}_{f}_{k - 1}", f"{s}_{f}_{k}")
    for s in "lr" for f in ("thumb", "index", "middle", "ring", "pinky") for k in range(1, 5)
]


def _palette(character: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(10_000 + character)
    # Saturated, not near white or black, so the figure never matches a background by accident.
    return [tuple(int(v) for v in rng.integers(40, 216, 3)) for _ in range(4)]


def _project(kp3: np.ndarray, yaw_deg: float, scale: float, origin: tuple[float, float]) -> np.ndarray:
    """Orthographic view: (K, 3) metres -> (K, 2) pixels; yaw turns the figure about Z."""
    t = np.radians(yaw_deg)
    x = kp3[:, 0] * np.cos(t) - kp3[:, 1] * np.sin(t)
    return np.stack([origin[0] + scale * x, origin[1] - scale * kp3[:, 2]], axis=1)


def _draw_figure(img: Image.Image, xy: np.ndarray, vis: np.ndarray, scale: float, colours) -> None:
    d = ImageDraw.Draw(img)
    width = max(3, int(round(0.09 * scale)))
    finger = max(2, int(round(0.012 * scale)))
    head = xy[_N["nose"]]
    r_head = 0.11 * scale
    for i, (a, b) in enumerate(LIMBS):
        ia, ib = _N[a], _N[b]
        if not (vis[ia] and vis[ib]):
            continue
        w = finger if "hand" in a or any(f in a for f in ("thumb", "index", "middle", "ring", "pinky")) else width
        c = colours[i % len(colours)] + ((255,) if img.mode == "RGBA" else ())
        d.line([tuple(xy[ia]), tuple(xy[ib])], fill=c, width=w)
        for p in (xy[ia], xy[ib]):  # round caps: keypoints sit inside the drawn figure
            d.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=c)
    c = colours[0] + ((255,) if img.mode == "RGBA" else ())
    torso = [_N[n] for n in ("r_shoulder", "l_shoulder", "l_hip", "r_hip")]
    if vis[torso].all():
        d.polygon([tuple(xy[i]) for i in torso], fill=colours[1] + c[3:])
    d.ellipse([head[0] - r_head, head[1] - r_head, head[0] + r_head, head[1] + r_head], fill=c)


def _pose_json(xy: np.ndarray, vis: np.ndarray, size: tuple[int, int]) -> bytes:
    kps = [[round(float(x), 3), round(float(y), 3), int(v)] for (x, y), v in zip(xy, vis)]
    kps = [k if k[2] else [0.0, 0.0, 0] for k in kps]
    return json.dumps({"width": size[0], "height": size[1], "names": sk.KEYPOINT_NAMES, "keypoints": kps}).encode()


def _texture(img: Image.Image, rng: np.random.Generator, amplitude: float) -> Image.Image:
    """Shading noise on the figure, so PNG sizes and decode times resemble real renders."""
    a = np.asarray(img).copy()
    fg = a[..., 3] > 0 if img.mode == "RGBA" else (a != 255).any(axis=2)
    noise = rng.normal(0, amplitude, (a.shape[0], a.shape[1], 1)).astype(np.float32)
    rgb = a[..., :3].astype(np.float32) + noise
    a[..., :3][fg] = np.clip(rgb, 0, 255).astype(np.uint8)[fg]
    return Image.fromarray(a, img.mode)


def synth_pair(character: int, pose: int, size=(512, 768), std_size=None, hands: bool = True,
               compress_level: int = 1, texture: float = 0.0, key: str | None = None,
               split: str = "train") -> dict[str, bytes]:
    """One sample's members (bytes): a posed figure (RGBA, transparent) and its standard (RGB on white).

    Poses, framing (scale, placement) and view (yaw) are drawn from ``(character, pose)``; colours
    from ``character``. Keypoints outside the image are marked invisible, as the renderer does.
    """
    std_size = std_size or size
    rng = np.random.default_rng([character, pose])
    colours = _palette(character)
    angles = np.zeros((len(sk.JOINTS), 3))
    for j, joint in enumerate(sk.JOINTS):
        lo = np.array([l for l, _ in joint.limits]) * 0.6
        hi = np.array([h for _, h in joint.limits]) * 0.6
        angles[j] = rng.uniform(lo, hi)
    angles[sk.JOINT_INDEX["pelvis"]] = [0, 0, 0]
    kp3, mask = sk.compute_keypoints(sk.forward_kinematics(angles))
    if not hands:
        mask[24:] = False
    w, h = size
    framing = str(rng.choice(["full", "full", "upper", "close"]))
    scale = {"full": 0.8, "upper": 1.3, "close": 2.0}[framing] * h / 1.75 * rng.uniform(0.85, 1.0)
    centre_z = {"full": 0.9, "upper": 1.3, "close": 1.5}[framing]
    origin = (w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + centre_z * scale)
    yaw = float(rng.uniform(-60, 60))
    xy = _project(np.nan_to_num(kp3), yaw, scale, origin)
    ref = Image.new("RGBA", size, (0, 0, 0, 0))
    _draw_figure(ref, xy, mask, scale, colours)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    ref_vis = mask & inside

    sw, sh = std_size
    kp_rest, rmask = sk.compute_keypoints(sk.forward_kinematics(np.zeros((len(sk.JOINTS), 3))))
    if not hands:
        rmask[24:] = False
    s_scale = 0.75 * sh / 1.75
    nose = kp_rest[_N["nose"]]
    # The face at a fixed place: nose at (w/2, 0.14 h), whatever the scale.
    s_origin = (sw / 2 - s_scale * nose[0], 0.14 * sh + s_scale * nose[2])
    s_xy = _project(kp_rest, 0.0, s_scale, s_origin)
    std = Image.new("RGB", std_size, (255, 255, 255))
    _draw_figure(std, s_xy, rmask, s_scale, colours)

    if texture > 0:
        ref, std = _texture(ref, rng, texture), _texture(std, np.random.default_rng(character), texture)

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=compress_level)
        return buf.getvalue()

    meta = {"schema": "serialgen.sample/1", "key": key or f"c{character:04d}_p{pose:05d}", "split": split,
            "character": f"synth{character:04d}", "pose_id": pose, "motion_id": "synthetic",
            "expression_id": "neutral", "framing": framing, "camera": {"yaw_deg": round(yaw, 3)},
            "seed": int(character * 100_003 + pose)}
    return {"ref.png": png(ref), "std.png": png(std), "ref_pose.json": _pose_json(xy, ref_vis, size),
            "std_pose.json": _pose_json(s_xy, rmask, std_size), "meta.json": json.dumps(meta).encode()}


def write_synthetic_shards(root: Path, n_shards: int = 4, per_shard: int = 6, split: str = "train",
                           size=(512, 768), std_size=None, characters_per_shard: int = 1,
                           first_character: int = 0, texture: float = 0.0, standard_pose: dict | None = None,
                           with_characters: bool = False, version: int = 3) -> list[Path]:
    """Write ``root/<split>/shard-NNNNNN.tar`` and ``root/index.json`` with the project's own shard
    writer (``serialgen.dataset.shards``: the render farm's format); return the shard paths.

    ``version`` 3 (the default, what render writes): pairs without ``std.png``, each character's
    standard once in ``<split>/standard/<character>.tar``, the index lists them and every character.
    ``version`` 2: every pair carries ``std.png``; ``with_characters`` fills the index's
    ``characters`` (from the samples' own std_pose.json). Keys are ``c<character>_p<pose>`` (no
    dots), unique across the whole set. Calling it again for another split keeps the shards,
    standards and characters already listed in the index. ``standard_pose`` fills the index's
    canonical standard pose.
    """
    from serialgen.dataset import shards as fmt

    root = Path(root)
    summaries, characters, standards = [], {}, []
    if (root / fmt.INDEX_NAME).is_file():
        old = fmt.read_index(root)
        summaries = [fmt.ShardSummary(**{k: e[k] for k in ("path", "split", "samples", "bytes", "sha256")})
                     for e in old["shards"] if e["split"] != split]
        characters = {c: r for c, r in (old["characters"] or {}).items() if r["split"] != split}
        standards = [fmt.StandardSummary.from_json(e) for e in old["standard_shards"] or [] if e["split"] != split]
    paths = []
    for s in range(n_shards):
        rel = f"{split}/shard-{s:06d}.tar"
        with fmt.ShardWriter(root, rel, split) as w:
            for i in range(per_shard):
                character = first_character + s * characters_per_shard + i % characters_per_shard
                pose = s * per_shard + i
                key = f"c{character:04d}_p{pose:05d}"
                sample = synth_pair(character, pose, size=size, std_size=std_size, texture=texture, key=key, split=split)
                cid = f"synth{character:04d}"
                std_pose = json.loads(sample["std_pose.json"])
                if version >= 3:
                    std_png = sample.pop("std.png")
                    if cid not in characters:
                        standards.append(fmt.write_standard(root, split, cid, std_png, std_pose, {"synthetic": True}))
                w.write(key, sample)
                characters[cid] = {"split": split, "standard_pose": std_pose}
            summaries.append(w.close())
        paths.append(root / rel)
    if version >= 3:
        fmt.write_index(root, summaries, config={"synthetic": True}, failures=[], standard_pose=standard_pose,
                        characters=characters, standards=standards)
    else:
        fmt.write_index(root, summaries, config={"synthetic": True}, failures=[], standard_pose=standard_pose,
                        characters=characters if with_characters else None)
    return paths


def synth_background(path: Path, seed: int, size=(800, 600)) -> Path:
    """A textured background image (smooth colour field plus noise); the format follows the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.002, 0.02), rng.uniform(0.002, 0.02), rng.uniform(0, 6.3)
        img[..., c] = 128 + 90 * np.sin(xx * fx + yy * fy + ph)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The generator's own premise: visible keypoints are on the (opaque) figure.
# ---------------------------------------------------------------------------------------------

def test_synthetic_keypoints_lie_on_the_figure():
    for pose in range(6):
        m = synth_pair(3, pose, size=(256, 384))
        alpha = np.asarray(Image.open(io.BytesIO(m["ref.png"])))[..., 3]
        kps = np.array(json.loads(m["ref_pose.json"])["keypoints"])
        vis = kps[:, 2] > 0
        assert vis[:18].sum() >= 4
        xs, ys = kps[vis, 0].astype(int), kps[vis, 1].astype(int)
        assert (alpha[ys, xs] == 255).all()
        std = np.asarray(Image.open(io.BytesIO(m["std.png"])))
        assert std.shape == (384, 256, 3) and (std[0, 0] == 255).all()
