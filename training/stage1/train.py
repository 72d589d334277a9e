"""Stage I training loop (accelerate): `serialgen train stage1 --config C`.

Reads top to bottom like the method section:
  1. accelerator, seeds, output folder      5. resume (weights, optimizer, RNG, data position)
  2. networks                               6. loop: encode -> noise -> predict -> loss (eq. 2) -> step
  3. optimizer, LR schedule, EMA            7. log, validate, checkpoint
  4. data in a resumable order

Every random draw of a step (VAE posterior sample, noise, timesteps, reference dropout) comes from
one seeded CPU generator per process whose state is checkpointed, and the data order is a seeded
permutation per epoch, so a resumed run continues with exactly the batches and noise the
uninterrupted run would have used.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from serialgen.training.common.checkpointing import check_model_config, load_checkpoint, save_checkpoint
from serialgen.training.common.config import config_to_dict, override
from serialgen.training.common.resumable_data import DataPosition, ResumableBatches
from serialgen.training.common.run_folder import latest_checkpoint, rotate_checkpoints
from serialgen.training.common.run_log import MetricsLogger, Throughput, plot_loss_curve, save_image_grid, to_uint8_image
from serialgen.training.stage1.components import Stage1Components, build_components, inference_scheduler
from serialgen.training.stage1.config import Stage1Config, check_model_paths, check_training_data
from serialgen.training.stage1.data import batch_to_device, canonical_pose_map, collate_stage1, open_stage1_dataset
from serialgen.training.stage1.model import clip_image_embeds, encode_latents
from serialgen.training.stage1.pipeline import StandardizePipeline

__all__ = ["TrainResult", "train_stage1", "diffusion_loss"]


@dataclass
class TrainResult:
    output_dir: Path
    first_step: int  # the first optimizer step this call ran (1, or the resumed step + 1)
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss over its micro-batches
    seconds_per_step: float = 0.0
    last_checkpoint: Path | None = None


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: float | None) -> torch.Tensor:
    """MSE between prediction and target (eq. 2), optionally min-SNR-gamma weighted per sample
    (Hang et al. 2023; weight min(SNR, gamma)/SNR for epsilon, /(SNR+1) for v; SNR 0 -> weight 1)."""
    if min_snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = torch.where(snr > 0, clipped / snr.clamp(min=1e-12), torch.ones_like(snr))
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def _make_accelerator(config: Stage1Config, output_dir: Path):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.train.ddp_find_unused_parameters)],
    )


def _encode_batch(batch, parts: Stage1Components, generator: torch.Generator, weight_dtype):
    """Frozen encoders: target latents (posterior sample), reference latents (mode), CLIP embeddings.
    `batch` is on the device already, in the model's ranges."""
    std = batch["std"].to(weight_dtype)
    ref = batch["ref"].to(weight_dtype)
    # posterior noise comes from the run's CPU generator, so it is the same on every device
    target_latents = encode_latents(parts.vae, std, generator=generator, sample=True)
    ref_latents = encode_latents(parts.vae, ref)
    embeds = clip_image_embeds(parts.image_encoder, ref)
    return target_latents, ref_latents, embeds


def _drop_estimates(batch: dict, config: Stage1Config, generator: torch.Generator) -> dict:
    """Per sample, with `train.mask_dropout` / `train.pose_dropout`: the reference's background mask or
    pose map becomes zeros, as for a picture whose mask or pose could not be estimated. No draw is
    made for a rate of 0, so runs without it keep the random stream of earlier releases."""
    out = dict(batch)
    for key, rate in (("ref_mask", config.train.mask_dropout), ("ref_pose", config.train.pose_dropout)):
        if rate:
            keep = (torch.rand(out[key].shape[0], generator=generator) >= rate).to(out[key].device)
            out[key] = out[key] * keep.to(out[key].dtype)[:, None, None, None]
    return out


def _noise(latents: torch.Tensor, parts: Stage1Components, config: Stage1Config, generator: torch.Generator):
    """Noisy latents, timesteps, the regression target and the reference-dropout mask."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if config.train.noise_offset:
        noise = noise + config.train.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    use_reference = torch.rand(b, generator=generator) >= config.train.reference_dropout
    noise, timesteps, use_reference = noise.to(latents.device), timesteps.to(latents.device), use_reference.to(latents.device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    if config.train.prediction_type == "v_prediction":
        target = parts.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target, use_reference


@torch.no_grad()
def _validate(step: int, model, parts: Stage1Components, config: Stage1Config, val_batch, output_dir: Path, logger, ema):
    """Grid of (reference | predicted standard | target) rows -> validation/step-XXXXXXXX.png."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:  # validate with the EMA weights, then put the training weights back
        ema.store(trainable)
        ema.copy_to(trainable)
    was_training = model.training
    model.eval()
    pipe = StandardizePipeline(model, parts.vae, parts.image_encoder, inference_scheduler(parts.noise_scheduler),
                               num_inference_steps=config.inference.num_inference_steps,
                               guidance_scale=config.inference.guidance_scale, resolution=config.data.resolution)
    pred = pipe(val_batch["ref"], val_batch["ref_mask"], val_batch["ref_pose"], val_batch["std_pose"],
                generator=torch.Generator().manual_seed(config.seed))
    rows = [[to_uint8_image(val_batch["ref"][i]), to_uint8_image(pred[i], (0, 1)), to_uint8_image(val_batch["std"][i])]
            for i in range(pred.shape[0])]
    grid = save_image_grid(rows, output_dir / "validation" / f"step-{step:08d}.png")
    if logger is not None:
        logger.log_image("validation/ref_pred_target", grid, step)
    model.train(was_training)
    if ema is not None:
        ema.restore(trainable)


def train_stage1(config: Stage1Config, *, output_dir: str | Path | None = None, max_steps: int | None = None,
                 train_shards: str | None = None, resume: str = "auto", stop_after: int | None = None,
                 progress: bool = False) -> TrainResult:
    """Train (or resume) Stage I. `resume`: "auto" (latest checkpoint in the output folder, if any),
    "never", or a checkpoint path. `stop_after`: return after that many optimizer steps of this call
    (to simulate an interruption; the schedule still targets `max_steps`). `progress`: a progress bar
    (loss, steps/s, ETA) on the main process. `config` is not changed: `output_dir`, `max_steps` and
    `train_shards` make a new config, the one saved with the checkpoints."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    changes = {"output_dir": None if output_dir is None else str(output_dir), "train.max_steps": max_steps,
               "data.train_shards": train_shards}
    config = override(config, {k: v for k, v in changes.items() if v is not None})
    t, v = config.train, config.validation
    check_training_data(config)
    output_dir = Path(config.output_dir)
    check_model_paths(config)  # before anything heavy

    # 1. Accelerator, seeds, output folder
    accelerator = _make_accelerator(config, output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 2. Networks (VAE and CLIP frozen, in the compute dtype; trainable weights stay fp32 under autocast)
    parts = build_components(config)
    model = parts.model.train()
    for frozen in (parts.vae, parts.image_encoder):
        frozen.to(accelerator.device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # 3. Optimizer, LR schedule, EMA
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    ema = EMAModel(trainable, decay=t.ema_decay) if t.ema else None

    # 4. Data in a resumable order. The validation batch is fixed (from the validation set or the first
    #    training samples).
    d = config.data
    train_set = open_stage1_dataset(d.train_shards, resolution=d.resolution, seed=config.seed, split="train",
                                    infinite=True, backgrounds=d.backgrounds, epoch_length=d.epoch_length,
                                    canonical_share=d.canonical_share, estimated_share=d.estimated_share,
                                    annotations=d.annotations)
    val_batch = None
    if v.every and v.num_references:
        val_source = open_stage1_dataset(d.val_shards, resolution=d.resolution, seed=config.seed, split="test",
                                         backgrounds=d.backgrounds) if d.val_shards else train_set
        val_batch = collate_stage1([val_source[i] for i in range(min(v.num_references, len(val_source)))]) \
            if hasattr(val_source, "__len__") else collate_stage1(list(_take(val_source, v.num_references)))
        val_batch = batch_to_device(val_batch, "cpu")  # model ranges; the pipeline moves it
    # What inference on a picture uses: the reference figure's canonical map at the model's size
    # (never a training sample's own map, which for a chibi is a small figure).
    canonical_pose = {"std_pose": canonical_pose_map(d.resolution)}

    # 5. Prepare, then resume (the EMA is placed on the device first: loading keeps each shadow
    #    weight where the EMA lives)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.to(accelerator.device)
    step, position = 0, DataPosition()
    checkpoint = None if resume == "never" else (latest_checkpoint(output_dir) if resume == "auto" else Path(resume))
    if checkpoint is not None:
        check_model_config(checkpoint, unwrapped.model_config())
        state = load_checkpoint(checkpoint, unwrapped, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                                generators={"train": generator}, rank=rank)
        step, position = state["step"], DataPosition.from_dict(state["data"])
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    batches = iter(ResumableBatches.for_dataset(train_set, t.batch_size, seed=config.seed, position=position,
                                                collate_fn=collate_stage1, num_workers=config.data.num_workers,
                                                rank=rank, world_size=world))
    logger = MetricsLogger(output_dir, resume_step=step, tensorboard=t.tensorboard) if accelerator.is_main_process else None
    result = TrainResult(output_dir=output_dir, first_step=step + 1, last_step=step)

    def save(at_step: int) -> Path:
        path = save_checkpoint(output_dir, at_step, unwrapped, train_state={"data": position.to_dict()},
                               config=config_to_dict(config), optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                               generators={"train": generator}, extra_tensors={"canonical_pose": canonical_pose},
                               model_config=unwrapped.model_config(), rank=rank,
                               is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            rotate_checkpoints(output_dir, t.keep_checkpoints)
            plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss.png", title=f"Stage I, {output_dir.name}")
        return path

    # 6. Training loop: one optimizer step = gradient_accumulation_steps micro-batches
    throughput, window, started, steps_run = Throughput(), [], time.perf_counter(), 0
    bar = tqdm(total=t.max_steps, initial=step, desc="stage1", unit="step", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    while step < t.max_steps and (stop_after is None or steps_run < stop_after):
        micro_losses = []
        for _ in range(t.gradient_accumulation_steps):
            position, batch = next(batches)
            with accelerator.accumulate(model):
                batch = _drop_estimates(batch_to_device(batch, accelerator.device), config, generator)
                target_latents, ref_latents, embeds = _encode_batch(batch, parts, generator, weight_dtype)
                noisy, timesteps, target, use_reference = _noise(target_latents, parts, config, generator)
                with accelerator.autocast():
                    pred = model(noisy, timesteps, ref_latents, embeds, batch["std_pose"].to(weight_dtype),
                                 batch["ref_pose"].to(weight_dtype), batch["ref_mask"].to(weight_dtype), use_reference)
                loss = diffusion_loss(pred, target, timesteps, parts.noise_scheduler, t.min_snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(accelerator.gather(loss.detach()).mean().item())
            throughput.add(batch["ref"].shape[0] * world)
        lr_scheduler.step()
        if ema is not None:
            ema.step(trainable)
        step += 1
        steps_run += 1
        step_loss = sum(micro_losses) / len(micro_losses)
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {step}; lower train.learning_rate or check the data")
        result.losses[step] = step_loss
        window.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)

        # 7. Log, validate, checkpoint
        if logger is not None and (step % t.log_every == 0 or step == t.max_steps):
            logger.log(step, loss=sum(window) / len(window), lr=lr_scheduler.get_last_lr()[0],
                       samples_per_s=throughput.rate(), epoch=position.epoch)
            window = []
        if accelerator.is_main_process and val_batch is not None and (step % v.every == 0 or step == t.max_steps):
            _validate(step, unwrapped, parts, config, val_batch, output_dir, logger, ema)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
            result.last_checkpoint = save(step)
    bar.close()
    accelerator.wait_for_everyone()
    result.last_step = step
    result.seconds_per_step = (time.perf_counter() - started) / max(steps_run, 1)
    if logger is not None:
        logger.close()
    accelerator.end_training()
    return result


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            break
        yield item
