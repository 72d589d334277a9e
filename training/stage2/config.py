"""Stage II run configuration (:mod:`serialgen.training.common.config` schema), and the model-path check.

The same settings have the same names as in Stage I (:mod:`serialgen.training.stage1.config`); the
config version 1 spellings of the first release are translated (``Stage2Config.RENAMED``).
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
    "MODES",
    "ModelConfig",
    "AugmentConfig",
    "DataConfig",
    "DropConfig",
    "TrainConfig",
    "ValidationConfig",
    "InferenceConfig",
    "Stage2Config",
    "load_stage2_config",
    "require_model_dir",
    "check_model_paths",
    "check_pair_sets",
    "check_resume",
]

# two-stage: the paper's model (reference = standardized std_ref.png);
# unpaired: the reference is an augmented copy of the target itself (Table 2 "unpaired-one-stage");
# paired-one-stage: the reference is another real image of the same identity, not standardized
#   (alt_ref.jpg in the pair shards; Table 2 "paired-one-stage").
MODES = ("two-stage", "unpaired", "paired-one-stage")

SDXL_LAYOUT = ("a local diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, "
               "tokenizer/, tokenizer_2/, scheduler/)")
SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
ENCODER_LAYOUT = ("a local CLIPVisionModelWithProjection folder (config.json + model.safetensors), e.g. OpenCLIP "
                  "ViT-H/14 as h94/IP-Adapter models/image_encoder")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen models. Either `tiny: true` (random-initialised tiny SDXL from `tiny_seed`) or local folders."""

    pretrained_model: str | None = None  # local diffusers SDXL base folder
    image_encoder: str | None = None  # local CLIPVisionModelWithProjection folder (OpenCLIP ViT-H/14)
    vae: str | None = None  # optional replacement VAE folder (e.g. sdxl-vae-fp16-fix); runs in fp32 regardless
    tiny: bool = False
    tiny_seed: int = setting(0, min=0)


@dataclass(frozen=True)
class AugmentConfig:
    """The `unpaired` baseline's reference augmentation (dataset.stage2_loader.augment_reference)."""

    flip: float = setting(0.5, min=0, max=1)
    min_scale: float = setting(0.7, min=0.05, max=1)
    jitter: float = setting(0.1, min=0, max=1)


@dataclass(frozen=True)
class DataConfig:
    pairs: tuple[str, ...] = ()  # pair-set folders (index.json + pairs-*.tar)
    synthetic: int = setting(0, min=0)  # >0: write that many synthetic pairs under output_dir first (tiny runs, tests)
    resolution: tuple[int, int] = resolution_setting(DEFAULT_RESOLUTION)  # of the target (the paper: 512x768)
    random_crop: bool = False  # cover-resize then crop centre (False) or at a seeded random offset (True)
    num_workers: int = setting(4, min=0)
    unpaired_augment: AugmentConfig = section(AugmentConfig)


@dataclass(frozen=True)
class DropConfig:
    """Classifier-free-guidance dropout per sample: image only, text only, both (exclusive draws)."""

    image: float = setting(0.05, min=0, max=1)
    text: float = setting(0.05, min=0, max=1)
    both: float = setting(0.05, min=0, max=1)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = setting(8, min=1)  # per process (the paper: 8 x 8 A100)
    max_steps: int = setting(200_000, min=1)
    gradient_accumulation_steps: int = setting(1, min=1)
    learning_rate: float = setting(1e-4, min=0)
    adam_beta1: float = setting(0.9, min=0, max=1)
    adam_beta2: float = setting(0.999, min=0, max=1)
    adam_weight_decay: float = setting(0.01, min=0)
    adam_epsilon: float = setting(1e-8, min=0)
    max_grad_norm: float | None = setting(1.0, min=0)  # null or 0: no clipping (the IP-Adapter scripts do not clip)
    mixed_precision: str = setting("bf16", choices=("no", "fp16", "bf16"))  # frozen weights; adapter fp32; VAE fp32
    gradient_checkpointing: bool = False
    noise_offset: float = setting(0.0, min=0)
    drop: DropConfig = section(DropConfig)
    checkpoint_every: int = setting(5000, min=0)  # 0: only at the end
    keep_checkpoints: int = setting(3, min=0)  # 0: keep all
    log_every: int = setting(50, min=1)
    tensorboard: bool = True


@dataclass(frozen=True)
class ValidationConfig:
    every: int = setting(5000, min=0)  # steps between validation grids (and one at the last step); 0: no validation
    num_references: int = setting(2, min=0)  # grid rows when `references` is empty: the first N references of the data
    references: tuple[str, ...] = ()  # image paths
    prompts: tuple[str, ...] = ("a person walking in a park", "a person cooking in a kitchen")
    seed: int = setting(0, min=0)


@dataclass(frozen=True)
class InferenceConfig:
    """Sampling for validation grids, and the defaults of `generate` for this adapter."""

    num_inference_steps: int = setting(20, min=1)  # DDIM, as in the paper
    guidance_scale: float = setting(7.5, min=0)
    ip_adapter_scale: float = setting(1.0, min=0)


def _kind_to_tiny(values: tuple, data: dict) -> dict:
    kind = values[0]
    if kind not in ("sdxl", "tiny"):
        raise UserInputError(f"models.kind: {kind!r} is not one of sdxl, tiny")
    if kind == "sdxl":
        return {"model.tiny": False}
    # the first release seeded the tiny models with the run seed
    return {"model.tiny": True, "model.tiny_seed": data.get("seed", 0)}


def _split_betas(values: tuple, data: dict) -> dict:
    betas = values[0]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise UserInputError(f"train.adam_betas: expected [beta1, beta2], got {betas!r}")
    return {"train.adam_beta1": betas[0], "train.adam_beta2": betas[1]}


@dataclass(frozen=True)
class Stage2Config:
    version: int = CONFIG_VERSION
    seed: int = setting(0, min=0)
    mode: str = setting("two-stage", choices=MODES)
    output_dir: str = "runs/stage2"
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    validation: ValidationConfig = section(ValidationConfig)
    inference: InferenceConfig = section(InferenceConfig)
    source: str = field(default="<dict>", compare=False, metadata={"internal": True})  # file the config came from

    # Config version 1 spellings (configs of the first release, and those saved in its checkpoints).
    RENAMED: ClassVar[tuple[Renamed, ...]] = (
        Renamed(("models.kind",), ("model.tiny",), _kind_to_tiny, hint="model.tiny=true|false"),
        Renamed(("models.sdxl",), ("model.pretrained_model",)),
        Renamed(("models.image_encoder",), ("model.image_encoder",)),
        Renamed(("models.vae",), ("model.vae",)),
        Renamed(("train.weight_decay",), ("train.adam_weight_decay",)),
        Renamed(("train.adam_betas",), ("train.adam_beta1", "train.adam_beta2"), _split_betas,
                hint="train.adam_beta1=B1 --set train.adam_beta2=B2"),
        Renamed(("train.adam_eps",), ("train.adam_epsilon",)),
        Renamed(("validation.num_inference_steps",), ("inference.num_inference_steps",)),
        Renamed(("validation.guidance_scale",), ("inference.guidance_scale",)),
        Renamed(("validation.ip_adapter_scale",), ("inference.ip_adapter_scale",)),
    )

    def check(self) -> None:
        if not self.data.pairs and not self.data.synthetic:
            raise UserInputError(f"{self.source}: data.pairs is empty; name pair-set folders (or data.synthetic: N for a test run)")
        d = self.train.drop
        if d.image + d.text + d.both > 1:
            raise UserInputError(f"{self.source}: train.drop.image + text + both must not exceed 1")


def load_stage2_config(path_or_name: str | Path, overrides: Iterable[str] = ()) -> Stage2Config:
    """Read and validate a Stage II config (a YAML path or `stage2` / `stage2-tiny`), with `--set` overrides."""
    return load_config(Stage2Config, path_or_name, overrides)


def require_model_dir(path: str | None, key: str, layout: str, must_contain: tuple[str, ...] = ()) -> Path:
    """The folder ``path`` (config key ``key``), or a one-line error saying what layout is expected there."""
    if not path:
        raise UserInputError(f"{key}: no path given; expected {layout}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserInputError(f"{key}: {p} not found; expected {layout}")
    missing = [m for m in must_contain if not (p / m).exists()]
    if missing:
        raise UserInputError(f"{key}: {p} lacks {', '.join(missing)}; expected {layout}")
    return p


def check_model_paths(model: ModelConfig) -> None:
    """Fail fast (one line) on a missing or malformed local model folder, before anything loads.

    Checks every folder before loading any: a typo in the second should not cost minutes of loading.
    """
    if model.tiny:
        return
    require_model_dir(model.pretrained_model, "model.pretrained_model", SDXL_LAYOUT, SDXL_PARTS)
    require_model_dir(model.image_encoder, "model.image_encoder", ENCODER_LAYOUT, ("config.json",))
    if model.vae:
        require_model_dir(model.vae, "model.vae", "a local AutoencoderKL folder", ("config.json",))


def check_pair_sets(config: Stage2Config) -> None:
    """One line for a ``data.pairs`` folder that is no pair set (the synthetic set is written by the run)."""
    for d in config.data.pairs:
        if not (Path(d) / "index.json").is_file():
            raise UserInputError(f"data.pairs: {d} has no index.json; expected a pair set from pair building")


# What a resume must share with the run it continues (the rest, e.g. the learning rate, may change).
_RESUME_KEYS = ("mode", "model", "data.resolution", "train.batch_size", "train.gradient_accumulation_steps", "seed")


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_resume(checkpoint: Path, config: Stage2Config) -> None:
    """One-line error when ``config`` differs from the checkpoint's run config in a _RESUME_KEYS entry
    (the checkpoint's config may use old key names: it is translated first). Reads YAML only."""
    from serialgen.training.common.config import config_from_dict, config_to_dict
    from serialgen.training.common.run_folder import read_checkpoint_config

    saved = config_to_dict(config_from_dict(Stage2Config, read_checkpoint_config(checkpoint),
                                            source=str(checkpoint / "config.yaml")))
    now = config_to_dict(config)
    if not saved["model"]["tiny"] and not now["model"]["tiny"]:
        saved["model"]["tiny_seed"] = now["model"]["tiny_seed"]  # unused without tiny models
    for key in _RESUME_KEYS:
        if _get(saved, key) != _get(now, key):
            raise UserInputError(
                f"{checkpoint}: resuming with a different {key} ({_get(saved, key)!r} -> {_get(now, key)!r}); "
                "use the run's config or a new --output-dir"
            )
