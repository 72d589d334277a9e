"""PSNR and SSIM for the standardization benchmark (paper Table 3), computed by scikit-image.

scikit-image is already a dependency (the loader and assets use it) and is the reference other tools are
checked against; torchmetrics would compute the same numbers on GPU batches, but it would be one more
dependency for a step that costs nothing next to the 20 DDIM steps that make each image. The settings
are spelled out because the libraries differ by default (scikit-image's default SSIM window is 7x7
uniform):

- inputs: RGB images (B, 3, H, W) in [0, 1]; data range 1.0;
- PSNR = 10 log10(1 / MSE) per image (``peak_signal_noise_ratio``); identical images give +inf;
- SSIM (Wang et al. 2004; ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=-1)``): Gaussian window 11x11, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population variances, per channel, averaged over the valid region (the 5-pixel
  border left out) and the channels.

A dataset score is the mean of the per-image scores (a mean PSNR with one identical pair is inf).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["psnr", "ssim", "SSIM_WINDOW", "SSIM_SIGMA"]

SSIM_WINDOW = 11  # what scikit-image derives from sigma 1.5 with its truncate of 3.5: 2 * int(3.5 * 1.5 + 0.5) + 1
SSIM_SIGMA = 1.5


def _images(a: torch.Tensor, b: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs as (H, W, C) float64 arrays."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    b = b.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
    return list(zip(a, b))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,); +inf where the images are identical."""
    from skimage.metrics import peak_signal_noise_ratio

    scores = []
    for x, y in _images(a, b):
        if np.array_equal(x, y):
            scores.append(float("inf"))  # scikit-image divides by a zero MSE here (a warning, then inf)
        else:
            scores.append(peak_signal_noise_ratio(x, y, data_range=data_range))
    return torch.tensor(scores, dtype=torch.float32)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM, (B,). Images must be at least 11x11."""
    from skimage.metrics import structural_similarity

    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    scores = [structural_similarity(x, y, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False,
                                    data_range=data_range, channel_axis=-1) for x, y in _images(a, b)]
    return torch.tensor(scores, dtype=torch.float32)
