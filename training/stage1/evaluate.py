"""`serialgen eval standardization`: PSNR / SSIM of standardized references against the rendered
standard images of the held-out split (paper Table 3), plus the copy-the-input baseline (the
reference itself scored against the target), as a table and JSON.

The test samples come from the loader as in training: uint8 out of the reader, converted to the
model's ranges on the device, each with its character's own standard pose map (the map that agrees
with the target image)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from serialgen.resolution import format_resolution
from serialgen.training.stage1.data import batch_to_device, collate_stage1, open_stage1_dataset
from serialgen.training.common.image_metrics import SSIM_SIGMA, SSIM_WINDOW, psnr, ssim

__all__ = ["evaluate_standardization", "format_table"]


def _batches(dataset, batch_size: int, max_samples: int | None):
    buffer, seen = [], 0
    items = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    for sample in items:
        if max_samples is not None and seen >= max_samples:
            break
        buffer.append(sample)
        seen += 1
        if len(buffer) == batch_size:
            yield collate_stage1(buffer)
            buffer = []
    if buffer:
        yield collate_stage1(buffer)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate_standardization(checkpoint: str | Path, shards: str, *, device: str = "cpu", dtype: str | None = None,
                             batch_size: int = 4, max_samples: int | None = None,
                             num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                             backgrounds: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the checkpoint over the test split of `shards`; returns the summary dict (see `format_table`).
    `dtype`: the weights' dtype (`auto`/None, `fp32`, `bf16`, `fp16`; see `pipeline.inference_dtype`)."""
    from serialgen.training.stage1.pipeline import StandardizePipeline, inference_dtype

    pipe = StandardizePipeline.from_checkpoint(checkpoint, device=device, dtype=inference_dtype(dtype, device),
                                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    dataset = open_stage1_dataset(shards, resolution=pipe.resolution, seed=pipe.config.seed, split="test",
                                  backgrounds=backgrounds)
    generator = torch.Generator().manual_seed(seed)
    scores = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
    batches = _batches(dataset, batch_size, max_samples)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="standardization eval", unit="batch")
    for batch in batches:
        batch = batch_to_device(batch, pipe.device)
        pred = pipe(batch["ref"], batch["ref_mask"], batch["ref_pose"], batch["std_pose"], generator=generator)
        target = ((batch["std"].float().cpu() + 1) / 2).clamp(0, 1)
        copy = ((batch["ref"].float().cpu() + 1) / 2).clamp(0, 1)
        scores["psnr"] += psnr(pred, target).tolist()
        scores["ssim"] += ssim(pred, target).tolist()
        scores["baseline_psnr"] += psnr(copy, target).tolist()
        scores["baseline_ssim"] += ssim(copy, target).tolist()
    return {
        "checkpoint": str(checkpoint),
        "shards": shards,
        "samples": len(scores["psnr"]),
        "psnr": _mean(scores["psnr"]),
        "ssim": _mean(scores["ssim"]),
        "baseline_copy_input": {"psnr": _mean(scores["baseline_psnr"]), "ssim": _mean(scores["baseline_ssim"])},
        "settings": {
            "num_inference_steps": pipe.num_inference_steps if num_inference_steps is None else num_inference_steps,
            "guidance_scale": pipe.guidance_scale if guidance_scale is None else guidance_scale,
            "resolution": format_resolution(pipe.resolution),
            "ssim": {"window": SSIM_WINDOW, "sigma": SSIM_SIGMA, "data_range": 1.0, "space": "RGB [0,1]",
                     "library": "scikit-image"},
            "seed": seed,
        },
        "per_sample": {k: [round(v, 6) if math.isfinite(v) else v for v in vals] for k, vals in scores.items()},
    }


def format_table(summary: dict[str, Any]) -> str:
    """Two-row table: the model and the copy-the-input baseline."""
    base = summary["baseline_copy_input"]
    lines = [
        f"standardization on {summary['shards']} ({summary['samples']} samples, checkpoint {summary['checkpoint']})",
        f"{'':<22}{'PSNR (dB)':>10}{'SSIM':>10}",
        f"{'model':<22}{summary['psnr']:>10.2f}{summary['ssim']:>10.4f}",
        f"{'copy input (baseline)':<22}{base['psnr']:>10.2f}{base['ssim']:>10.4f}",
        f"scikit-image SSIM: Gaussian {SSIM_WINDOW}x{SSIM_WINDOW}, sigma {SSIM_SIGMA}, data range 1.0, RGB in [0, 1]",
    ]
    return "\n".join(lines)
