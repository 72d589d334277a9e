"""Tiny random-initialised diffusers/transformers models for CPU tests and the `*-tiny` configs.

No hub, no downloads: every model is built from a config dict with a fixed seed, so "tiny model,
seed 0" is the same model on every machine and a checkpoint of a tiny run can be reloaded by
rebuilding the frozen parts from the seed. Sizes follow diffusers' own test suite (block channels
(32, 64), latents 8x12 for 64x96 images). The tiny VAE has 4 blocks, so its downsampling factor is
8 like the SD VAE (a 2-block VAE would give factor 2, see research/training_anchors.md §3.1).

Shared by Stage I and Stage II (the SDXL and CLIP-text builders are for Stage II).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "seeded_init",
    "tiny_clip_vision_config",
    "tiny_clip_text_config",
    "build_tiny_unet",
    "build_tiny_vae",
    "build_tiny_clip_vision",
    "build_tiny_clip_text",
    "build_tiny_sdxl_unet",
    "write_tiny_clip_tokenizer",
    "build_tiny_scheduler",
]


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Run module construction under a fixed torch seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_unet_config(**overrides) -> dict:
    """SD1.5-shaped UNet2DConditionModel config, two resolutions, attention at both (7 attn1 layers).

    cross_attention_dim 32 equals the tiny CLIP vision projection_dim, as 768 does for SD1.5 + ViT-L/14.
    """
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    config.update(overrides)
    return config


def _tiny_vae_config(**overrides) -> dict:
    """AutoencoderKL with 4 blocks (downsampling factor 8, like the SD VAE), 4 latent channels."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    config.update(overrides)
    return config


def tiny_clip_vision_config(**overrides) -> dict:
    """CLIPVisionConfig kwargs: 32x32 input, patch 8 (17 tokens), projection 32."""
    config = dict(
        hidden_size=32,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_channels=3,
    )
    config.update(overrides)
    return config


def _tiny_sdxl_unet_config(**overrides) -> dict:
    """SDXL-shaped UNet config from diffusers' SDXL pipeline tests (text_time embedding, cross dim 64)."""
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (pooled text projection)
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    config.update(overrides)
    return config


def tiny_clip_text_config(**overrides) -> dict:
    """CLIPTextConfig kwargs (hidden 32, projection 32, vocab 1000)."""
    config = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    config.update(overrides)
    return config


def build_tiny_unet(seed: int = 0, **overrides):
    """Random-initialised tiny `UNet2DConditionModel` (see `_tiny_unet_config`)."""
    from diffusers import UNet2DConditionModel

    with seeded_init(seed):
        return UNet2DConditionModel(**_tiny_unet_config(**overrides))


def build_tiny_vae(seed: int = 0, **overrides):
    """Random-initialised tiny `AutoencoderKL` (factor 8, see `_tiny_vae_config`)."""
    from diffusers import AutoencoderKL

    with seeded_init(seed):
        return AutoencoderKL(**_tiny_vae_config(**overrides))


def build_tiny_clip_vision(seed: int = 0, **overrides):
    """Random-initialised tiny `CLIPVisionModelWithProjection`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded_init(seed):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_clip_vision_config(**overrides))).eval()


def build_tiny_clip_text(seed: int = 0, with_projection: bool = False, **overrides):
    """Random-initialised tiny `CLIPTextModel` (or `CLIPTextModelWithProjection`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with seeded_init(seed):
        return cls(CLIPTextConfig(**tiny_clip_text_config(**overrides))).eval()


def build_tiny_sdxl_unet(seed: int = 0, **overrides):
    """Random-initialised tiny SDXL-shaped `UNet2DConditionModel`."""
    from diffusers import UNet2DConditionModel

    with seeded_init(seed):
        return UNet2DConditionModel(**_tiny_sdxl_unet_config(**overrides))


def write_tiny_clip_tokenizer(directory: str | Path, vocab_size: int = 1000):
    """Write an offline CLIP BPE vocabulary (letters, with and without `</w>`) and return a `CLIPTokenizer`.

    Replaces the hub's `hf-internal-testing/tiny-random-clip` tokenizer used by diffusers' tests.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens += letters + [f"{ch}</w>" for ch in letters]
    vocab = {tok: i for i, tok in enumerate(tokens[:vocab_size])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77, pad_token="!"
    )


def build_tiny_scheduler(**overrides):
    """SD1.5's DDIM scheduler settings (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    from diffusers import DDIMScheduler

    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    config.update(overrides)
    return DDIMScheduler(**config)
