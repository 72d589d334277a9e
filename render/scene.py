"""Render settings (plain data, validated before any work) and the Blender scene they configure.

``RenderSettings`` needs no Blender, so the CLI and the Ray driver can validate
``--engine``/``--resolution`` before starting workers. Everything that touches ``bpy`` is
inside functions and runs only in a Blender worker process (one ``bpy`` per process: it is not
thread-safe).

Engines (``docs/rendering.md``):

* ``workbench`` (default, CPU through Mesa EGL): studio lighting, textures shown (objects without
  an image texture show their material colour), Workbench's own AA off (its 5/8/... samples gave
  identical scenes slightly different pixels from run to run, about one pixel in ten images, and
  its FXAA costs more than a 2x frame here). Anti-aliasing in numpy, deterministic
  (``docs/rendering.md``, "Anti-aliasing"): ``supersample`` 1 (default for non-standard images)
  renders W x H and filters it with the 2x2 supersample's own kernel ([1, 6, 1] / 8 per axis,
  premultiplied alpha: the average of the bilinear image at the four sub-pixel offsets; Pillow's
  box blur of radius 1/6);
  ``supersample`` k > 1 renders kW x kH and box-averages k x k blocks (premultiplied). The standard
  image, rendered once per character, always uses k >= 2 (:data:`STANDARD_SUPERSAMPLE`).
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
    "STANDARD_SUPERSAMPLE",
    "RenderSettings",
    "new_scene",
    "configure_render",
    "render_rgba",
    "read_tga",
    "antialias",
    "set_render_scale",
    "time_bare_render",
]

ENGINES = {"workbench": "BLENDER_WORKBENCH", "eevee": "BLENDER_EEVEE", "cycles": "CYCLES"}
MIN_SIDE = 16  # smallest image side a render accepts (``--resolution`` checks it before any work)
# The standard image is rendered once per character and is the model's target: there the 2x2
# supersample's cost is amortised over the character's pairs.
STANDARD_SUPERSAMPLE = 2


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
    supersample: int = 1  # workbench only: 1 = W x H + the 2x2 kernel; k > 1 = k x the size, box-averaged

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

    def scale(self, standard: bool = False) -> int:
        """Render-size factor: ``supersample`` on workbench (at least :data:`STANDARD_SUPERSAMPLE`
        for the standard image), 1 on engines that sample themselves."""
        if self.engine != "workbench":
            return 1
        return max(self.supersample, STANDARD_SUPERSAMPLE) if standard else self.supersample


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
    k = settings.scale()
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
    # Raw, uncompressed output: the fastest way out of Blender here (see render_rgba). No dither:
    # Blender's float -> 8-bit dither noise costs a third of the write and is not wanted in data.
    r.image_settings.file_format = "TARGA_RAW"
    r.image_settings.color_mode = "RGBA"
    r.dither_intensity = 0.0
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


def read_tga(path) -> np.ndarray:
    """An uncompressed 32-bit TGA (what Blender's ``TARGA_RAW`` writes) as uint8 (H, W, 4) RGBA."""
    from PIL import Image

    data = Path(path).read_bytes()
    if len(data) < 18 or data[2] != 2 or data[16] != 32:
        raise ValueError(f"{path}: not an uncompressed 32-bit TGA")
    start = 18 + data[0] + (int.from_bytes(data[5:7], "little") * ((data[7] + 7) // 8) if data[1] else 0)
    w, h = int.from_bytes(data[12:14], "little"), int.from_bytes(data[14:16], "little")
    if len(data) < start + w * h * 4:
        raise ValueError(f"{path}: not an uncompressed 32-bit TGA (cut short)")
    # Pillow's raw decoder swaps BGRA -> RGBA and flips rows in C (numpy fancy indexing: 4x slower).
    orientation = 1 if data[17] & 0x20 else -1  # bit 5: top-left origin; else rows go up
    im = Image.frombuffer("RGBA", (w, h), data[start:start + w * h * 4], "raw", "BGRA", 0, orientation)
    return np.asarray(im)


# The 2x2 supersample's kernel: per axis [1, 6, 1] / 8 (the mean of the bilinear image at the four
# sub-pixel offsets +-1/4). Pillow's box blur of radius 1/6 is exactly it ((2r + 1) = 4/3 wide, edge
# weight r) in integer running sums; ``frame_kernels.antialias_box`` is that arithmetic compiled
# into one pass over the box (the bytes Pillow gave; 1.9 vs 4.8 ms at 512x768 with the copies around it).
_AA_RADIUS = 1 / 6


def antialias(rgba: np.ndarray) -> np.ndarray:
    """Filter a 1x frame with the 2x2 supersample's kernel on premultiplied alpha (Pillow's integer
    maths, compiled), so edges get partial coverage and textures the same slight softening a 2x2
    supersample gives. Only the foreground's box (grown by 2 px) is touched: the transparent rest
    stays as it was. Returns a new array."""
    from serialgen.render import frame_kernels  # numba: not for the driver, which imports this module too

    out = rgba.copy()
    y0, y1, x0, x1 = frame_kernels.alpha_box(rgba)
    if y1 == 0:
        return out
    h, w = rgba.shape[:2]
    frame_kernels.antialias_box(rgba, max(y0 - 2, 0), min(y1 + 2, h), max(x0 - 2, 0), min(x1 + 2, w),
                                *frame_kernels.box_blur_weights(_AA_RADIUS), out)
    return out


def render_rgba(scene, supersample: int = 1, antialiased: bool = False) -> np.ndarray:
    """Render the scene and return the image as uint8 (H, W, 4) RGBA, straight (unpremultiplied) alpha.

    Blender's Render Result has no Python pixel access and the compositor's Viewer node, the
    usual way around it, is not evaluated by the bpy module (background mode), so the frame goes
    through an uncompressed TGA in /dev/shm (write ~5%, numpy read ~1% of a 512x768 render). With
    ``supersample`` k > 1 the frame (rendered at k times the size) is averaged over k x k blocks
    with premultiplied alpha, so edges do not darken; with k = 1 and ``antialiased`` False it gets
    :func:`antialias` (the engine did not anti-alias it itself).
    """
    bpy = import_bpy()
    path = _scratch_path()
    scene.render.filepath = str(path)
    with _quiet_stdout():  # Blender prints "Saved: ..." per frame; keep progress bars clean
        bpy.ops.render.render(write_still=True)
    try:
        rgba = read_tga(path)
    finally:
        path.unlink(missing_ok=True)  # /dev/shm is memory: never leave frames behind
    if supersample > 1:
        from PIL import Image

        return np.asarray(Image.fromarray(rgba, "RGBA").convert("RGBa").reduce(supersample).convert("RGBA"))
    return rgba if antialiased else antialias(rgba)


def set_render_scale(scene, settings: RenderSettings, standard: bool = False) -> int:
    """Set the scene's render size for an image (standard or not) of ``settings``; returns the factor."""
    k = settings.scale(standard)
    r = scene.render
    if (r.resolution_x, r.resolution_y) != (settings.width * k, settings.height * k):
        r.resolution_x, r.resolution_y = settings.width * k, settings.height * k
    return k


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
