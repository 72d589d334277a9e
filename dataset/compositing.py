"""Reference compositing at load time: a transparent render placed onto a random background.

One render becomes unlimited training variety: each time a sample is read, its RGBA reference is
scaled, placed (possibly cropped by the frame) and lightly colour-jittered onto a random crop of a
random background, and the background mask and keypoints follow the same transform exactly.

Everything runs in uint8, and only the character's bounding box (from alpha) is processed; the rest
of the canvas is the background window, copied once into the output:

* ``prepare_reference``: the box is colour-jittered through one lookup table per channel (straight
  colours) and premultiplied in ONE compiled pass (``fused.jitter_premultiply``: empty pixels
  become transparent black, opaque ones only go through the table, the antialiased rim is
  multiplied), then resampled with torch's antialiased uint8 bilinear kernel (premultiplied, so
  transparent pixels do not darken the edges);
* ``PlacedReference.write_into``: the background window is copied into the output around the box;
  the box is blended premultiplied "over" (``P + (1 - a) bg``, PIL's ``paste`` arithmetic, the same
  result as ``alpha_composite`` of the straight colours) and its mask (``alpha < 128``) written, in
  ONE compiled pass (``fused.over_and_mask``);
* backgrounds are decoded once into a small per-process pool of numpy arrays (resized once to
  cover the canvas with a random zoom, jittered, randomly flipped); a sample reads a random
  canvas-sized window of one entry (a view, no copy); ``refresh`` is the probability that a sample
  replaces one pool entry with a newly decoded background, so decode cost is amortised while every
  background still gets used.

Coordinates are continuous pixels: pixel ``i`` spans ``[i, i + 1)``. Sizes are ``(width, height)``.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serialgen.assets_manifest.backgrounds import load_backgrounds
from serialgen.assets_manifest.manifest import MANIFEST_FILES
from serialgen.dataset import fused
from serialgen.dataset.posemap import Pose
from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION, parse_resolution

__all__ = [
    "CompositeConfig",
    "Composite",
    "PlacedReference",
    "BackgroundPool",
    "EmptyReferenceError",
    "place_reference",
    "prepare_reference",
    "composite_reference",
    "jitter_lut",
    "jitter_table",
    "list_background_images",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_THRESHOLD = 128  # alpha >= 128 is foreground (mask 0); below is background (mask 1)


class EmptyReferenceError(ValueError):
    """The reference render has no opaque pixel: nothing to composite (a broken render)."""


@dataclass
class CompositeConfig:
    """How a reference is placed on its background.

    resolution: output (width, height). scale_range: random scale relative to fitting the whole render
    into the canvas. max_crop: largest fraction of the character's box (per axis) that may leave the
    canvas (a side already cut by the render's frame always stays at the canvas edge). jitter: mild
    colour jitter of the character (brightness, contrast and per-channel gain within +-jitter).
    """

    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    scale_range: tuple[float, float] = (0.8, 1.1)
    max_crop: float = 0.1
    jitter: float = 0.06

    def __post_init__(self):
        r = self.resolution
        self.resolution = parse_resolution(r if isinstance(r, str) else tuple(int(v) for v in r), "resolution")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise UserInputError(f"scale_range {self.scale_range}: need 0 < low <= high")
        if not 0 <= self.max_crop < 0.5 or not 0 <= self.jitter < 0.5:
            raise UserInputError("max_crop and jitter must lie in [0, 0.5)")


@dataclass
class Composite:
    """One composited reference.

    image: (H, W, 3) uint8; mask: (H, W) uint8, 1 = background; pose: keypoints in output pixels;
    background: the background crop before compositing (only when asked for: tests, previews);
    transform: (sx, sy, tx, ty) with x' = sx x + tx in output pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    pose: Pose
    transform: tuple[float, float, float, float]
    background: Image.Image | None = None


def resize_uint8(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bilinear (antialiased) resize of an 8-bit image (L, RGB, RGBA, RGBa) to ``size`` = (w, h).

    torch's uint8 kernel, about 5x faster than PIL's for 3-4 channels. It maps the input's pixel
    extent onto the output's (as PIL's resize does): x_out = x_in * w_out / w_in. Multi-band images
    go in as a true channels-last tensor (torch's fast interleaved kernel; see
    ``_resize_premultiplied``) and come back interleaved. RGBA is resampled as stored (straight
    alpha): pass RGBa to resample premultiplied.
    """
    import torch
    import torch.nn.functional as F

    if img.size == tuple(size):
        return img
    w, h = img.size
    nw, nh = size
    with warnings.catch_warnings():  # PIL's arrays are read-only; torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        arr = np.ascontiguousarray(np.asarray(img))
        t = torch.from_numpy(arr)
    c = 1 if arr.ndim == 2 else arr.shape[2]
    t = t.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    out = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if c == 1:
        return Image.frombuffer("L", (nw, nh), out.reshape(nh, nw).contiguous().numpy(), "raw", "L", 0, 1)
    if out.is_contiguous(memory_format=torch.channels_last):
        return Image.frombuffer(img.mode, (nw, nh), out[0].permute(1, 2, 0).numpy(), "raw", img.mode, 0, 1)
    planes = out[0].numpy()
    bands = [Image.frombuffer("L", (nw, nh), np.ascontiguousarray(planes[i]), "raw", "L", 0, 1) for i in range(c)]
    return Image.merge(img.mode, bands)


_RAMP = np.arange(256, dtype=np.float32)
_IDENTITY = list(range(256))
_IDENTITY_TABLE = np.tile(np.arange(256, dtype=np.uint8), (3, 1))


def jitter_table(rng: random.Random, amount: float) -> np.ndarray:
    """A (3, 256) uint8 lookup table per colour channel: contrast about mid-grey, brightness, and
    per-channel gain. Draws, in order: contrast, brightness, then one gain per colour channel."""
    if amount <= 0:
        return _IDENTITY_TABLE
    contrast = 1 + rng.uniform(-amount, amount)
    bright = 1 + rng.uniform(-amount, amount)
    gains = np.array([bright * (1 + rng.uniform(-amount / 2, amount / 2)) for _ in range(3)], np.float32)
    base = (_RAMP - 128) * contrast + 128
    return np.clip(base[None, :] * gains[:, None] + 0.5, 0, 255).astype(np.uint8)


def jitter_lut(rng: random.Random, amount: float, alpha: bool) -> list[int]:
    """``jitter_table`` as a flat PIL ``point`` table (identity for alpha when ``alpha``); the same draws."""
    lut = jitter_table(rng, amount).ravel().tolist()
    return lut + _IDENTITY if alpha else lut


def place_reference(bbox: tuple[int, int, int, int], image_size: tuple[int, int], cfg: CompositeConfig,
                    rng: random.Random) -> tuple[int, int, int, int]:
    """Choose where the character's box lands: returns the destination box (dx0, dy0, dw, dh).

    bbox: (x0, y0, x1, y1) of the opaque pixels in the render; image_size: the render's (W0, H0).
    The box may extend past the canvas (a crop); sides the render already cut stay cut.
    """
    (x0, y0, x1, y1), (w0, h0), (cw, ch) = bbox, image_size, cfg.resolution
    bw, bh = x1 - x0, y1 - y0
    s = min(cw / w0, ch / h0) * rng.uniform(*cfg.scale_range)
    touch = (x0 <= 0, x1 >= w0, y0 <= 0, y1 >= h0)
    # A box cut on both sides by the render's frame must still span the canvas on that axis.
    if touch[0] and touch[1]:
        s = max(s, cw / bw)
    if touch[2] and touch[3]:
        s = max(s, ch / bh)
    dw, dh = max(1, round(bw * s)), max(1, round(bh * s))

    def start(length, canvas, cut_low, cut_high):
        m = cfg.max_crop * length
        lo, hi = (-m, canvas - length + m) if length <= canvas else (canvas - length, 0.0)
        if cut_low:
            hi = min(hi, 0.0)
        if cut_high:
            lo = max(lo, canvas - length)
        if lo > hi:  # cannot happen after the scale fix above; keep the box on the canvas anyway
            lo = hi = (canvas - length) / 2
        return int(math.floor(rng.uniform(lo, hi) + 0.5))

    return start(dw, cw, touch[0], touch[1]), start(dh, ch, touch[2], touch[3]), dw, dh


def _resize_premultiplied(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample a premultiplied C-contiguous (h, w, 4) box to ``size`` = (w', h'): (h', w', 4) uint8.

    torch's antialiased uint8 bilinear kernel, given the box as a true channels-last tensor (a batch
    stride of h*w*4: ``t[None]`` would give a stride torch does not recognise as channels-last, and
    it would then take its generic planar path, 2x slower). The result is channels-last too, i.e.
    (h', w', 4) interleaved bytes, seen without a copy.
    """
    import torch
    import torch.nn.functional as F

    h, w = box.shape[:2]
    nw, nh = size
    t = torch.from_numpy(box).as_strided((1, 4, h, w), (h * w * 4, 1, w * 4, 4))
    out = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # (h', w', 4): contiguous when torch kept channels-last


@dataclass
class PlacedReference:
    """The character ready to be composited: its premultiplied pixels on the canvas and its pose.

    pixels: (h, w, 4) uint8 premultiplied RGBa of the part of the box that lies on the canvas (any
    strides), at (x0, y0); pose: keypoints in output pixels; transform: (sx, sy, tx, ty) with
    x' = sx x + tx; size: the canvas (width, height).
    """

    pixels: np.ndarray
    x0: int
    y0: int
    pose: Pose
    transform: tuple[float, float, float, float]
    size: tuple[int, int]

    @property
    def alpha(self) -> np.ndarray:
        return self.pixels[..., 3]

    def write_into(self, out: np.ndarray, mask: np.ndarray, background: np.ndarray) -> None:
        """Write the composite into ``out`` ((H, W, 3) uint8, writable) and the background mask into
        ``mask`` ((H, W) uint8; 1 = background, alpha < 128): ``background`` ((H, W, 3) uint8, any
        row stride, not modified) with the character over it. The background is copied around the
        box; the box itself is one compiled pass (``fused.over_and_mask``)."""
        h, w = self.pixels.shape[:2]
        y0, y1, x0, x1 = self.y0, self.y0 + h, self.x0, self.x0 + w
        np.copyto(out[:y0], background[:y0])
        np.copyto(out[y1:], background[y1:])
        np.copyto(out[y0:y1, :x0], background[y0:y1, :x0])
        np.copyto(out[y0:y1, x1:], background[y0:y1, x1:])
        mask[:y0] = 1
        mask[y1:] = 1
        mask[y0:y1, :x0] = 1
        mask[y0:y1, x1:] = 1
        if h and w:
            fused.over_and_mask(self.pixels, y0, x0, background, out, mask)

    def composite_into(self, out: np.ndarray, background: np.ndarray) -> None:
        """``write_into`` without the mask (into a scratch one)."""
        self.write_into(out, np.empty(out.shape[:2], np.uint8), background)

    def mask_into(self, out: np.ndarray) -> None:
        """Write the background mask into ``out`` ((H, W) uint8): 1 = background (alpha < 128)."""
        out.fill(1)
        h, w = self.pixels.shape[:2]
        if w and h:
            np.less(self.alpha, MASK_THRESHOLD, out=out[self.y0:self.y0 + h, self.x0:self.x0 + w].view(np.bool_))


def prepare_reference(ref: np.ndarray, pose: Pose, cfg: CompositeConfig, rng: random.Random) -> PlacedReference:
    """Choose the placement of the render ``ref`` ((H0, W0, 4) uint8, straight alpha; not modified)
    and its ``pose`` on the canvas, jitter its colours and resample it (see the module doc).

    Random draws, in order: scale, x, y (``place_reference``), then the jitter table. Raises
    EmptyReferenceError when the render has no opaque pixel.
    """
    cw, ch = cfg.resolution
    if ref.ndim != 3 or ref.shape[2] != 4 or ref.dtype != np.uint8:
        raise ValueError(f"reference must be (H, W, 4) uint8 RGBA, got {ref.shape} {ref.dtype}")
    ref = np.ascontiguousarray(ref)
    bbox = Image.fromarray(ref, "RGBA").getbbox(alpha_only=True)  # a view of the decoder's buffer; C speed
    if bbox is None:
        raise EmptyReferenceError("ref.png is fully transparent")
    x0, y0, x1, y1 = bbox
    dx0, dy0, dw, dh = place_reference(bbox, (ref.shape[1], ref.shape[0]), cfg, rng)
    sx, sy = dw / (x1 - x0), dh / (y1 - y0)
    # The jitter is on straight colours, before premultiplying (a table cannot follow alpha after).
    box = np.empty((y1 - y0, x1 - x0, 4), np.uint8)
    fused.jitter_premultiply(ref, y0, y1, x0, x1, jitter_table(rng, cfg.jitter), box)
    placed = _resize_premultiplied(box, (dw, dh)) if (dw, dh) != (x1 - x0, y1 - y0) else box
    # Only the part on the canvas is kept.
    cx0, cy0, cx1, cy1 = max(dx0, 0), max(dy0, 0), min(dx0 + dw, cw), min(dy0 + dh, ch)
    cx1, cy1 = max(cx1, cx0), max(cy1, cy0)
    placed = placed[cy0 - dy0:cy1 - dy0, cx0 - dx0:cx1 - dx0]
    tx, ty = dx0 - x0 * sx, dy0 - y0 * sy
    return PlacedReference(placed, cx0, cy0, pose.transformed(sx, sy, tx, ty, (cw, ch)), (sx, sy, tx, ty), (cw, ch))


def composite_reference(ref: np.ndarray, pose: Pose, background, cfg: CompositeConfig,
                        rng: random.Random, keep_background: bool = False) -> Composite:
    """Place the render ``ref`` ((H0, W0, 4) uint8, straight alpha) and its ``pose`` onto
    ``background`` (RGB PIL image or (H, W, 3) uint8 array at the canvas size; not modified) with a
    random scale, position and colour jitter. Returns the composite, the mask and the keypoints.

    The loader uses ``prepare_reference`` + ``PlacedReference.composite_into`` directly, writing
    into its batch buffers; this is the same computation into fresh arrays. Raises
    EmptyReferenceError when the render has no opaque pixel.
    """
    cw, ch = cfg.resolution
    bg = np.asarray(background)
    if bg.shape != (ch, cw, 3) or bg.dtype != np.uint8:
        mode = background.mode if isinstance(background, Image.Image) else bg.dtype
        raise ValueError(f"background must be RGB {cw}x{ch}, got {mode} {bg.shape[1::-1]}")
    placed = prepare_reference(ref, pose, cfg, rng)
    image = np.empty((ch, cw, 3), np.uint8)
    mask = np.empty((ch, cw), np.uint8)
    placed.write_into(image, mask, bg)
    kept = Image.fromarray(np.ascontiguousarray(bg)) if keep_background else None
    return Composite(image, mask, placed.pose, placed.transform, kept)


def list_background_images(source) -> list[str]:
    """Background image paths from a list of paths, a folder (searched recursively for
    jpg/jpeg/png/webp) or an assets folder with a backgrounds manifest.

    Raises UserInputError naming the path when it does not exist or holds no usable image.
    """
    if source is None:
        return []
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise UserInputError(f"background image not found: {missing[0]}")
        return paths
    root = Path(source)
    if not root.exists():
        raise UserInputError(f"backgrounds: {root} does not exist (expected a folder of jpg/png/webp images)")
    if root.is_file():
        return [str(root)]
    if (root / MANIFEST_FILES["background"]).is_file():  # an assets folder: its accepted backgrounds
        paths = sorted(r["path"] for r in load_backgrounds(root) if Path(r["path"]).suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserInputError(f"backgrounds: {root / MANIFEST_FILES['background']} lists no accepted "
                                 "jpg/jpeg/png/webp image")
        return paths
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserInputError(f"backgrounds: no jpg/jpeg/png/webp image under {root}")
    return paths


class BackgroundPool:
    """Random canvas-sized background windows from a list of image files (or procedural fields).

    paths: image files (empty: procedural colour fields, for previews and tests without assets).
    pool_size: decoded backgrounds kept per process (each ~ canvas size x zoom^2 x 3 bytes).
    refresh: probability per sample of decoding a new background into the pool.
    zoom: a loaded background covers the canvas times a random factor in [1, zoom] (aspect kept).
    jitter: colour jitter applied once when a background is loaded.
    Pool entries are read-only (H', W', 3) uint8 arrays, resized once when loaded: a sample is a
    window of one of them (``sample_array``: a view, no resize, no copy). Unreadable files are
    skipped and counted in ``bad`` (path -> reason); if every file fails, the pool raises
    UserInputError.
    """

    def __init__(self, paths, size: tuple[int, int], rng: random.Random, pool_size: int = 32,
                 refresh: float = 0.05, zoom: float = 1.5, jitter: float = 0.15):
        self.paths = list(paths)
        self.size = tuple(size)
        self.rng = rng
        self.pool_size = max(1, int(pool_size))
        self.refresh = float(refresh)
        self.zoom = max(1.0, float(zoom))
        self.jitter = jitter
        self.pool: list[np.ndarray] = []
        self.bad: dict[str, str] = {}
        self.loads = 0

    def _procedural(self) -> Image.Image:
        w, h = self.size
        r = self.rng
        yy, xx = np.mgrid[0:h:8, 0:w:8].astype(np.float32)
        img = np.empty(yy.shape + (3,), np.float32)
        for c in range(3):
            img[..., c] = 128 + 100 * np.sin(xx * r.uniform(0.003, 0.03) + yy * r.uniform(0.003, 0.03) + r.uniform(0, 6.3))
        small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        return resize_uint8(small, (w, h))

    def _load(self, path: str) -> Image.Image:
        w, h = self.size
        with Image.open(path) as im:
            z = self.rng.uniform(1.0, self.zoom)
            # JPEG: let libjpeg decode at a reduced scale when the file is much larger than needed.
            s = max(w * z / im.width, h * z / im.height)
            im.draft("RGB", (math.ceil(im.width * s), math.ceil(im.height * s)))
            rgb = im.convert("RGB")
        s = max(w * z / rgb.width, h * z / rgb.height)
        img = resize_uint8(rgb, (max(w, math.ceil(rgb.width * s)), max(h, math.ceil(rgb.height * s))))
        if self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter > 0:
            img = img.point(jitter_lut(self.rng, self.jitter, alpha=False))
        return img

    def _new(self) -> np.ndarray:
        self.loads += 1
        if not self.paths:
            return np.asarray(self._procedural())
        while self.paths:
            path = self.rng.choice(self.paths)
            try:
                return np.asarray(self._load(path))  # read-only: windows of it are handed out
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self.bad[path] = f"{type(exc).__name__}: {exc}"
                self.paths.remove(path)
        raise UserInputError(f"backgrounds: none of the {len(self.bad)} background images could be read "
                             f"(first: {next(iter(self.bad))}: {next(iter(self.bad.values()))})")

    def sample_array(self) -> np.ndarray:
        """A random canvas-sized window, (H, W, 3) uint8: a read-only view of a pool entry."""
        if len(self.pool) < self.pool_size:
            self.pool.append(self._new())
            img = self.pool[-1]
        else:
            i = self.rng.randrange(len(self.pool))
            if self.rng.random() < self.refresh:
                self.pool[i] = self._new()  # a replaced entry stays alive while a window of it is used
            img = self.pool[i]
        w, h = self.size
        x = self.rng.randint(0, img.shape[1] - w)
        y = self.rng.randint(0, img.shape[0] - h)
        return img[y:y + h, x:x + w]

    def sample(self) -> Image.Image:
        """A random canvas-sized window as a (copied) RGB PIL image."""
        return Image.fromarray(np.ascontiguousarray(self.sample_array()))
