"""Stage I commands: `serialgen train stage1`, `serialgen standardize`, `serialgen eval standardization`.

Pair building for Stage II (Stage I over real pictures) is its own command, `serialgen pairs build`
(:mod:`serialgen.training.stage2.cli_pairs`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serialgen.errors import UserInputError
from serialgen.resolution import add_renamed_flags, add_resolution_argument
from serialgen.argtypes import positive_int
from serialgen.training.stage1.config import INFERENCE_DTYPES

__all__ = ["register"]


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _train(args: argparse.Namespace) -> int:
    from serialgen.training.common.config import override
    from serialgen.training.common.run_folder import finished_message, require_checkpoint
    from serialgen.training.stage1.config import check_model_paths, check_training_data, load_stage1_config

    # Everything a user can get wrong is checked here, before torch is imported (a second, not 6-17).
    overrides = list(args.set or [])
    if args.no_fbdm:
        overrides.append("model.fbdm=false")
    if args.no_rpim:
        overrides.append("model.rpim=false")
    config = load_stage1_config(args.config, overrides)
    changes = {"output_dir": args.output_dir, "train.max_steps": args.max_steps,
               "data.train_shards": args.train_shards, "data.backgrounds": args.backgrounds}
    config = override(config, {k: v for k, v in changes.items() if v is not None})
    check_model_paths(config)
    check_training_data(config)
    if args.resume == "auto":
        done = finished_message(config.output_dir, config.train.max_steps)
        if done:
            print(done)
            return 0
    elif args.resume != "never":
        require_checkpoint(args.resume)

    from serialgen.training.common.quiet import filter_library_warnings
    filter_library_warnings()
    from serialgen.training.stage1.train import train_stage1

    result = train_stage1(config, resume=args.resume, progress=not args.no_progress)
    losses = list(result.losses.values())
    summary = {
        "output_dir": str(result.output_dir),
        "steps": [result.first_step, result.last_step],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds_per_step": round(result.seconds_per_step, 4),
        "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _is_shard_input(value: str) -> bool:
    """synthetic:N, a .tar, a brace pattern, an index.json, or a folder of shards (index.json, *.tar, <split>/*.tar)."""
    path = Path(value)
    if value.startswith("synthetic:") or path.suffix in (".tar", ".json") or "{" in value:
        return True
    return path.is_dir() and ((path / "index.json").is_file() or any(path.glob("*.tar")) or any(path.glob("*/*.tar")))


def _standardize(args: argparse.Namespace) -> int:
    from serialgen.training.common.quiet import filter_library_warnings

    if not Path(args.checkpoint).is_dir():
        raise UserInputError(f"{args.checkpoint}: checkpoint folder not found")
    filter_library_warnings()
    import torch
    from PIL import Image

    from serialgen.training.common.run_log import to_uint8_image
    from serialgen.training.stage1.data import batch_to_device, open_stage1_dataset
    from serialgen.training.stage1.pipeline import StandardizePipeline, inference_dtype
    from serialgen.training.stage1.reference_inputs import (
        ReferencePreparer,
        list_images,
        load_reference,
        reference_options,
    )

    device = _device(args.device)
    pipe = StandardizePipeline.from_checkpoint(args.checkpoint, device=device, dtype=inference_dtype(args.dtype, device),
                                               num_inference_steps=args.steps, guidance_scale=args.guidance,
                                               resolution=args.resolution)
    resolution = pipe.resolution
    std_pose = None
    if args.std_pose:
        std_pose = load_reference(args.std_pose, resolution)["ref"].add(1).div(2)  # pose map as drawn, [0, 1]

    out = Path(args.out)
    single_file = out.suffix.lower() == ".png"
    # inputs: our own shards (exact mask and keypoints, and each character's own standard pose map,
    # as in training and eval) or pictures (the checkpoint's canonical map)
    from_shards = _is_shard_input(args.input)
    if from_shards:
        if single_file:
            raise UserInputError(f"--out {out}: a shard input gives many images; pass a folder")
        dataset = open_stage1_dataset(args.input, resolution=resolution, seed=args.seed, split=args.split,
                                      backgrounds=args.backgrounds)
        samples = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
        items = ((s.get("__key__") or f"sample-{i:06d}", batch_to_device(s, "cpu")) for i, s in enumerate(samples))
    else:
        prepare = ReferencePreparer(**reference_options(args))  # the person estimator by default (--mask/--pose)
        pictures = list_images(args.input)
        if single_file and len(pictures) > 1:
            raise UserInputError(f"--out {out}: {args.input} holds {len(pictures)} images; pass a folder")
        items = ((p.stem, prepare(p, resolution)) for p in pictures)
    (out.parent if single_file else out).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    written = 0
    batch: list[tuple[str, dict]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        refs = torch.stack([s["ref"] for _, s in batch])
        masks = torch.stack([s["ref_mask"] for _, s in batch])
        poses = torch.stack([s["ref_pose"] for _, s in batch])
        target_pose = std_pose
        if target_pose is None and from_shards:
            target_pose = torch.stack([s["std_pose"] for _, s in batch])
        images = pipe(refs, masks, poses, target_pose, generator=generator)
        for (name, _), image in zip(batch, images):
            target = out if single_file else out / f"{name}.png"
            Image.fromarray(to_uint8_image(image, (0, 1))).save(target)
            written += 1
        batch.clear()

    for name, sample in items:
        batch.append((name, sample))
        if len(batch) == args.batch_size:
            flush()
    flush()
    print(f"standardized {written} image(s) -> {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from serialgen.training.common.quiet import filter_library_warnings

    if not Path(args.checkpoint).is_dir():
        raise UserInputError(f"{args.checkpoint}: checkpoint folder not found")
    filter_library_warnings()
    from serialgen.training.stage1.evaluate import evaluate_standardization, format_table

    summary = evaluate_standardization(args.checkpoint, args.shards, device=_device(args.device), dtype=args.dtype,
                                       batch_size=args.batch_size, max_samples=args.max_samples,
                                       num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                       backgrounds=args.backgrounds, progress=not (args.json or args.no_progress))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    if args.json:
        brief = {k: v for k, v in summary.items() if k != "per_sample"}
        print(json.dumps(brief, indent=2))
    else:
        print(format_table(summary))
    return 0


def register(sub, groups) -> None:
    """Add `train stage1`, `eval standardization` and the top-level `standardize`."""
    p = groups["train"].add_parser(
        "stage1", help="train the Stage I standardization model",
        description="Train (or resume) the Stage I standardization model on accelerate. Re-running the same "
        "command resumes from the latest checkpoint; a finished run says there is nothing to do. Launch multi-GPU "
        "with `accelerate launch -m serialgen.cli train stage1 ...`. Config values not given here come from --config.")
    p.add_argument("--config", required=True, help="YAML config path, or stage1 / stage1-tiny (packaged)")
    p.add_argument("--output-dir", help="run folder: checkpoints/, metrics.jsonl, loss.png, tensorboard/, validation/ "
                   "(default: the config's output_dir)")
    p.add_argument("--max-steps", type=positive_int,
                   help="optimizer steps in total, counting those already done (default: the config's train.max_steps)")
    p.add_argument("--train-shards", help="training shards for the loader, or synthetic:N (default: the config's data.train_shards)")
    p.add_argument("--backgrounds", help="background images to composite the references onto: a folder of images or "
                   "an assets folder (default: the config's data.backgrounds; without any, shard training is refused "
                   "unless data.procedural_backgrounds is true)")
    p.add_argument("--resume", default="auto", help="auto: the latest checkpoint in the output folder, if any (default); "
                   "never: start over; or a checkpoint path")
    p.add_argument("--no-fbdm", action="store_true", help="ablation: no foreground/background tokens")
    p.add_argument("--no-rpim", action="store_true", help="ablation: no reference pose injection")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (loss, steps/s, time left)")
    p.set_defaults(handler=_train)

    p = groups["eval"].add_parser("standardization", help="PSNR/SSIM of Stage I on the held-out split",
                                  description="Standardize the test split of a shard set and score it against the "
                                  "rendered standard images (scikit-image PSNR and SSIM: Gaussian 11x11, sigma 1.5, "
                                  "data range 1). Each sample's target pose map is its character's own, as in training.")
    p.add_argument("--checkpoint", required=True, help="Stage I checkpoint folder (checkpoints/step-N)")
    p.add_argument("--shards", required=True, help="shard set (its test split is used), or synthetic:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table (and no progress bar)")
    p.add_argument("--backgrounds", help="background images to composite the test references onto (default: "
                   "procedural colour fields)")
    p.add_argument("--out", help="also write the full JSON (with per-sample scores) to this file")
    p.add_argument("--max-samples", type=positive_int, help="stop after this many samples (default: the whole split)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per model call (default 4)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: the checkpoint config's, 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint config's)")
    p.add_argument("--dtype", choices=("auto", *INFERENCE_DTYPES), default="auto",
                   help="weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("standardize", help="Stage I inference: reference image(s) -> standard form",
                       description="Standardize pictures (a file or a folder; padded to the model's size) or the "
                       "samples of our own shards (exact masks and keypoints). Writes one PNG per input.")
    p.add_argument("--checkpoint", required=True, help="Stage I checkpoint folder")
    p.add_argument("--input", required=True, help="image file, folder of images, shard set (.tar / folder with index.json) or synthetic:N")
    p.add_argument("--out", required=True, help="output folder (or a .png path for a single input)")
    p.add_argument("--split", default="test", help="shard split to read when --input is a shard set (default test)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per model call (default 4)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: the checkpoint config's, 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint config's)")
    p.add_argument("--dtype", choices=("auto", *INFERENCE_DTYPES), default="auto",
                   help="weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    add_resolution_argument(p, default=None, multiple_of=8,
                            help="model input size (default: the checkpoint config's data.resolution)")
    p.add_argument("--std-pose", help="target pose map image (default: pictures get the reference figure's canonical "
                   "map stored in the checkpoint; shard samples their character's own)")
    from serialgen.training.stage1.reference_inputs import add_reference_arguments

    add_reference_arguments(p)  # --mask, --pose, --white-threshold, --dwpose-det, --dwpose-pose
    add_renamed_flags(p, {"--pairs": "serialgen pairs build (pair building is its own command)"})
    p.add_argument("--backgrounds", help="shard input: background images to composite the references onto "
                   "(default: procedural colour fields)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.set_defaults(handler=_standardize)
