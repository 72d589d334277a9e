"""Lighting: random (direction, intensity, colour temperature) for non-standard images, a fixed
studio set-up for the standard image.

* ``eevee``/``cycles``: a sun lamp (the key light) from the drawn direction with the drawn
  strength and black-body colour, plus a uniform grey world as fill light.
* ``workbench`` has no lamps: the drawn direction rotates a studio light (world-space lighting),
  and intensity and colour temperature become a per-channel gain applied to the rendered RGB
  (:func:`rgb_gain`), so the same ``LightingSpec`` varies the image on every engine.

**Exposure floor** (``docs/rendering.md``): a drawn light can leave the character nearly black
(Workbench's ``basic.sl`` from behind: 31% of its samples had a median foreground luminance under
25/255, 6.5% of all samples). After the render the foreground's median luminance
(:func:`fg_luminance`) is measured; under :data:`REDRAW_BELOW` another light is drawn (from its own
seed, at most :data:`MAX_REDRAWS` times) and the frame rendered again; under
:data:`EXPOSURE_FLOOR` the image gets an exposure gain (at most :data:`MAX_EXPOSURE_GAIN`) that
lifts the median to the floor, as a camera's exposure would. The light's direction, colour and
studio set-up stay as drawn, so the variety stays; only the darkest frames change.

Sampling is pure numpy; :func:`apply_lighting` needs bpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from serialgen.render.bpy_utils import import_bpy, import_mathutils

__all__ = [
    "LightingSpec",
    "STANDARD_LIGHTING",
    "STUDIO_LIGHTS",
    "LightingRanges",
    "sample_lighting",
    "kelvin_to_rgb",
    "rgb_gain",
    "apply_gain",
    "apply_lighting",
    "EXPOSURE_FLOOR",
    "MAX_EXPOSURE_GAIN",
    "REDRAW_BELOW",
    "MAX_REDRAWS",
    "fg_luminance",
    "exposure_gain",
]

#: Median foreground luminance (0..1) a non-standard image is lifted to when it comes out darker.
EXPOSURE_FLOOR = 32 / 255
#: At most this exposure gain: more would show 8-bit banding; darker frames get another light.
MAX_EXPOSURE_GAIN = 2.5
#: Frames darker than this (the floor out of the gain's reach) are rendered again with a new light.
REDRAW_BELOW = EXPOSURE_FLOOR / MAX_EXPOSURE_GAIN
MAX_REDRAWS = 3
# Rec. 709 luma weights x 256 (sum 256), on the sRGB-encoded values: integer maths, exact medians.
_LUMA = np.array([54, 183, 19], dtype=np.int64)

# Workbench studio lights that ship inside the bpy wheel (type STUDIO).
STUDIO_LIGHTS = ("Default", "basic.sl", "outdoor.sl", "paint.sl", "rim.sl", "studio.sl")


@dataclass(frozen=True)
class LightingSpec:
    """Key light ``azimuth``/``elevation`` in degrees (world frame, same convention as cameras),
    ``intensity`` (1.0 = the standard set-up), ``temperature_k`` (kelvin; 6500 = neutral white),
    ``studio_light`` (workbench only), ``world_space`` False = the light turns with the camera."""

    azimuth: float
    elevation: float
    intensity: float
    temperature_k: float
    studio_light: str = "Default"
    world_space: bool = True

    def to_json(self) -> dict:
        return asdict(self)


# Front, slightly above: even light on the face; neutral white; camera-relative on workbench.
STANDARD_LIGHTING = LightingSpec(azimuth=0.0, elevation=30.0, intensity=1.0, temperature_k=6500.0,
                                 studio_light="Default", world_space=False)


@dataclass(frozen=True)
class LightingRanges:
    elevation: tuple[float, float] = (5.0, 75.0)
    intensity: tuple[float, float] = (0.7, 1.3)
    temperature_k: tuple[float, float] = (3500.0, 9000.0)


def sample_lighting(rng: np.random.Generator, ranges: LightingRanges = LightingRanges()) -> LightingSpec:
    """Draw a random key light (fixed draw order: the seed fixes the lighting)."""
    return LightingSpec(
        azimuth=float(rng.uniform(0.0, 360.0)),
        elevation=float(rng.uniform(*ranges.elevation)),
        intensity=float(rng.uniform(*ranges.intensity)),
        temperature_k=float(rng.uniform(*ranges.temperature_k)),
        studio_light=STUDIO_LIGHTS[int(rng.integers(len(STUDIO_LIGHTS)))],
        world_space=True,
    )


def _kelvin_raw(k: float) -> np.ndarray:
    # Tanner Helland's fit of the black-body locus to sRGB (1000-40000 K), in 0..1.
    t = k / 100.0
    r = 1.0 if t <= 66 else 1.292936186 * (t - 60) ** -0.1332047592
    g = (0.3900815788 * np.log(t) - 0.6318414438) if t <= 66 else 1.129890861 * (t - 60) ** -0.0755148492
    b = 1.0 if t >= 66 else (0.0 if t <= 19 else 0.5432067891 * np.log(t - 10) - 1.19625408914)
    return np.clip(np.array([r, g, b], dtype=np.float64), 0.0, 1.0)


def kelvin_to_rgb(kelvin: float) -> np.ndarray:
    """Black-body colour (3,) normalised so that 6500 K is (1, 1, 1)."""
    return _kelvin_raw(kelvin) / _kelvin_raw(6500.0)


def rgb_gain(spec: LightingSpec) -> np.ndarray:
    """Per-channel gain (3,) that workbench images get for ``spec`` (intensity x colour)."""
    return spec.intensity * kelvin_to_rgb(spec.temperature_k)


def apply_gain(rgba: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Multiply the RGB of uint8 (H, W, 4) by ``gain`` (3,) through per-channel lookup tables
    (rounded, clipped; one compiled pass, ``frame_kernels.lookup_rgb``); alpha untouched. Returns
    a new array."""
    from serialgen.render import frame_kernels  # numba: loaded by the workers only

    levels = np.arange(256, dtype=np.float64)
    table = np.stack([np.clip(np.floor(levels * g + 0.5), 0, 255).astype(np.uint8) for g in gain])
    src = np.ascontiguousarray(rgba)
    out = np.empty_like(src)
    frame_kernels.lookup_rgb(src, table, out)
    return out


def fg_luminance(rgba: np.ndarray, gain=None) -> float | None:
    """Median luminance (0..1, Rec. 709 luma of the sRGB-encoded values) of the foreground (alpha >=
    128) of uint8 RGBA, as it would be after :func:`apply_gain` with ``gain`` (3,) (None: as it is);
    None when there is no foreground. Over every second pixel of every second row (a quarter of the
    pixels: the median moves by a level at most, and the cost drops from ~6 to ~0.7 ms at 512x768);
    integer maths on a histogram, so the same bytes give the same number."""
    sub = rgba[::2, ::2]
    fg = sub[..., 3] >= 128
    if not fg.any():
        return None
    px = sub[fg]
    levels = np.arange(256, dtype=np.float64)
    g = np.ones(3) if gain is None else np.asarray(gain, dtype=np.float64)
    # apply_gain's tables (rounded, clipped) times the luma weights: one lookup per channel.
    tables = [np.clip(np.floor(levels * g[c] + 0.5), 0, 255).astype(np.int64) * _LUMA[c] for c in range(3)]
    luma = (tables[0][px[:, 0]] + tables[1][px[:, 1]] + tables[2][px[:, 2]] + 128) >> 8
    counts = np.cumsum(np.bincount(luma, minlength=256))
    return float(np.searchsorted(counts, (counts[-1] + 1) // 2)) / 255.0


def exposure_gain(luminance: float | None) -> float:
    """The exposure gain (>= 1) that lifts a median foreground ``luminance`` to the floor."""
    if luminance is None or luminance >= EXPOSURE_FLOOR:
        return 1.0
    return min(EXPOSURE_FLOOR / max(luminance, 1e-6), MAX_EXPOSURE_GAIN)


def apply_lighting(scene, spec: LightingSpec, engine: str) -> None:
    """Set the scene's lights for ``spec`` on ``engine`` (bpy)."""
    if engine == "workbench":
        shading = scene.display.shading
        shading.light = "STUDIO"
        shading.studio_light = spec.studio_light
        shading.use_world_space_lighting = spec.world_space
        # Studio lights are lit from the front at rotation 0; rotate towards the drawn azimuth.
        shading.studiolight_rotate_z = float(np.deg2rad(((spec.azimuth + 180.0) % 360.0) - 180.0))
        return
    bpy = import_bpy()
    sun = bpy.data.objects.get("key_light")
    if sun is None:
        sun = bpy.data.objects.new("key_light", bpy.data.lights.new("key_light", "SUN"))
        scene.collection.objects.link(sun)
    a, e = np.deg2rad(spec.azimuth), np.deg2rad(spec.elevation)
    to_light = np.array([np.sin(a) * np.cos(e), -np.cos(a) * np.cos(e), np.sin(e)])
    # A sun shines along its local -Z: point -Z away from the light direction.
    z = to_light / np.linalg.norm(to_light)
    x = np.cross([0.0, 0.0, 1.0], z)
    x = x / np.linalg.norm(x) if np.linalg.norm(x) > 1e-8 else np.array([1.0, 0.0, 0.0])
    y = np.cross(z, x)
    sun.matrix_world = import_mathutils().Matrix(np.stack([x, y, z], axis=1).tolist()).to_4x4()
    sun.data.energy = 3.0 * spec.intensity
    sun.data.color = tuple(np.clip(_kelvin_raw(spec.temperature_k), 0, 1).tolist())
    sun.data.angle = np.deg2rad(5.0)
    world = scene.world
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    if bg is not None:
        bg.inputs["Color"].default_value = (0.6, 0.6, 0.6, 1.0)
        bg.inputs["Strength"].default_value = 0.6 * spec.intensity
