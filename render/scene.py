"""Render settings (plain data, validated before any work) and the Blender scene they configure.

``RenderSettings`` needs no Blender, so the CLI and the Ray driver can validate
``--engine``/``--resolution`` before starting workers. Everything that touches ``bpy`` is
inside functions and runs only in a Blender worker process (one ``bpy`` per process: it is not
thread-safe).

Engines (``docs/rendering.md``):

* ``workbench`` (default, CPU through Mesa EGL): studio lighting, textures shown (objects without
  an image texture show their material colour). Anti-aliasing by 2x2 supersampling
  (``supersample``: render at 2W x 2H with Workbench AA off, box-downsample with premultiplied
  alpha): byte-reproducible and ~40% faster than Workbench's own 8-sample AA, which here gave
  identical scenes slightly different pixels from run to run (about one pixel in ten images, by a
  few levels) and so broke byte-identical shards.
* ``eevee`` (GPU nodes through EGL; ~17 s a frame on software GL): ``eevee_samples`` TAA samples.
* ``cycles``: ``cycles_samples`` path-tracing samples, a fixed seed, no denoiser unless asked
  (OIDN costs 6-10 s a frame on 2 CPU cores), persistent data on (pose-only changes reuse the BVH).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serialgen.errors import UserInputError
from serialgen.render.bpy_utils import import_bpy, reset_scene
from serialgen.resolution import DEFAULT_RESOLUTION, MAX_SIDE

__all__ = [
    "ENGINES",
    "MIN_SIDE",
    "RenderSettings",
    "new_scene",
    "configure_render",
    "render_rgba",
    "time_bare_render",
]

ENGINES = {"workbench": "BLENDER_WORKBENCH", "eevee": "BLENDER_EEVEE", "cycles": "CYCLES"}
MIN_SIDE = 16  # smallest image side a render accepts (``--resolution`` checks it before any work)


@dataclass(frozen=True)
class RenderSettings:
    """What every image of a run is rendered with. ``threads`` 0 = Blender's automatic count."""

    engine: str = "workbench"
    width: int = DEFAULT_RESOLUTION[0]
    height: int = DEFAULT_RESOLUTION[1]
    threads: int = 0
    cycles_samples: int = 16
    cycles_denoise: bool = False
    cycles_device: str = "CPU"
    eevee_samples: int = 16
    workbench_aa: str = "OFF"
    supersample: int = 2  # workbench only: render at k x the size, box-downsample

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise UserInputError(f"--engine: unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or not MIN_SIDE <= value <= MAX_SIDE:
                raise UserInputError(f"--resolution: {name} {value!r} must be an integer in {MIN_SIDE}..{MAX_SIDE}")
        if self.cycles_samples < 1 or self.eevee_samples < 1:
            raise UserInputError("render samples must be >= 1")
        if self.supersample not in (1, 2, 3, 4):
            raise UserInputError(f"supersample {self.supersample!r}: expected 1..4")
        if self.cycles_device not in ("CPU", "GPU"):
            raise UserInputError(f"cycles device {self.cycles_device!r}: expected CPU or GPU")

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def scale(self) -> int:
        """Render-size factor: ``supersample`` on workbench, 1 on engines that sample themselves."""
        return self.supersample if self.engine == "workbench" else 1


def new_scene():
    """Empty the Blender session (``bpy_utils.reset_scene``) and add the render camera and world.

    Returns the scene; its camera is ``scene.camera``.
    """
    bpy = import_bpy()
    scene = reset_scene()
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    world = bpy.data.worlds.new("world")
    scene.world = world
    return scene


def configure_render(scene, settings: RenderSettings) -> None:
    """Apply ``settings`` to ``scene``: engine, resolution, threads, colour management, output."""
    r = scene.render
    r.engine = ENGINES[settings.engine]
    k = settings.scale
    r.resolution_x, r.resolution_y, r.resolution_percentage = settings.width * k, settings.height * k, 100
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    r.film_transparent = True  # RGBA; the standard image is put on white afterwards, in numpy
    r.threads_mode = "FIXED" if settings.threads else "AUTO"
    if settings.threads:
        r.threads = settings.threads
    r.use_stamp = False
    r.use_compositing = False
    r.use_sequencer = False
    # Straight, predictable colours: no filmic/AgX tone curve.
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    # Raw, uncompressed output: the fastest way out of Blender here (see render_rgba).
    r.image_settings.file_format = "TARGA_RAW"
    r.image_settings.color_mode = "RGBA"
    if settings.engine == "workbench":
        shading = scene.display.shading
        shading.light = "STUDIO"
        shading.color_type = "TEXTURE"
        shading.show_cavity = False
        shading.show_shadows = False
        shading.show_specular_highlight = True
        scene.display.render_aa = settings.workbench_aa
    elif settings.engine == "eevee":
        scene.eevee.taa_render_samples = settings.eevee_samples
    else:
        cycles = scene.cycles
        cycles.samples = settings.cycles_samples
        cycles.use_denoising = settings.cycles_denoise
        cycles.seed = 0
        cycles.use_animated_seed = False
        cycles.device = settings.cycles_device
        cycles.max_bounces = 4
        r.use_persistent_data = True


def _scratch_path() -> Path:
    # /dev/shm keeps the render -> numpy hop off the disk; one file per process.
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"serialgen-render-{os.getpid()}.tga"


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def render_rgba(scene, supersample: int = 1) -> np.ndarray:
    """Render the scene and return the image as uint8 (H, W, 4) RGBA, straight (unpremultiplied) alpha.

    Blender's Render Result has no Python pixel access, so the frame goes through an uncompressed
    TGA in /dev/shm (~1 ms each way at 512x768), which is cheaper than any compressed format. With
    ``supersample`` k > 1 the frame (rendered at k times the size) is averaged over k x k blocks
    with premultiplied alpha, so edges do not darken.
    """
    from PIL import Image

    bpy = import_bpy()
    path = _scratch_path()
    scene.render.filepath = str(path)
    with _quiet_stdout():  # Blender prints "Saved: ..." per frame; keep progress bars clean
        bpy.ops.render.render(write_still=True)
    try:
        with Image.open(path) as im:
            im = im.convert("RGBA")
            if supersample > 1:
                im = im.convert("RGBa").reduce(supersample).convert("RGBA")
            arr = np.asarray(im)
    finally:
        path.unlink(missing_ok=True)  # /dev/shm is memory: never leave frames behind
    return arr


def time_bare_render(scene, still_path: str) -> tuple[float, float]:
    """Seconds for two bare loops on the scene as it is (the render benchmark's baseline):
    ``bpy.ops.render.render()`` alone, and render + save with Blender's own PNG writer (RGBA, its
    default 15% compression), i.e. what a plain render loop that keeps its images pays."""
    bpy = import_bpy()
    t = time.perf_counter()
    bpy.ops.render.render()
    render_s = time.perf_counter() - t
    settings = scene.render.image_settings
    previous = (scene.render.filepath, settings.file_format, settings.compression)
    scene.render.filepath, settings.file_format = still_path, "PNG"
    settings.compression = 15
    t = time.perf_counter()
    with _quiet_stdout():
        bpy.ops.render.render(write_still=True)
    save_s = time.perf_counter() - t
    scene.render.filepath, settings.file_format = previous[0], previous[1]
    settings.compression = previous[2]
    return render_s, save_s
