"""Procedural default characters built on ``anny`` (NAVER; CC0 MakeHuman data). Blender-free.

Two steps, both deterministic:

* ``describe_character(char_id, seed)`` -> a JSON-able description sampled with a numpy Generator
  seeded from sha256(id, seed): anny phenotypes (children to elderly), skin tone, clothing (top,
  bottom or dress, shoes; colours and stripes/checks/solid patterns), hair (style, colour), eye
  colour and the expressions it supports. Pure numpy, microseconds.
* ``build_mesh_data(description)`` -> ``CharacterMesh``: numpy arrays from anny with the canonical
  A-pose baked into the rest mesh (``rig_alignment``), feet on z=0, metres, Z up, facing -Y; per-face
  material regions, a small UV texture atlas carrying the clothing patterns, a bone hierarchy with
  top-4 skin weights, the canonical bone map, sparse expression deltas (anny's ARKit facial
  actions), measured face landmarks, and extra meshes (hair proxy, skirt). ``save_mesh_data`` /
  ``load_mesh_data`` store it as a versioned ``.npz``; ``mesh_hash`` is a stable sha256.

Format and decisions: ``docs/characters.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest import rig_alignment as ra

__all__ = [
    "MESH_VERSION",
    "DESCRIPTION_VERSION",
    "BUILDER_REVISION",
    "EXPRESSIONS",
    "EXPRESSION_RECIPES",
    "REGION_NAMES",
    "HAIR_STYLES",
    "ANNY_BONE_MAP",
    "CharacterMesh",
    "MeshPart",
    "describe_character",
    "build_mesh_data",
    "save_mesh_data",
    "load_mesh_data",
    "mesh_hash",
    "mesh_stats",
    "anny_model",
]

MESH_VERSION = 1
DESCRIPTION_VERSION = 1
#: Bumped whenever build_mesh_data changes its output for the same description; it is part of the
#: description, so manifests that cache meshes by description rebuild them.
BUILDER_REVISION = 1

# ---------------------------------------------------------------------------------------------
# Palettes (sRGB, 0..1)
# ---------------------------------------------------------------------------------------------

# Ten skin tones from very light to very deep (roughly the Monk scale), jittered per character.
SKIN_TONES = [
    (0.96, 0.84, 0.76), (0.93, 0.78, 0.67), (0.89, 0.71, 0.58), (0.82, 0.63, 0.49),
    (0.74, 0.55, 0.40), (0.64, 0.46, 0.32), (0.54, 0.37, 0.25), (0.44, 0.29, 0.19),
    (0.35, 0.22, 0.15), (0.26, 0.17, 0.12),
]
HAIR_COLOURS = {
    "black": (0.04, 0.035, 0.03), "dark_brown": (0.15, 0.10, 0.06), "brown": (0.30, 0.19, 0.11),
    "light_brown": (0.50, 0.35, 0.21), "blonde": (0.80, 0.66, 0.42), "platinum": (0.90, 0.86, 0.74),
    "auburn": (0.42, 0.16, 0.07), "red": (0.62, 0.24, 0.09), "grey": (0.55, 0.55, 0.54),
    "white": (0.86, 0.86, 0.84),
}
EYE_COLOURS = {
    "dark_brown": (0.18, 0.10, 0.05), "brown": (0.35, 0.20, 0.08), "hazel": (0.45, 0.35, 0.15),
    "green": (0.25, 0.45, 0.25), "blue": (0.25, 0.45, 0.75), "grey": (0.50, 0.55, 0.58),
}
CLOTH_COLOURS = {
    "white": (0.93, 0.93, 0.91), "black": (0.06, 0.06, 0.07), "navy": (0.08, 0.12, 0.30),
    "red": (0.75, 0.10, 0.12), "forest": (0.10, 0.35, 0.18), "mustard": (0.85, 0.65, 0.15),
    "sky": (0.45, 0.68, 0.90), "grey": (0.50, 0.50, 0.52), "beige": (0.82, 0.74, 0.60),
    "burgundy": (0.45, 0.07, 0.15), "orange": (0.95, 0.45, 0.10), "purple": (0.42, 0.20, 0.55),
    "teal": (0.05, 0.50, 0.50), "pink": (0.95, 0.60, 0.70), "olive": (0.40, 0.42, 0.18),
    "denim": (0.20, 0.30, 0.48), "brown": (0.38, 0.24, 0.14), "yellow": (0.98, 0.85, 0.25),
}
SHOE_COLOURS = ("black", "brown", "white", "grey", "navy", "red", "beige")

HAIR_STYLES = ("buzz", "short", "bob", "long", "bun", "ponytail", "afro", "bald")
TOP_STYLES = ("tshirt", "long_sleeve", "tank")
BOTTOM_STYLES = ("trousers", "shorts", "skirt")
PATTERNS = ("solid", "stripes", "checks")

#: Material regions; ``CharacterMesh.face_region`` and part regions index this list.
REGION_NAMES = [
    "skin", "top", "bottom", "shoes", "sclera", "iris", "pupil", "mouth", "brows", "hair", "lips",
]
_R = {n: i for i, n in enumerate(REGION_NAMES)}

#: Our expression set -> anny (ARKit) facial action weights.
EXPRESSION_RECIPES: dict[str, dict[str, float]] = {
    "smile": {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0, "cheekSquintLeft": 0.5,
              "cheekSquintRight": 0.5, "eyeSquintLeft": 0.3, "eyeSquintRight": 0.3},
    "open_mouth": {"jawOpen": 0.8, "mouthLowerDownLeft": 0.3, "mouthLowerDownRight": 0.3},
    "angry": {"browDownLeft": 1.0, "browDownRight": 1.0, "noseSneerLeft": 0.6, "noseSneerRight": 0.6,
              "mouthPressLeft": 0.5, "mouthPressRight": 0.5, "eyeSquintLeft": 0.4, "eyeSquintRight": 0.4},
    "surprised": {"browInnerUp": 1.0, "browOuterUpLeft": 1.0, "browOuterUpRight": 1.0,
                  "eyeWideLeft": 1.0, "eyeWideRight": 1.0, "jawOpen": 0.45},
    "sad": {"browInnerUp": 0.9, "mouthFrownLeft": 1.0, "mouthFrownRight": 1.0,
            "mouthShrugLower": 0.4, "eyeSquintLeft": 0.2, "eyeSquintRight": 0.2},
    "blink": {"eyeBlinkLeft": 1.0, "eyeBlinkRight": 1.0},
}
EXPRESSIONS = ("neutral", *EXPRESSION_RECIPES)

#: Canonical joint -> anny bone. Twist bones (upperarm02, ...), spine05/04/02, shoulder01,
#: metacarpals, toes and eyes follow their parents (see rig_alignment).
ANNY_BONE_MAP: dict[str, str] = {
    "pelvis": "root", "spine": "spine03", "chest": "spine01", "neck": "neck01", "head": "head",
}
for _s, _S in (("l", "L"), ("r", "R")):
    ANNY_BONE_MAP.update({
        f"{_s}_clavicle": f"clavicle.{_S}", f"{_s}_upper_arm": f"upperarm01.{_S}",
        f"{_s}_lower_arm": f"lowerarm01.{_S}", f"{_s}_hand": f"wrist.{_S}",
        f"{_s}_upper_leg": f"upperleg01.{_S}", f"{_s}_lower_leg": f"lowerleg01.{_S}",
        f"{_s}_foot": f"foot.{_S}",
    })
    for _k, _f in enumerate(("thumb", "index", "middle", "ring", "pinky"), start=1):
        for _seg in (1, 2, 3):
            ANNY_BONE_MAP[f"{_s}_{_f}{_seg}"] = f"finger{_k}-{_seg}.{_S}"

# ---------------------------------------------------------------------------------------------
# Description (pure numpy)
# ---------------------------------------------------------------------------------------------

# anny 0.6.2 standing height (m, rest mesh) at height=0 and height=1 for gender 0 (male) / 1
# (female) over the age parameter (weight, muscle, proportions 0.5); measured once, used to turn a
# sampled real-world height into the height phenotype without running anny here.
_AGE_GRID = np.array([0.15, 0.25, 1 / 3, 0.42, 0.5, 0.6, 0.7, 0.85, 1.0])
_H_MIN = {0: [0.69, 0.85, 0.99, 1.09, 1.18, 1.29, 1.36, 1.35, 1.33],
          1: [0.64, 0.78, 0.90, 0.98, 1.06, 1.16, 1.22, 1.22, 1.21]}
_H_MAX = {0: [1.36, 1.67, 1.94, 2.07, 2.19, 2.35, 2.45, 2.44, 2.42],
          1: [1.32, 1.60, 1.84, 1.96, 2.08, 2.22, 2.31, 2.31, 2.30]}


def _age_param(years: float) -> float:
    """Years -> anny age (0 = baby ~1 y, 1/3 = child ~11 y, 2/3 = young adult ~25 y, 1 = 90 y)."""
    if years <= 11.0:
        return (years - 1.0) / 30.0
    if years <= 25.0:
        return 1.0 / 3.0 + (years - 11.0) / 42.0
    return 2.0 / 3.0 + (years - 25.0) / 195.0


def _mean_height(years: float, female: float) -> float:
    """Mean standing height (m) by age, interpolated between male and female growth charts."""
    ages = [4, 6, 8, 10, 12, 14, 16, 18, 60, 90]
    male = [1.03, 1.16, 1.28, 1.39, 1.50, 1.64, 1.73, 1.76, 1.75, 1.70]
    fem = [1.02, 1.15, 1.27, 1.38, 1.51, 1.60, 1.62, 1.63, 1.62, 1.57]
    return float((1 - female) * np.interp(years, ages, male) + female * np.interp(years, ages, fem))


def _height_param(target_m: float, gender: float, age: float) -> float:
    lo = (1 - gender) * np.interp(age, _AGE_GRID, _H_MIN[0]) + gender * np.interp(age, _AGE_GRID, _H_MIN[1])
    hi = (1 - gender) * np.interp(age, _AGE_GRID, _H_MAX[0]) + gender * np.interp(age, _AGE_GRID, _H_MAX[1])
    return float(np.clip((target_m - lo) / (hi - lo), 0.0, 1.0))


def _rng(char_id: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"serialgen.procedural/{DESCRIPTION_VERSION}:{char_id}:{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _jitter(rng: np.random.Generator, rgb, amount: float) -> list[float]:
    return [round(float(np.clip(c + rng.normal(0.0, amount), 0.0, 1.0)), 4) for c in rgb]


def _pick(rng: np.random.Generator, options, p=None):
    options = list(options)
    return options[int(rng.choice(len(options), p=p))]


def _garment(rng: np.random.Generator, skin, avoid: str | None = None, pattern_p=(0.6, 0.25, 0.15)) -> dict:
    # Never a colour close to the skin tone: the garment would read as bare skin.
    names = [n for n in CLOTH_COLOURS if n != avoid
             and np.linalg.norm(np.subtract(CLOTH_COLOURS[n], skin)) > 0.25]
    colour = _pick(rng, names)
    pattern = _pick(rng, PATTERNS, p=pattern_p)
    second = _pick(rng, [n for n in CLOTH_COLOURS if n != colour])
    return {
        "colour_name": colour,
        "colour": _jitter(rng, CLOTH_COLOURS[colour], 0.03),
        "pattern": pattern,
        "colour2": _jitter(rng, CLOTH_COLOURS[second], 0.03),
        # Pattern period in metres (stripes horizontal, checks in x/z).
        "period": round(float(rng.uniform(0.035, 0.09)), 4),
    }


def describe_character(char_id: str, seed: int) -> dict:
    """Sample a character's description; the same (id, seed) gives the same dict everywhere.

    Returns a JSON-able dict: ``schema``, ``id``, ``seed``, ``age_years``, ``phenotype`` (anny's six
    phenotypes in [0, 1]), ``target_height_m``, ``skin``, ``eyes``, ``hair``, ``clothing`` and
    ``expressions``.
    """
    if not isinstance(char_id, str) or not char_id:
        raise ValueError(f"character id must be a non-empty string, got {char_id!r}")
    rng = _rng(char_id, seed)
    group = _pick(rng, ("child", "teen", "adult", "elderly"), p=(0.18, 0.12, 0.55, 0.15))
    years = {"child": (4.5, 11.5), "teen": (12.0, 17.5), "adult": (18.0, 64.0), "elderly": (65.0, 88.0)}[group]
    years = float(rng.uniform(*years))
    female = float(rng.random() < 0.5)
    # Mostly clearly male (near 0) or female (near 1), with a little androgynous spread.
    spread = min(abs(float(rng.normal(0.0, 0.12))), 0.45)
    gender = 1.0 - spread if female else spread
    age = _age_param(years)
    target_h = _mean_height(years, female) + rng.normal(0.0, 0.065 if years >= 16 else 0.05)
    adult = years >= 16
    weight = float(np.clip(rng.normal(0.5, 0.2 if adult else 0.12), 0.05, 0.95))
    muscle = float(np.clip(rng.normal(0.5, 0.18 if adult else 0.1), 0.1, 0.9))
    proportions = float(rng.uniform(0.1, 0.8))
    phenotype = {
        "gender": round(gender, 4), "age": round(age, 4), "muscle": round(muscle, 4),
        "weight": round(weight, 4), "height": round(_height_param(target_h, gender, age), 4),
        "proportions": round(proportions, 4),
    }

    tone = int(rng.integers(len(SKIN_TONES)))
    skin = {"tone_index": tone, "colour": _jitter(rng, SKIN_TONES[tone], 0.015)}

    eye_name = _pick(rng, EYE_COLOURS, p=None if tone < 4 else (0.4, 0.35, 0.1, 0.05, 0.05, 0.05))
    eyes = {"colour_name": eye_name, "colour": _jitter(rng, EYE_COLOURS[eye_name], 0.02)}

    if group == "elderly" and rng.random() < 0.7:
        hair_name = _pick(rng, ("grey", "white"))
    elif tone >= 5:
        hair_name = _pick(rng, ("black", "dark_brown", "brown"), p=(0.6, 0.3, 0.1))
    else:
        hair_name = _pick(rng, [h for h in HAIR_COLOURS if h not in ("grey", "white")])
    styles = list(HAIR_STYLES)
    if female:
        p_style = (0.02, 0.12, 0.2, 0.26, 0.14, 0.16, 0.08, 0.02)
    else:
        p_style = (0.22, 0.42, 0.04, 0.04, 0.02, 0.04, 0.08, 0.14)
    style = _pick(rng, styles, p=p_style)
    if style == "bald" and group in ("child", "teen"):
        style = "short"
    hair = {"style": style, "colour_name": hair_name, "colour": _jitter(rng, HAIR_COLOURS[hair_name], 0.02),
            "volume": round(float(rng.uniform(0.8, 1.25)), 3)}

    dress = bool(female and rng.random() < 0.3)
    top = _garment(rng, skin["colour"])
    top["style"] = _pick(rng, TOP_STYLES, p=(0.5, 0.35, 0.15))
    top["neckline"] = _pick(rng, ("crew", "v"), p=(0.7, 0.3))
    top["length"] = round(float(rng.uniform(-0.03, 0.05)), 4)  # metres below the waist line
    # Lengths along a limb: 0 at the shoulder/hip, 1 at the elbow/knee, 2 at the wrist/ankle.
    top["sleeve"] = {"tshirt": round(float(rng.uniform(0.35, 0.7)), 3), "long_sleeve": 1.97, "tank": 0.0}[top["style"]]
    if dress:
        bottom = dict(top, style="skirt")
        bottom["length"] = round(float(rng.uniform(0.6, 1.4)), 3)  # hem
    else:
        bottom = _garment(rng, skin["colour"], avoid=top["colour_name"], pattern_p=(0.85, 0.05, 0.10))
        bottom["style"] = _pick(rng, BOTTOM_STYLES, p=(0.6, 0.25, 0.15) if female else (0.75, 0.25, 0.0))
        bottom["length"] = {"trousers": 1.97, "shorts": round(float(rng.uniform(0.35, 0.85)), 3),
                            "skirt": round(float(rng.uniform(0.5, 1.2)), 3)}[bottom["style"]]
    shoe_name = _pick(rng, SHOE_COLOURS)
    shoes = {"colour_name": shoe_name, "colour": _jitter(rng, CLOTH_COLOURS[shoe_name], 0.03),
             "style": _pick(rng, ("shoes", "boots"), p=(0.8, 0.2))}
    clothing = {"outfit": "dress" if dress else "top_bottom", "top": top, "bottom": bottom, "shoes": shoes}

    return {
        "schema": f"serialgen.procedural_character/{DESCRIPTION_VERSION}",
        "builder": f"anny-{MESH_VERSION}.{BUILDER_REVISION}",
        "id": char_id,
        "seed": int(seed),
        "age_group": group,
        "age_years": round(years, 2),
        "phenotype": phenotype,
        "target_height_m": round(float(target_h), 4),
        "skin": skin,
        "eyes": eyes,
        "hair": hair,
        "clothing": clothing,
        "expressions": list(EXPRESSIONS),
    }


# ---------------------------------------------------------------------------------------------
# Mesh data
# ---------------------------------------------------------------------------------------------


@dataclass
class MeshPart:
    """An extra skinned mesh (hair proxy, skirt): vertices (N, 3) f32, faces (M, 3) i32, uvs (N, 2)
    f32 (per vertex), one region id, top-4 weights over the character's bones."""

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    region: int
    weight_indices: np.ndarray  # (N, 4) int16
    weight_values: np.ndarray  # (N, 4) float32, rows sum to 1
    texture: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8))  # own pattern


@dataclass
class CharacterMesh:
    """One procedural character, ready for Blender (``serialgen.render.procedural_build``).

    Units metres, Z up, facing -Y, feet on z=0, rest = canonical A-pose. Faces are triangles.
    """

    char_id: str
    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int32
    uv_coords: np.ndarray  # (U, 2) float32
    face_uvs: np.ndarray  # (F, 3) int32 indices into uv_coords (UVs live on face corners)
    face_region: np.ndarray  # (F,) uint8 into REGION_NAMES
    region_colors: np.ndarray  # (R, 3) float32 sRGB
    texture: np.ndarray  # (T, T, 3) uint8 sRGB atlas over the body UVs (patterns; skin elsewhere)
    bone_names: list[str]
    bone_heads: np.ndarray  # (B, 3) float32
    bone_tails: np.ndarray  # (B, 3) float32
    bone_z_axes: np.ndarray  # (B, 3) float32, for the bone roll
    bone_parents: np.ndarray  # (B,) int16, -1 = root
    weight_indices: np.ndarray  # (V, 4) int16
    weight_values: np.ndarray  # (V, 4) float32
    bone_map: dict[str, str]
    expression_names: list[str]  # without "neutral"
    expression_offsets: np.ndarray  # (E + 1,) int64 into expression_vertex / expression_delta
    expression_vertex: np.ndarray  # (N,) int32
    expression_delta: np.ndarray  # (N, 3) float32
    face_landmarks: dict[str, list[float]]
    parts: list[MeshPart] = field(default_factory=list)
    textured_regions: list[str] = field(default_factory=list)  # regions drawn from the atlas
    version: int = MESH_VERSION

    def expression(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(vertex indices (N,), deltas (N, 3)) of one expression."""
        k = self.expression_names.index(name)
        a, b = self.expression_offsets[k], self.expression_offsets[k + 1]
        return self.expression_vertex[a:b], self.expression_delta[a:b]


_MODEL = None
_MODEL_LOCK = threading.Lock()
# What anny keeps reading from its cache: the compacted model (69 MB). Building it also writes the
# parsed MakeHuman data (561 MB) and the full model (234 MB), which nothing here reads again.
_KEPT_CACHE = "build_compact_model_data_"


def anny_model(progress: bool = False):
    """The process-wide anny model (facial actions on); later calls return the same object.

    The first construction on a machine builds anny's cache (~76 CPU-seconds, 1.8 GB peak: mostly
    parsing MakeHuman's blend shape files). That is announced on stderr in one line, with a stage
    bar (elapsed time ticking) when ``progress``, and only the compacted model that anny reads
    again is kept in ``~/.cache/anny`` (69 MB instead of 864 MB): the build runs in a scratch folder
    inside the cache folder where the files already there are linked in. Later constructions load
    the kept file (~0.3 s)."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            _MODEL = _build_anny(progress)
        return _MODEL


class _CacheBuildProgress(logging.Handler):
    """Turns anny's log lines during a cache build into one announcement and a stage bar."""

    STAGES = (("load_data_", "parsing MakeHuman data"), ("build_model_data_", "building the full model"),
              (_KEPT_CACHE, "compacting blend shapes"))

    def __init__(self, progress: bool, cache_dir: Path):
        super().__init__(logging.INFO)
        self.progress, self.cache_dir = progress, cache_dir
        self.bar, self.t0, self.saved = None, None, []
        self._stop = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("No cached model data found") and self.t0 is None:
            self.t0 = time.perf_counter()
            print(f"anny: first run on this machine: building its model cache in {self.cache_dir} "
                  f"(about a minute of CPU, once)", file=sys.stderr, flush=True)
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=len(self.STAGES), file=sys.stderr, dynamic_ncols=True,
                                bar_format="{desc} {n}/{total} |{bar}| [{elapsed}]")
                self.bar.set_description_str(f"anny cache: {self.STAGES[0][1]}")
                # anny's data parsing is one long call: refresh the elapsed time meanwhile.
                threading.Thread(target=self._tick, daemon=True).start()
        elif msg.startswith("Saved built model data to cache at "):
            name = Path(msg.rsplit(" ", 1)[-1]).name
            self.saved.append(name)
            if self.bar is not None:
                self.bar.update(1)
                nxt = [text for prefix, text in self.STAGES if not any(s.startswith(prefix) for s in self.saved)]
                self.bar.set_description_str(f"anny cache: {nxt[0] if nxt else 'done'}")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()

    def finish(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()
        if self.t0 is not None:
            print(f"anny: model cache built in {time.perf_counter() - self.t0:.0f} s", file=sys.stderr, flush=True)


def _build_anny(progress: bool):
    import anny  # torch enters only here
    from anny.models.model_data import CURRENT_DATA_VERSION
    from anny.paths import get_anny_cache_path, set_anny_cache_path

    real = Path(get_anny_cache_path()) / f"v{CURRENT_DATA_VERSION}"
    real.mkdir(parents=True, exist_ok=True)
    for stale in real.parent.glob(".build-*"):  # left by a killed build (its pid is gone)
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=real.parent))
    work = scratch / real.name
    work.mkdir()
    for f in real.glob("*.safetensors"):
        (work / f.name).symlink_to(f)
    watcher = _CacheBuildProgress(progress, real.parent)
    log = logging.getLogger("anny")
    level, propagate = log.level, log.propagate
    log.addHandler(watcher)
    log.setLevel(logging.INFO)
    log.propagate = False  # our announcement replaces anny's INFO lines
    set_anny_cache_path(scratch)
    try:
        # Plain torch skinning: we only read anny's rest model, and this keeps NVIDIA Warp (its
        # default skinning backend, with CUDA probing and kernel compiles) out of the process.
        model = anny.Anny(facial_actions="all", skinning_method="lbs")
        for f in work.iterdir():
            if f.name.startswith(_KEPT_CACHE) and not f.is_symlink():
                os.replace(f, real / f.name)
    finally:
        set_anny_cache_path(real.parent)
        log.removeHandler(watcher)
        log.setLevel(level)
        log.propagate = propagate
        watcher.finish()
        shutil.rmtree(scratch, ignore_errors=True)
    return model


def _anny_rest(model, phenotype: dict, facial: list[dict[str, float]]):
    """Rest vertices (1 + E, V, 3), bone heads (B, 3), bone orientations (B, 3, 3) as float64."""
    import torch

    n = len(facial)
    actions = {k: torch.zeros(n, dtype=model.dtype) for k in model.facial_action_labels}
    for i, recipe in enumerate(facial):
        for k, w in recipe.items():
            actions[k][i] = w
    with torch.no_grad():
        out = model.forward(phenotype_kwargs={k: float(v) for k, v in phenotype.items()}, facial_actions=actions)
    verts = out["rest_vertices"].detach().cpu().numpy().astype(np.float64)
    heads = out["rest_bone_heads"][0].detach().cpu().numpy().astype(np.float64)
    rots = out["rest_bone_poses"][0, :, :3, :3].detach().cpu().numpy().astype(np.float64)
    return verts, heads, rots


class _Topology:
    """Per-process constants of anny's mesh: faces, UVs, segmentation labels, skin weights."""

    def __init__(self, model):
        from PIL import Image
        import yaml

        self.faces = model.faces.detach().cpu().numpy().astype(np.int32)
        self.uv_coords = model.texture_coordinates.detach().cpu().numpy().astype(np.float32)
        self.face_uvs = model.face_texture_coordinate_indices.detach().cpu().numpy().astype(np.int32)
        self.bone_names = list(model.bone_labels)
        self.parents = np.asarray(model.bone_parents, dtype=np.int64)
        self.w_idx = model.vertex_bone_indices.detach().cpu().numpy().astype(np.int64)
        self.w_val = model.vertex_bone_weights.detach().cpu().numpy().astype(np.float64)
        root = Path(__import__("anny").__file__).parent / "data" / "segmentation"
        seg = np.asarray(Image.open(root / "body_parts_segmentation.png").convert("RGB"))
        colours = yaml.safe_load((root / "body_parts_segmentation.yaml").read_text())["colors"]
        centre = self.uv_coords[self.face_uvs].mean(axis=1)
        u = np.clip(np.round(centre[:, 0] * seg.shape[1]).astype(int), 0, seg.shape[1] - 1)
        v = np.clip(np.round((1 - centre[:, 1]) * seg.shape[0]).astype(int), 0, seg.shape[0] - 1)
        rgb = seg[v, u]
        self.seg_names = list(colours)
        self.face_seg = np.zeros(len(self.faces), dtype=np.int16)  # 0 = body
        for k, name in enumerate(self.seg_names):
            self.face_seg[np.all(rgb == np.asarray(colours[name]), axis=-1)] = k
        # Bone groups for clothing regions.
        groups = {
            "torso": ("root", "pelvis", "spine", "clavicle", "shoulder01"),
            "neck": ("neck",), "head": ("head", "eye"), "upper_arm": ("upperarm",),
            "lower_arm": ("lowerarm",), "hand": ("wrist", "finger", "metacarpal"),
            "upper_leg": ("upperleg",), "lower_leg": ("lowerleg",), "foot": ("foot", "toe"),
        }
        self.group_names = list(groups)
        self.bone_group = np.zeros(len(self.bone_names), dtype=np.int64)
        for b, name in enumerate(self.bone_names):
            for g, prefixes in enumerate(groups.values()):
                if name.startswith(prefixes):
                    self.bone_group[b] = g
                    break
        # (V, G) weight per group.
        vg = np.zeros((len(self.w_idx), len(groups)))
        np.add.at(vg, (np.repeat(np.arange(len(self.w_idx)), self.w_idx.shape[1]), self.bone_group[self.w_idx].ravel()),
                  self.w_val.ravel())
        self.vertex_group_weight = vg
        self.face_group = vg[self.faces].sum(axis=1).argmax(axis=1)
        self.head_bone = self.bone_names.index("head")
        self.vertex_head_weight = np.where(self.w_idx == self.head_bone, self.w_val, 0.0).sum(axis=1)


_TOPOLOGY: _Topology | None = None


def _topology(model) -> _Topology:
    global _TOPOLOGY
    with _MODEL_LOCK:
        if _TOPOLOGY is None:
            _TOPOLOGY = _Topology(model)
        return _TOPOLOGY


def _anny_tails(names: list[str], parents: np.ndarray, heads: np.ndarray, rots: np.ndarray,
                verts: np.ndarray) -> np.ndarray:
    """Bone tails for the Blender armature: the head of the bone's chain child, a few special
    cases (root up, head to the top of the skull, foot to the toe bases), leaves along anny's axis."""
    index = {n: i for i, n in enumerate(names)}
    children: dict[int, list[int]] = {}
    for b, p in enumerate(parents):
        children.setdefault(int(p), []).append(b)
    special = {"spine01": "neck01", "wrist.L": "finger3-1.L", "wrist.R": "finger3-1.R"}
    tails = np.zeros_like(heads)
    length = np.zeros(len(names))
    for b, name in enumerate(names):  # anny lists parents first
        kids = children.get(b, [])
        target = None
        if name in special:
            target = heads[index[special[name]]]
        elif name.startswith("foot."):
            target = heads[[c for c in kids]].mean(axis=0)
        elif len(kids) == 1 and np.linalg.norm(heads[kids[0]] - heads[b]) > 1e-3:
            target = heads[kids[0]]
        if name == "root":
            tails[b] = heads[b] + np.array([0.0, 0.0, 0.1])
        elif name == "head":
            tails[b] = np.array([heads[b, 0], heads[b, 1], verts[:, 2].max()])
        elif target is not None:
            tails[b] = target
        else:
            p = parents[b]
            ln = 0.6 * length[p] if p >= 0 and length[p] > 0 else 0.03
            if name.startswith("eye"):
                ln = 0.02
            tails[b] = heads[b] + rots[b][:, 1] * ln
        length[b] = np.linalg.norm(tails[b] - heads[b])
    return tails


def _bone_frames(heads: np.ndarray, tails: np.ndarray, x_hint: np.ndarray) -> np.ndarray:
    """Orthonormal frames (B, 3, 3): Y along the bone, X from the hint (anny's X axis)."""
    y = tails - heads
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    x = x_hint - (x_hint * y).sum(1, keepdims=True) * y
    bad = np.linalg.norm(x, axis=1) < 1e-6
    x[bad] = np.cross(y[bad], [0.0, 0.0, 1.0]) + np.cross(y[bad], [0.0, 1.0, 0.0]) * 1e-3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=2)


def _skin(verts: np.ndarray, w_idx: np.ndarray, w_val: np.ndarray, rot: np.ndarray, heads: np.ndarray,
          new_heads: np.ndarray) -> np.ndarray:
    """Linear blend skinning with per-bone rotation about the head: v' = sum w (R (v - h) + h')."""
    r = rot[w_idx]  # (V, K, 3, 3)
    local = verts[..., None, :] - heads[w_idx]  # (..., V, K, 3)
    moved = np.einsum("vkij,...vkj->...vki", r, local) + new_heads[w_idx]
    return (moved * w_val[..., None]).sum(axis=-2)


def _top4(w_idx: np.ndarray, w_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-w_val, axis=1)[:, :4]
    idx = np.take_along_axis(w_idx, order, axis=1)
    val = np.take_along_axis(w_val, order, axis=1)
    val = val / np.maximum(val.sum(axis=1, keepdims=True), 1e-12)
    idx = np.where(val > 0, idx, 0)
    return idx.astype(np.int16), val.astype(np.float32)


def build_mesh_data(description: dict) -> CharacterMesh:
    """Build the character's numpy mesh data from its description (see ``CharacterMesh``)."""
    from serialgen.assets_manifest import clothing, hair as hair_mod

    model = anny_model()
    topo = _topology(model)
    exprs = [e for e in description.get("expressions", EXPRESSIONS) if e != "neutral"]
    unknown = [e for e in exprs if e not in EXPRESSION_RECIPES]
    if unknown:
        raise ValueError(f"description {description.get('id')!r}: unknown expressions {unknown}")
    verts_all, heads, rots = _anny_rest(model, description["phenotype"], [{}] + [EXPRESSION_RECIPES[e] for e in exprs])
    rest = verts_all[0]
    names, parents = topo.bone_names, topo.parents
    tails = _anny_tails(names, parents, heads, rots, rest)
    frames = _bone_frames(heads, tails, rots[:, :, 0])

    # Bake the canonical A-pose into the rest mesh: pose the zero pose through the alignment.
    al = ra.build_alignment(names, parents, heads, tails, frames, ANNY_BONE_MAP)
    w, new_heads = ra.pose_bones(al, np.tile(np.eye(3), (len(sk.JOINTS), 1, 1)))
    skin_rot = w @ np.transpose(frames, (0, 2, 1))  # (B, 3, 3) = alignment per bone
    posed = _skin(verts_all, topo.w_idx, topo.w_val, skin_rot, heads, new_heads)  # (1 + E, V, 3)
    new_tails = new_heads + np.einsum("bij,bj->bi", skin_rot, tails - heads)
    z_axes = w[:, :, 2]
    lift = -posed[0, :, 2].min()  # feet on z = 0
    shift = np.array([0.0, 0.0, lift])
    posed = posed + shift
    new_heads = new_heads + shift
    new_tails = new_tails + shift
    body = posed[0]

    w_idx4, w_val4 = _top4(topo.w_idx, topo.w_val)

    # Expressions: sparse deltas in the baked rest pose.
    offsets, ev, ed = [0], [], []
    for k in range(len(exprs)):
        delta = posed[k + 1] - body
        moved = np.nonzero(np.linalg.norm(delta, axis=1) > 1e-5)[0]
        ev.append(moved.astype(np.int32))
        ed.append(delta[moved].astype(np.float32))
        offsets.append(offsets[-1] + len(moved))

    index = {n: i for i, n in enumerate(names)}
    geo = clothing.BodyGeometry.from_arrays(body, topo, new_heads, index)
    face_region = clothing.assign_regions(description, geo, topo)
    parts: list[MeshPart] = []
    skirt = clothing.skirt_part(description, geo, index)
    if skirt is not None:
        parts.append(MeshPart("skirt", *skirt[:3], _R["bottom"], *skirt[3:]))
    hair_part = hair_mod.hair_part(description, geo, index)
    if hair_part is not None:
        parts.append(MeshPart("hair", *hair_part[:3], _R["hair"], *hair_part[3:]))

    colours = clothing.region_colours(description)
    texture, textured = clothing.pattern_atlas(description, geo, topo, face_region, colours)
    landmarks = clothing.face_landmarks(geo, new_heads[index["head"]], new_tails[index["head"]])

    return CharacterMesh(
        char_id=description["id"],
        vertices=body.astype(np.float32),
        faces=topo.faces.astype(np.int32),
        uv_coords=topo.uv_coords.astype(np.float32),
        face_uvs=topo.face_uvs.astype(np.int32),
        face_region=face_region.astype(np.uint8),
        region_colors=np.asarray([colours[n] for n in REGION_NAMES], dtype=np.float32),
        texture=texture,
        bone_names=list(names),
        bone_heads=new_heads.astype(np.float32),
        bone_tails=new_tails.astype(np.float32),
        bone_z_axes=z_axes.astype(np.float32),
        bone_parents=parents.astype(np.int16),
        weight_indices=w_idx4,
        weight_values=w_val4,
        bone_map=dict(ANNY_BONE_MAP),
        expression_names=exprs,
        expression_offsets=np.asarray(offsets, dtype=np.int64),
        expression_vertex=np.concatenate(ev) if ev else np.zeros(0, np.int32),
        expression_delta=np.concatenate(ed) if ed else np.zeros((0, 3), np.float32),
        face_landmarks=landmarks,
        parts=parts,
        textured_regions=textured,
    )


# ---------------------------------------------------------------------------------------------
# Storage and hashing
# ---------------------------------------------------------------------------------------------

_ARRAYS = ("vertices", "faces", "uv_coords", "face_uvs", "face_region", "region_colors", "texture",
           "bone_heads", "bone_tails", "bone_z_axes", "bone_parents", "weight_indices", "weight_values",
           "expression_offsets", "expression_vertex", "expression_delta")
_PART_ARRAYS = ("vertices", "faces", "uvs", "weight_indices", "weight_values", "texture")


def _meta(mesh: CharacterMesh) -> dict:
    return {
        "schema": f"serialgen.procedural_mesh/{mesh.version}",
        "version": mesh.version,
        "char_id": mesh.char_id,
        "bone_names": mesh.bone_names,
        "bone_map": mesh.bone_map,
        "expression_names": mesh.expression_names,
        "face_landmarks": mesh.face_landmarks,
        "region_names": REGION_NAMES,
        "textured_regions": mesh.textured_regions,
        "parts": [{"name": p.name, "region": p.region} for p in mesh.parts],
    }


def _flat_arrays(mesh: CharacterMesh) -> dict[str, np.ndarray]:
    arrays = {k: np.ascontiguousarray(getattr(mesh, k)) for k in _ARRAYS}
    for i, p in enumerate(mesh.parts):
        for k in _PART_ARRAYS:
            arrays[f"part{i}_{k}"] = np.ascontiguousarray(getattr(p, k))
    return arrays


def save_mesh_data(mesh: CharacterMesh, path) -> Path:
    """Write ``mesh`` as a compressed .npz (atomic: temp file then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _flat_arrays(mesh)
    arrays["meta_json"] = np.frombuffer(json.dumps(_meta(mesh), sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_mesh_data(path) -> CharacterMesh:
    """Read a mesh written by ``save_mesh_data``; ValueError names the file on any problem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable procedural mesh file ({exc})") from exc
    if "meta_json" not in data:
        raise ValueError(f"{path}: missing meta_json; not a serialgen procedural mesh")
    meta = json.loads(bytes(data.pop("meta_json")).decode())
    if meta.get("version") != MESH_VERSION:
        raise ValueError(f"{path}: mesh format version {meta.get('version')!r}, expected {MESH_VERSION}")
    missing = [k for k in _ARRAYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    parts = []
    for i, p in enumerate(meta["parts"]):
        missing = [f"part{i}_{k}" for k in _PART_ARRAYS if f"part{i}_{k}" not in data]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        parts.append(MeshPart(p["name"], *(data[f"part{i}_{k}"] for k in _PART_ARRAYS[:3]), p["region"],
                              *(data[f"part{i}_{k}"] for k in _PART_ARRAYS[3:])))
    return CharacterMesh(
        char_id=meta["char_id"], bone_names=meta["bone_names"], bone_map=meta["bone_map"],
        expression_names=meta["expression_names"], face_landmarks=meta["face_landmarks"],
        parts=parts, textured_regions=meta.get("textured_regions", []), version=meta["version"],
        **{k: data[k] for k in _ARRAYS},
    )


def mesh_hash(mesh: CharacterMesh) -> str:
    """sha256 over the metadata (canonical JSON) and every array's dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(_meta(mesh), sort_keys=True).encode())
    for k, a in sorted(_flat_arrays(mesh).items()):
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def mesh_stats(mesh: CharacterMesh) -> dict:
    """Measured sizes (metres) for manifests and tests: height, shoulder/hip width, depth."""
    v = mesh.vertices.astype(np.float64)
    idx = {n: i for i, n in enumerate(mesh.bone_names)}
    hip = mesh.bone_heads[idx["upperleg01.L"]]
    band = v[(np.abs(v[:, 2] - hip[2]) < 0.04) & (np.abs(v[:, 0]) < 2.6 * abs(float(hip[0])))]  # no hands
    sh_z = float(mesh.bone_heads[idx["upperarm01.L"], 2])
    sh = v[np.abs(v[:, 2] - sh_z) < 0.03]
    return {
        "height_m": round(float(v[:, 2].max() - v[:, 2].min()), 4),
        "hip_width_m": round(float(np.ptp(band[:, 0])) if len(band) else 0.0, 4),
        "shoulder_width_m": round(float(np.ptp(sh[:, 0])) if len(sh) else 0.0, 4),
        "depth_m": round(float(np.ptp(v[:, 1])), 4),
        "vertices": int(len(v)),
        "faces": int(len(mesh.faces)),
    }
