"""Compiled (numba) kernels of the loader's compositing: each one pass over the character's box.

What they replace, on real 512x768 renders (``benchmarks/loader.py --mode routes``, docs/loader.md):
a colour-jitter lookup through PIL's ``point`` then a numpy premultiply (two passes and a PIL
image), and, after the resample, PIL's premultiplied ``paste`` onto an unpacked copy of the
background region, packed back, then the mask in numpy (four passes). The arithmetic is PIL's, so
the results are bit for bit those of the previous path (tests/test_compositing.py):

* premultiply: ``c' = round(c * a / 255)`` as ``t = c * a + 128; (t + (t >> 8)) >> 8``;
* "over" with a premultiplied source (PIL ``paste`` with an ``RGBa`` mask):
  ``out = P + round(bg * (255 - a) / 255)``, same rounding;
* mask: 1 = background where ``a < 128``.

``cache=True`` keeps the machine code on disk beside this file (``__pycache__``), so a process
(e.g. each DataLoader worker) compiles them once per machine, not once per start.
"""

from __future__ import annotations

import numpy as np

from serialgen.jit_cache import ensure_writable_cache

ensure_writable_cache(__file__)  # before numba reads its settings (serialgen/jit_cache.py)
from numba import njit  # noqa: E402

__all__ = ["jitter_premultiply", "over_and_mask"]


@njit(cache=True, nogil=True, boundscheck=False)
def jitter_premultiply(src, y0, y1, x0, x1, lut, out):
    """``out[:, :] = premultiply(lut[c][src[y0:y1, x0:x1, c]])``: the box of the straight-alpha render
    ``src`` ((H, W, 4) uint8), colour-jittered through ``lut`` ((3, 256) uint8, one table per colour
    channel; alpha unchanged) and premultiplied, into ``out`` ((y1 - y0, x1 - x0, 4) uint8)."""
    for y in range(y0, y1):
        oy = y - y0
        for x in range(x0, x1):
            ox = x - x0
            a = np.uint32(src[y, x, 3])
            if a == 0:  # most of a render's box: empty pixels become transparent black
                out[oy, ox, 0] = 0
                out[oy, ox, 1] = 0
                out[oy, ox, 2] = 0
                out[oy, ox, 3] = 0
            elif a == 255:  # the figure itself: already premultiplied
                out[oy, ox, 0] = lut[0, src[y, x, 0]]
                out[oy, ox, 1] = lut[1, src[y, x, 1]]
                out[oy, ox, 2] = lut[2, src[y, x, 2]]
                out[oy, ox, 3] = 255
            else:  # the antialiased rim
                for c in range(3):
                    t = np.uint32(lut[c, src[y, x, c]]) * a + np.uint32(128)
                    out[oy, ox, c] = (t + (t >> np.uint32(8))) >> np.uint32(8)
                out[oy, ox, 3] = a


@njit(cache=True, nogil=True, boundscheck=False)
def over_and_mask(prem, y0, x0, background, out, mask):
    """The premultiplied box ``prem`` ((h, w, 4) uint8, any strides) over ``background`` ((H, W, 3)
    uint8, any strides, not modified) at (``y0``, ``x0``), written into ``out`` ((H, W, 3) uint8), and
    its mask (1 = background, ``a < 128``) into ``mask`` ((H, W) uint8). Only the box is touched."""
    h, w = prem.shape[0], prem.shape[1]
    for y in range(h):
        oy = y0 + y
        for x in range(w):
            ox = x0 + x
            a = np.uint32(prem[y, x, 3])
            if a == 255:
                out[oy, ox, 0] = prem[y, x, 0]
                out[oy, ox, 1] = prem[y, x, 1]
                out[oy, ox, 2] = prem[y, x, 2]
                mask[oy, ox] = 0
            elif a == 0:
                out[oy, ox, 0] = background[oy, ox, 0]
                out[oy, ox, 1] = background[oy, ox, 1]
                out[oy, ox, 2] = background[oy, ox, 2]
                mask[oy, ox] = 1
            else:
                ia = np.uint32(255) - a
                for c in range(3):
                    t = np.uint32(background[oy, ox, c]) * ia + np.uint32(128)
                    v = np.uint32(prem[y, x, c]) + ((t + (t >> np.uint32(8))) >> np.uint32(8))
                    out[oy, ox, c] = 255 if v > 255 else v
                mask[oy, ox] = 1 if a < 128 else 0
