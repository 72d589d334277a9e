"""Stage II run configuration: YAML with defaults, strict keys, and one-line errors.

A config is a nested dict (so it dumps back to YAML beside every checkpoint unchanged). ``load_config``
accepts a path or the name of a packaged config (``stage2``, ``stage2-tiny``), fills defaults, and
rejects unknown keys and bad values with the key path in the message. Format version 1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from serialgen.errors import UserInputError

__all__ = ["CONFIG_VERSION", "DEFAULTS", "MODES", "load_config", "validate_config", "packaged_config"]

CONFIG_VERSION = 1
# two-stage: the paper's model (reference = standardized std_ref.png);
# unpaired: the reference is an augmented copy of the target itself (Table 2 "unpaired-one-stage");
# paired-one-stage: the reference is another real image of the same identity, not standardized
#   (alt_ref.jpg in the pair shards; Table 2 "paired-one-stage").
MODES = ("two-stage", "unpaired", "paired-one-stage")

DEFAULTS: dict[str, Any] = {
    "version": CONFIG_VERSION,
    "seed": 0,
    "mode": "two-stage",
    "output_dir": "runs/stage2",
    "models": {
        "kind": "sdxl",  # sdxl | tiny
        "sdxl": None,  # local diffusers SDXL base folder
        "image_encoder": None,  # local CLIPVisionModelWithProjection folder (OpenCLIP ViT-H/14)
        "vae": None,  # optional replacement VAE folder (e.g. sdxl-vae-fp16-fix); runs in fp32 regardless
    },
    "data": {
        "pairs": [],  # pair-set folders (index.json + pairs-*.tar)
        "synthetic": 0,  # >0: write that many synthetic pairs under output_dir first (tiny runs, tests)
        "resolution": [512, 768],  # width, height of the target (the paper: 512x768)
        "random_crop": False,  # cover-resize then crop centre (False) or at a seeded random offset (True)
        "num_workers": 4,
        "unpaired_augment": {"flip": 0.5, "min_scale": 0.7, "jitter": 0.1},
    },
    "train": {
        "batch_size": 8,  # per GPU (the paper: 8 x 8 A100)
        "max_steps": 200000,
        "learning_rate": 1.0e-4,
        "weight_decay": 0.01,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1.0e-8,
        "gradient_accumulation_steps": 1,
        "mixed_precision": "bf16",  # no | fp16 | bf16 (frozen weights in that dtype; adapter fp32; VAE fp32)
        "max_grad_norm": 1.0,  # null: no clipping (the IP-Adapter scripts do not clip)
        "noise_offset": 0.0,
        "drop": {"image": 0.05, "text": 0.05, "both": 0.05},
        "gradient_checkpointing": False,
        "checkpoint_every": 5000,
        "keep_checkpoints": 3,
        "log_every": 50,
        "tensorboard": True,
    },
    "validation": {
        "every": 5000,  # 0: never (a final grid is still written at the end)
        "references": [],  # image paths; empty: the first num_references references of the data
        "num_references": 2,
        "prompts": ["a person walking in a park", "a person cooking in a kitchen"],
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "ip_adapter_scale": 1.0,
        "seed": 0,
    },
}

_PACKAGED = Path(__file__).resolve().parent / "configs"


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``stage2``, ``stage2-tiny``)."""
    return _PACKAGED / f"{name}.yaml"


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        path = f"{where}.{key}" if where else key
        if key not in defaults:
            raise UserInputError(f"config: unknown key {path!r} (known: {', '.join(sorted(defaults))})")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise UserInputError(f"config: {path} must be a mapping")
            out[key] = _merge(defaults[key], value, path)
        else:
            out[key] = value
    return out


def _number(cfg: dict, path: str, lo: float | None = None, hi: float | None = None, integer: bool = False) -> None:
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    value = node[leaf]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UserInputError(f"config: {path} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserInputError(f"config: {path} = {value} is outside [{lo}, {hi}]")


def validate_config(cfg: dict) -> dict:
    """Check values (types, ranges, enums); returns ``cfg``. Paths are checked when models load."""
    if cfg["version"] != CONFIG_VERSION:
        raise UserInputError(f"config: version {cfg['version']!r} is not supported (expected {CONFIG_VERSION})")
    if cfg["mode"] not in MODES:
        raise UserInputError(f"config: mode {cfg['mode']!r} is not one of {', '.join(MODES)}")
    if cfg["models"]["kind"] not in ("sdxl", "tiny"):
        raise UserInputError(f"config: models.kind {cfg['models']['kind']!r} is not one of sdxl, tiny")
    res = cfg["data"]["resolution"]
    if not (isinstance(res, (list, tuple)) and len(res) == 2 and all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in res)):
        raise UserInputError(f"config: data.resolution must be [width, height], multiples of 8, got {res!r}")
    if isinstance(cfg["data"]["pairs"], str):
        cfg["data"]["pairs"] = [cfg["data"]["pairs"]]
    if not cfg["data"]["pairs"] and not cfg["data"]["synthetic"]:
        raise UserInputError("config: data.pairs is empty; name pair-set folders (or data.synthetic: N for a test run)")
    for path, lo, hi, integer in [
        ("seed", 0, None, True), ("data.synthetic", 0, None, True), ("data.num_workers", 0, None, True),
        ("train.batch_size", 1, None, True), ("train.max_steps", 0, None, True),
        ("train.learning_rate", 0, None, False), ("train.weight_decay", 0, None, False),
        ("train.gradient_accumulation_steps", 1, None, True), ("train.noise_offset", 0, None, False),
        ("train.drop.image", 0, 1, False), ("train.drop.text", 0, 1, False), ("train.drop.both", 0, 1, False),
        ("train.checkpoint_every", 0, None, True), ("train.keep_checkpoints", 0, None, True),
        ("train.log_every", 1, None, True), ("validation.every", 0, None, True),
        ("validation.num_references", 0, None, True), ("validation.num_inference_steps", 1, None, True),
        ("validation.guidance_scale", 0, None, False), ("validation.ip_adapter_scale", 0, None, False),
    ]:
        _number(cfg, path, lo, hi, integer)
    drop = cfg["train"]["drop"]
    if drop["image"] + drop["text"] + drop["both"] > 1:
        raise UserInputError("config: train.drop.image + text + both must not exceed 1")
    if cfg["train"]["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise UserInputError(f"config: train.mixed_precision {cfg['train']['mixed_precision']!r} is not one of no, fp16, bf16")
    if not isinstance(cfg["validation"]["prompts"], list) or not all(isinstance(p, str) for p in cfg["validation"]["prompts"]):
        raise UserInputError("config: validation.prompts must be a list of strings")
    return cfg


def load_config(path_or_name: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config (a path, or a packaged name like ``stage2-tiny``), fill defaults, validate."""
    import yaml

    p = Path(path_or_name)
    if not p.is_file() and not p.suffix and packaged_config(str(path_or_name)).is_file():
        p = packaged_config(str(path_or_name))
    if not p.is_file():
        raise UserInputError(f"--config: {path_or_name} not found (a YAML file, or a packaged name: stage2, stage2-tiny)")
    try:
        given = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"--config: {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(given, dict):
        raise UserInputError(f"--config: {p} must hold a mapping at the top level")
    cfg = _merge(DEFAULTS, given, "")
    for key, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserInputError(f"config override: unknown key {key!r}")
        node[leaf] = value
    return validate_config(cfg)
