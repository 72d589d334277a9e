"""One Stage I training step at paper size: seconds per step and peak memory, bf16, with and without
gradient checkpointing, measured side by side in one process.

    python benchmarks/stage1_gpu_step.py                      # GPU: 512x768, batch 4, SD1.5-sized UNets
    python benchmarks/stage1_gpu_step.py --tiny --device cpu  # smoke run: tiny models, 64x96, CPU

The networks are random-initialised with the real architectures (no weights needed for speed):
two SD1.5 UNets (859.5 M parameters each; cross-attention 768), the SD VAE (frozen, bf16) and a
CLIP ViT-L/14 vision tower (frozen, bf16), plus FBDM, RPIM and the pose guider. A step is exactly the
training loop's: VAE + CLIP encode, reference UNet at t=0, denoiser reading the bank, epsilon MSE,
backward, grad clipping, AdamW on fp32 master weights under bf16 autocast. A configuration that runs
out of memory is reported as OOM, not a crash.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from serialgen.resolution import DEFAULT_RESOLUTION, add_resolution_argument, format_resolution
from serialgen.training.stage1.model import StandardizationModel, clip_image_embeds, encode_latents
from serialgen.training.common.tiny_models import (
    build_tiny_clip_vision,
    build_tiny_scheduler,
    build_tiny_unet,
    build_tiny_vae,
    seeded_init,
)
from serialgen.training.stage1.train import diffusion_loss

# runwayml/stable-diffusion-v1-5 unet/config.json (the values that differ from diffusers' defaults)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                patch_size=14, image_size=224, projection_dim=768)


def build(tiny: bool, device: str | torch.device = "cpu"):
    """(model, vae, clip), random-initialised on ``device`` (built there: initialising two SD1.5 UNets on a
    CPU first takes longer than the whole measurement on a GPU)."""
    if tiny:
        return (StandardizationModel(build_tiny_unet(0), build_tiny_unet(0), vae_scale_factor=8),
                build_tiny_vae(1), build_tiny_clip_vision(2))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded_init(0), torch.device(device):
        model = StandardizationModel(UNet2DConditionModel(**SD15_UNET), UNet2DConditionModel(**SD15_UNET), vae_scale_factor=8)
        vae = AutoencoderKL(**SD15_VAE)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14))
    return model, vae, clip


def step(model, vae, clip, scheduler, optimizer, batch, autocast_dtype, device):
    with torch.no_grad():
        target = encode_latents(vae, batch["std"])
        ref_latents = encode_latents(vae, batch["ref"])
        embeds = clip_image_embeds(clip, batch["ref"])
    noise = torch.randn_like(target)
    t = torch.randint(0, 1000, (target.shape[0],), device=device)
    noisy = scheduler.add_noise(target, noise, t)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        pred = model(noisy, t, ref_latents, embeds, batch["std_pose"], batch["ref_pose"], batch["ref_mask"],
                     torch.ones(target.shape[0], dtype=torch.bool, device=device))
    loss = diffusion_loss(pred, noise, t, scheduler, None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(model, vae, clip, scheduler, optimizer, batch, dtype, device, checkpointing: bool, warmup: int, steps: int):
    for unet in (model.reference_unet, model.denoising_unet):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            step(model, vae, clip, scheduler, optimizer, batch, dtype, device)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model, vae, clip, scheduler, optimizer, batch, dtype, device)
        sync()
        seconds = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"gradient_checkpointing": checkpointing, "seconds_per_step": round(seconds, 4),
                "samples_per_s": round(batch["ref"].shape[0] / seconds, 3),
                "peak_memory_gib": None if peak is None else round(peak, 2)}
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"gradient_checkpointing": checkpointing, "seconds_per_step": None, "oom": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64x96 (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    add_resolution_argument(parser, default=None, multiple_of=8, help="image size (default 512x768; tiny 64x96)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", default="off,on", help="gradient checkpointing modes to run, in order")
    args = parser.parse_args()
    width, height = args.resolution or ((64, 96) if args.tiny else DEFAULT_RESOLUTION)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(2)

    model, vae, clip = build(args.tiny, device)
    model.to(device).train()
    vae.to(device, dtype=dtype if dtype != torch.float32 else None).eval()
    clip.to(device, dtype=dtype if dtype != torch.float32 else None).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    scheduler = build_tiny_scheduler()  # SD1.5's schedule
    g = torch.Generator().manual_seed(0)
    b, h, w = args.batch_size, height, width
    batch = {k: v.to(device) for k, v in {
        "ref": torch.rand(b, 3, h, w, generator=g) * 2 - 1, "std": torch.rand(b, 3, h, w, generator=g) * 2 - 1,
        "ref_pose": torch.rand(b, 3, h, w, generator=g), "std_pose": torch.rand(b, 3, h, w, generator=g),
        "ref_mask": (torch.rand(b, 1, h, w, generator=g) > 0.5).float()}.items()}
    for key in ("ref", "std"):
        batch[key] = batch[key].to(dtype if dtype != torch.float32 else torch.float32)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "resolution": format_resolution((w, h)), "batch_size": b, "dtype": args.dtype, "tiny": args.tiny,
        "trainable_params_M": round(sum(p.numel() for p in trainable) / 1e6, 1),
        "runs": [],
    }
    for mode in args.modes.split(","):
        report["runs"].append(measure(model, vae, clip, scheduler, optimizer, batch, dtype, device, mode == "on",
                                      args.warmup, args.steps))
        print(json.dumps(report["runs"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
