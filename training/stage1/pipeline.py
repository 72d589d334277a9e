"""Stage I inference: reference image (+ background mask + pose map) -> its standard form.

`StandardizePipeline` is reusable outside the CLI:

    pipe = StandardizePipeline.from_checkpoint("runs/stage1/checkpoints/step-00050000", device="cuda")
    images = pipe(refs, masks, poses)          # (B, 3, H, W) in [0, 1]

Stage II's pair building and `serialgen generate` run it on prepared pictures
(:class:`serialgen.training.stage2.build_pairs.CheckpointStandardizer`).

The reference UNet runs ONCE per call (its bank is reused by all DDIM steps) and only for the
conditional inputs; classifier-free guidance batches [unconditional ; conditional] through the
denoiser, where the unconditional half has its reference keys masked out and a zero CLIP
embedding (exactly what reference dropout trained).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION
from serialgen.training.common.checkpointing import check_model_config, load_trainable_weights
from serialgen.training.common.run_folder import read_checkpoint_config
from serialgen.training.stage1.model import clip_image_embeds, decode_latents, encode_latents

__all__ = ["StandardizePipeline", "inference_dtype"]


def inference_dtype(name: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The weights' dtype for inference: ``fp32``/``bf16``/``fp16`` (or a torch dtype); None or
    ``auto``: bf16 on CUDA (the networks trained under bf16 autocast), fp32 elsewhere (on our CPU,
    which has bf16 matrix units, bf16 ran the tiny models at 0.75-0.84x fp32's speed: docs/stage1.md)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    from serialgen.training.stage1.config import INFERENCE_DTYPES

    if name not in INFERENCE_DTYPES:
        raise UserInputError(f"--dtype {name}: expected auto, {', '.join(INFERENCE_DTYPES)}")
    return getattr(torch, INFERENCE_DTYPES[name])


class StandardizePipeline:
    """DDIM sampling of the standardization model with classifier-free guidance on the reference."""

    def __init__(self, model, vae, image_encoder, scheduler, *, canonical_pose: torch.Tensor | None = None,
                 num_inference_steps: int = 20, guidance_scale: float = 3.5,
                 resolution: tuple[int, int] = DEFAULT_RESOLUTION, config=None):
        self.model, self.vae, self.image_encoder, self.scheduler = model, vae, image_encoder, scheduler
        self.canonical_pose = canonical_pose
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.resolution = tuple(resolution)  # (width, height) of the inputs it expects
        self.config = config

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, use_ema: bool = True, **overrides) -> "StandardizePipeline":
        """Rebuild the networks from the checkpoint's config.yaml (old key names are translated, with a
        notice), then load its trained weights (the EMA weights when the run had EMA and `use_ema`).
        `overrides`: num_inference_steps, guidance_scale, resolution (None: the checkpoint config's)."""
        from serialgen.training.common.config import config_from_dict, override
        from serialgen.training.stage1.components import build_components, inference_scheduler
        from serialgen.training.stage1.config import Stage1Config

        checkpoint = Path(checkpoint)
        config = config_from_dict(Stage1Config, read_checkpoint_config(checkpoint), source=str(checkpoint / "config.yaml"))
        config = override(config, {"train.gradient_checkpointing": False})
        parts = build_components(config)
        check_model_config(checkpoint, parts.model.model_config())
        load_trainable_weights(parts.model, checkpoint, ema=use_ema and (checkpoint / "ema.safetensors").is_file())
        for module in (parts.model, parts.vae, parts.image_encoder):
            module.to(device=device).eval()
            if dtype != torch.float32:
                module.to(dtype=dtype)
        settings = dict(num_inference_steps=config.inference.num_inference_steps,
                        guidance_scale=config.inference.guidance_scale, resolution=config.data.resolution)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        # The canonical target pose for pictures: the map stored with the checkpoint, or, at another
        # size (or for a checkpoint without one), the same reference figure drawn at that size.
        width, height = settings["resolution"]
        canonical = None
        if (checkpoint / "canonical_pose.safetensors").is_file():
            canonical = load_file(str(checkpoint / "canonical_pose.safetensors"))["std_pose"]
        if canonical is None or tuple(canonical.shape[-2:]) != (height, width):
            from serialgen.training.stage1.data import canonical_pose_map

            canonical = canonical_pose_map((width, height))
        return cls(parts.model, parts.vae, parts.image_encoder, inference_scheduler(parts.noise_scheduler),
                   canonical_pose=canonical, config=config, **settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_inputs(self, images, masks, poses, std_pose):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserInputError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h % 8 or w % 8:
            raise UserInputError(f"image size {w}x{h} must be a multiple of 8 (pad the reference first)")
        if masks.shape != (b, 1, h, w) or poses.shape != (b, 3, h, w):
            raise UserInputError(f"masks {tuple(masks.shape)} / poses {tuple(poses.shape)} do not match images {tuple(images.shape)}")
        if std_pose is None:
            raise UserInputError("no target pose: the checkpoint stores no canonical pose map, pass std_pose")
        if std_pose.shape[-2:] != (h, w):
            raise UserInputError(f"target pose map {tuple(std_pose.shape)} does not match images {w}x{h}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, masks: torch.Tensor, poses: torch.Tensor, std_pose: torch.Tensor | None = None,
                 *, generator: torch.Generator | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1]; masks (B, 1, H, W), 1 = background; poses (B, 3, H, W) as the
        loader draws them; std_pose (3, H, W) or (B, 3, H, W), default the checkpoint's canonical map.
        Returns the standardized images (B, 3, H, W) in [0, 1], on CPU as float32."""
        steps = num_inference_steps or self.num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        std_pose = self.canonical_pose if std_pose is None else std_pose
        # 1. Check inputs
        self._check_inputs(images, masks, poses, std_pose)
        device, dtype = self.device, next(self.model.parameters()).dtype
        batch = images.shape[0]
        images, masks, poses = (x.to(device=device, dtype=dtype) for x in (images, masks, poses))
        std_pose = std_pose.to(device=device, dtype=dtype)
        if std_pose.ndim == 3:
            std_pose = std_pose.expand(batch, -1, -1, -1)

        # 2. Encode the reference once: VAE latents, CLIP embedding, reference UNet -> bank
        ref_latents = encode_latents(self.vae, images).to(dtype)
        embeds = clip_image_embeds(self.image_encoder, images).to(dtype)
        bank = self.model.encode_reference(ref_latents, embeds, poses, masks)
        pose_embedding = self.model.pose_embedding(std_pose)

        # 3. Classifier-free guidance: [unconditional ; conditional] in one denoiser batch
        do_cfg = scale > 1.0
        if do_cfg:
            bank = {name: torch.cat([feat, feat]) for name, feat in bank.items()}
            embeds = torch.cat([embeds, embeds])
            pose_embedding = torch.cat([pose_embedding, pose_embedding])
            use_reference = torch.arange(2 * batch, device=device) >= batch
        else:
            use_reference = None

        # 4. Initial noise
        self.scheduler.set_timesteps(steps, device=device)
        shape = ref_latents.shape
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device) * self.scheduler.init_noise_sigma

        # 5. Denoising loop (the bank is not recomputed)
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t).to(dtype)
            timesteps = t.expand(model_input.shape[0]).to(device)
            pred = self.model.denoise(model_input, timesteps, bank, embeds, pose_embedding, use_reference).float()
            if do_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]

        # 6. Decode
        return decode_latents(self.vae, latents).cpu()
