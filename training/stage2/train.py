"""Stage II training: IP-Adapter Full on a frozen SDXL, with accelerate.

Loss (paper eq. 5): ``|| eps - eps_theta(z_t, t, c_text, adapter(CLIP(ref))) ||^2`` on SDXL latents at
512x768, where ``ref`` is the Stage I standardization of the target (mode ``two-stage``) or a baseline
reference (``unpaired``, ``paired-one-stage``). Only the adapter (image projection + ``to_k_ip`` /
``to_v_ip``) has gradients; UNet, VAE, text encoders and the vision encoder are frozen.

Per training step (everything random comes from one generator seeded by (seed, micro-step, rank), so
a resumed run draws exactly what the uninterrupted run would have):

1. CFG dropout per sample: image / text / both at 0.05 each (:func:`draw_cfg_dropout`). A dropped
   caption becomes ""; a dropped image becomes a zero image *through the vision encoder*, the exact
   unconditional input of diffusers' SDXL pipeline at inference.
2. Target -> SDXL VAE (always fp32; the SDXL VAE overflows in fp16) -> latents x scaling factor.
3. Text: the pipeline's own ``encode_prompt`` (penultimate states of both encoders, 768 + 1280 = 2048;
   pooled from text_encoder_2). Time ids: original (h, w), crop (y, x), target (768, 512).
4. Noise (+ optional offset), uniform timestep, DDPM ``add_noise``; MSE against eps (or v).

Checkpoints (:mod:`serialgen.training.common.checkpointing`) hold only the adapter: ``trainable.safetensors``
is written from a view whose parameter names are the IP-Adapter file keys (``image_proj.proj.0.weight``,
``ip_adapter.1.to_k_ip.weight``, ...; :class:`serialgen.training.stage2.ip_adapter.AdapterView`), and
``ip_adapter.safetensors`` is a hard link to it, so every checkpoint folder loads with stock
``pipe.load_ip_adapter(ckpt, subfolder="", weight_name="ip_adapter.safetensors")``. The adapter's own config
(``model_config.json``) sits beside it, in every checkpoint and in the run folder.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from serialgen.errors import UserInputError
from serialgen.training.common.config import config_to_dict, override
from serialgen.training.stage2.config import Stage2Config, check_model_paths, check_pair_sets, check_resume

__all__ = [
    "Stage2Denoiser",
    "prepare_inputs",
    "denoising_loss",
    "train_stage2",
]


class Stage2Denoiser(nn.Module):
    """The module accelerate wraps (DDP): SDXL UNet with the adapter installed -> predicted noise."""

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet

    def forward(self, noisy, timesteps, prompt_embeds, pooled, time_ids, image_hidden):
        """noisy (B, 4, h, w); prompt_embeds (B, 77, 2048); pooled (B, 1280); time_ids (B, 6);
        image_hidden (B, 257, 1280) -> (B, 4, h, w)."""
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [image_hidden.unsqueeze(1)]},
        ).sample


def _step_generator(seed: int, micro_step: int, rank: int, device: Any) -> Any:
    """The one generator a micro-step draws from; a function of (seed, micro-step, rank) only."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + micro_step * 4099 + rank * 7919 + 12345) % (2**63 - 1))
    return g


def _validation_grid(pipe: Any, references: list[Any], prompts: Sequence[str], path: str | Path, *,
                    resolution: tuple[int, int], steps: int, guidance_scale: float, ip_scale: float, seed: int,
                    autocast: Any = None) -> Path:
    """One row per reference: the reference (letterboxed to the output size), then one image per prompt.

    Every image uses ``seed``, so grids from different steps are comparable.
    """
    import contextlib

    import numpy as np
    import torch

    from serialgen.imaging import letterbox, pad_to_square
    from serialgen.training.common.run_log import save_image_grid
    from serialgen.training.stage2.ip_adapter import ip_adapter_scale

    width, height = resolution
    rows = []
    with ip_adapter_scale(pipe, ip_scale):  # the trained UNet's own scale comes back afterwards
        for ref in references:
            row = [np.asarray(letterbox(ref.convert("RGB"), resolution)[0])]
            for prompt in prompts:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    image = pipe(
                        prompt, negative_prompt="", ip_adapter_image=pad_to_square(ref), height=height, width=width,
                        num_inference_steps=steps, guidance_scale=guidance_scale,
                        generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pil",
                    ).images[0]
                row.append(np.asarray(image.convert("RGB")))
            rows.append(row)
    save_image_grid(rows, path)
    return Path(path)


def _link_adapter(checkpoint: Path) -> Path:
    """``ip_adapter.safetensors`` beside ``trainable.safetensors`` (hard link; copy where links fail)."""
    from serialgen.training.stage2.ip_adapter import WEIGHT_NAME

    src, dst = checkpoint / "trainable.safetensors", checkpoint / WEIGHT_NAME
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def prepare_inputs(comps: Any, pipe: Any, batch: dict[str, Any], generator: Any, *, drop: dict[str, float],
                   noise_offset: float, target_hw: tuple[int, int], device: Any) -> dict[str, Any]:
    """Everything frozen in one training micro-step (no grad): latents, noise, text and image tokens.

    ``batch``: ``pixel_values`` (B, 3, H, W) in [-1, 1], ``ref_pixel_values`` (B, 3, S, S), ``caption``
    (B strings), ``original_size`` / ``crop_top_left`` (B, 2). Every random draw (dropout, VAE sample,
    noise, timesteps) comes from ``generator``. Returns the denoiser's inputs and its regression target.
    """
    import torch

    from serialgen.training.stage2.ip_adapter import encode_reference
    from serialgen.dataset.stage2_loader import draw_cfg_dropout, sdxl_time_ids

    sched = comps.noise_scheduler
    bsz = batch["pixel_values"].shape[0]
    with torch.no_grad():
        drop_image, drop_text = draw_cfg_dropout(bsz, drop, generator)
        px = batch["pixel_values"].to(device, torch.float32)  # the VAE runs in fp32 (SDXL's overflows in fp16)
        latents = comps.vae.encode(px).latent_dist.sample(generator=generator)
        shift = getattr(comps.vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * comps.vae.config.scaling_factor
        captions = ["" if d else c for c, d in zip(batch["caption"], drop_text.tolist())]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        image_hidden = encode_reference(comps.image_encoder, batch["ref_pixel_values"], drop_image)
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_hw).to(device)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(
                (bsz, latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype
            )
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=generator, device=device)
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
    return {"noisy": noisy, "timesteps": timesteps, "prompt_embeds": prompt_embeds, "pooled": pooled,
            "time_ids": time_ids, "image_hidden": image_hidden, "target": target,
            "drop_image": drop_image, "drop_text": drop_text}


def denoising_loss(model: Any, inputs: dict[str, Any], weight_dtype: Any) -> Any:
    """MSE between the denoiser's prediction and the target (eq. 5); the only part with gradients."""
    import torch.nn.functional as F

    w = weight_dtype
    pred = model(inputs["noisy"].to(w), inputs["timesteps"], inputs["prompt_embeds"].to(w), inputs["pooled"].to(w),
                 inputs["time_ids"].to(w), inputs["image_hidden"].to(w))
    return F.mse_loss(pred.float(), inputs["target"].float())


def train_stage2(config: Stage2Config, *, output_dir: str | Path | None = None, max_steps: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train (or resume, when ``output_dir`` holds checkpoints) and return a summary dict.

    ``config`` is not changed: ``output_dir`` / ``max_steps`` make a new config, the one saved with the run.
    """
    import dataclasses

    import torch
    import yaml
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from serialgen.dataset.stage2_loader import Stage2PairDataset, write_synthetic_pairs
    from serialgen.training.common import checkpointing as ckpt
    from serialgen.training.common.resumable_data import DataPosition, ResumableBatches, SeededEpochSampler
    from serialgen.training.common.run_folder import latest_checkpoint, rotate_checkpoints
    from serialgen.training.common.run_log import MetricsLogger, Throughput, plot_loss_curve
    from serialgen.training.stage2.components import build_components
    from serialgen.training.stage2.ip_adapter import (
        AdapterView,
        adapter_config,
        attach_ip_adapter,
        count_parameters,
        open_reference,
    )

    changes = {"output_dir": None if output_dir is None else str(output_dir), "train.max_steps": max_steps}
    config = override(config, {k: v for k, v in changes.items() if v is not None})
    out = Path(config.output_dir)
    tcfg, vcfg, icfg, dcfg = config.train, config.validation, config.inference, config.data
    seed = config.seed
    resolution = dcfg.resolution
    width, height = resolution

    # Cheap checks first: a wrong weights path or a mismatched resume is one line, before any process
    # group starts or any model loads.
    check_model_paths(config.model)
    check_pair_sets(config)
    latest = latest_checkpoint(out)
    if latest is not None:
        check_resume(latest, config)
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),  # without it accelerate ignores a CPU torchrun/MPI world (no gloo group)
    )
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device

    # ---- data first: a wrong pairs path fails in a second, not after minutes of model loading
    pair_dirs = [str(p) for p in dcfg.pairs]
    if dcfg.synthetic:
        synth = out / "synthetic-pairs"
        if main:
            write_synthetic_pairs(synth, dcfg.synthetic, seed=seed, size=resolution)
        accelerator.wait_for_everyone()
        pair_dirs.append(str(synth))

    # ---- frozen models; the adapter
    comps = build_components(config.model)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[tcfg.mixed_precision]
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.image_encoder):
        m.requires_grad_(False)
    comps.vae.to(device, dtype=torch.float32)  # SDXL's VAE is unstable in fp16: always fp32
    for m in (comps.text_encoder, comps.text_encoder_2, comps.image_encoder):
        m.to(device, dtype=weight_dtype).eval()
    comps.unet.to(device, dtype=weight_dtype)
    params = attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size), seed=seed)
    if tcfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    view = AdapterView(comps.unet)
    assert sum(1 for _ in view.parameters()) == len(params)
    model_config = adapter_config(comps.unet)
    optimizer = torch.optim.AdamW(
        view.parameters(), lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
        eps=tcfg.adam_epsilon, weight_decay=tcfg.adam_weight_decay,
    )
    clip_size = int(comps.image_encoder.config.image_size)
    dataset = Stage2PairDataset(pair_dirs, mode=config.mode, resolution=resolution, clip_size=clip_size, seed=seed,
                                random_crop=dcfg.random_crop, augment=dataclasses.asdict(dcfg.unpaired_augment))
    if len(dataset) < tcfg.batch_size * world:
        raise UserInputError(f"data.pairs: {len(dataset)} pairs, fewer than one batch ({tcfg.batch_size} x {world} processes)")

    start_step, samples_seen, position = 0, 0, DataPosition()
    if latest is not None:
        ckpt.check_model_config(latest, model_config)
        state = ckpt.load_checkpoint(latest, view, optimizer=optimizer, rank=rank)
        start_step, samples_seen = int(state["step"]), int(state.get("samples_seen", 0))
        position = DataPosition.from_dict(state.get("data"))
    model = Stage2Denoiser(comps.unet)
    model, optimizer = accelerator.prepare(model, optimizer)

    def make_loader(epoch: int, start_sample: int):
        dataset.set_epoch(epoch)
        sampler = SeededEpochSampler(len(dataset), seed=seed, epoch=epoch, rank=rank, world_size=world, start=start_sample)
        return DataLoader(dataset, batch_size=tcfg.batch_size, sampler=sampler, num_workers=dcfg.num_workers,
                          drop_last=True, pin_memory=device.type == "cuda")

    resumable = ResumableBatches(make_loader, tcfg.batch_size, position=position, seekable=True)
    batches = iter(resumable)  # resumable.position: micro-batches consumed so far (what a resume skips)

    pipe = comps.pipeline()  # for encode_prompt (identical to inference) and validation grids
    val_refs = [open_reference(p, "validation.references") for p in vcfg.references] or [
        dataset.reference_image(i) for i in range(min(vcfg.num_references, len(dataset)))
    ]
    saved_config = config_to_dict(config)

    logger = MetricsLogger(out, resume_step=start_step, tensorboard=tcfg.tensorboard) if main else None
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(saved_config, sort_keys=False))
    accum = tcfg.gradient_accumulation_steps
    total = tcfg.max_steps
    throughput = Throughput()
    bar = tqdm(total=total, initial=start_step, desc="stage2", disable=not (main and progress), unit="step",
               dynamic_ncols=True)
    losses: list[float] = []
    last_loss = float("nan")
    t0 = time.perf_counter()

    def save(step: int) -> Path:
        path = ckpt.save_checkpoint(
            out, step, view, optimizer=optimizer.optimizer,  # the torch optimizer inside accelerate's wrapper
            train_state={"samples_seen": samples_seen, "data": resumable.position.to_dict(), "mode": config.mode},
            config=saved_config, model_config=model_config, rank=rank, is_main_process=main,
        )
        if main:
            _link_adapter(path)
            rotate_checkpoints(out, tcfg.keep_checkpoints)
            plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=f"Stage II ({config.mode}), {out.name}")
        accelerator.wait_for_everyone()
        return path

    model.train()
    last_saved = start_step
    for step in range(start_step, total):
        for micro in range(accum):
            _pos, batch = next(batches)
            g = _step_generator(seed, step * accum + micro, rank, device)
            inputs = prepare_inputs(comps, pipe, batch, g, drop=dataclasses.asdict(tcfg.drop),
                                    noise_offset=tcfg.noise_offset, target_hw=(height, width), device=device)
            with accelerator.accumulate(model):
                loss = denoising_loss(model, inputs, weight_dtype)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, tcfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
            samples_seen += tcfg.batch_size * world
            throughput.add(tcfg.batch_size * world)
        global_step = step + 1
        bar.update(1)
        if main and (global_step % tcfg.log_every == 0 or global_step == total):
            last_loss = sum(losses) / len(losses)
            logger.log(global_step, loss=last_loss, lr=optimizer.param_groups[0]["lr"], samples_seen=samples_seen,
                       samples_per_s=throughput.rate(), elapsed_s=time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            losses.clear()
        if tcfg.checkpoint_every and global_step % tcfg.checkpoint_every == 0:
            save(global_step)
            last_saved = global_step
        if main and vcfg.every and val_refs and (global_step % vcfg.every == 0 or global_step == total):
            _validation_grid(pipe, val_refs, vcfg.prompts, out / "validation" / f"step-{global_step:08d}.png",
                            resolution=resolution, steps=icfg.num_inference_steps,
                            guidance_scale=icfg.guidance_scale, ip_scale=icfg.ip_adapter_scale,
                            seed=vcfg.seed, autocast=accelerator.autocast)
        accelerator.wait_for_everyone()
    bar.close()

    final_step = max(total, start_step)
    if final_step > last_saved or latest_checkpoint(out) is None:
        save(final_step)
    final = latest_checkpoint(out)
    adapter_path = out / "ip_adapter.safetensors"
    if main and final is not None:
        shutil.copyfile(final / "ip_adapter.safetensors", adapter_path)
        ckpt.write_model_config(out, model_config)
    if logger is not None:
        logger.close()
    accelerator.wait_for_everyone()
    summary = {
        "steps": final_step,
        "resumed_from": start_step,
        "samples_seen": samples_seen,
        "pairs": len(dataset),
        "skipped_pairs": dataset.skipped,
        "trainable_parameters": count_parameters(params),
        "last_loss": last_loss,
        "adapter": str(adapter_path),
        "checkpoint": str(final),
        "output_dir": str(out),
    }
    accelerator.end_training()
    return summary


