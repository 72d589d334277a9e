"""Stage II commands: `serialgen train stage2`, `serialgen generate`, `serialgen eval personalization`, and
`serialgen pairs one-stage` (the paper's pairs for the paired one-stage baseline, `register_pairs`).

Pair building (Stage I over real pictures) is `serialgen pairs build`: :mod:`serialgen.training.stage2.cli_pairs`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from serialgen.errors import UserInputError
from serialgen.resolution import add_renamed_flags, add_resolution_argument
from serialgen.argtypes import positive_int
from serialgen.training.stage2.config import MODES

__all__ = ["register"]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _train(args: argparse.Namespace) -> int:
    from serialgen.training.common.config import override
    from serialgen.training.common.run_folder import finished_message, latest_checkpoint
    from serialgen.training.stage2.config import check_model_paths, check_pair_sets, check_resume, load_stage2_config

    # Everything a user can get wrong is checked here, before torch is imported (a second, not 6-17).
    overrides = list(args.set or [])
    if args.mode:
        overrides.append(f"mode={args.mode}")
    config = load_stage2_config(args.config, overrides)
    changes = {"output_dir": args.output_dir, "train.max_steps": args.max_steps}
    config = override(config, {k: v for k, v in changes.items() if v is not None})
    check_model_paths(config.model)
    check_pair_sets(config)
    latest = latest_checkpoint(config.output_dir)
    if latest is not None:
        check_resume(latest, config)
    done = finished_message(config.output_dir, config.train.max_steps)
    if done:
        print(done)
        return 0

    from serialgen.training.common.quiet import filter_library_warnings
    filter_library_warnings()
    from serialgen.training.stage2.train import train_stage2

    summary = train_stage2(config, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per run, not per process
        print(json.dumps(summary, indent=1))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from serialgen.training.common.quiet import filter_library_warnings
    from serialgen.training.stage1.reference_inputs import reference_options
    from serialgen.training.stage2.generate import check_standardizer, generate_series

    check_standardizer(args.standardizer)
    filter_library_warnings()
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise UserInputError(f"--prompts-file: {f} not found")
        prompts += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    record = generate_series(
        ref=args.ref, prompts=prompts, out=args.out, adapter=args.adapter, standardizer=args.standardizer,
        num_seeds=args.num_seeds, first_seed=args.first_seed, resolution=args.resolution, steps=args.steps,
        guidance_scale=args.guidance, ip_scale=args.ip_scale, negative_prompt=args.negative_prompt,
        sdxl=args.sdxl, image_encoder=args.image_encoder, vae=args.vae, device=_device(args.device),
        progress=not args.no_progress, reference_options=reference_options(args),
    )
    print(f"{len(record['images'])} images ({len(record['prompts'])} prompts x {len(record['seeds'])} seeds) "
          f"-> {args.out} (grid.png, series.json); standardizer: {record['standardizer']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from serialgen.training.common.quiet import filter_library_warnings

    filter_library_warnings()
    from serialgen.training.stage2.evaluate import (
        ArcFaceOnnx,
        ClipScorer,
        evaluate_outputs,
        format_table,
        make_segmenter,
    )

    if bool(args.face_det) != bool(args.face_rec):
        raise UserInputError("--face-det and --face-rec go together (SCRFD det_10g.onnx and ArcFace w600k_r50.onnx)")
    segmenter = make_segmenter(args.segmenter)
    faces = ArcFaceOnnx(args.face_det, args.face_rec) if args.face_det else None
    clip = ClipScorer(args.clip, device=_device(args.device))
    result = evaluate_outputs(args.outputs, args.refs or [], clip, segmenter, faces=faces, ap_pairs=args.ap_pairs)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "series"} | {
            "series": [{k: v for k, v in s.items() if k != "per_image"} for s in result["series"]]}, indent=1))
    else:
        print(format_table(result))
    return 0


def _one_stage_pairs(args: argparse.Namespace) -> int:
    from serialgen.training.common.quiet import filter_library_warnings
    from serialgen.training.stage2.one_stage_pairs import build_one_stage_pairs

    if not Path(args.pairs).exists():
        raise UserInputError(f"--pairs {args.pairs}: not found; expected a pair set from `serialgen pairs build`")
    filter_library_warnings()
    summary = build_one_stage_pairs(
        args.pairs, args.adapter, args.out, prompts=args.prompts, seed=args.seed, resolution=args.resolution,
        steps=args.steps, guidance_scale=args.guidance, ip_scale=args.ip_scale, sdxl=args.sdxl,
        image_encoder=args.image_encoder, vae=args.vae, device=_device(args.device), limit=args.limit,
        progress=not (args.json or args.no_progress))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"one-stage pairs: {summary['pairs']} in {summary['shards']} shards at {summary['out']} "
              f"({summary['built_now']} built now, {summary['shards_kept']} shards kept)")
    return 0


def _register_pairs(groups) -> None:
    """`serialgen pairs one-stage` (the `pairs` group also holds `pairs build`, from cli_pairs)."""
    p = groups["pairs"].add_parser(
        "one-stage", help="the paper's pairs for the paired one-stage baseline, generated by the two-stage model",
        description="For each pair of a two-stage pair set, generate a target with the trained two-stage model "
        "(its standardized reference, a prompt) and write a pair set whose reference (alt_ref.jpg) is the original, "
        "unstandardized image: the paper's paired one-stage construction (Table 2). Train it with "
        "`serialgen train stage2 --mode paired-one-stage --set data.pairs=[OUT]`. Re-running finishes what is missing.")
    p.add_argument("--pairs", required=True, help="a two-stage pair set (from `serialgen pairs build`)")
    p.add_argument("--adapter", required=True,
                   help="the trained two-stage model: a Stage II run or checkpoint folder (mode two-stage)")
    p.add_argument("--out", required=True, help="output folder for the new pair set")
    p.add_argument("--prompts", choices=("shuffled", "own"), default="shuffled",
                   help="prompt of each generated target: another pair's caption by a seeded permutation (default "
                   "shuffled: the character in another scene), or the pair's own caption")
    add_resolution_argument(p, default=None, multiple_of=8,
                            help="generated size (default: the adapter's training data.resolution, else 512x768)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: the adapter config's, else 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the adapter config's, else 7.5)")
    p.add_argument("--ip-scale", type=float, help="IP-Adapter scale (default: the adapter config's, else 1.0)")
    p.add_argument("--sdxl", help="SDXL folder (default: from the adapter's training config)")
    p.add_argument("--image-encoder", help="CLIP vision folder (default: from the adapter's training config)")
    p.add_argument("--vae", help="replacement VAE folder (default: the adapter config's model.vae, else SDXL's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and of each pair's sampling (default 0)")
    p.add_argument("--limit", type=positive_int, help="only the first N pairs (default: all)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (and no progress bar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_one_stage_pairs)


def register(sub, groups) -> None:
    """Add `train stage2`, `eval personalization` and the top-level `generate`."""
    p = groups["train"].add_parser(
        "stage2", help="train the Stage II IP-Adapter (SDXL) on pair shards",
        description="Train (or resume, when --output-dir holds checkpoints) IP-Adapter Full on a frozen SDXL. "
        "Multi-GPU: `accelerate launch --num_processes N -m serialgen.cli train stage2 --config C`.",
    )
    p.add_argument("--config", required=True, help="YAML config path, or a packaged name: stage2, stage2-tiny")
    p.add_argument("--output-dir", help="run folder: checkpoints/, metrics.jsonl, loss.png, tensorboard/, validation/ "
                   "(default: the config's output_dir)")
    p.add_argument("--max-steps", type=positive_int,
                   help="optimizer steps in total, counting those already done (default: the config's train.max_steps)")
    p.add_argument("--mode", choices=MODES,
                   help="reference used in training (default: the config's mode, two-stage; the other two are the "
                   "Table 2 baselines)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=2e-5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (loss, steps/s, time left)")
    add_renamed_flags(p, {"--quiet": "--no-progress"})
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "generate", help="two-stage generation: standardize a reference, then a series of images",
        description="Standardize the reference once (Stage I), then generate one image per prompt x seed with "
        "SDXL + the trained IP-Adapter (DDIM). Writes the images, grid.png and series.json to --out.",
    )
    p.add_argument("--standardizer", required=True,
                   help="Stage I checkpoint folder; 'identity' (no standardization, letterbox only: a labelled stand-in); "
                   "'none' (raw reference: the one-stage baselines); or module:function")
    p.add_argument("--adapter", required=True, help="ip_adapter.safetensors, or a Stage II run / checkpoint folder holding one")
    p.add_argument("--ref", required=True, help="reference image")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; at least one here or in --prompts-file)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--num-seeds", type=positive_int, default=4,
                   help="images per prompt: seeds first-seed .. first-seed+N-1 (default 4)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    add_renamed_flags(p, {"--seeds": "--num-seeds N (images per prompt)", "--quiet": "--no-progress"})
    p.add_argument("--out", required=True, help="output folder")
    add_resolution_argument(p, default=None, multiple_of=8,
                            help="image size (default: the adapter's training data.resolution, else 512x768)")
    p.add_argument("--steps", type=positive_int,
                   help="DDIM steps (default: the adapter config's inference.num_inference_steps, else 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the adapter config's, else 7.5)")
    p.add_argument("--ip-scale", type=float, help="IP-Adapter scale, 0 = text only (default: the adapter config's, else 1.0)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default '': what text dropout trained)")
    p.add_argument("--sdxl", help="SDXL folder (default: from the adapter's training config)")
    p.add_argument("--image-encoder", help="CLIP vision folder (default: from the adapter's training config)")
    p.add_argument("--vae", help="replacement VAE folder (default: the adapter config's model.vae, else SDXL's own)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from serialgen.training.stage1.reference_inputs import add_reference_arguments

    add_reference_arguments(p)  # a Stage I standardizer's reference mask and pose, as in `standardize`
    p.set_defaults(handler=_generate)

    p = groups["eval"].add_parser(
        "personalization", help="CLIP-I, CLIP-T, AP-CLIP-I, Face Sim of generated series",
        description="Score series written by `serialgen generate` (paper Tables 1, 2, 4). CLIP-I/T and AP-CLIP-I "
        "x100; Face Sim as a cosine. Backgrounds are removed before CLIP-I / AP-CLIP-I.",
    )
    p.add_argument("--outputs", nargs="+", required=True, help="series folders, or folders holding series folders")
    p.add_argument("--refs", nargs="*", help="reference images or folders (default: the paths in series.json)")
    p.add_argument("--clip", required=True, help="local transformers CLIP folder (e.g. clip-vit-large-patch14)")
    p.add_argument("--segmenter", default="white", help="white[:T] (default), masks:DIR, rembg:MODEL.onnx")
    p.add_argument("--face-det", help="SCRFD detector ONNX (insightface det_10g.onnx); enables Face Sim")
    p.add_argument("--face-rec", help="ArcFace recognition ONNX (insightface w600k_r50.onnx)")
    p.add_argument("--ap-pairs", choices=("cross-prompt", "all"), default="cross-prompt",
                   help="AP-CLIP-I over pairs from different prompts (default) or all pairs")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", help="also write the full JSON (per-image scores) to this file")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.set_defaults(handler=_eval)
    _register_pairs(groups)
