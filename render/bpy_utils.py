"""Small helpers around ``bpy``: a clear import error, a clean scene, orphan purging, colours.

Importing this module does not import ``bpy``; each helper imports it when called.
"""

from __future__ import annotations

import numpy as np

__all__ = ["import_bpy", "reset_scene", "purge_orphans", "srgb_to_linear"]


def import_bpy():
    """Return the ``bpy`` module, or raise ImportError saying how to get it."""
    try:
        import bpy  # noqa: PLC0415 - deliberately lazy
    except ImportError as exc:  # pragma: no cover - bpy is a pinned dependency
        raise ImportError(
            "serialgen.render needs Blender's Python module: pip install bpy==5.0.1 (Python 3.11)"
        ) from exc
    return bpy


def reset_scene() -> None:
    """An empty scene (factory settings, no startup file objects)."""
    bpy = import_bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)


def purge_orphans() -> None:
    """Free every datablock no longer used (meshes, materials, images of removed characters)."""
    bpy = import_bpy()
    bpy.data.orphans_purge(do_recursive=True)


def srgb_to_linear(rgb) -> np.ndarray:
    """sRGB (..., 3) in [0, 1] -> scene-linear, the space Blender's colour sockets take."""
    c = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
