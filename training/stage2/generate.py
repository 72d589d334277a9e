"""Two-stage generation of a series: standardize the reference once, then one image per prompt x seed.

``serialgen generate --standardizer CK1 --adapter CK2 --ref IMG --prompt P ... --num-seeds N --out DIR``
writes::

    DIR/reference.png        the input reference (RGB)
    DIR/standardized.png     its Stage I standard form (what the adapter sees), at the standardizer's size
    DIR/p00-s0000.png ...    prompt index x seed
    DIR/grid.png             the series: one row per prompt, one column per seed, standardized ref first
    DIR/series.json          version, prompts, seeds, files, settings (what `eval personalization` reads)

Sampling settings not given (steps, guidance, adapter scale, resolution) come from the adapter's
training config (its ``inference`` section and ``data.resolution``), else the paper's values.

The SDXL pipeline is stock diffusers with the adapter loaded by ``load_ip_adapter`` from the trained
``ip_adapter.safetensors``; the reference is padded to a white square before the pipeline's CLIP
processor, as in training (see :mod:`serialgen.training.stage2.ip_adapter`). The negative prompt is "" encoded
by the text encoders (not SDXL's zeroed embedding), which is what text dropout trained as "no text".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION, format_resolution
from serialgen.training.common.config import config_from_dict, config_to_dict
from serialgen.training.stage2.config import InferenceConfig, ModelConfig, Stage2Config

__all__ = ["SERIES_VERSION", "adapter_run_config", "check_standardizer", "generate_series", "load_adapter_pipeline"]

# 2: the model section is "model" (was "models") and settings hold "resolution": "WxH" (was width, height)
SERIES_VERSION = 2


def check_standardizer(spec: str) -> None:
    """One line naming ``--standardizer`` when its value is none of the accepted kinds, before any model
    loads: a Stage I checkpoint folder, ``identity``, ``none`` or ``module:function``."""
    if spec in ("identity", "none") or Path(spec).is_dir():
        return
    module, sep, function = spec.partition(":")
    if sep and module and function and not Path(spec).exists():
        return
    raise UserInputError(f"--standardizer {spec}: not found; expected a Stage I checkpoint folder, 'identity', "
                         "'none' or module:function")


def adapter_run_config(adapter: str | Path) -> Stage2Config | None:
    """The training config saved beside an adapter (checkpoint folder or run folder), if any; a config
    of an older release is translated to the current key names (with a notice)."""
    import yaml

    from serialgen.training.stage2.ip_adapter import resolve_adapter_file

    f = resolve_adapter_file(adapter)
    for d in (f.parent, f.parent.parent.parent):  # checkpoint dir, then run dir above checkpoints/step-N
        cfg = d / "config.yaml"
        if cfg.is_file():
            return config_from_dict(Stage2Config, yaml.safe_load(cfg.read_text(encoding="utf-8")), source=str(cfg))
    return None


def load_adapter_pipeline(adapter: str | Path, run_config: Stage2Config | None, *, sdxl: str | None = None,
                          image_encoder: str | None = None, vae: str | None = None, device: str = "cpu",
                          dtype: Any = None) -> tuple[Any, ModelConfig]:
    """A stock ``StableDiffusionXLPipeline`` (DDIM) with the trained adapter loaded by ``load_ip_adapter``.

    Base models come from ``sdxl`` / ``image_encoder`` when given, else from the adapter's training
    config ``run_config`` (:func:`adapter_run_config`; a tiny run rebuilds its seeded tiny models).
    Returns (pipeline, model section used).
    """
    import dataclasses

    import torch

    from serialgen.training.common.checkpointing import check_model_config
    from serialgen.training.stage2.components import build_components
    from serialgen.training.stage2.ip_adapter import adapter_config, resolve_adapter_file

    f = resolve_adapter_file(adapter)
    model = run_config.model if run_config is not None else ModelConfig()
    if sdxl or image_encoder:
        model = ModelConfig(pretrained_model=sdxl or model.pretrained_model,
                            image_encoder=image_encoder or model.image_encoder, vae=vae or model.vae)
    elif vae:
        model = dataclasses.replace(model, vae=vae)
    if not model.tiny and not (model.pretrained_model and model.image_encoder):
        raise UserInputError(
            f"--adapter: {f} has no training config naming the base models; pass --sdxl DIR and --image-encoder DIR"
        )
    comps = build_components(model)
    pipe = comps.pipeline()
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe.to(device=device, dtype=dtype)
    pipe.load_ip_adapter(str(f.parent), subfolder="", weight_name=f.name, image_encoder_folder=None)
    check_model_config(f.parent, adapter_config(pipe.unet))
    return pipe, model


def generate_series(
    *,
    ref: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    adapter: str | Path,
    standardizer: str = "identity",
    num_seeds: int = 4,
    first_seed: int = 0,
    resolution: tuple[int, int] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    ip_scale: float | None = None,
    negative_prompt: str = "",
    sdxl: str | None = None,
    image_encoder: str | None = None,
    vae: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    reference_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the two stages and write the series (see module docstring); returns the series record.

    ``standardizer``: a Stage I checkpoint folder, ``identity`` (no standardization: the reference is
    letterboxed to the paper's 512x768 on white; a labelled stand-in), or ``none`` (the raw reference goes
    to the adapter: the one-stage baselines). ``resolution``, ``steps``, ``guidance_scale``, ``ip_scale``:
    None takes the adapter's training config (``data.resolution``, ``inference``), else the paper's values.
    ``reference_options``: where a Stage I checkpoint's reference mask and pose come from
    (:class:`serialgen.training.stage1.reference_inputs.ReferencePreparer`'s ``mask``, ``pose``, ...;
    default: the person estimator when it is set up).
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from serialgen.imaging import letterbox, pad_to_square
    from serialgen.training.common.run_log import save_image_grid
    from serialgen.training.stage2.build_pairs import load_standardizer
    from serialgen.training.stage2.ip_adapter import open_reference

    if not prompts:
        raise UserInputError("--prompt: give at least one prompt")
    if num_seeds < 1:
        raise UserInputError(f"--num-seeds: {num_seeds} must be >= 1")
    check_standardizer(standardizer)
    run_cfg = adapter_run_config(adapter)
    defaults = run_cfg.inference if run_cfg is not None else InferenceConfig()
    resolution = tuple(resolution or (run_cfg.data.resolution if run_cfg is not None else DEFAULT_RESOLUTION))
    steps = steps or defaults.num_inference_steps
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    ip_scale = defaults.ip_adapter_scale if ip_scale is None else ip_scale
    width, height = resolution
    out = Path(out)
    reference = open_reference(ref, "--ref")
    # Stage I first (its model is freed before SDXL loads).
    if standardizer == "none":
        standardized, std_name = reference, "none (raw reference)"
    else:
        std = load_standardizer(standardizer, device=device)
        if getattr(std, "takes_references", False):  # a Stage I checkpoint: image, mask and pose prepared here
            from serialgen.training.stage1.reference_inputs import ReferencePreparer

            prepare = ReferencePreparer(**(reference_options or {}))
            try:
                prepared = prepare(Path(ref), std.resolution)  # the file itself: its alpha is the best mask
            finally:
                prepare.close()
            standardized = std([prepared], seed=first_seed)[0]
        else:
            standardized = std([reference], seed=first_seed)[0]
        std_name = std.name
        del std
    pipe, model = load_adapter_pipeline(adapter, run_cfg, sdxl=sdxl, image_encoder=image_encoder, vae=vae, device=device)
    pipe.set_ip_adapter_scale(ip_scale)
    out.mkdir(parents=True, exist_ok=True)
    reference.save(out / "reference.png")
    standardized.save(out / "standardized.png")
    ip_image = pad_to_square(standardized)
    images: list[dict[str, Any]] = []
    seed_list = list(range(first_seed, first_seed + num_seeds))
    rows = []
    total = len(prompts) * len(seed_list)
    with tqdm(total=total, desc="generate", unit="img", disable=not progress) as bar:
        for pi, prompt in enumerate(prompts):
            row = [np.asarray(letterbox(standardized.convert("RGB"), resolution)[0])]
            for seed in seed_list:
                image = pipe(
                    prompt, negative_prompt=negative_prompt, ip_adapter_image=ip_image, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                ).images[0]
                name = f"p{pi:02d}-s{seed:04d}.png"
                image.save(out / name)
                images.append({"file": name, "prompt": prompt, "prompt_index": pi, "seed": seed})
                row.append(np.asarray(image.convert("RGB")))
                bar.update(1)
            rows.append(row)
    save_image_grid(rows, out / "grid.png")
    record = {
        "format": "serialgen-series",
        "version": SERIES_VERSION,
        "reference": str(Path(ref).resolve()),
        "reference_copy": "reference.png",
        "standardized": "standardized.png",
        "standardizer": std_name,
        "adapter": str(Path(adapter).resolve()),
        "model": config_to_dict(model),
        "prompts": list(prompts),
        "seeds": seed_list,
        "images": images,
        "settings": {"resolution": format_resolution(resolution), "steps": steps, "scheduler": "DDIM",
                     "guidance_scale": guidance_scale, "ip_adapter_scale": ip_scale, "negative_prompt": negative_prompt},
        "grid": "grid.png",
    }
    (out / "series.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record

