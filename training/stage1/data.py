"""Stage I batches: the sample contract, a synthetic in-memory dataset, collation, and the data source.

Sample contract (what `dataset/loader.py` yields and what the model consumes), per sample:
    ref       (3, H, W) float in [-1, 1]   reference composited on a background
    ref_mask  (1, H, W) float in [0, 1]    1 = background
    ref_pose  (3, H, W) float              reference pose map (OpenPose colours)
    std       (3, H, W) float in [-1, 1]   standard image (target)
    std_pose  (3, H, W) float              standard pose map: the character's own (the loader's
                                           default), or the canonical one for a `data.canonical_share`
    meta      dict                         (character id, pose id, ...)
    __key__   str                          the sample key
Shard data comes out of the loader as uint8 (its fast path: a quarter of the bytes between processes)
and is converted to these ranges on the device (:func:`batch_to_device`); the synthetic data is float.
Pose maps are passed to the networks as the loader draws them; training and inference must use the
same drawing (:func:`canonical_pose_map` draws the canonical map with the loader's renderer).

`SyntheticStandardizationDataset` is a learnable toy version of the task for tests and the tiny
config: a "character" (head, torso, legs in per-character colours) somewhere on a noisy coloured
background, and its standard form centred on white.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from serialgen.errors import UserInputError
from serialgen.training.stage1.config import parse_synthetic_spec

__all__ = [
    "SyntheticStandardizationDataset",
    "batch_to_device",
    "canonical_pose_map",
    "collate_stage1",
    "open_stage1_dataset",
]

_SAMPLE_KEYS = ("ref", "ref_mask", "ref_pose", "std", "std_pose")

# joints of the toy figure in a unit box (x, y), and the limbs drawn between them (OpenPose-ish colours)
_JOINTS = {"head": (0.5, 0.12), "neck": (0.5, 0.25), "hip": (0.5, 0.55), "lhand": (0.2, 0.5),
           "rhand": (0.8, 0.5), "lfoot": (0.35, 0.95), "rfoot": (0.65, 0.95)}
_LIMBS = [("head", "neck", (255, 0, 0)), ("neck", "hip", (255, 170, 0)), ("neck", "lhand", (0, 255, 0)),
          ("neck", "rhand", (0, 170, 255)), ("hip", "lfoot", (170, 0, 255)), ("hip", "rfoot", (255, 0, 170))]


def _to_tensor(image: Image.Image, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr * (hi - lo) + lo


class SyntheticStandardizationDataset(Dataset):
    """`num_samples` deterministic toy pairs of `num_characters` characters at `resolution` (width, height)."""

    def __init__(self, num_samples: int, resolution: tuple[int, int] = (64, 96), seed: int = 0,
                 num_characters: int | None = None):
        if num_samples < 1:
            raise UserInputError(f"synthetic dataset needs at least 1 sample, got {num_samples}")
        self.num_samples, self.resolution, self.seed = num_samples, tuple(resolution), seed
        self.num_characters = num_characters or max(1, num_samples // 2)

    def __len__(self) -> int:
        return self.num_samples

    def _figure(self, draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colors, pose: bool,
                lean: float) -> None:
        x0, y0, bw, bh = box
        pts = {k: (x0 + (x + (lean * (y - 0.55) if k.endswith("hand") else 0.0)) * bw, y0 + y * bh)
               for k, (x, y) in _JOINTS.items()}
        width = max(1, int(bw * 0.06))
        if pose:
            for a, b, color in _LIMBS:
                draw.line([pts[a], pts[b]], fill=color, width=width)
            return
        skin, shirt, trousers = colors
        draw.line([pts["neck"], pts["lhand"]], fill=shirt, width=width * 2)
        draw.line([pts["neck"], pts["rhand"]], fill=shirt, width=width * 2)
        draw.rectangle([x0 + 0.3 * bw, pts["neck"][1], x0 + 0.7 * bw, pts["hip"][1]], fill=shirt)
        draw.line([pts["hip"], pts["lfoot"]], fill=trousers, width=width * 3)
        draw.line([pts["hip"], pts["rfoot"]], fill=trousers, width=width * 3)
        r = 0.12 * bw
        hx, hy = pts["head"]
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=skin)

    def __getitem__(self, index: int) -> dict[str, Any]:
        character = index % self.num_characters
        char_rng = np.random.default_rng([self.seed, character])
        colors = [tuple(int(c) for c in char_rng.integers(0, 256, 3)) for _ in range(3)]
        rng = np.random.default_rng([self.seed, 1_000_000 + index])
        w, h = self.resolution

        # standard: fixed box, white background
        std_box = (0.2 * w, 0.08 * h, 0.6 * w, 0.84 * h)
        # reference: random scale / position / lean, noisy coloured background
        scale = rng.uniform(0.45, 0.8)
        bw, bh = 0.75 * w * scale, 0.9 * h * scale
        ref_box = (rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh)
        lean = rng.uniform(-0.6, 0.6)

        background = (rng.integers(0, 256, 3)[None, None] + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
        ref = Image.fromarray(background)
        fg = Image.new("L", (w, h), 0)
        self._figure(ImageDraw.Draw(ref), ref_box, colors, pose=False, lean=lean)
        self._figure(ImageDraw.Draw(fg), ref_box, [(255,)] * 3, pose=False, lean=lean)
        ref_pose = Image.new("RGB", (w, h), (0, 0, 0))
        self._figure(ImageDraw.Draw(ref_pose), ref_box, colors, pose=True, lean=lean)
        std = Image.new("RGB", (w, h), (255, 255, 255))
        self._figure(ImageDraw.Draw(std), std_box, colors, pose=False, lean=0.0)
        std_pose = Image.new("RGB", (w, h), (0, 0, 0))
        self._figure(ImageDraw.Draw(std_pose), std_box, colors, pose=True, lean=0.0)

        return {
            "ref": _to_tensor(ref),
            "ref_mask": 1.0 - _to_tensor(fg, 0.0, 1.0),
            "ref_pose": _to_tensor(ref_pose, 0.0, 1.0),
            "std": _to_tensor(std),
            "std_pose": _to_tensor(std_pose, 0.0, 1.0),
            "meta": {"character": f"synthetic-char-{character:04d}"},
            "__key__": f"synthetic-{index:06d}",
        }


def collate_stage1(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensor members; `meta` becomes a list."""
    samples = list(samples)
    batch = {key: torch.stack([s[key] for s in samples]) for key in _SAMPLE_KEYS}
    batch["meta"] = [s.get("meta", {}) for s in samples]
    batch["__key__"] = [s.get("__key__", "") for s in samples]
    return batch


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The tensor members on ``device``, uint8 ones (the loader's fast path) converted there to the
    model's ranges by the loader's own ``to_model_range``; float members (synthetic data) as they are."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in moved.values()):
        from serialgen.dataset.loader import to_model_range

        moved = to_model_range(moved)
    return moved


def canonical_pose_map(resolution: tuple[int, int]) -> torch.Tensor:
    """The reference figure's standard pose (geometry's ``reference_standard_keypoints`` at
    ``resolution``) drawn by the loader's pose-map renderer: (3, H, W) float in [0, 1].

    What a checkpoint stores for inference on pictures, where no character of ours defines a
    standard pose; drawn at the model's own size, so no resize blurs its lines."""
    from serialgen.assets_manifest.geometry.standard_form import reference_standard_keypoints
    from serialgen.dataset.posemap import Pose, draw_pose_map

    width, height = resolution
    xy, visible = reference_standard_keypoints(width, height)
    pose = Pose(xy, visible, (width, height), np.zeros((0, 2), np.float32))
    return torch.from_numpy(draw_pose_map(pose, (width, height))).permute(2, 0, 1).float().div(255.0)


def open_stage1_dataset(spec: str, *, resolution: tuple[int, int], seed: int, split: str = "train",
                        infinite: bool = False, backgrounds: str | None = None, epoch_length: int | None = None,
                        canonical_share: float = 0.0, estimated_share: float = 0.0,
                        annotations: str | None = None) -> Dataset:
    """A dataset for a data spec: `synthetic:N`, or shard path(s)/pattern read by `dataset/loader.py`.

    `split`, `infinite` (resampled shards), `backgrounds`, `epoch_length` (samples per reader per
    epoch in infinite mode), `canonical_share` (the probability that a sample's standard pose map
    is the canonical one instead of its character's own) and `estimated_share` / `annotations` (the
    probability that its reference mask and pose map are the person estimator's, from that annotation
    set; docs/estimator.md) go to the shard loader, which yields uint8
    (convert with :func:`batch_to_device`). The synthetic data has no split (train and test are
    different seeds) and its toy figure has no canonical pose.
    """
    count = parse_synthetic_spec(spec)
    if count is not None:
        return SyntheticStandardizationDataset(count, resolution, seed=seed if split == "train" else seed + 7919)
    from serialgen.dataset.loader import open_dataset

    extra = {"epoch_length": epoch_length} if infinite and epoch_length else {}
    return open_dataset(spec, resolution=resolution, seed=seed, split=split, infinite=infinite,
                        backgrounds=backgrounds, dtype="uint8", std_pose="per_character",
                        canonical_share=canonical_share, estimated_share=estimated_share, annotations=annotations,
                        **extra)
