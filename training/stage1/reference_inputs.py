"""Turning a user's reference picture into the Stage I inputs: padded image, background mask, pose map.

- Padding: the picture is letterboxed to the model's size (LANCZOS, centred on a transparent canvas,
  `serialgen.imaging.letterbox`), then flattened onto white (`flatten_on_white`); the padding counts
  as background.
- Background mask (`MaskEstimator`): the alpha channel when there is one (1 - alpha; the picture is
  composited onto white), otherwise near-white pixels (all channels >= `white_threshold`) count as
  background. Pluggable: any callable (H, W, 3) uint8 -> (H, W) float in [0, 1], 1 = background.
- Pose map (`PoseEstimator`): any callable (H, W, 3) uint8 -> (3, H, W) float pose map drawn like
  the training loader draws it. `BlankPose` (no pose: an all-black map, RPIM then adds only its
  bias response) is the fallback; `DWPoseOnnx` runs user-supplied DWPose ONNX files. For our own
  shards the exact keypoints are used instead (the loader's `ref_pose`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from serialgen.errors import UserInputError
from serialgen.imaging import flatten_on_white, has_alpha, letterbox

__all__ = [
    "IMAGE_SUFFIXES",
    "PoseEstimator",
    "BlankPose",
    "WhiteBackgroundMask",
    "load_reference",
    "list_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PoseEstimator(Protocol):
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H, W) float pose map."""


class BlankPose:
    """No pose information: an all-zero (black) pose map."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.zeros(3, image.shape[0], image.shape[1])


class WhiteBackgroundMask:
    """Near-white pixels (every channel >= threshold, in [0, 1]) are background."""

    def __init__(self, white_threshold: float = 0.94):
        self.white_threshold = white_threshold

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return (image.astype(np.float32) / 255.0 >= self.white_threshold).all(axis=-1).astype(np.float32)


def list_images(path: str | Path) -> list[Path]:
    """One image file, or the images in a folder (sorted, not recursive)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserInputError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserInputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise UserInputError(f"{path}: not found")


def _open_rgba(source: str | Path | Image.Image) -> tuple[Image.Image, bool]:
    def convert(img: Image.Image) -> tuple[Image.Image, bool]:
        return img.convert("RGBA"), has_alpha(img)

    if isinstance(source, Image.Image):
        return convert(source)
    try:
        with Image.open(source) as img:
            img.load()
            return convert(img)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{source}: cannot read image ({exc})") from None


def load_reference(path: str | Path | Image.Image, resolution: tuple[int, int], *, pose: PoseEstimator | None = None,
                   mask: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """One picture (a file or a PIL image) -> {"ref": (3,H,W) [-1,1], "ref_mask": (1,H,W), "ref_pose":
    (3,H,W)} at `resolution` (width, height)."""
    rgba, alpha_given = _open_rgba(path)
    path = path if not isinstance(path, Image.Image) else "<image>"
    width, height = resolution
    # letterbox on a transparent canvas (the padding has alpha 0, so it is background), then flatten on white
    canvas = letterbox(rgba, (width, height), fill=(255, 255, 255, 0), resample="lanczos")[0]
    rgba_arr = np.asarray(canvas)
    alpha = rgba_arr[..., 3].astype(np.float32) / 255.0
    rgb = flatten_on_white(rgba_arr)
    if alpha_given:
        background = 1.0 - alpha
    else:
        background = (mask or WhiteBackgroundMask())(rgb)
        background = np.maximum(background, 1.0 - alpha)  # padding is background
    pose_map = (pose or BlankPose())(rgb)
    if tuple(pose_map.shape) != (3, height, width):
        raise UserInputError(f"{path}: pose estimator returned {tuple(pose_map.shape)}, expected (3, {height}, {width})")
    image = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return {"ref": image, "ref_mask": torch.from_numpy(background)[None].float(), "ref_pose": pose_map.float()}
