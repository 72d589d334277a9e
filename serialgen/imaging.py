"""The two image operations every part needs: flatten transparency onto white, and letterbox.

White is the background of the standard form (and so of every standard image, Stage I output and
Stage II reference), so everything that turns a transparent or differently shaped picture into a
model input goes through these: the standard render (``render/``), the loader's standard images
(``dataset/``), pictures given to ``standardize`` and the IP-Adapter's CLIP padding (``training/``).

Flattening uses integer maths, ``(rgb * a + 255 * (255 - a) + 127) // 255``: exact, the same on every
machine, and the formula the standard images in the shards were written with (changing it would
change their bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["WHITE", "has_alpha", "flatten_on_white", "fit_transform", "letterbox", "pad_to_square"]

WHITE = (255, 255, 255)


def has_alpha(image: Any) -> bool:
    """True for a PIL image with an alpha channel or a transparent palette entry."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)


def _flatten_array(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def flatten_on_white(image: Any) -> Any:
    """Composite straight alpha over white.

    numpy uint8 (H, W, 4) -> uint8 (H, W, 3); (H, W, 3) is returned as is. A PIL image of any mode ->
    an RGB PIL image (images without alpha are only converted).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"flatten_on_white: expected uint8 (H, W, 3|4), got {image.dtype} {image.shape}")
        return image if image.shape[2] == 3 else _flatten_array(image)
    from PIL import Image

    if not has_alpha(image):
        return image.convert("RGB")
    return Image.fromarray(_flatten_array(np.asarray(image.convert("RGBA"))), "RGB")


def fit_transform(src_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(sx, sy, tx, ty) with x' = sx x + tx that fits ``src_size`` inside ``size``, aspect kept,
    centred. Shared by images (:func:`letterbox`) and by keypoints that have no image behind them."""
    (w0, h0), (cw, ch) = src_size, size
    if (w0, h0) == (cw, ch):
        return 1.0, 1.0, 0.0, 0.0
    s = min(cw / w0, ch / h0)
    nw, nh = max(1, round(w0 * s)), max(1, round(h0 * s))
    return nw / w0, nh / h0, float((cw - nw) // 2), float((ch - nh) // 2)


def letterbox(image: Any, size: tuple[int, int], fill: tuple[int, ...] = WHITE,
              resample: str = "bicubic") -> tuple[Any, tuple[float, float, float, float]]:
    """Resize a PIL image to fit ``size`` (width, height), aspect kept, centred on ``fill``.

    The mode is kept (give a 4-value ``fill`` for RGBA, e.g. ``(255, 255, 255, 0)``). Returns the
    canvas and the (sx, sy, tx, ty) transform of its pixels, for keypoints drawn on it. An image that
    already has the size is returned as is; one that fits without scaling (see :func:`pad_to_square`)
    is only padded.
    """
    from PIL import Image

    t = fit_transform(image.size, size)
    if t == (1.0, 1.0, 0.0, 0.0):
        return image, t
    nw, nh = round(image.size[0] * t[0]), round(image.size[1] * t[1])
    canvas = Image.new(image.mode, tuple(size), fill)
    resized = image if (nw, nh) == image.size else image.resize((nw, nh), getattr(Image.Resampling, resample.upper()))
    canvas.paste(resized, (int(t[2]), int(t[3])))
    return canvas, t


def pad_to_square(image: Any) -> Any:
    """Flatten onto white and centre on a white square of the longer side, without scaling (a
    512x768 figure becomes 768x768 with 128 px of white left and right). RGB out."""
    rgb = flatten_on_white(image)
    side = max(rgb.size)
    return letterbox(rgb, (side, side))[0]
