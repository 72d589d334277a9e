"""Stage I run configuration (:mod:`serialgen.training.common.config` schema), and the weights-path check.

Every weights path is checked up front (:func:`check_model_paths`), with a one-line error naming the
config file, the key, the path and what is expected there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION
from serialgen.training.common.config import (
    CONFIG_VERSION,
    Renamed,
    load_config,
    resolution_setting,
    section,
    setting,
)

__all__ = [
    "INFERENCE_DTYPES",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "ValidationConfig",
    "InferenceConfig",
    "Stage1Config",
    "load_stage1_config",
    "check_model_paths",
    "check_training_data",
    "parse_synthetic_spec",
]


# `--dtype` of standardize / eval (and the pair builder): name -> torch dtype attribute. Here, not in
# the pipeline, so the commands list the choices without importing torch.
INFERENCE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ModelConfig:
    """Which networks. Either `tiny: true` (random-initialised tiny models from `tiny_seed`) or paths."""

    pretrained_model: str | None = None  # diffusers-layout SD1.5 folder: unet/, vae/, scheduler/
    pretrained_unet: str | None = None  # optional UNet folder overriding <pretrained_model>/unet
    image_encoder: str | None = None  # CLIPVisionModelWithProjection folder (config.json + weights)
    tiny: bool = False
    tiny_seed: int = 0
    fbdm: bool = True
    rpim: bool = True
    rpim_channels: tuple[int, ...] = (16, 32, 64, 128)
    pose_guider_channels: tuple[int, ...] = (16, 32, 96, 256)


@dataclass(frozen=True)
class DataConfig:
    train_shards: str | None = None  # shard path/pattern for dataset/loader.py, or synthetic:N
    val_shards: str | None = None  # same; None: validate on the first training batch
    backgrounds: str | None = None  # background images for the loader's compositing (a folder or an assets folder)
    # without backgrounds, shard training is refused unless this allows procedural colour fields
    procedural_backgrounds: bool = False
    epoch_length: int | None = setting(2000, min=1)  # loader samples per reader per epoch in infinite mode (bounds resume replay)
    resolution: tuple[int, int] = resolution_setting(DEFAULT_RESOLUTION)
    num_workers: int = setting(4, min=0)
    # probability that a sample's target pose map is the canonical (reference figure's) map instead of
    # its character's own: what inference on pictures gives the model (docs/stage1.md)
    canonical_share: float = setting(0.2, min=0, max=1)
    # probability that a sample's reference mask and pose map are the person estimator's (the annotation
    # set of `serialgen shards annotate`, docs/estimator.md) instead of the exact ones: train as you infer
    estimated_share: float = setting(0.0, min=0, max=1)
    annotations: str | None = None  # the annotation set (default: <train shards>/annotations)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(4, min=1)  # per process
    max_steps: int = setting(50_000, min=1)  # optimizer steps
    gradient_accumulation_steps: int = setting(1, min=1)
    learning_rate: float = setting(1e-5, min=0)
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = setting(0, min=0)
    adam_beta1: float = setting(0.9, min=0, max=1)
    adam_beta2: float = setting(0.999, min=0, max=1)
    adam_weight_decay: float = setting(1e-2, min=0)
    adam_epsilon: float = setting(1e-8, min=0)
    max_grad_norm: float | None = setting(1.0, min=0)  # null or 0: no clipping
    mixed_precision: str = setting("bf16", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = setting(0.9999, min=0, max=1)
    reference_dropout: float = setting(0.1, min=0)  # per sample: no reference features, zero CLIP embedding (CFG)
    # per sample: the reference's background mask / pose map replaced by zeros, what a picture whose
    # mask or pose could not be estimated gives at inference, so a missing estimate is in-distribution
    mask_dropout: float = setting(0.0, min=0, max=1)
    pose_dropout: float = setting(0.0, min=0, max=1)
    min_snr_gamma: float | None = setting(None, min=0)  # e.g. 5.0; None: plain epsilon MSE (eq. 2)
    noise_offset: float = setting(0.0, min=0)
    zero_terminal_snr: bool = False  # rescale betas to zero terminal SNR (pair with prediction_type v_prediction)
    prediction_type: str = setting("epsilon", choices=("epsilon", "v_prediction"))  # epsilon: the paper's eq. 2
    checkpoint_every: int = setting(2000, min=0)  # 0: only at the end
    keep_checkpoints: int = setting(3, min=0)  # 0: keep all
    log_every: int = setting(10, min=1)
    tensorboard: bool = True
    # every trainable parameter gets a gradient in every step (the reference tail that cannot is frozen,
    # model.reference_unused_parameters), so DDP needs no per-step search for unused ones
    ddp_find_unused_parameters: bool = False


@dataclass(frozen=True)
class ValidationConfig:
    every: int = setting(500, min=0)  # steps between validation grids (and one at the last step); 0: no validation
    num_references: int = setting(4, min=0)  # rows of the grid (reference | predicted standard | target); 0: no grid


@dataclass(frozen=True)
class InferenceConfig:
    """Sampling for validation, and the defaults of `standardize` / `eval standardization`."""

    num_inference_steps: int = setting(20, min=1)
    guidance_scale: float = setting(3.5, min=0)


def _merge_size(values: tuple, data: dict) -> dict:
    return {"data.resolution": list(values)}


@dataclass(frozen=True)
class Stage1Config:
    version: int = CONFIG_VERSION
    seed: int = setting(42, min=0)
    output_dir: str = "runs/stage1"
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    validation: ValidationConfig = section(ValidationConfig)
    inference: InferenceConfig = section(InferenceConfig)
    source: str = field(default="<dict>", compare=False, metadata={"internal": True})  # file the config came from

    # Config version 1 spellings (configs of the first release, and those saved in its checkpoints).
    RENAMED: ClassVar[tuple[Renamed, ...]] = (
        Renamed(("data.width", "data.height"), ("data.resolution",), _merge_size, hint="data.resolution=WxH"),
        Renamed(("model.gradient_checkpointing",), ("train.gradient_checkpointing",)),
        Renamed(("train.checkpoints_keep",), ("train.keep_checkpoints",)),
        Renamed(("train.validate_every",), ("validation.every",)),
        Renamed(("train.validation_samples",), ("validation.num_references",)),
    )

    def check(self) -> None:
        if not self.train.reference_dropout < 1:
            raise UserInputError(f"{self.source}: train.reference_dropout must be in [0, 1), got {self.train.reference_dropout}")
        if not self.model.tiny and not self.model.pretrained_model:
            raise UserInputError(f"{self.source}: model.pretrained_model is required unless model.tiny is true")


def parse_synthetic_spec(spec: str) -> int | None:
    """``synthetic:N`` -> N (the toy data set of :mod:`serialgen.training.stage1.data`); anything else -> None."""
    if not spec.startswith("synthetic:"):
        return None
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise UserInputError(f"{spec!r}: expected synthetic:N with N an integer") from None


def check_training_data(config: Stage1Config) -> None:
    """One-line errors for training data the run cannot or should not use, before any heavy import.

    Shard training composites every reference onto a background. Procedural colour fields are a
    stand-in (the tiny config allows them); a model that will see real pictures must train on real
    backgrounds, so without ``data.backgrounds`` the run stops unless ``data.procedural_backgrounds``
    says that is meant."""
    d = config.data
    if not d.train_shards:
        raise UserInputError(f"{config.source}: no training data: set data.train_shards or pass --train-shards "
                             "(shards, or synthetic:N)")
    for spec in (d.train_shards, d.val_shards):
        count = parse_synthetic_spec(spec or "")
        if count is not None and count < 1:
            raise UserInputError(f"{config.source}: {spec}: the synthetic data set needs at least 1 sample")
    if parse_synthetic_spec(d.train_shards) is not None:
        return
    shards = Path(d.train_shards)
    annotations = Path(d.annotations) if d.annotations else (shards / "annotations" if shards.is_dir() else None)
    if d.estimated_share > 0 and annotations is not None and not (annotations / "index.json").is_file():
        raise UserInputError(f"{config.source}: data.estimated_share {d.estimated_share:g} needs the person estimator's "
                             f"annotations: {annotations / 'index.json'} not found; run `serialgen shards annotate "
                             f"{d.train_shards}` (docs/estimator.md), or --set data.estimated_share=0")
    if d.backgrounds or d.procedural_backgrounds:
        return
    raise UserInputError(f"{config.source}: data.backgrounds is not set: references would be composited onto procedural "
                         "colour fields; pass --backgrounds DIR (images, or an assets folder), or "
                         "--set data.procedural_backgrounds=true if that is meant")


def load_stage1_config(path_or_name: str | Path, overrides: Iterable[str] = ()) -> Stage1Config:
    """Read and validate a Stage I config (a YAML path or `stage1` / `stage1-tiny`), with `--set` overrides."""
    return load_config(Stage1Config, path_or_name, overrides)


def check_model_paths(config: Stage1Config) -> None:
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
