"""ReferenceNet as attention processors on stock diffusers UNets (no forked UNet, no monkeypatching).

- `ReferenceWriterProcessor` sits on every `attn1` (self-attention) of the reference UNet. Its input
  is the `norm1` output f (B, N, C); it adds FBDM (background/foreground tokens by mask) and RPIM
  (projected reference-pose features), stores the result in the bank under its layer name, and
  self-attends on it (paper eq. 3-4).
- `ReferenceReaderProcessor` sits on every `attn1` of the denoising UNet: queries from its own
  tokens, keys/values from [own tokens ; bank[name]] (the paper's "concatenate along the spatial
  dimension, keep the first half"). Samples with `use_reference=False` (reference dropout, the CFG
  unconditional branch) have the reference keys masked out, i.e. plain self-attention.
- `PlainAttnProcessor` is SDPA attention for every other attention (`attn2`), accepting the
  `reference` argument so diffusers does not warn about it.

Roles are fixed per processor; nothing global switches read/write (that broke gradient
checkpointing's recomputation, research/training_anchors.md §1.6). The bank travels in
`cross_attention_kwargs={"reference": ReferenceContext(...)}`, a new one per forward, so a
forward can never read features left over from an earlier batch (gradient accumulation) and
checkpointed blocks recompute with exactly the context they first ran with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

__all__ = [
    "ReferenceContext",
    "ReferenceWriterProcessor",
    "ReferenceReaderProcessor",
    "PlainAttnProcessor",
    "self_attention_layers",
    "layer_hw",
    "resize_map",
]


@dataclass
class ReferenceContext:
    """What the writer/reader processors of one UNet forward see.

    bank: layer name -> (B, N, C) writer features; the writers fill it, the readers read it.
    latent_size: (H, W) of the UNet input latent; each layer's (h, w) is recovered from its token count.
    bg_mask: (B, 1, H', W') reference background mask in [0, 1], 1 = background (writers: FBDM).
    pose_features: (B, Cp, h', w') RPIM encoder output (writers: RPIM).
    use_reference: (B,) bool, readers only: False = attend to own tokens only. None = all True.
    trace: if a list, every reader appends (layer name, bank tensor) it used (tests, debugging).
    """

    bank: dict[str, torch.Tensor] = field(default_factory=dict)
    latent_size: tuple[int, int] = (0, 0)
    bg_mask: torch.Tensor | None = None
    pose_features: torch.Tensor | None = None
    use_reference: torch.Tensor | None = None
    trace: list | None = None


def self_attention_layers(unet) -> list[str]:
    """Names (without `.processor`) of the UNet's self-attention layers, in diffusers' order."""
    return [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn1.processor")]


def layer_hw(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with `num_tokens` tokens: the latent size halved (rounding up, as a
    stride-2 conv with padding 1 does) until it matches."""
    h, w = latent_size
    while h * w > num_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != num_tokens:
        raise RuntimeError(f"cannot place {num_tokens} tokens on a latent of {latent_size}")
    return h, w


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) maps to `size`: area average when shrinking (soft mask fractions, no
    aliasing of thin pose limbs), bilinear when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _attend(attn: Attention, query_states: torch.Tensor, kv_states: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA attention of `attn` with queries from `query_states` (B, N, C) and keys/values from
    `kv_states` (B, M, C); `mask` (B, 1, 1, M) bool, True = attend. Returns (B, N, C_out)."""
    batch = query_states.shape[0]
    query = attn.to_q(query_states)
    key = attn.to_k(kv_states)
    value = attn.to_v(kv_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + query_states
    return out / attn.rescale_output_factor


def _check_plain(attn: Attention, hidden_states: torch.Tensor) -> None:
    # BasicTransformerBlock's attn1 gets (B, N, C) tokens and has no group/spatial norm; the
    # processors below rely on that (it holds for every SD1.5/SDXL transformer block).
    if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
        raise RuntimeError("reference processors expect a transformer-block self-attention with (B, N, C) input")


class PlainAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor that also accepts (and ignores) the `reference` argument."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: ReferenceContext | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceWriterProcessor:
    """Reference-UNet self-attention: f -> FBDM(f) + RPIM -> bank[name]; self-attend on the result.

    `fbdm` and `rpim` are modules owned by the standardization model (their parameters are
    registered there, not here, so they are saved once); either may be None (ablation).
    """

    def __init__(self, name: str, fbdm=None, rpim=None):
        self.name, self.fbdm, self.rpim = name, fbdm, rpim

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: ReferenceContext | None = None):
        _check_plain(attn, hidden_states)
        features = hidden_states
        if reference is not None:
            hw = layer_hw(features.shape[1], reference.latent_size)
            if self.fbdm is not None and reference.bg_mask is not None:
                mask = resize_map(reference.bg_mask.to(features.dtype), hw).flatten(2).transpose(1, 2)
                features = self.fbdm(features, mask, self.name)
            if self.rpim is not None and reference.pose_features is not None:
                features = features + self.rpim.project(reference.pose_features, self.name, hw).to(features.dtype)
            reference.bank[self.name] = features
        return _attend(attn, features, features)


class ReferenceReaderProcessor:
    """Denoising-UNet self-attention over [own tokens ; reference tokens of the same layer name]."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: ReferenceContext | None = None):
        _check_plain(attn, hidden_states)
        if reference is None or not reference.bank:
            return _attend(attn, hidden_states, hidden_states)  # no reference at all: plain self-attention
        if self.name not in reference.bank:
            raise RuntimeError(f"reference bank has no features for {self.name} (writer/reader layers differ)")
        ref = reference.bank[self.name]
        if ref.shape[0] != hidden_states.shape[0] or ref.shape[2] != hidden_states.shape[2]:
            raise RuntimeError(f"{self.name}: reference features {tuple(ref.shape)} do not fit {tuple(hidden_states.shape)}")
        if reference.trace is not None:
            reference.trace.append((self.name, ref))
        kv = torch.cat([hidden_states, ref.to(hidden_states.dtype)], dim=1)
        mask = None
        use = reference.use_reference
        if use is not None and not bool(use.all()):
            batch, own, extra = hidden_states.shape[0], hidden_states.shape[1], ref.shape[1]
            mask = torch.ones(batch, 1, 1, own + extra, dtype=torch.bool, device=hidden_states.device)
            mask[:, 0, 0, own:] = use.to(device=hidden_states.device, dtype=torch.bool)[:, None]
        return _attend(attn, hidden_states, kv, mask)
