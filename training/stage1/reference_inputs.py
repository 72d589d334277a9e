"""Turning a user's reference picture into the Stage I inputs: padded image, background mask, pose map.

`ReferencePreparer` is what `serialgen standardize` and `serialgen pairs build` use: it decides where
the mask and the pose come from (``--mask``/``--pose``, :func:`add_reference_arguments`) and records
it. By default (``auto``) both come from the person estimator (`serialgen.dataset.person_estimate`,
MediaPipe in its own venv) when it is set up, as the training loader's annotations do
(docs/estimator.md); a picture with an alpha channel keeps its exact mask. No person found: the mask
is all zeros and the pose map black, exactly what Stage I's mask/pose dropout trains on
(`train.mask_dropout`, `train.pose_dropout`). Without the estimator, ``auto`` falls back to the
near-white threshold and a blank pose with a one-line warning; asking for ``estimator`` is an error.

`load_reference` is the low-level step (torch is imported where tensors are made: the command line
reads this module's options without it):
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

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
from PIL import Image

from serialgen.errors import UserInputError
from serialgen.imaging import fit_transform, flatten_on_white, has_alpha, letterbox

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_SOURCES",
    "POSE_SOURCES",
    "PoseEstimator",
    "BlankPose",
    "WhiteBackgroundMask",
    "ReferencePreparer",
    "add_reference_arguments",
    "reference_options",
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
        import torch

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
    import torch

    image = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return {"ref": image, "ref_mask": torch.from_numpy(background)[None].float(), "ref_pose": pose_map.float()}


ESTIMATE_SIDE = 1024  # pictures are estimated at most this large (MediaPipe's own inputs are 256 px)

# --mask / --pose choices. "auto": the estimator when it is set up, else threshold / blank (warned).
MASK_SOURCES = ("auto", "estimator", "threshold", "none")
POSE_SOURCES = ("auto", "estimator", "dwpose", "blank")


def add_reference_arguments(parser: Any, default: str = "auto") -> None:
    """The options that say where a picture's mask and pose come from (``standardize``: default
    auto; ``pairs build``: default estimator, so nothing falls back silently)."""
    if default == "auto":
        mask_default = ("auto (default): estimator when set up (`serialgen estimator setup`), else threshold "
                        "with a warning")
        pose_default = "auto (default): dwpose when its files are given, else estimator when set up, else blank with a warning"
    else:
        mask_default = pose_default = f"default {default}"
    parser.add_argument("--mask", choices=MASK_SOURCES, default=default,
                        help="background mask of pictures without alpha: estimator (MediaPipe person segmentation), "
                        "threshold (near-white pixels, --white-threshold), none (all zeros: 'no mask', as Stage I's "
                        f"mask dropout); {mask_default}. An alpha channel is always the mask")
    parser.add_argument("--pose", choices=POSE_SOURCES, default=default,
                        help="reference pose: estimator (MediaPipe keypoints), dwpose (--dwpose-det/--dwpose-pose "
                        f"ONNX files), blank (a black map, as Stage I's pose dropout); {pose_default}")
    parser.add_argument("--white-threshold", type=float, default=0.94,
                        help="--mask threshold: pixels with every channel at least this (0..1) are background (default 0.94)")
    parser.add_argument("--dwpose-det", help="DWPose detector ONNX (yolox_l.onnx), local path; needs onnxruntime")
    parser.add_argument("--dwpose-pose", help="DWPose pose ONNX (dw-ll_ucoco_384.onnx), local path")


def reference_options(args: Any) -> dict[str, Any]:
    """``ReferencePreparer`` keyword arguments from :func:`add_reference_arguments`'s options."""
    return {"mask": args.mask, "pose": args.pose, "white_threshold": args.white_threshold,
            "dwpose_det": args.dwpose_det, "dwpose_pose": args.dwpose_pose}


def _to_pose_tensor(pose_map: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(pose_map.astype(np.float32) / 255.0).permute(2, 0, 1)


class ReferencePreparer:
    """A picture -> the Stage I inputs plus where its mask and pose came from.

    ``prepare(source, resolution)`` returns ``load_reference``'s tensors and ``mask_source`` (alpha |
    estimator | threshold | none), ``pose_source`` (estimator | dwpose | blank | none) and ``estimate``
    (the person estimate's summary, or None when the estimator did not run). ``none`` means the
    estimator found no person: an all-zero mask or a black pose, Stage I's dropout values. The
    estimator runs on the picture itself (long side at most 1024 px) and its mask and keypoints are
    placed on the letterboxed canvas, in the model's pixels.
    """

    def __init__(self, mask: str = "auto", pose: str = "auto", *, white_threshold: float = 0.94,
                 dwpose_det: str | None = None, dwpose_pose: str | None = None, estimator=None, warn=None):
        from serialgen.dataset.person_estimate import SETUP_HINT, EstimatorUnavailable, estimator_python

        if mask not in MASK_SOURCES or pose not in POSE_SOURCES:
            raise UserInputError(f"--mask {mask} / --pose {pose}: expected {'|'.join(MASK_SOURCES)} / {'|'.join(POSE_SOURCES)}")
        warn = warn or (lambda msg: print(f"serialgen: {msg}", file=sys.stderr))
        if bool(dwpose_det) != bool(dwpose_pose):
            raise UserInputError("--dwpose-det and --dwpose-pose go together (yolox_l.onnx and dw-ll_ucoco_384.onnx)")
        if pose == "dwpose" and not dwpose_det:
            raise UserInputError("--pose dwpose needs --dwpose-det and --dwpose-pose")
        if pose == "auto" and dwpose_det:
            pose = "dwpose"
        available = estimator is not None or estimator_python() is not None
        if "estimator" in (mask, pose) and not available:
            raise EstimatorUnavailable(f"--mask/--pose estimator: the person estimator is not set up: {SETUP_HINT}")
        if mask == "auto":
            mask = "estimator" if available else "threshold"
        if pose == "auto":
            pose = "estimator" if available else "blank"
        if not available and (mask, pose) == ("threshold", "blank"):
            warn(f"the person estimator is not set up ({SETUP_HINT}): near-white threshold mask and blank pose "
                 "(pass --mask threshold --pose blank to say so)")
        self.mask_mode, self.pose_mode, self.white_threshold = mask, pose, white_threshold
        self.dwpose = None
        if pose == "dwpose":
            from serialgen.training.stage1.dwpose import DWPoseOnnx

            self.dwpose = DWPoseOnnx(dwpose_det, dwpose_pose)
        self.estimator = estimator
        if self.estimator is None and "estimator" in (mask, pose):
            from serialgen.dataset.person_estimate import MediaPipeEstimator

            self.estimator = MediaPipeEstimator()

    @property
    def estimator_name(self) -> str | None:
        return None if self.estimator is None else getattr(self.estimator, "name", type(self.estimator).__name__)

    def __call__(self, source: str | Path | Image.Image, resolution: tuple[int, int]) -> dict[str, Any]:
        width, height = resolution
        rgba, alpha_given = _open_rgba(source)
        where = source if not isinstance(source, Image.Image) else "<image>"
        canvas = letterbox(rgba, (width, height), fill=(255, 255, 255, 0), resample="lanczos")[0]
        rgba_arr = np.asarray(canvas)
        padding = 1.0 - rgba_arr[..., 3].astype(np.float32) / 255.0
        rgb = flatten_on_white(rgba_arr)
        found = None
        if self.estimator is not None:
            # Estimated on the picture at its own resolution (at most ESTIMATE_SIDE px on its long
            # side), not on the letterboxed canvas: a wide group photo shrunk to 512 px loses the
            # faces that tell several people apart. Then placed on the canvas like the picture.
            picture = flatten_on_white(rgba)
            scale = min(1.0, ESTIMATE_SIDE / max(picture.size))
            if scale < 1.0:
                picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                         Image.Resampling.BILINEAR)
            found = self.estimator(np.asarray(picture)).placed(fit_transform(picture.size, (width, height)), (width, height))
        # mask (1 = background)
        if alpha_given:
            background, mask_source = padding, "alpha"
        elif self.mask_mode == "estimator":
            if found.person:
                background, mask_source = np.maximum(found.background_mask(), padding), "estimator"
            else:
                background, mask_source = np.zeros((height, width), np.float32), "none"
        elif self.mask_mode == "threshold":
            background = np.maximum(WhiteBackgroundMask(self.white_threshold)(rgb), padding)
            mask_source = "threshold"
        else:
            background, mask_source = np.zeros((height, width), np.float32), "none"
        # pose map
        if self.pose_mode == "estimator":
            pose_map = _to_pose_tensor(found.pose_map()) if found.person else BlankPose()(rgb)
            pose_source = "estimator" if found.person else "none"
        elif self.pose_mode == "dwpose":
            pose_map, pose_source = self.dwpose(rgb), "dwpose"
        else:
            pose_map, pose_source = BlankPose()(rgb), "blank"
        if tuple(pose_map.shape) != (3, height, width):
            raise UserInputError(f"{where}: pose estimator returned {tuple(pose_map.shape)}, expected (3, {height}, {width})")
        import torch

        image = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"ref": image, "ref_mask": torch.from_numpy(background)[None].float(), "ref_pose": pose_map.float(),
                "mask_source": mask_source, "pose_source": pose_source, "estimate": found}

    def close(self) -> None:
        if self.estimator is not None and hasattr(self.estimator, "close"):
            self.estimator.close()
