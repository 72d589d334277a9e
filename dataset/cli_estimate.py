"""`serialgen estimator setup` and `serialgen shards annotate`: the person estimator's commands.

`estimator setup` creates the estimator's own venv (MediaPipe 0.10.21 and its pinned requirements,
from PyPI; :mod:`serialgen.dataset.person_estimate`). `shards annotate` runs the estimator once per
rendered sample (:mod:`serialgen.dataset.annotations`): the annotation set the loader mixes in
(``LoaderConfig.estimated_share``) and the estimator's quality against the exact masks and keypoints.
"""

from __future__ import annotations

import argparse

from serialgen.argtypes import positive_int
import json
import sys

__all__ = ["register"]


def _setup(args: argparse.Namespace) -> int:
    from serialgen.dataset.person_estimate import estimator_python, setup_estimator_venv

    ready = estimator_python(args.venv)
    if ready is not None and not args.json:
        print(f"estimator ready: {ready}")
        return 0
    python = setup_estimator_venv(args.venv, log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps({"python": str(python)}) if args.json else f"estimator ready: {python}")
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from serialgen.dataset.annotations import annotate_shards, format_quality

    report = annotate_shards(args.shards, args.out, backgrounds=args.backgrounds, workers=args.workers,
                             address=args.address, limit_per_shard=args.limit_per_shard,
                             progress=not (args.json or args.no_progress))
    print(json.dumps(report, indent=1) if args.json else format_quality(report))
    return 0


def register(sub, groups) -> None:
    """Add `serialgen estimator setup` and `serialgen shards annotate`."""
    group = sub.add_parser("estimator", help="the person estimator (mask and keypoints of real pictures)",
                           description="The person estimator: MediaPipe 0.10.21 in its own venv (its models ship in "
                           "its wheel; nothing is downloaded at run time).")
    estimator = group.add_subparsers(dest="estimator_command", metavar="COMMAND")
    group.set_defaults(_group_parser=group)
    p = estimator.add_parser("setup", help="create the estimator's venv (about a minute, ~1 GB from PyPI; once per machine)",
                             description="Create (or repair) the estimator's venv: mediapipe==0.10.21 and its pinned "
                             "requirements, installed by pip from PyPI. Default place: $SERIALGEN_ESTIMATOR_VENV, else "
                             "~/.cache/serialgen/estimator-mediapipe-0.10.21 (shared by every checkout). Safe to run "
                             "twice, or from several processes at once.")
    p.add_argument("--venv", help="where to create it (default: $SERIALGEN_ESTIMATOR_VENV or "
                   "~/.cache/serialgen/estimator-mediapipe-0.10.21)")
    p.add_argument("--json", action="store_true", help="print {\"python\": PATH}")
    p.set_defaults(handler=_setup)

    p = groups["shards"].add_parser(
        "annotate", help="estimate mask and keypoints of every rendered sample (train as you infer)",
        description="Run the person estimator once per sample of a shard set, on the render composited over a fixed "
        "person-free background, and write annotations/<split>/<shard>.tar (est_mask.png, est_pose.json per key) "
        "plus annotations/index.json and quality.json: the estimate against the exact mask and keypoints per "
        "character (mask IoU, PCK@0.05/0.1 of the frame height, no-person rate). The loader mixes the estimates in "
        "with LoaderConfig.estimated_share. Re-running annotates only missing shards.")
    p.add_argument("shards", help="shard set folder (with index.json)")
    p.add_argument("--out", help="annotation folder (default: SHARDS/annotations)")
    p.add_argument("--backgrounds", help="asset folder or image folder for the fixed backgrounds (default: the "
                   "built-in procedural ones); pictures where the estimator finds a person are left out")
    p.add_argument("--workers", type=int, default=0, help="Ray actors, one estimator each (default 0: in this process)")
    p.add_argument("--address", help="Ray cluster to join (default: a local one on 127.0.0.1)")
    p.add_argument("--limit-per-shard", type=positive_int, help="annotate only the first N samples of each shard "
                   "(a quick quality estimate; the loader then uses exact inputs for the rest)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_annotate)
