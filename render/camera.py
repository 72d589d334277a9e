"""The Blender side of the camera model: set a Blender camera object from a :class:`CameraSpec`.

The model itself (pinhole, sensor, views, framing) is pure numpy in
:mod:`serialgen.assets_manifest.geometry.camera`.
"""

from __future__ import annotations

from serialgen.assets_manifest.geometry.camera import CLIP_START, SENSOR_MM, CameraSpec
from serialgen.render.bpy_utils import import_mathutils

__all__ = ["apply_camera"]


def apply_camera(cam_obj, spec: CameraSpec) -> None:
    """Set a Blender camera object to ``spec`` (the scene resolution is set by ``scene.configure_render``)."""
    mu = import_mathutils()
    m = mu.Matrix(spec.rotation.tolist()).to_4x4()
    m.translation = mu.Vector(spec.location.tolist())
    cam_obj.matrix_world = m
    data = cam_obj.data
    data.type = "PERSP"
    data.sensor_fit = "AUTO"
    data.sensor_width = SENSOR_MM
    data.lens = spec.focal_mm
    data.shift_x = spec.shift_x
    data.shift_y = spec.shift_y
    data.clip_start = CLIP_START
    data.clip_end = 1000.0
