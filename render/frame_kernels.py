"""Compiled (numba) passes over a rendered frame: the 1x frame's anti-aliasing and the light's gain.

Both were Pillow calls on copies of the frame (``Image.fromarray`` -> ``convert("RGBa")`` ->
``BoxBlur`` (two passes and two transposes) -> ``convert("RGBA")`` -> ``np.asarray`` -> a copy
into the frame; ``point`` with a lookup table on another copy): 4.8 and 1.8 ms per 512x768 image,
now 1.9 and 0.4 (docs/rendering.md, "Second pass"). Here each is one compiled pass that writes its
result once, with Pillow's own integer arithmetic, so the bytes are those Pillow gave
(``tests/test_render.py`` compares them on random frames; a 9-character render gave the same
pixels before and after):

* premultiply, Pillow's ``RGBA -> RGBa``: ``c' = MULDIV255(c, a)``, ``t = c * a + 128;
  ((t >> 8) + t) >> 8``;
* Pillow's box blur of radius r < 1 along a line, with its edge pixels repeated:
  ``out[x] = (in[x] * ww + (in[x - 1] + in[x + 1]) * fw + 2**23) >> 24`` with
  ``ww = (uint32)(2**24 / (2r + 1))`` computed in float32 as Pillow does, ``fw = (2**24 - ww) / 2``;
  rows first, then columns of the rounded result;
* un-premultiply, Pillow's ``RGBa -> RGBA``: alpha 0 or 255 keep their colour, else
  ``min(255, 255 * c // a)``;
* the gain: ``out[c] = table[c][in[c]]``, alpha unchanged (Pillow's ``point``).

``cache=True`` keeps the machine code beside this file, so a render worker compiles them once per
machine (about a second), not once per start. numba's LLVM and Mesa's (llvmpipe) coexist in one
Blender process (checked with bpy 5.0.1: compile a kernel, render, call it again; and every
render benchmark and farm run since).
"""

from __future__ import annotations

import numpy as np

from serialgen.jit_cache import ensure_writable_cache

ensure_writable_cache(__file__)  # before numba reads its settings (serialgen/jit_cache.py)
from numba import njit  # noqa: E402

__all__ = ["box_blur_weights", "alpha_box", "antialias_box", "lookup_rgb"]


def box_blur_weights(radius: float) -> tuple[int, int]:
    """(ww, fw) of Pillow's box blur for a radius below 1, in its own float32 arithmetic."""
    if not 0 < radius < 1:
        raise ValueError(f"box blur radius {radius}: this pass handles 0 < r < 1")
    r = np.float32(radius)
    ww = int(np.float32(1 << 24) / (r * np.float32(2) + np.float32(1)))
    return ww, ((1 << 24) - ww) // 2


@njit(cache=True, nogil=True, boundscheck=False)
def alpha_box(rgba):
    """(y0, y1, x0, x1): the smallest box holding every pixel of ``rgba`` ((H, W, 4) uint8) with
    alpha > 0; (0, 0, 0, 0) when there is none. One pass over the alpha bytes."""
    h, w = rgba.shape[0], rgba.shape[1]
    y0, y1, x0, x1 = h, 0, w, 0
    for y in range(h):
        first = -1
        last = -1
        for x in range(w):
            if rgba[y, x, 3] != 0:
                if first < 0:
                    first = x
                last = x
        if first >= 0:
            if y < y0:
                y0 = y
            y1 = y + 1
            if first < x0:
                x0 = first
            if last + 1 > x1:
                x1 = last + 1
    if y1 == 0:
        return 0, 0, 0, 0
    return y0, y1, x0, x1


@njit(cache=True, nogil=True, boundscheck=False)
def _filtered_row(src, y, x0, w, ww, fw, pm, out_row):
    """Row ``y`` of the box: premultiplied into ``pm`` ((w, 4) int32 scratch), then blurred along
    the row into ``out_row`` ((w, 4) int32)."""
    for x in range(w):
        a = np.int32(src[y, x0 + x, 3])
        if a == 0:
            pm[x, 0] = 0
            pm[x, 1] = 0
            pm[x, 2] = 0
        else:
            for c in range(3):
                t = np.int32(src[y, x0 + x, c]) * a + 128
                pm[x, c] = ((t >> 8) + t) >> 8
        pm[x, 3] = a
    half = np.int64(1 << 23)
    for x in range(w):
        left = x - 1 if x > 0 else 0
        right = x + 1 if x < w - 1 else w - 1
        for c in range(4):
            s = pm[left, c] + pm[right, c]
            m = pm[x, c]
            if s == 0 and m == 0:  # most of the box: transparent ground
                out_row[x, c] = 0
            else:
                out_row[x, c] = (np.int64(m) * ww + np.int64(s) * fw + half) >> 24


@njit(cache=True, nogil=True, boundscheck=False)
def antialias_box(src, y0, y1, x0, x1, ww, fw, out):
    """Filter the box [y0:y1, x0:x1] of the straight-alpha frame ``src`` ((H, W, 4) uint8) on
    premultiplied alpha and write it, straight again, into the same box of ``out`` ((H, W, 4)
    uint8; the rest of ``out`` is left as it is). The box's edges repeat outwards (Pillow's
    behaviour on the crop it was given). Three filtered rows are kept at a time."""
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0:
        return
    pm = np.empty((w, 4), np.int32)
    ring = np.empty((3, w, 4), np.int32)  # filtered rows y - 1, y, y + 1 at slots (y + k) % 3
    _filtered_row(src, y0, x0, w, ww, fw, pm, ring[0])
    if h > 1:
        _filtered_row(src, y0 + 1, x0, w, ww, fw, pm, ring[1])
    half = np.int64(1 << 23)
    for y in range(h):
        if y + 1 < h and y >= 1:
            _filtered_row(src, y0 + y + 1, x0, w, ww, fw, pm, ring[(y + 1) % 3])
        mid = ring[y % 3]
        up = ring[(y - 1) % 3] if y > 0 else mid
        down = ring[(y + 1) % 3] if y < h - 1 else mid
        oy = y0 + y
        for x in range(w):
            ox = x0 + x
            sa = up[x, 3] + down[x, 3]
            ma = mid[x, 3]
            if sa == 0 and ma == 0:  # nothing within a pixel: premultiplied zero stays zero
                out[oy, ox, 0] = 0
                out[oy, ox, 1] = 0
                out[oy, ox, 2] = 0
                out[oy, ox, 3] = 0
                continue
            a = (np.int64(ma) * ww + np.int64(sa) * fw + half) >> 24
            for c in range(3):
                v = (np.int64(mid[x, c]) * ww + np.int64(up[x, c] + down[x, c]) * fw + half) >> 24
                if a == 0 or a == 255:
                    out[oy, ox, c] = v
                else:
                    q = (255 * v) // a
                    out[oy, ox, c] = 255 if q > 255 else q
            out[oy, ox, 3] = a


@njit(cache=True, nogil=True, boundscheck=False)
def lookup_rgb(src, table, out):
    """``out[..., c] = table[c, src[..., c]]`` for the colour channels of ``src`` ((H, W, 4) uint8;
    ``table`` (3, 256) uint8); alpha copied. ``out`` may be ``src``."""
    h, w = src.shape[0], src.shape[1]
    for y in range(h):
        for x in range(w):
            out[y, x, 0] = table[0, src[y, x, 0]]
            out[y, x, 1] = table[1, src[y, x, 1]]
            out[y, x, 2] = table[2, src[y, x, 2]]
            out[y, x, 3] = src[y, x, 3]
