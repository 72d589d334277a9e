"""Stage I run configuration: YAML -> typed dataclasses, validated before anything heavy happens.

Unknown keys are errors (a typo must not silently fall back to a default). `--set a.b=value`
overrides use YAML syntax for the value. Every weights path is checked up front, with a one-line
error naming the config file, the key, the path and what is expected there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serialgen.errors import UserInputError

__all__ = [
    "CONFIG_VERSION",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "InferenceConfig",
    "Stage1Config",
    "load_stage1_config",
    "config_from_dict",
    "apply_overrides",
    "check_weight_paths",
    "packaged_config",
]

CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Which networks. Either `tiny: true` (random-initialised tiny models from `tiny_seed`) or paths."""

    pretrained_model: str | None = None  # diffusers-layout SD1.5 folder: unet/, vae/, scheduler/
    pretrained_unet: str | None = None  # optional UNet folder overriding <pretrained_model>/unet
    image_encoder: str | None = None  # CLIPVisionModelWithProjection folder (config.json + weights)
    tiny: bool = False
    tiny_seed: int = 0
    fbdm: bool = True
    rpim: bool = True
    rpim_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    pose_guider_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_shards: str | None = None  # shard path/pattern for dataset/loader.py, or synthetic:N
    val_shards: str | None = None  # same; None: validate on the first training batch
    backgrounds: str | None = None  # background image folder for the loader's compositing (None: procedural)
    epoch_length: int | None = 2000  # loader samples per reader per epoch in infinite mode (bounds resume replay)
    width: int = 512
    height: int = 768
    num_workers: int = 4


@dataclass
class TrainConfig:
    batch_size: int = 4  # per process
    max_steps: int = 50_000  # optimizer steps
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # no | fp16 | bf16
    ema: bool = False
    ema_decay: float = 0.9999
    reference_dropout: float = 0.1  # per sample: no reference features and zero CLIP embedding (for CFG)
    min_snr_gamma: float | None = None  # e.g. 5.0; None: plain epsilon MSE (eq. 2)
    noise_offset: float = 0.0
    zero_terminal_snr: bool = False  # rescale betas to zero terminal SNR (pair with prediction_type v_prediction)
    prediction_type: str = "epsilon"  # epsilon (the paper's eq. 2) | v_prediction
    checkpoint_every: int = 2000
    checkpoints_keep: int = 3
    validate_every: int = 500
    validation_samples: int = 4
    log_every: int = 10
    ddp_find_unused_parameters: bool = True


@dataclass
class InferenceConfig:
    num_inference_steps: int = 20
    guidance_scale: float = 3.5


@dataclass
class Stage1Config:
    version: int = CONFIG_VERSION
    seed: int = 42
    output_dir: str = "runs/stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    source: str = field(default="<dict>", metadata={"internal": True})  # file the config came from (errors)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def _build(cls, data: Any, where: str, source: str):
    if not isinstance(data, dict):
        raise UserInputError(f"{source}: {where or 'top level'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserInputError(f"{source}: unknown key {where + '.' if where else ''}{unknown[0]} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            kwargs[name] = _build(type(f.default_factory()), value or {}, key, source)
        else:
            kwargs[name] = _check_type(f, value, key, source)
    return cls(**kwargs)


def _check_type(f: dataclasses.Field, value: Any, key: str, source: str) -> Any:
    annotation = str(f.type)
    if value is None:
        if "None" in annotation:
            return None
        raise UserInputError(f"{source}: {key} must not be empty")
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise UserInputError(f"{source}: {key} must be true or false, got {value!r}")
    elif annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{source}: {key} must be an integer, got {value!r}")
    elif annotation.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{source}: {key} must be a number, got {value!r}")
        value = float(value)
    elif annotation.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise UserInputError(f"{source}: {key} must be a list of integers, got {value!r}")
    elif annotation.startswith("str") and not isinstance(value, str):
        raise UserInputError(f"{source}: {key} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Stage1Config:
    """Validate a config mapping (e.g. a dumped checkpoint config) into a `Stage1Config`."""
    config = _build(Stage1Config, data, "", source)
    config.source = source
    if config.version != CONFIG_VERSION:
        raise UserInputError(f"{source}: config version {config.version}, expected {CONFIG_VERSION}")
    _check_values(config)
    return config


def _check_values(config: Stage1Config) -> None:
    src, t, d = config.source, config.train, config.data
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise UserInputError(f"{src}: train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if t.prediction_type not in ("epsilon", "v_prediction"):
        raise UserInputError(f"{src}: train.prediction_type must be epsilon or v_prediction, got {t.prediction_type!r}")
    if not 0.0 <= t.reference_dropout < 1.0:
        raise UserInputError(f"{src}: train.reference_dropout must be in [0, 1), got {t.reference_dropout}")
    for key in ("batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every", "validate_every", "log_every"):
        if getattr(t, key) < 1:
            raise UserInputError(f"{src}: train.{key} must be >= 1, got {getattr(t, key)}")
    if d.width % 8 or d.height % 8:
        raise UserInputError(f"{src}: data.width and data.height must be multiples of 8, got {d.width}x{d.height}")
    if not config.model.tiny and not config.model.pretrained_model:
        raise UserInputError(f"{src}: model.pretrained_model is required unless model.tiny is true")


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a config mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"--set {item!r}: {part} is not a section of {source}")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_stage1_config(path: str | Path, overrides: list[str] | None = None) -> Stage1Config:
    """Read and validate a Stage I YAML config (with optional `--set` overrides)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    apply_overrides(data, overrides or [], path.name)
    return config_from_dict(data, source=path.name)


def check_weight_paths(config: Stage1Config) -> None:
    """One-line errors for missing pretrained weights (skipped for tiny models)."""
    m, src = config.model, config.source
    if m.tiny:
        return
    base = Path(m.pretrained_model)
    expected = "a diffusers-layout Stable Diffusion 1.5 folder (unet/, vae/, scheduler/)"
    if not base.is_dir():
        raise UserInputError(f"{src}: model.pretrained_model {base} not found: expected {expected}")
    for sub in ("vae", "scheduler") + (() if m.pretrained_unet else ("unet",)):
        if not (base / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).is_file():
            raise UserInputError(f"{src}: model.pretrained_model {base} has no {sub}/: expected {expected}")
    if m.pretrained_unet and not (Path(m.pretrained_unet) / "config.json").is_file():
        raise UserInputError(f"{src}: model.pretrained_unet {m.pretrained_unet} not found: expected a diffusers UNet2DConditionModel folder (config.json + weights)")
    if not m.image_encoder or not (Path(m.image_encoder) / "config.json").is_file():
        raise UserInputError(
            f"{src}: model.image_encoder {m.image_encoder} not found: expected a CLIPVisionModelWithProjection folder "
            "(config.json + model.safetensors, e.g. CLIP ViT-L/14 or sd-image-variations' image_encoder/)"
        )


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (`stage1`, `stage1-tiny`)."""
    return Path(__file__).parent / "configs" / f"{name}.yaml"
