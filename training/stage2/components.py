"""The frozen Stage II models: SDXL (UNet, VAE, two text encoders and tokenizers, noise scheduler) and
the CLIP vision encoder, either from local paths or as tiny random-initialised stand-ins for CPU tests.

Nothing here downloads: every pretrained model is a local folder the user names, and a missing one is
a one-line :class:`UserInputError` that says which config key and what layout is expected.

The tiny sizes are the diffusers SDXL test sizes (block channels (32, 64), cross-attention 64 = 32 + 32
from two 32-wide text encoders) with a VAE of four blocks so that the latent is 8x smaller than the
image, like the real SDXL VAE. The tiny vision encoder keeps ViT-H/14's geometry that matters here:
patch 14 at 224 px, hence 16x16 + 1 = 257 tokens, so diffusers' "Full" adapter path (which hard-codes
257 tokens) runs unchanged.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serialgen.training.stage2.config import (
    ENCODER_LAYOUT,
    SDXL_LAYOUT,
    SDXL_PARTS,
    ModelConfig,
    require_model_dir,
    check_model_paths,
)

__all__ = [
    "SDXLComponents",
    "build_components",
    "build_tiny_components",
]


@dataclass
class SDXLComponents:
    """Everything Stage II needs besides the adapter. All modules are frozen by the caller."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any  # DDPM, for training
    image_encoder: Any

    def pipeline(self, scheduler: Any = None) -> Any:
        """A stock ``StableDiffusionXLPipeline`` over these modules (DDIM unless a scheduler is given).

        ``feature_extractor`` is a plain ``CLIPImageProcessor`` at the encoder's size: references are
        padded to a square before they reach it (see :func:`serialgen.imaging.pad_to_square`),
        so its centre crop is a no-op.
        """
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        from serialgen.dataset.clip_inputs import clip_processor

        size = int(self.image_encoder.config.image_size)
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler,
            image_encoder=self.image_encoder,
            feature_extractor=clip_processor(size),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _load_sdxl(path: str | Path, vae_path: str | Path | None = None) -> dict[str, Any]:
    """Load the frozen SDXL parts from a local diffusers folder (``local_files_only``; no hub).

    ``vae_path`` replaces the VAE (e.g. madebyollin/sdxl-vae-fp16-fix); the VAE runs in fp32 anyway.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = require_model_dir(path, "model.pretrained_model", SDXL_LAYOUT, SDXL_PARTS)
    kw = {"local_files_only": True}
    if vae_path:
        vae = AutoencoderKL.from_pretrained(require_model_dir(vae_path, "model.vae", "a local AutoencoderKL folder"), **kw)
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    return dict(
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
        tokenizer_2=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw),
        noise_scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
    )


def _load_image_encoder(path: str | Path) -> Any:
    """The CLIP vision tower whose penultimate hidden states (257 tokens for ViT-H/14) feed the adapter."""
    from transformers import CLIPVisionModelWithProjection

    root = require_model_dir(path, "model.image_encoder", ENCODER_LAYOUT, ("config.json",))
    return CLIPVisionModelWithProjection.from_pretrained(root, local_files_only=True)


def build_tiny_components(seed: int = 0) -> SDXLComponents:
    """Random-initialised tiny SDXL + vision encoder, identical for a given ``seed`` on every machine.

    Built from the shared tiny factories (:mod:`serialgen.training.common.tiny_models`); the vision tower is
    overridden to patch 14 at 224 px so it emits ViT-H/14's 257 tokens.
    """
    from diffusers import DDPMScheduler

    from serialgen.training.common import tiny_models as tm

    with tempfile.TemporaryDirectory(prefix="serialgen-tok-") as tmp:
        tokenizer = tm.write_tiny_clip_tokenizer(Path(tmp) / "tokenizer")
        tokenizer_2 = tm.write_tiny_clip_tokenizer(Path(tmp) / "tokenizer_2")
    return SDXLComponents(
        unet=tm.build_tiny_sdxl_unet(seed),
        vae=tm.build_tiny_vae(seed + 1, scaling_factor=0.13025),  # SDXL's latent scale
        text_encoder=tm.build_tiny_clip_text(seed + 2),
        text_encoder_2=tm.build_tiny_clip_text(seed + 3, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, steps_offset=1,
        ),
        image_encoder=tm.build_tiny_clip_vision(seed + 4, image_size=224, patch_size=14),
    )


def build_components(model: ModelConfig) -> SDXLComponents:
    """Build or load the frozen models named by a config's ``model`` section: the seeded tiny set
    (``tiny: true``), or the local SDXL / vision-encoder / VAE folders (checked first, one line each)."""
    if model.tiny:
        return build_tiny_components(model.tiny_seed)
    check_model_paths(model)
    parts = _load_sdxl(model.pretrained_model, model.vae)
    return SDXLComponents(image_encoder=_load_image_encoder(model.image_encoder), **parts)
