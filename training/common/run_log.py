"""Training metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard, plus image grids.

`metrics.jsonl` is the machine-readable record (`{"step", "loss", "lr", "samples_per_s", ...}`);
after a resume the lines past the resumed step are dropped first, so the file always describes one
consistent run. `loss.png` beside it is its loss curve, redrawn at every checkpoint, for a look
without TensorBoard. Shared by Stage I and Stage II.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["MetricsLogger", "Throughput", "plot_loss_curve", "save_image_grid", "to_uint8_image"]


class MetricsLogger:
    """Append metrics to `<output_dir>/metrics.jsonl` and TensorBoard (`<output_dir>/tensorboard`).

    `resume_step`: drop existing lines with a step beyond it (they belong to the part of an
    interrupted run that the resume redoes). Construct only on the main process.
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        if self.path.exists():
            keep = []
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", math.inf) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
            self.path.write_text("".join(line + "\n" for line in keep))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, **metrics: float) -> None:
        record = {"step": int(step), **{k: _number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """`image`: (H, W, 3) uint8."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _number(value) -> float | int | str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (int, float, str)):
        return value
    return float(value)


class Throughput:
    """Samples per second over the interval since the last `rate()` call."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0

    def add(self, samples: int) -> None:
        self._samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._samples / max(now - self._t0, 1e-9)
        self._t0, self._samples = now, 0
        return rate


def to_uint8_image(image: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(3, H, W) float in `value_range` -> (H, W, 3) uint8."""
    lo, hi = value_range
    image = ((image.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, pad: int = 2) -> np.ndarray:
    """Tile rows of equally sized (H, W, 3) uint8 images (white gaps) into one PNG; returns the grid."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def plot_loss_curve(metrics: str | Path, out: str | Path, title: str = "") -> Path | None:
    """Draw the `loss` of `metrics.jsonl` against `step` into the PNG `out` (written to a temporary
    name, then renamed, so a viewer never sees half a file); None when there is nothing to draw yet.

    The logged losses (means over `train.log_every` steps) and, once there are enough of them, a
    moving average over a tenth of the points, which is what shows the trend of a noisy diffusion loss.
    """
    metrics, out = Path(metrics), Path(out)
    steps, losses = [], []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(record.get("loss"), (int, float)) and math.isfinite(record["loss"]):
                steps.append(record["step"])
                losses.append(record["loss"])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.45 if len(steps) >= 20 else 1.0, label="loss")
    window = max(len(steps) // 10, 1)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.6, label=f"mean of {window}")
        ax.legend(loc="upper right", frameon=False)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set_title(title or metrics.parent.name, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
