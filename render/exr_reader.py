"""Decode OpenEXR images with Blender (PIL cannot read EXR): the HDRI backgrounds of the default
asset folder come from the ``bpy`` wheel's CC0 studio lights.

``render.asset_build.BlenderProbe.read_exrs`` runs it as a subprocess, so Blender never loads into
the build process::

    python -m serialgen.render.exr_reader OUT.npz IN1.exr [IN2.exr ...]

``OUT.npz`` holds ``img0``, ``img1``, ... as float32 (H, W, 3) linear RGB, top row first.
"""

from __future__ import annotations

import sys

import numpy as np

from serialgen.render.bpy_utils import import_bpy

__all__ = ["read_exrs", "main"]


def read_exrs(paths: list[str]) -> list[np.ndarray]:
    """float32 (H, W, 3) linear RGB per file, top row first."""
    bpy = import_bpy()
    arrays = []
    for p in paths:
        img = bpy.data.images.load(p, check_existing=False)
        w, h = img.size
        a = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(a)
        arrays.append(a.reshape(h, w, 4)[::-1, :, :3])  # Blender's rows go bottom-up
        bpy.data.images.remove(img)
    return arrays


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m serialgen.render.exr_reader OUT.npz IN.exr [IN.exr ...]", file=sys.stderr)
        return 2
    out, paths = args[0], args[1:]
    np.savez(out, **{f"img{i}": a for i, a in enumerate(read_exrs(paths))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
