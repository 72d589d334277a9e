"""`serialgen pairs build`: Stage II pair shards from real pictures (:mod:`serialgen.training.stage2.build_pairs`).

Pair building runs Stage I over a corpus of real images, so it shares Stage I's inference options
(``--resolution``, ``--steps``, ``--guidance``, ``--dtype``) and the mask/pose options of
`serialgen standardize` (``--mask``, ``--pose``: here the estimator by default, never a silent
threshold), plus the skip policy and the Ray settings.
"""

from __future__ import annotations

import argparse
import json

from serialgen.argtypes import positive_int
from serialgen.resolution import add_resolution_argument

__all__ = ["register"]

_DTYPES = ("auto", "fp32", "bf16", "fp16")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _build(args: argparse.Namespace) -> int:
    from serialgen.training.stage1.reference_inputs import reference_options
    from serialgen.training.stage2.build_pairs import SkipPolicy, build_pairs

    policy = SkipPolicy(no_person=args.no_person, several_people=args.several_people,
                        min_height=args.min_person_height, min_confidence=args.min_confidence)
    options = {"resolution": args.resolution, "steps": args.steps, "guidance": args.guidance,
               "dtype": args.dtype}
    if args.checkpoint == "identity":
        options = {"resolution": args.resolution}
    report = build_pairs(
        args.input, args.out, standardizer=args.checkpoint, samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        address=args.address, limit=args.limit, seed=args.seed, standardizer_options=options,
        reference_options=reference_options(args), policy=policy, progress=not (args.json or args.no_progress),
    )
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in report["skip_reasons"].items())
    sources = ", ".join(f"{v} x {k}" for k, v in report["sources_built_now"].items())
    print(f"pairs: {report['pairs']} in {report['shards']} shards at {report['out']} ({report['shards_built']} built now, "
          f"{report['shards_kept']} kept); {report['skipped']} of {report['inputs']} inputs skipped "
          f"({100 * report['skip_rate']:.1f}%{': ' + reasons if reasons else ''})")
    if sources:
        print(f"new pairs' references: {sources}")
    print(f"{report['pairs_per_s']} pairs/s; standardizer {report['standardizer']}")
    return 0


def register(sub, groups) -> None:
    """Add `serialgen pairs build`."""
    from serialgen.training.stage1.reference_inputs import add_reference_arguments

    p = groups["pairs"].add_parser(
        "build", help="standardize a corpus of real pictures with Stage I into pair shards (Ray Data, resumable)",
        description="Run a Stage I checkpoint over real pictures (a folder, recursive, or WebDataset .tar shards) and "
        "write (standardized reference, target) pair shards: std_ref.png, target.jpg, caption.txt, meta.json (with "
        "mask_source, pose_source and the person estimate). Pictures where the estimator finds no person, several "
        "people or a too small one are skipped with a reason (--no-person, --several-people, --min-person-height). "
        "Re-running finishes what is missing.")
    p.add_argument("--checkpoint", required=True,
                   help="Stage I checkpoint folder; 'identity' (no standardization: letterbox only, a labelled stand-in); "
                   "or module:function returning a standardizer")
    p.add_argument("--input", required=True, help="folder of images (captions from NAME.txt / NAME.json, identity from "
                   "the subfolder) or WebDataset .tar shards")
    p.add_argument("--out", required=True, help="output folder (pairs-NNNNNN.tar, index.json, plan.json)")
    add_resolution_argument(p, default=None, multiple_of=8,
                            help="model input size (default: the checkpoint config's data.resolution; identity: 512x768)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (default: the checkpoint config's, 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint config's)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="Stage I weights' dtype: auto (default: bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    add_reference_arguments(p, default="estimator")
    g = p.add_argument_group("skip policy (checked on the person estimate; the report counts each reason)")
    g.add_argument("--no-person", choices=("skip", "keep"), default="skip",
                   help="no person found: skip (default), or keep with Stage I's no-estimate inputs (zero mask, black "
                   "pose; meta says mask_source/pose_source none). Stylised characters are often not found")
    g.add_argument("--several-people", choices=("skip", "keep"), default="skip",
                   help="more than one face of comparable size: skip (default) or keep (the estimate follows one person)")
    g.add_argument("--min-person-height", type=_fraction, default=0.2,
                   help="skip a person whose box is shorter than this fraction of the picture (default 0.2; 0: off)")
    g.add_argument("--min-confidence", type=_fraction, default=0.6,
                   help="skip a pose estimate whose confidence (mean visibility of the body keypoints in the picture) is "
                   "below this (default 0.6; 0: off)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pictures per Stage I call (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; a rebuilt shard is identical)")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000, help="inputs per pair shard (default 1000)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="standardizer actors (default: 1, or one per GPU with --gpus-per-worker)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor on a cluster (default 0: CPU)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: a local one on 127.0.0.1)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N inputs, sorted (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_build)
