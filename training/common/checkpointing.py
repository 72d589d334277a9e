"""Training checkpoints: only the trainable weights (safetensors) plus exactly what an exact resume needs.

Layout of one checkpoint (format version `run_folder.CHECKPOINT_VERSION`), written to a temporary folder and
renamed when complete, so a crash never leaves a half checkpoint that `latest_checkpoint` would pick:

    OUTPUT/checkpoints/step-00001000/
        trainable.safetensors   trainable parameters by state_dict name (frozen weights are NOT here:
                                they come back from the base model paths / tiny seeds in config.yaml)
        ema.safetensors         EMA shadow weights, same names (only when EMA is on)
        optimizer.pt            optimizer + LR scheduler state (+ EMA counters); torch.save, read back
                                with torch.load(weights_only=True)
        rng-<rank>.pt           torch/numpy/python RNG states and named torch.Generator states, per process
        train_state.json        {"version", "step", "samples_seen", "data": {...position...}, ...}
        config.yaml             the full run config (what to rebuild the model from)
        model_config.json       the trained model's own config (architecture, ablation switches), beside
                                its weights as diffusers keeps config.json beside each module's safetensors;
                                checked against the model a resume or an inference builds
        <extra files>           e.g. Stage I's canonical standard-pose map

Checkpoints written before `model_config.json` existed load without that check. The config.yaml of
such checkpoints may use old key names: readers pass it through the stage's config class, which
translates them (:func:`serialgen.training.common.config.config_from_dict`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from serialgen.errors import UserInputError
from serialgen.training.common.run_folder import CHECKPOINT_VERSION, read_train_state, require_checkpoint

__all__ = [
    "save_checkpoint",
    "load_trainable_weights",
    "load_checkpoint",
    "check_model_config",
    "write_model_config",
]

MODEL_CONFIG_NAME = "model_config.json"


def _trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with `requires_grad`, by state_dict name, detached, contiguous and on CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """All RNG states a training step may draw from (global torch/CUDA/numpy/python + named generators)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy/python states as tensors and lists so the file loads with torch.load(weights_only=True)
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _python_state_to_plain(random.getstate()),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of `_capture_rng_state`; a generator missing from the saved state is an error."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise UserInputError(f"checkpoint RNG state has no generator {name!r}")
        gen.set_state(state["generators"][name])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    *,
    train_state: Mapping[str, Any],
    config: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    ema: Any = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    model_config: Mapping[str, Any] | None = None,
    rank: int = 0,
    is_main_process: bool = True,
) -> Path:
    """Write `output_dir/checkpoints/step-XXXXXXXX` and return its path.

    Every process calls this (each saves its own RNG state); only the main process writes weights.
    `model` must be the unwrapped module. `ema` is a diffusers `EMAModel` over the trainable
    parameters in `named_parameters()` order. `extra_tensors` maps a file stem to tensors saved as
    `<stem>.safetensors` (e.g. the canonical pose map). `model_config` (JSON types) is written as
    `model_config.json` beside the weights.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        weights = _trainable_state_dict(model)
        save_file(weights, str(tmp / "trainable.safetensors"), metadata={"format": "pt", "step": str(step)})
        resume: dict[str, Any] = {}
        if optimizer is not None:
            resume["optimizer"] = optimizer.state_dict()
        if lr_scheduler is not None:
            resume["lr_scheduler"] = lr_scheduler.state_dict()
        if ema is not None:
            names = list(weights)
            ema_state = ema.state_dict()
            shadow = ema_state.pop("shadow_params")
            save_file(
                {name: p.detach().to("cpu").contiguous() for name, p in zip(names, shadow)},
                str(tmp / "ema.safetensors"),
            )
            resume["ema"] = {k: v for k, v in ema_state.items() if k != "collected_params"}
        torch.save(resume, tmp / "optimizer.pt")
        for stem, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / f"{stem}.safetensors"))
        state = {"version": CHECKPOINT_VERSION, **dict(train_state), "step": step}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        if model_config is not None:
            write_model_config(tmp, model_config)
    _barrier()
    if not is_main_process or tmp.exists():
        # each process writes its own RNG state into the (temporary) checkpoint folder
        target = tmp if tmp.exists() else final
        torch.save(_capture_rng_state(generators), target / f"rng-{rank}.pt")
    _barrier()
    if is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    _barrier()
    return final


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _plain(value: Any) -> Any:
    """Config values as plain YAML types (tuples -> lists, Paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_model_config(folder: str | Path, model_config: Mapping[str, Any]) -> Path:
    """`folder/model_config.json`: the model's own config, beside its weights."""
    path = Path(folder) / MODEL_CONFIG_NAME
    path.write_text(json.dumps(_plain(model_config), indent=2, sort_keys=True) + "\n")
    return path


def _read_model_config(folder: str | Path) -> dict[str, Any] | None:
    """The `model_config.json` of a checkpoint or run folder; None for folders written before it existed."""
    path = Path(folder) / MODEL_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def check_model_config(folder: str | Path, expected: Mapping[str, Any]) -> None:
    """One-line error when the saved model config differs from the model about to load the weights
    (another architecture or ablation); nothing to check for folders without `model_config.json`."""
    saved = _read_model_config(folder)
    if saved is None:
        return
    expected = json.loads(json.dumps(_plain(expected)))
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            if isinstance(saved.get(key), dict) and isinstance(expected.get(key), dict):
                sub = sorted(k for k in set(saved[key]) | set(expected[key]) if saved[key].get(k) != expected[key].get(k))
                key, was, now = f"{key}.{sub[0]}", saved[key].get(sub[0]), expected[key].get(sub[0])
            else:
                was, now = saved.get(key), expected.get(key)
            raise UserInputError(f"{Path(folder) / MODEL_CONFIG_NAME}: the weights belong to a model with {key}={was!r}, "
                                 f"this config builds {key}={now!r} (use the run's config)")


def load_trainable_weights(model: torch.nn.Module, checkpoint: str | Path, *, ema: bool = False) -> list[str]:
    """Load `trainable.safetensors` (or `ema.safetensors`) into `model`; returns the loaded names.

    Every saved name must exist in the model with the same shape (a mismatch means the checkpoint
    belongs to another architecture or ablation, e.g. trained with --no-fbdm).
    """
    path = require_checkpoint(checkpoint) / ("ema.safetensors" if ema else "trainable.safetensors")
    if not path.is_file():
        raise UserInputError(f"{path}: not found (the run had no EMA?)")
    weights = load_file(str(path))
    own = dict(model.named_parameters())
    unknown = [name for name in weights if name not in own]
    if unknown:
        raise UserInputError(f"{path}: {len(unknown)} weights the model does not have, e.g. {unknown[0]!r} (other architecture or ablation?)")
    with torch.no_grad():
        for name, tensor in weights.items():
            if own[name].shape != tensor.shape:
                raise UserInputError(f"{path}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].dtype))
    return list(weights)


def load_checkpoint(
    checkpoint: str | Path,
    model: torch.nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    ema: Any = None,
    generators: Mapping[str, torch.Generator] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the train state (step, data position...)."""
    checkpoint = require_checkpoint(checkpoint)
    state = read_train_state(checkpoint)
    names = load_trainable_weights(model, checkpoint)
    own_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(names) != sorted(own_trainable):
        raise UserInputError(
            f"{checkpoint}: trainable weights differ from this run's trainable parameters "
            f"({len(names)} saved, {len(own_trainable)} expected); resume with the same config"
        )
    resume = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(resume["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(resume["lr_scheduler"])
    if ema is not None:
        shadow = load_file(str(checkpoint / "ema.safetensors"))
        ema_state = dict(resume["ema"])
        # parameters() order, as EMAModel keeps them; each shadow stays where the EMA already lives
        # (device and dtype): safetensors loads to CPU, and a CPU shadow would mix devices in the next
        # EMA step on a GPU
        ema_state["shadow_params"] = [shadow[n].to(device=old.device, dtype=old.dtype)
                                      for n, old in zip(own_trainable, ema.shadow_params)]
        ema.load_state_dict(ema_state)
    rng_path = checkpoint / f"rng-{rank}.pt"
    if not rng_path.is_file():
        raise UserInputError(f"{rng_path}: not found (resuming with more processes than the run had?)")
    _restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True), generators)
    return state
