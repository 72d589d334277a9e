"""The paper's two additions to ReferenceNet self-attention input, and the target-pose guider.

FBDM (eq. 3): per self-attention layer, learned foreground/background tokens v_f, v_b (1 x C; the
widths differ per layer, so one pair per layer):  f~ = (f + v_b) * m + (f + v_f) * (1 - m),
m = the reference background mask (1 = background) resized to the layer (area average).

RPIM (eq. 4): a light 4-layer conv encoder of the reference pose map (run once per forward), then
per layer a zero-initialised 1x1 conv to the layer width, resized to the layer: f~ = f~ + f_p.
Resizing before the 1x1 projection is equivalent (both are linear) and much cheaper at 1280 channels.

Pose guider: diffusers' `ControlNetConditioningEmbedding` (Animate Anyone / Moore's guider: convs
with 16/32/96/256 channels, zero-initialised output), added to the denoiser's `conv_in` output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from serialgen.training.stage1.reference_attention import resize_map

__all__ = ["FBDM", "RPIM", "build_pose_guider", "module_key"]


def module_key(layer_name: str) -> str:
    """ModuleDict key for a layer name (dots are not allowed in module names)."""
    return layer_name.replace(".", "_")


class FBDM(nn.Module):
    """Per-layer foreground/background tokens. `layers`: {layer name: width C}.

    Tokens start at zero, so FBDM is the identity at initialisation (the pretrained reference
    features are undisturbed) and learns from the first step (the gradients of v_f and v_b differ
    because they see different regions). The paper does not state an initialisation.
    """

    def __init__(self, layers: dict[str, int]):
        super().__init__()
        self.v_f = nn.ParameterDict({module_key(n): nn.Parameter(torch.zeros(c)) for n, c in layers.items()})
        self.v_b = nn.ParameterDict({module_key(n): nn.Parameter(torch.zeros(c)) for n, c in layers.items()})

    def forward(self, features: torch.Tensor, mask: torch.Tensor, layer_name: str) -> torch.Tensor:
        """features (B, N, C); mask (B, N, 1) in [0, 1], 1 = background. Returns (B, N, C)."""
        key = module_key(layer_name)
        v_f = self.v_f[key].to(features.dtype)
        v_b = self.v_b[key].to(features.dtype)
        return (features + v_b) * mask + (features + v_f) * (1 - mask)


class RPIM(nn.Module):
    """Reference-pose encoder (4 convs, strides 2,2,2,1: 1/8 resolution like the latent) and per-layer
    zero-initialised 1x1 projections. `layers`: {layer name: width C}."""

    def __init__(self, layers: dict[str, int], channels: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"RPIM encoder has 4 layers, got channels {channels}")
        convs, prev = [], in_channels
        for i, ch in enumerate(channels):
            convs.append(nn.Conv2d(prev, ch, 3, stride=2 if i < 3 else 1, padding=1))
            prev = ch
        self.encoder = nn.ModuleList(convs)
        self.proj = nn.ModuleDict({module_key(n): nn.Conv2d(prev, c, 1) for n, c in layers.items()})
        for proj in self.proj.values():
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def encode(self, pose_map: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) reference pose map -> (B, channels[-1], H/8, W/8) features."""
        x = pose_map
        for i, conv in enumerate(self.encoder):
            x = conv(x)
            if i < len(self.encoder) - 1:
                x = F.silu(x)
        return x

    def project(self, features: torch.Tensor, layer_name: str, hw: tuple[int, int]) -> torch.Tensor:
        """Encoder features -> this layer's (B, h*w, C) additive term."""
        x = self.proj[module_key(layer_name)](resize_map(features, hw))
        return x.flatten(2).transpose(1, 2)


def build_pose_guider(unet_channels: int, vae_scale_factor: int,
                      channels: tuple[int, ...] = (16, 32, 96, 256)) -> ControlNetConditioningEmbedding:
    """Target-pose guider producing `unet_channels` maps at latent resolution (zero output at init).

    It has one stride-2 conv per channel step, so `channels` is cut to log2(vae_scale_factor) + 1
    entries (4 for the SD VAE's factor 8).
    """
    steps = int(round(torch.log2(torch.tensor(float(vae_scale_factor))).item()))
    if 2**steps != vae_scale_factor or steps + 1 > len(channels):
        raise ValueError(f"pose guider: VAE factor {vae_scale_factor} needs {steps + 1} channel entries, have {channels}")
    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=unet_channels,
        conditioning_channels=3,
        block_out_channels=tuple(channels[: steps + 1]),
    )
