"""Reference pictures as CLIP image-encoder inputs: padded to a white square, then CLIP-preprocessed.

Why pad (the paper is silent; our decision): a standardized reference is a 2:3 full-body image
(512x768). ``CLIPImageProcessor``'s default resizes the short side and crops the centre square, which
for a 2:3 image drops the top and bottom sixth: the head and the feet. We pad to a square with white
(the standard form's background) first, so the processor's crop is a no-op and the whole figure
reaches the encoder. The same :func:`reference_pixel_values` runs in the Stage II data loader, in
generation and in the metrics (``training/``), so training and inference see identical pixels.
"""

from __future__ import annotations

from typing import Any, Sequence

from serialgen.imaging import pad_to_square

__all__ = ["clip_processor", "reference_pixel_values"]

_PROCESSORS: dict[int, Any] = {}


def clip_processor(size: int) -> Any:
    """The CLIP image processor at ``size`` px, always the PIL backend.

    The same settings diffusers' ``load_ip_adapter`` uses when a pipeline has no feature extractor
    (``CLIPImageProcessor(size=S, crop_size=S)``: bicubic short-side resize, centre crop, CLIP mean/std).
    We pin the PIL implementation: transformers picks a torchvision backend when torchvision is
    installed, whose resize differs slightly, and training and inference must see identical pixels.
    """
    from transformers import CLIPImageProcessorPil

    if size not in _PROCESSORS:
        _PROCESSORS[size] = CLIPImageProcessorPil(size=size, crop_size=size)
    return _PROCESSORS[size]


def reference_pixel_values(images: Sequence[Any], image_size: int = 224) -> Any:
    """Pad each PIL reference to a white square, then CLIP-preprocess: float tensor (B, 3, S, S).

    ``S = image_size`` is the vision encoder's ``config.image_size`` (224 for ViT-H/14). Values are CLIP
    normalised (mean/std of OpenAI CLIP, which OpenCLIP ViT-H/14 shares).
    """
    if not images:
        raise ValueError("reference_pixel_values: no images")
    padded = [pad_to_square(im) for im in images]
    return clip_processor(int(image_size))(images=padded, return_tensors="pt").pixel_values
