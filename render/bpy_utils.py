"""The one gate to Blender's Python modules, and small helpers around them.

Every module of the project reaches ``bpy``, ``mathutils``, ``bmesh`` and ``bpy_extras`` through the
functions here; nothing else imports them. Importing this module imports none of them, so the farm
driver, the CLI and tests without Blender stay light; each accessor imports its module when called
and says how to get it when it is missing. The accessors return the module itself::

    bpy = import_bpy()
    mu = import_mathutils()
    m = mu.Matrix.Identity(4)
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

__all__ = ["import_bpy", "import_mathutils", "import_bmesh", "import_bpy_extras", "reset_scene",
           "purge_orphans", "srgb_to_linear"]

_INSTALL = "serialgen.render needs Blender's Python module: pip install bpy==5.0.1 (Python 3.11)"


def _blender_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - bpy is a pinned dependency
        raise ImportError(f"{_INSTALL} ({name} failed to import: {exc})") from exc


def import_bpy() -> ModuleType:
    """Return the ``bpy`` module, or raise ImportError saying how to get it."""
    return _blender_module("bpy")


def import_mathutils() -> ModuleType:
    """Return Blender's ``mathutils`` (``Matrix``, ``Vector``, ...); it comes with ``bpy``, which is
    imported first."""
    import_bpy()
    return _blender_module("mathutils")


def import_bmesh() -> ModuleType:
    """Return Blender's ``bmesh`` (mesh editing); ``bpy`` is imported first."""
    import_bpy()
    return _blender_module("bmesh")


def import_bpy_extras() -> ModuleType:
    """Return Blender's ``bpy_extras`` with its ``object_utils`` submodule loaded."""
    import_bpy()
    _blender_module("bpy_extras.object_utils")
    return _blender_module("bpy_extras")


def reset_scene():
    """Empty the Blender session (factory settings, no startup-file objects); returns the scene.
    (``scene.new_scene`` adds the render camera and world to it.)"""
    bpy = import_bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return bpy.context.scene


def purge_orphans() -> None:
    """Free every datablock no longer used (meshes, materials, images of removed characters)."""
    import_bpy().data.orphans_purge(do_recursive=True)


def srgb_to_linear(rgb) -> np.ndarray:
    """sRGB (..., 3) in [0, 1] -> scene-linear, the space Blender's colour sockets take."""
    c = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
