"""Stage I standardization model: reference UNet + denoising UNet + FBDM + RPIM + pose guider.

Both UNets are stock `UNet2DConditionModel`s; the ReferenceNet link is the attention processors of
`reference_attention.py`. The frozen parts (VAE, CLIP image encoder) stay outside this module, so
`StandardizationModel.parameters()` is what the optimizer and the checkpoint see (minus the
reference UNet's unused tail, frozen here).

Data flow of one training forward (shapes for 512x768, SD1.5; latent 64x96):
    ref_latents (B,4,96,64), image_embeds (B,1,768), ref_pose (B,3,768,512), ref_mask (B,1,768,512)
      -> reference UNet at t=0, writers fill bank {16 layer names: (B, h*w, C)}
    noisy (B,4,96,64), t (B,), std_pose (B,3,768,512) -> pose guider (B,320,96,64) added after conv_in
      -> denoising UNet, readers attend over [own ; bank] -> predicted noise (B,4,96,64)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from serialgen.training.stage1.fbdm_rpim import FBDM, RPIM, build_pose_guider
from serialgen.training.stage1.reference_attention import (
    PlainAttnProcessor,
    ReferenceContext,
    ReferenceReaderProcessor,
    ReferenceWriterProcessor,
    self_attention_layers,
)

__all__ = [
    "StandardizationModel",
    "reference_unused_parameters",
    "encode_latents",
    "decode_latents",
    "clip_image_embeds",
]

# OpenAI CLIP normalisation (ViT-L/14 and the sd-image-variations encoder use it).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_LAYER = re.compile(r"^(up_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")


def reference_unused_parameters(unet) -> list[str]:
    """Parameters of a reference UNet that cannot influence any writer input (the bank holds the
    norm1 output of each attn1, and the last one executed sits in the last up block with attention).

    They are: `conv_norm_out`, `conv_out`; up blocks after the last one with attention; in that
    block, resnets after the last attention and the upsampler; in that attention, `proj_out` and
    everything of its last transformer block except `norm1`. Freezing them keeps DDP from waiting
    for gradients that never come and saves their optimizer state.
    """
    layers = [(m.group(1), int(m.group(3)), int(m.group(4))) for n in self_attention_layers(unet) if (m := _LAYER.match(n))]
    up = [entry for entry in layers if entry[0].startswith("up_blocks")]
    if up:
        block, attn_idx, tb_idx = max(up, key=lambda e: (int(e[0].split(".")[1]), e[1], e[2]))
        later_blocks = [f"up_blocks.{i}." for i in range(int(block.split(".")[1]) + 1, len(unet.up_blocks))]
    else:  # attention only down/mid: the whole decoder is unused
        block, attn_idx, tb_idx = max((e for e in layers if e[0] == "mid_block"), key=lambda e: (e[1], e[2]))
        later_blocks = ["up_blocks."]
    dead_prefixes = ["conv_norm_out.", "conv_out.", f"{block}.upsamplers."] + later_blocks
    attn_prefix = f"{block}.attentions.{attn_idx}."
    tb_prefix = f"{attn_prefix}transformer_blocks.{tb_idx}."
    dead = []
    for name, _ in unet.named_parameters():
        if any(name.startswith(p) for p in dead_prefixes):
            dead.append(name)
        elif (m := re.match(rf"^{re.escape(block)}\.resnets\.(\d+)\.", name)) and int(m.group(1)) > attn_idx:
            dead.append(name)
        elif name.startswith(attn_prefix):
            rest = name[len(attn_prefix):]
            if rest.startswith("proj_out.") or rest.startswith("norm_out."):
                dead.append(name)
            elif (m := re.match(r"^transformer_blocks\.(\d+)\.", rest)) and int(m.group(1)) > tb_idx:
                dead.append(name)
            elif name.startswith(tb_prefix) and not name[len(tb_prefix):].startswith("norm1."):
                dead.append(name)
    return dead


class StandardizationModel(nn.Module):
    """The trainable Stage I model. `use_fbdm` / `use_rpim` False are the paper's ablations."""

    def __init__(self, reference_unet, denoising_unet, *, vae_scale_factor: int, use_fbdm: bool = True,
                 use_rpim: bool = True, rpim_channels=(16, 32, 64, 128), pose_guider_channels=(16, 32, 96, 256)):
        super().__init__()
        self.reference_unet = reference_unet
        self.denoising_unet = denoising_unet
        writer_layers = self_attention_layers(reference_unet)
        reader_layers = self_attention_layers(denoising_unet)
        if writer_layers != reader_layers:
            raise ValueError("reference and denoising UNets must have the same self-attention layers")
        widths = {name: reference_unet.get_submodule(name).to_q.in_features for name in writer_layers}
        if widths != {name: denoising_unet.get_submodule(name).to_q.in_features for name in reader_layers}:
            raise ValueError("reference and denoising UNets have different layer widths")
        self.layer_names = writer_layers
        self._settings = {"use_fbdm": bool(use_fbdm), "use_rpim": bool(use_rpim), "vae_scale_factor": int(vae_scale_factor),
                          "rpim_channels": list(rpim_channels), "pose_guider_channels": list(pose_guider_channels)}
        self.fbdm = FBDM(widths) if use_fbdm else None
        self.rpim = RPIM(widths, tuple(rpim_channels)) if use_rpim else None
        self.pose_guider = build_pose_guider(denoising_unet.config.block_out_channels[0], vae_scale_factor,
                                             tuple(pose_guider_channels))
        self._install_processors()
        for name in reference_unused_parameters(reference_unet):
            reference_unet.get_parameter(name).requires_grad_(False)
        # The pose guider's output joins the denoiser right after conv_in, through a forward hook:
        # UNet2DConditionModel has no input for it, and a hook keeps the UNet stock.
        self._pose_embedding: torch.Tensor | None = None
        denoising_unet.conv_in.register_forward_hook(self._add_pose_embedding)

    def model_config(self) -> dict:
        """This model's own config (JSON types), saved as `model_config.json` beside its weights: the
        constructor settings and the UNet config (both UNets share it)."""
        unet = {k: v for k, v in self.denoising_unet.config.items() if not k.startswith("_")}
        return {"_class_name": type(self).__name__, **self._settings, "unet": unet}

    # -- wiring ---------------------------------------------------------------------------------
    def _install_processors(self) -> None:
        ref_procs, den_procs = {}, {}
        for key in self.reference_unet.attn_processors:
            name = key[: -len(".processor")]
            ref_procs[key] = (ReferenceWriterProcessor(name, self.fbdm, self.rpim)
                              if name in self.layer_names else PlainAttnProcessor())
        for key in self.denoising_unet.attn_processors:
            name = key[: -len(".processor")]
            den_procs[key] = ReferenceReaderProcessor(name) if name in self.layer_names else PlainAttnProcessor()
        self.reference_unet.set_attn_processor(ref_procs)
        self.denoising_unet.set_attn_processor(den_procs)

    def _add_pose_embedding(self, module, inputs, output):
        if self._pose_embedding is None:
            return output
        return output + self._pose_embedding.to(output.dtype)

    @contextlib.contextmanager
    def _pose(self, pose_embedding: torch.Tensor | None):
        self._pose_embedding = pose_embedding
        try:
            yield
        finally:
            self._pose_embedding = None

    def enable_gradient_checkpointing(self) -> None:
        self.reference_unet.enable_gradient_checkpointing()
        self.denoising_unet.enable_gradient_checkpointing()

    # -- the three steps ------------------------------------------------------------------------
    def encode_reference(self, ref_latents: torch.Tensor, image_embeds: torch.Tensor,
                         ref_pose: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the reference UNet once at t=0; returns the bank {layer name: (B, h*w, C)}.

        ref_latents (B, 4, h, w) scaled VAE latents; image_embeds (B, 1, D); ref_pose (B, 3, H, W);
        ref_mask (B, 1, H, W), 1 = background.
        """
        context = ReferenceContext(
            bank={},
            latent_size=tuple(ref_latents.shape[-2:]),
            bg_mask=ref_mask if self.fbdm is not None else None,
            pose_features=self.rpim.encode(ref_pose) if self.rpim is not None and ref_pose is not None else None,
        )
        timesteps = torch.zeros(ref_latents.shape[0], dtype=torch.long, device=ref_latents.device)
        # The output is not used: only the bank is (the unused tail is frozen, see above).
        self.reference_unet(ref_latents, timesteps, encoder_hidden_states=image_embeds,
                            cross_attention_kwargs={"reference": context}, return_dict=False)
        return context.bank

    def pose_embedding(self, std_pose: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) target (canonical standard) pose map -> (B, C0, H/8, W/8)."""
        return self.pose_guider(std_pose)

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, bank: dict[str, torch.Tensor],
                image_embeds: torch.Tensor, pose_embedding: torch.Tensor | None,
                use_reference: torch.Tensor | None = None, trace: list | None = None) -> torch.Tensor:
        """Denoising UNet reading `bank`; samples with use_reference False get neither the reference
        features nor the CLIP embedding (zeros), as in the CFG unconditional branch."""
        if use_reference is not None:
            image_embeds = image_embeds * use_reference.to(image_embeds.dtype)[:, None, None]
        context = ReferenceContext(bank=bank, latent_size=tuple(noisy_latents.shape[-2:]),
                                   use_reference=use_reference, trace=trace)
        with self._pose(pose_embedding):
            return self.denoising_unet(noisy_latents, timesteps, encoder_hidden_states=image_embeds,
                                       cross_attention_kwargs={"reference": context}, return_dict=False)[0]

    def forward(self, noisy_latents, timesteps, ref_latents, image_embeds, std_pose, ref_pose=None, ref_mask=None,
                use_reference=None):
        """One training forward: predicted noise (or v) for `noisy_latents`, (B, 4, h, w)."""
        bank = self.encode_reference(ref_latents, image_embeds, ref_pose, ref_mask)
        return self.denoise(noisy_latents, timesteps, bank, image_embeds, self.pose_embedding(std_pose), use_reference)


@dataclass
class _Scaling:
    factor: float
    shift: float


def _vae_scaling(vae) -> _Scaling:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return _Scaling(vae.config.scaling_factor, shift)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), using the VAE's own scaling factor.

    `sample`: draw from the posterior with `generator` (training targets); else its mode.
    """
    scaling = _vae_scaling(vae)
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mode()
    return (latents.float() - scaling.shift) * scaling.factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
    scaling = _vae_scaling(vae)
    images = vae.decode((latents / scaling.factor + scaling.shift).to(vae.dtype), return_dict=False)[0]
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def clip_image_embeds(image_encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, projection_dim) CLIP image embeddings for cross-attention.

    The full 2:3 figure is padded to a white square and resized (not centre-cropped as
    CLIPImageProcessor would do, which cuts the head and feet of a full-body image); the same
    preprocessing is used in training and inference.
    """
    size = image_encoder.config.image_size
    x = (images.float() + 1) / 2
    # On the device, inside the training step: the tensor form of serialgen.imaging.pad_to_square
    # (centred on white), which works on PIL images; every checkpoint was trained with exactly this.
    h, w = x.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    x = F.pad(x, (left, side - w - left, top, side - h - top), value=1.0)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(_CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(_CLIP_STD, device=x.device)[:, None, None]
    pixel_values = ((x - mean) / std).to(image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).image_embeds.float().unsqueeze(1)
