"""PSNR and SSIM for the standardization benchmark (paper Table 3), in plain torch.

Definitions (documented because libraries differ by default):
- Inputs: RGB images (B, 3, H, W) in [0, 1]; data range L = 1.0.
- PSNR = 10 log10(L^2 / MSE) per image, MSE over all pixels and channels; identical images give +inf.
- SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2,
  C2 = (K2 L)^2, population (biased) variances, computed per channel on the "valid" region (no
  padding: the 5-pixel border is left out), averaged over pixels then channels. This equals
  scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=-1)` and torchmetrics'
  `StructuralSimilarityIndexMeasure(data_range=1.0)` up to float rounding.
A dataset score is the mean of the per-image scores (a mean PSNR with one identical pair is inf).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "SSIM_WINDOW", "SSIM_SIGMA"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (B,); +inf where the images are identical."""
    _check(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()  # mse 0 -> inf


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM, (B,). Images must be at least 11x11."""
    _check(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    channels = a.shape[1]
    g = _gaussian_window()
    kx = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        return F.conv2d(F.conv2d(x, kx, groups=channels), ky, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(2).mean(2).mean(1).float()
