"""Stage II on one GPU: adapter training step and series generation, with SDXL-sized random weights.

What it measures (one run, side by side):

1. **Training step** at 512x768, batch 8 (the paper's per-GPU batch): the real training code path
   (:func:`serialgen.training.stage2.train.prepare_inputs` + :func:`denoising_loss`): VAE encode in fp32,
   both text encoders, the ViT-H/14 vision tower, SDXL UNet with IP-Adapter Full (257 tokens) forward
   + backward, AdamW on the ~345 M adapter parameters. Seconds per step (median after warm-up), the
   frozen-encoder share of it, and peak GPU memory (allocated and reserved).
2. **Generation**: stock ``StableDiffusionXLPipeline`` with the adapter, DDIM 20 steps, CFG 7.5,
   512x768: seconds per image (median after one warm-up image).

Weights are random (built on the device from SDXL / OpenCLIP ViT-H/14 / CLIP-L / bigG configs): speed
and memory do not depend on their values, and nothing needs downloading. ``--tiny`` runs the same
code at the CPU test sizes (64x96, batch 2) so the script is checked where no GPU exists.

    python benchmarks/stage2_gpu_step.py                 # GPU, paper sizes
    python benchmarks/stage2_gpu_step.py --tiny          # CPU smoke run
    python benchmarks/stage2_gpu_step.py --count-only    # parameter counts only (meta device, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

import torch

from serialgen.resolution import DEFAULT_RESOLUTION, add_resolution_argument, format_resolution

# SDXL base 1.0 UNet (unet/config.json), OpenCLIP ViT-H/14 vision tower (h94/IP-Adapter image_encoder),
# CLIP ViT-L/14 text and OpenCLIP bigG text (SDXL text_encoder / text_encoder_2), SDXL VAE.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
               patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   vocab_size=49408, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 vocab_size=49408, projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=2)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def build_full(device: str) -> Any:
    """Random-initialised SDXL-sized components, built directly on ``device``."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from serialgen.training.stage2.components import SDXLComponents
    from serialgen.training.common.tiny_models import write_tiny_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT))
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14))
    with tempfile.TemporaryDirectory() as tmp:
        # Tokenization cost is negligible; a character-level vocabulary keeps ids inside the 49408 vocab.
        tok1 = write_tiny_clip_tokenizer(Path(tmp) / "a")
        tok2 = write_tiny_clip_tokenizer(Path(tmp) / "b")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return SDXLComponents(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                          noise_scheduler=sched, image_encoder=enc)


def random_batch(batch: int, width: int, height: int) -> dict[str, Any]:
    """A fixed random Stage II batch as the data loader yields it (targets in [-1, 1], CLIP-normalised
    references at 224 px, captions, SDXL size conditioning)."""
    return {
        "pixel_values": torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1,
        "ref_pixel_values": torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2)),
        "caption": ["a person cooking a meal in the park"] * batch,
        "original_size": torch.tensor([[height, width]] * batch),
        "crop_top_left": torch.zeros(batch, 2, dtype=torch.long),
    }


def count_only() -> dict[str, Any]:
    """Parameter counts of the paper-sized models (meta device: no memory, no init)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    cross = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    modules = dict(unet.named_modules())
    kv = sum(2 * modules[n[: -len(".processor")]].to_k.weight.numel() for n in cross)
    h, c = VIT_H14["hidden_size"], SDXL_UNET["cross_attention_dim"]
    proj = h * h + h + h * c + c + 2 * c  # Linear(h,h), Linear(h,c), LayerNorm(c)
    return {"unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6, "cross_attention_layers": len(cross),
            "adapter_kv_params_M": kv / 1e6, "adapter_proj_params_M": proj / 1e6,
            "adapter_params_M": (kv + proj) / 1e6}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models, 64x96, batch 2, on CPU (a smoke run)")
    ap.add_argument("--count-only", action="store_true", help="print parameter counts of the full models and exit")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 8; tiny 2)")
    add_resolution_argument(ap, default=None, multiple_of=8, help="image size (default 512x768; tiny 64x96)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="frozen-weight dtype (default bf16 on GPU)")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--gen-images", type=int, default=3, help="timed images (after one warm-up image)")
    ap.add_argument("--gen-steps", type=int, default=20, help="DDIM steps per image (the paper: 20)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.count_only:
        print(json.dumps(count_only(), indent=1))
        return 0

    from serialgen.imaging import pad_to_square
    from serialgen.training.stage2.components import build_tiny_components
    from serialgen.training.stage2.ip_adapter import AdapterView, attach_ip_adapter, count_parameters
    from serialgen.training.stage2.train import Stage2Denoiser, denoising_loss, prepare_inputs

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU run", file=sys.stderr)
        return 2
    batch = args.batch or (2 if args.tiny else 8)
    width, height = args.resolution or ((64, 96) if args.tiny else DEFAULT_RESOLUTION)
    dtype_name = args.dtype or ("fp32" if args.tiny else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if args.tiny:
        torch.set_num_threads(2)

    t0 = time.perf_counter()
    comps = build_tiny_components(0) if args.tiny else build_full(device)
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.image_encoder):
        m.requires_grad_(False)
    comps.vae.to(device, torch.float32)
    for m in (comps.text_encoder, comps.text_encoder_2, comps.image_encoder, comps.unet):
        m.to(device, dtype)
    params = attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size))
    if args.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    view = AdapterView(comps.unet)
    optimizer = torch.optim.AdamW(view.parameters(), lr=1e-4, weight_decay=0.01)
    model = Stage2Denoiser(comps.unet).train()
    pipe = comps.pipeline()
    build_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "size": "tiny" if args.tiny else "paper (SDXL + ViT-H/14, random weights)",
        "resolution": format_resolution((width, height)), "batch": batch, "dtype": dtype_name,
        "gradient_checkpointing": args.gradient_checkpointing,
        "adapter_params_M": round(count_parameters(params) / 1e6, 2), "build_s": round(build_s, 1),
        "torch": torch.__version__,
    }

    g = torch.Generator(device=device).manual_seed(0)
    data = random_batch(batch, width, height)
    use_autocast = device == "cuda" and dtype != torch.float32

    def autocast() -> Any:
        # bf16/fp16 frozen weights meet the fp32 adapter: autocast, as accelerate's mixed precision does
        return torch.autocast(device_type="cuda", dtype=dtype) if use_autocast else contextlib.nullcontext()

    if not args.skip_train:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_times, encode_times = [], []
        for i in range(args.warmup + args.steps):
            _sync(device)
            s0 = time.perf_counter()
            inputs = prepare_inputs(comps, pipe, data, g, drop={"image": 0.05, "text": 0.05, "both": 0.05},
                                    noise_offset=0.0, target_hw=(height, width), device=device)
            _sync(device)
            s1 = time.perf_counter()
            with autocast():
                loss = denoising_loss(model, inputs, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            s2 = time.perf_counter()
            if i >= args.warmup:
                step_times.append(s2 - s0)
                encode_times.append(s1 - s0)
        result["train_s_per_step"] = round(statistics.median(step_times), 4)
        result["train_frozen_encode_s"] = round(statistics.median(encode_times), 4)
        result["train_samples_per_s"] = round(batch / statistics.median(step_times), 2)
        result["train_loss_finite"] = bool(torch.isfinite(loss).item())
        if device == "cuda":
            result["train_peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["train_peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        print(json.dumps({k: result[k] for k in result if k.startswith("train")}), flush=True)

    if not args.skip_generate:
        del optimizer
        model.eval()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        from PIL import Image

        ref = pad_to_square(Image.new("RGB", DEFAULT_RESOLUTION, (200, 60, 60)))
        times = []
        for i in range(1 + args.gen_images):
            _sync(device)
            s0 = time.perf_counter()
            with autocast():
                pipe("a person cooking a meal in the park", negative_prompt="", ip_adapter_image=ref,
                     height=height, width=width, num_inference_steps=args.gen_steps, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(i), output_type="pil")
            _sync(device)
            if i:
                times.append(time.perf_counter() - s0)
        result["gen_s_per_image"] = round(statistics.median(times), 3)
        result["gen_steps"] = args.gen_steps
        result["gen_scheduler"] = type(pipe.scheduler).__name__
        if device == "cuda":
            result["gen_peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
