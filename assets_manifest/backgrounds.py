"""Background images: the embedded default (no download) and a user's folders, as manifest records.

The default is built from what ships with our dependencies plus procedural images, all written as
plain image files under ``DIR/backgrounds/`` so the loader only ever reads files with PIL:

* ``photo`` / ``texture``: scikit-image's bundled sample images whose docstrings state CC0 or public
  domain (list and licences in ``SKIMAGE_IMAGES``), copied unchanged.
* ``hdri``: the CC0 Poly Haven HDRIs inside the ``bpy`` wheel (``studiolights/world/*.exr``). PIL cannot
  read OpenEXR, so the caller's probe decodes them (``probe.AssetProbe.read_exrs``; the Blender one
  runs a short ``bpy`` worker process, Blender stays out of this process); each equirectangular map
  gives ``HDRI_YAWS`` perspective views, auto-exposed and tone-mapped (ACES fit, sRGB) to 8-bit PNG.
  Without a probe there are no HDRI views. Cached: an unchanged source and view description is not
  converted again.
* ``procedural``: gradients, fractal noise, soft shapes and stripes/tiles, each fully described by
  its generator parameters and seed in the record.

``--backgrounds PATH`` adds jpg/jpeg/png/webp files (folders are scanned recursively). Unreadable,
truncated, wrongly-typed or tiny images (short side < ``MIN_SHORT_SIDE`` = 256 px: the loader crops
and scales backgrounds to at least 512x768, and below 256 px upscaling artefacts dominate) become
rejected records with a reason; byte-identical duplicates are rejected as ``duplicate``.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from serialgen.assets_manifest import manifest as mf
from serialgen.assets_manifest.probe import AssetProbe, ProbeError
from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION

__all__ = [
    "MIN_SHORT_SIDE",
    "IMAGE_EXTENSIONS",
    "SKIMAGE_IMAGES",
    "HDRI_YAWS",
    "DEFAULT_PROCEDURAL_BACKGROUNDS",
    "inspect_image",
    "bpy_hdri_dir",
    "procedural_params",
    "render_procedural",
    "equirect_view",
    "tonemap",
    "build_default_backgrounds",
    "scan_user_backgrounds",
    "build_backgrounds",
    "load_backgrounds",
]

MIN_SHORT_SIDE = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_FORMATS = {"JPEG", "PNG", "WEBP", "MPO"}  # MPO: multi-picture JPEGs from phone cameras
DEFAULT_PROCEDURAL_BACKGROUNDS = 64
HDRI_YAWS = (0, 90, 180, 270)
_PNG_LEVEL = 3  # zlib level: 3x faster than the default 6 for ~5% larger files
# Backgrounds are made at the training size (DEFAULT_RESOLUTION, the paper's 512x768 frame).
HDRI_VIEW = {"pitch": 5.0, "hfov": 70.0, "size": list(DEFAULT_RESOLUTION), "tonemap": "aces-autoexposure-0.18"}

# scikit-image sample images used as backgrounds, with the licence their docstrings state
# (skimage/data/_fetchers.py). Left out: images without a stated licence (logo, color wheel,
# moon, page, phantom, chessboards, motorcycle stereo pair), scientific/medical ones (cells,
# retina, microaneurysms, immunohistochemistry), ones under 256 px (text), and the two portraits
# (astronaut, camera): a background with a person in it puts a second person behind every
# composited character, which the standardization model would learn to keep or to copy.
SKIMAGE_IMAGES: list[dict] = [
    {"file": "chelsea.png", "kind": "photo", "licence": "CC0 (Stefan van der Walt)"},
    {"file": "coffee.png", "kind": "photo", "licence": "CC0 (Rachel Michetti)"},
    {"file": "rocket.jpg", "kind": "photo", "licence": "public domain (SpaceX)"},
    {"file": "hubble_deep_field.jpg", "kind": "photo", "licence": "public domain (NASA)"},
    {"file": "coins.png", "kind": "photo", "licence": "no known copyright restrictions (Brooklyn Museum)"},
    {"file": "clock_motion.png", "kind": "photo", "licence": "public domain (Stefan van der Walt)"},
    {"file": "brick.png", "kind": "texture", "licence": "CC0 (CC0Textures Bricks25)"},
    {"file": "grass.png", "kind": "texture", "licence": "CC0 (DeviantArt linolafett)"},
    {"file": "gravel.png", "kind": "texture", "licence": "CC0 (CC0Textures Gravel04)"},
]
_HDRI_LICENCE = "CC0 (Greg Zaal, Poly Haven; bpy studiolights/world/license.txt)"


# ---------------------------------------------------------------------------------------------
# Checking one image file
# ---------------------------------------------------------------------------------------------


def inspect_image(path: str | Path) -> dict:
    """Decode an image fully. -> {"ok", "reason", "detail", "width", "height", "mode", "format"}.

    Reasons: ``unreadable_image`` (not an image, truncated, corrupt, too many pixels),
    ``unsupported_format`` (decodes, but is not JPEG/PNG/WebP, e.g. a GIF named .png),
    ``image_too_small`` (short side < MIN_SHORT_SIDE)."""
    from PIL import Image

    info = {"ok": False, "reason": None, "detail": "", "width": None, "height": None, "mode": None, "format": None}
    try:
        with Image.open(path) as im:
            info.update(width=im.width, height=im.height, mode=im.mode, format=im.format)
            im.load()  # full decode: truncated files fail here, not at training time
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        info.update(reason="unreadable_image", detail=f"{type(exc).__name__}: {exc}")
        return info
    if info["format"] not in _FORMATS:
        info.update(reason="unsupported_format", detail=f"{info['format']} image (expected JPEG, PNG or WebP)")
    elif min(info["width"], info["height"]) < MIN_SHORT_SIDE:
        info.update(reason="image_too_small",
                    detail=f"{info['width']}x{info['height']} (short side under {MIN_SHORT_SIDE} px)")
    else:
        info["ok"] = True
    return info


def _image_record(asset_id: str, kind: str, path_field: str, sha: str, info: dict, **fields) -> dict:
    rec = mf.make_record("background", asset_id, kind, path=path_field, sha256=sha,
                         stats={"mode": info["mode"], "format": info["format"]},
                         width=info["width"], height=info["height"], **fields)
    if not info["ok"]:
        mf.reject(rec, info["reason"], info["detail"])
    return rec


# ---------------------------------------------------------------------------------------------
# Where the bundled files are (found without importing the packages)
# ---------------------------------------------------------------------------------------------


def _skimage_data_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def bpy_hdri_dir() -> Path | None:
    spec = importlib.util.find_spec("bpy")
    if spec is None or spec.origin is None:
        return None
    hits = sorted(Path(spec.origin).parent.glob("*/datafiles/studiolights/world"))
    return hits[-1] if hits else None


# ---------------------------------------------------------------------------------------------
# Procedural backgrounds
# ---------------------------------------------------------------------------------------------

_PROCEDURAL_TYPES = ("gradient", "noise", "shapes", "stripes")


def _colour(rng: np.random.Generator, sat=(0.05, 0.7), val=(0.15, 0.95)) -> list[int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return [int(round(255 * c)) for c in (r, g, b)]


def procedural_params(seed: int, index: int) -> dict:
    """The full description of procedural background ``index`` for a run ``seed`` (JSON-able)."""
    rng = np.random.default_rng([int(seed), int(index), 0xB6])
    kind = _PROCEDURAL_TYPES[index % len(_PROCEDURAL_TYPES)]
    p = {"type": kind, "seed": int(seed), "index": int(index), "noise_seed": int(rng.integers(2**31))}
    if kind == "gradient":
        p.update(colours=[_colour(rng) for _ in range(int(rng.integers(2, 4)))],
                 radial=bool(rng.random() < 0.3), angle=float(rng.uniform(0, 360)),
                 centre=[float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))])
    elif kind == "noise":
        p.update(colours=[_colour(rng) for _ in range(3)], octaves=int(rng.integers(3, 6)),
                 base_cells=int(rng.integers(2, 8)), persistence=float(rng.uniform(0.35, 0.65)))
    elif kind == "shapes":
        p.update(background=[_colour(rng), _colour(rng)], angle=float(rng.uniform(0, 360)),
                 count=int(rng.integers(8, 40)), blur=float(rng.uniform(1.0, 12.0)),
                 shape=str(rng.choice(["circle", "rectangle", "mixed"])),
                 colours=[_colour(rng, sat=(0.1, 0.9), val=(0.3, 1.0)) for _ in range(4)])
    else:
        p.update(colours=[_colour(rng), _colour(rng)], period=int(rng.integers(12, 120)),
                 angle=float(rng.choice([0.0, 90.0, float(rng.uniform(0, 180))])),
                 checker=bool(rng.random() < 0.4), softness=float(rng.uniform(0.0, 0.4)))
    return p


def _grid(w: int, h: int):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x / (w - 1), y / (h - 1)


def _blend(t: np.ndarray, colours) -> np.ndarray:
    """Map t in [0, 1] (H, W) through a piecewise-linear palette -> (H, W, 3) float 0..255."""
    cols = np.asarray(colours, dtype=np.float64)
    xp = np.linspace(0.0, 1.0, len(cols))
    return np.stack([np.interp(t, xp, cols[:, c]) for c in range(3)], axis=-1)


def _value_noise(rng, w, h, cells, octaves, persistence) -> np.ndarray:
    from PIL import Image

    total, amp, norm = np.zeros((h, w)), 1.0, 0.0
    for o in range(octaves):
        c = cells * 2**o
        g = rng.random((max(2, int(c * h / w) + 1), c + 1)).astype(np.float32)
        up = np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BICUBIC), dtype=np.float64)
        total += amp * up
        norm += amp
        amp *= persistence
    total /= norm
    lo, hi = np.percentile(total, [1, 99])
    return np.clip((total - lo) / max(hi - lo, 1e-6), 0, 1)


def render_procedural(params: dict, size: Sequence[int] = DEFAULT_RESOLUTION):
    """Render a procedural background description -> PIL RGB image of ``size`` (w, h)."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = int(size[0]), int(size[1])
    rng = np.random.default_rng(params["noise_seed"])
    x, y = _grid(w, h)
    kind = params["type"]
    if kind in ("gradient", "shapes"):
        a = np.deg2rad(params["angle"])
        if params.get("radial"):
            cx, cy = params["centre"]
            t = np.hypot(x - cx, (y - cy) * h / w) / 0.9
        else:
            t = (x - 0.5) * np.cos(a) + (y - 0.5) * np.sin(a) + 0.5
        img = _blend(t, params["colours"] if kind == "gradient" else params["background"])
    elif kind == "noise":
        img = _blend(_value_noise(rng, w, h, params["base_cells"], params["octaves"], params["persistence"]),
                     params["colours"])
    elif kind == "stripes":
        a = np.deg2rad(params["angle"])
        px = (x * w * np.cos(a) + y * h * np.sin(a)) / params["period"]
        wave = np.sin(np.pi * px)
        if params["checker"]:
            py = (-x * w * np.sin(a) + y * h * np.cos(a)) / params["period"]
            wave = wave * np.sin(np.pi * py)
        soft = max(params["softness"], 0.02)
        img = _blend(np.clip(0.5 + wave / (2 * soft), 0, 1), params["colours"])
    else:
        raise ValueError(f"unknown procedural background type {kind!r}")
    # No grain: noise would triple the PNG size, and 8-bit gradients over 768 px do not band.
    im = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    if kind == "shapes":
        layer = im.copy()
        draw = ImageDraw.Draw(layer)
        for _ in range(params["count"]):
            col = tuple(params["colours"][int(rng.integers(len(params["colours"])))])
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.02, 0.18) * w
            shape = params["shape"] if params["shape"] != "mixed" else ("circle" if rng.random() < 0.5 else "rectangle")
            box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)]
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=col)
        im = Image.blend(im, layer.filter(ImageFilter.GaussianBlur(params["blur"])), 0.85)
    return im


# ---------------------------------------------------------------------------------------------
# HDRI views
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _equirect_map(src_hw: tuple[int, int], yaw: float, pitch: float, hfov: float, size: tuple[int, int]):
    """Flat source indices (4, H*W) and bilinear weights (4, H*W) of a pinhole view."""
    w, h = size
    hs, ws = src_hw
    f = (w / 2) / np.tan(np.deg2rad(hfov) / 2)
    j, i = np.meshgrid(np.arange(w) + 0.5 - w / 2, np.arange(h) + 0.5 - h / 2)
    d = np.stack([j / f, np.ones_like(j), -i / f], axis=-1)  # x right, y forward, z up
    cp, sp = np.cos(np.deg2rad(pitch)), np.sin(np.deg2rad(pitch))
    d = np.stack([d[..., 0], d[..., 1] * cp - d[..., 2] * sp, d[..., 1] * sp + d[..., 2] * cp], axis=-1)
    cy, sy = np.cos(np.deg2rad(yaw)), np.sin(np.deg2rad(yaw))
    d = np.stack([d[..., 0] * cy - d[..., 1] * sy, d[..., 0] * sy + d[..., 1] * cy, d[..., 2]], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    sx = (np.arctan2(d[..., 0], d[..., 1]) / (2 * np.pi) + 0.5) * ws - 0.5
    sy_ = (0.5 - np.arcsin(np.clip(d[..., 2], -1, 1)) / np.pi) * hs - 0.5
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.clip(np.floor(sy_).astype(np.int64), 0, hs - 2)
    fx = (sx - x0).ravel()
    fy = np.clip(sy_ - y0, 0, 1).ravel()
    x0 %= ws
    x1 = (x0 + 1) % ws
    y0 = y0.ravel()
    x0, x1 = x0.ravel(), x1.ravel()
    idx = np.stack([y0 * ws + x0, y0 * ws + x1, (y0 + 1) * ws + x0, (y0 + 1) * ws + x1])
    wts = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]).astype(np.float32)
    return idx, wts


def equirect_view(pano: np.ndarray, yaw: float, pitch: float, hfov: float, size: Sequence[int]) -> np.ndarray:
    """A pinhole view (H, W, 3) of an equirectangular panorama (Hs, Ws, 3), bilinear; yaw about the
    vertical, pitch up and horizontal field of view in degrees; size (w, h)."""
    w, h = int(size[0]), int(size[1])
    idx, wts = _equirect_map(pano.shape[:2], float(yaw), float(pitch), float(hfov), (w, h))
    flat = np.asarray(pano, dtype=np.float32).reshape(-1, 3)
    out = sum(np.take(flat, idx[k], axis=0) * wts[k][:, None] for k in range(4))
    return out.reshape(h, w, 3)


def tonemap(rgb: np.ndarray, key: float = 0.18) -> np.ndarray:
    """Linear HDR (H, W, 3) -> uint8 sRGB: log-average auto exposure to ``key``, ACES filmic fit."""
    rgb = np.maximum(np.asarray(rgb, dtype=np.float32), 0.0)
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
    x = rgb * np.float32(key / np.exp(np.mean(np.log(lum + 1e-4))))
    x = np.clip((x * (2.51 * x + 0.03)) / (x * (2.43 * x + 0.59) + 0.14), 0, 1)
    srgb = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.clip(np.round(srgb * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Building the manifest
# ---------------------------------------------------------------------------------------------


def _cached(prev: dict | None, out_dir: Path, same: Callable[[dict], bool]) -> dict | None:
    """A previous accepted record whose description matches and whose file is still intact."""
    if not prev or prev.get("status") != "accepted" or not same(prev):
        return None
    f = out_dir / prev["path"]
    if f.is_file() and mf.file_stats(f) == {k: prev["stats"].get(k) for k in ("file_size", "mtime_ns")}:
        return prev
    return None


def _skimage_records(out_dir: Path, previous: dict[str, dict], notes: list[str]) -> list[dict]:
    src_dir = _skimage_data_dir()
    if src_dir is None:
        notes.append("scikit-image not installed: no bundled photos")
        return []
    dest = out_dir / "backgrounds" / "skimage"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for item in SKIMAGE_IMAGES:
        src = src_dir / item["file"]
        asset_id = "skimage-" + Path(item["file"]).stem.replace("_", "-")
        rel = f"backgrounds/skimage/{item['file']}"
        if not src.is_file():
            out.append(mf.make_record("background", asset_id, item["kind"], status="rejected", reason="missing_file",
                                      detail=f"{src} not in this scikit-image", licence=item["licence"]))
            continue
        sha = mf.sha256_file(src)
        hit = _cached(previous.get(asset_id), out_dir, lambda p: p.get("sha256") == sha)
        if hit:
            out.append(hit)
            continue
        shutil.copyfile(src, out_dir / rel)
        rec = _image_record(asset_id, item["kind"], rel, sha, inspect_image(out_dir / rel),
                            licence=item["licence"], source=f"scikit-image data/{item['file']}")
        rec["stats"].update(mf.file_stats(out_dir / rel))
        out.append(rec)
    return out


def _hdri_records(out_dir: Path, previous: dict[str, dict], notes: list[str], probe: AssetProbe,
                  progress=None) -> list[dict]:
    src_dir = bpy_hdri_dir()
    if src_dir is None:
        notes.append("bpy not installed: no HDRI backgrounds")
        return []
    exrs = sorted(src_dir.glob("*.exr"))
    dest = out_dir / "backgrounds" / "hdri"
    dest.mkdir(parents=True, exist_ok=True)
    todo, out = [], {}
    for exr in exrs:
        src_sha = mf.sha256_file(exr)
        for yaw in HDRI_YAWS:
            asset_id = f"hdri-{exr.stem}-{yaw:03d}"
            gen = {**HDRI_VIEW, "yaw": float(yaw), "source": exr.name, "source_sha256": src_sha}
            hit = _cached(previous.get(asset_id), out_dir, lambda p, gen=gen: p.get("generator") == gen)
            if hit:
                out[asset_id] = hit
            else:
                todo.append((exr, yaw, asset_id, gen))
    if todo:
        files = sorted({t[0] for t in todo})
        try:
            panos = dict(zip(files, probe.read_exrs(files)))
        except ProbeError as exc:
            notes.append(f"HDRI conversion failed: {exc}")
            panos = {}
        for exr, yaw, asset_id, gen in todo:
            rel = f"backgrounds/hdri/{asset_id}.png"
            if exr not in panos:
                out[asset_id] = mf.make_record("background", asset_id, "hdri", status="rejected",
                                               reason="unreadable_image", detail=f"{exr}: could not decode the EXR",
                                               generator=gen, licence=_HDRI_LICENCE)
                continue
            from PIL import Image

            view = equirect_view(panos[exr], yaw, gen["pitch"], gen["hfov"], gen["size"])
            Image.fromarray(tonemap(view), "RGB").save(out_dir / rel, compress_level=_PNG_LEVEL)
            rec = _image_record(asset_id, "hdri", rel, mf.sha256_file(out_dir / rel), inspect_image(out_dir / rel),
                                generator=gen, licence=_HDRI_LICENCE)
            rec["stats"].update(mf.file_stats(out_dir / rel))
            out[asset_id] = rec
            if progress:
                progress()
    return [out[k] for k in sorted(out)]


def _procedural_records(out_dir: Path, n: int, seed: int, previous: dict[str, dict], progress=None) -> list[dict]:
    from PIL import Image  # noqa: F401 - render_procedural needs it; fail early if missing

    dest = out_dir / "backgrounds" / "procedural"
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        params = procedural_params(seed, i)
        gen = {**params, "size": list(DEFAULT_RESOLUTION)}
        asset_id = f"procbg-{i:06d}"
        hit = _cached(previous.get(asset_id), out_dir, lambda p, gen=gen: p.get("generator") == gen)
        if hit is None:
            rel = f"backgrounds/procedural/{asset_id}.png"
            render_procedural(params, DEFAULT_RESOLUTION).save(out_dir / rel, compress_level=_PNG_LEVEL)
            hit = _image_record(asset_id, "procedural", rel, mf.sha256_file(out_dir / rel),
                                inspect_image(out_dir / rel), generator=gen, licence="generated (CC0)")
            hit["stats"].update(mf.file_stats(out_dir / rel))
        out.append(hit)
        if progress:
            progress()
    return out


def build_default_backgrounds(out_dir: str | Path, *, n_procedural: int = DEFAULT_PROCEDURAL_BACKGROUNDS,
                              seed: int = 0, previous: Iterable[dict] = (), probe: AssetProbe | None = None,
                              progress=None, notes: list[str] | None = None) -> list[dict]:
    """Records of the embedded default (files written under ``out_dir/backgrounds/``). The HDRI
    views need ``probe`` to decode the EXR files; without one there are none."""
    out_dir = Path(out_dir)
    prev = {r["id"]: r for r in previous}
    notes = notes if notes is not None else []
    records = _skimage_records(out_dir, prev, notes)
    if probe is not None:
        records += _hdri_records(out_dir, prev, notes, probe, progress)
    records += _procedural_records(out_dir, n_procedural, seed, prev, progress)
    return records


def _user_record(path: Path, sha: str) -> dict:
    return _image_record(f"user-{sha[:12]}", "user", str(path), sha, inspect_image(path))


def _user_error(path: Path, sha: str, exc: Exception) -> dict:
    rec = mf.make_record("background", f"user-{sha[:12]}", "user", path=str(path), sha256=sha)
    return mf.reject(rec, "unreadable_image", f"{type(exc).__name__}: {exc}")


def scan_user_backgrounds(paths: Iterable[str | Path], previous: Iterable[dict] = (), progress=None,
                          max_bytes: int | None = mf.DEFAULT_MAX_BYTES) -> tuple[list[dict], dict]:
    """Scan everything under a user's paths (``manifest.walk_inputs``: every file gets a record;
    other formats are ``unsupported_format``, files over ``max_bytes`` ``too_large``, broken links,
    FIFOs ... with their reasons) and read the images incrementally (``manifest.incremental_scan``);
    duplicates (same bytes) after the first are rejected as ``duplicate``. -> (records, counts)."""
    for p in paths:
        if not Path(p).expanduser().exists():
            raise UserInputError(f"--backgrounds {p}: no such file or folder")
    entries = mf.walk_inputs(paths, IMAGE_EXTENSIONS, max_bytes, what="background image")
    files = [e.path for e in entries if e.reason is None]
    read, counts = mf.incremental_scan(files, [r for r in previous if r.get("kind") == "user" and r.get("sha256")],
                                       _user_record, on_error=_user_error, progress=progress)
    by_file = {rec["path"]: rec for rec in read}
    records = [by_file[str(e.path)] if e.reason is None else mf.entry_record("background", "user", "user", e)
               for e in entries]
    seen: dict[str, int] = {}
    for rec in records:
        if not rec.get("sha256"):
            continue  # not read: its id is the path's hash
        base = f"user-{rec['sha256'][:12]}"
        if rec["reason"] == "duplicate":  # marked by an earlier scan: judge it again below
            rec.update(status="accepted", reason=None, detail="")
        k = seen.get(base, 0)
        seen[base] = k + 1
        rec["id"] = base if k == 0 else f"{base}-dup{k}"
        if k and rec["status"] == "accepted":
            mf.reject(rec, "duplicate", f"same bytes as {base}")
    counts["ignored_non_images"] = sum(1 for e in entries if e.reason == "unsupported_format")
    return records, counts


def build_backgrounds(out_dir: str | Path, user_paths: Iterable[str | Path] = (), *,
                      n_procedural: int = DEFAULT_PROCEDURAL_BACKGROUNDS, seed: int = 0,
                      probe: AssetProbe | None = None, progress=None, notes: list[str] | None = None,
                      max_bytes: int | None = mf.DEFAULT_MAX_BYTES) -> tuple[list[dict], dict]:
    """Default + user backgrounds; writes ``out_dir/backgrounds.jsonl``. -> (records, counts).
    ``probe`` decodes the HDRIs (``build_default_backgrounds``); ``max_bytes`` caps a user's image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = mf.read_previous(out_dir / mf.MANIFEST_FILES["background"], "background")
    records = build_default_backgrounds(out_dir, n_procedural=n_procedural, seed=seed, previous=previous,
                                        probe=probe, progress=progress, notes=notes)
    user, counts = scan_user_backgrounds(user_paths, previous, progress, max_bytes) if user_paths else ([], {})
    mf.write_jsonl(out_dir / mf.MANIFEST_FILES["background"], records + user)
    return records + user, counts


def load_backgrounds(assets_dir: str | Path) -> list[dict]:
    """Accepted background records of ``assets_dir/backgrounds.jsonl`` with ``path`` made absolute
    (for the loader). A missing manifest or a path leaving the folder is a UserInputError."""
    assets_dir = Path(assets_dir)
    out = []
    for rec in mf.read_jsonl(assets_dir / mf.MANIFEST_FILES["background"], "background"):
        if rec["status"] != "accepted":
            continue
        out.append(dict(rec, path=str(mf.resolve_record_path(assets_dir, rec["path"]))))
    return out
