"""Build every Stage I network from a config: pretrained local folders, or tiny seeded models.

Nothing here downloads: diffusers/transformers loaders run with `local_files_only=True`, after
`check_model_paths` has turned a missing folder into a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serialgen.errors import UserInputError
from serialgen.training.stage1.config import Stage1Config, check_model_paths
from serialgen.training.stage1.model import StandardizationModel

__all__ = ["Stage1Components", "build_components", "inference_scheduler"]


@dataclass
class Stage1Components:
    model: StandardizationModel  # trainable part
    vae: torch.nn.Module  # AutoencoderKL, frozen
    image_encoder: torch.nn.Module  # CLIPVisionModelWithProjection, frozen
    noise_scheduler: object  # DDIMScheduler with the training noise schedule
    vae_scale_factor: int


def _training_scheduler(config: Stage1Config):
    from diffusers import DDIMScheduler

    from serialgen.training.common.tiny_models import build_tiny_scheduler

    t = config.train
    overrides = dict(
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=t.prediction_type,
        rescale_betas_zero_snr=t.zero_terminal_snr,
        # zero terminal SNR needs the last timestep (999) sampled at inference (Lin et al. 2024)
        timestep_spacing="trailing" if t.zero_terminal_snr else "leading",
    )
    if config.model.tiny:
        return build_tiny_scheduler(**overrides)
    base = DDIMScheduler.load_config(config.model.pretrained_model, subfolder="scheduler", local_files_only=True)
    return DDIMScheduler.from_config(base, **overrides)


def inference_scheduler(noise_scheduler):
    """A fresh DDIM scheduler with the training schedule (the pipeline mutates its timesteps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config)


def build_components(config: Stage1Config) -> Stage1Components:
    """Reference + denoising UNets (both initialised from the same weights), VAE, CLIP image encoder."""
    check_model_paths(config)
    m = config.model
    if m.tiny:
        from serialgen.training.common.tiny_models import build_tiny_clip_vision, build_tiny_unet, build_tiny_vae

        reference_unet = build_tiny_unet(m.tiny_seed)
        denoising_unet = build_tiny_unet(m.tiny_seed)
        vae = build_tiny_vae(m.tiny_seed + 1)
        image_encoder = build_tiny_clip_vision(m.tiny_seed + 2)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        unet_path, subfolder = (m.pretrained_unet, None) if m.pretrained_unet else (m.pretrained_model, "unet")
        reference_unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder=subfolder, local_files_only=True)
        denoising_unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder=subfolder, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(m.pretrained_model, subfolder="vae", local_files_only=True)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(m.image_encoder, local_files_only=True)
    if denoising_unet.config.cross_attention_dim != image_encoder.config.projection_dim:
        raise UserInputError(
            f"{config.source}: UNet cross_attention_dim {denoising_unet.config.cross_attention_dim} != image encoder "
            f"projection_dim {image_encoder.config.projection_dim} (use a CLIP encoder matching the UNet, e.g. ViT-L/14 for SD1.5)"
        )
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.requires_grad_(False).eval()
    image_encoder.requires_grad_(False).eval()
    with torch.random.fork_rng(devices=[]):
        # the new modules (RPIM encoder, pose guider) are initialised from the run seed
        torch.manual_seed(config.seed)
        model = StandardizationModel(
            reference_unet,
            denoising_unet,
            vae_scale_factor=vae_scale_factor,
            use_fbdm=m.fbdm,
            use_rpim=m.rpim,
            rpim_channels=tuple(m.rpim_channels),
            pose_guider_channels=tuple(m.pose_guider_channels),
        )
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return Stage1Components(model, vae, image_encoder, _training_scheduler(config), vae_scale_factor)
