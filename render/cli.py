"""``serialgen render``: characters in, (non-standard, standard) pairs out, in WebDataset shards.

Heavy imports (ray, bpy) happen inside the handler; bad input is a one-line error before any work.
The benchmark is ``benchmarks/render.py``.
"""

from __future__ import annotations

import argparse

from serialgen.render.scene import MIN_SIDE, STANDARD_SUPERSAMPLE, RenderSettings
from serialgen.resolution import add_resolution_argument

__all__ = ["register"]

_DEFAULTS = RenderSettings()  # the command's defaults are the renderer's own


def _handle_render(args: argparse.Namespace) -> int:
    from serialgen.errors import UserInputError
    from serialgen.render.farm.driver import FarmConfig, run_farm
    from serialgen.render.farm.report import format_summary
    from serialgen.render.scene import RenderSettings

    width, height = args.resolution
    settings = RenderSettings(engine=args.engine, width=width, height=height, threads=args.threads,
                              cycles_samples=args.samples, cycles_denoise=args.denoise,
                              cycles_device=args.cycles_device, eevee_samples=args.samples,
                              supersample=args.supersample)
    if not 0.0 <= args.test_fraction <= 1.0:
        raise UserInputError(f"--test-fraction must be in 0..1, got {args.test_fraction}")
    if args.poses_per_shard < 1:
        raise UserInputError(f"--poses-per-shard must be >= 1, got {args.poses_per_shard}")
    config = FarmConfig(
        assets=args.assets, out=args.out, settings=settings, per_character=args.poses_per_character,
        seed=args.seed, test_fraction=args.test_fraction, poses_per_shard=args.poses_per_shard,
        workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        address=args.address, job_timeout=args.job_timeout, max_attempts=args.max_attempts,
        retry_quarantined=args.retry_quarantined,
        max_characters_per_worker=args.max_characters_per_worker, rss_cap_mb=args.rss_cap_mb,
        limit_characters=args.limit_characters, record_timings=args.record_timings,
        overwrite=args.overwrite, repair=args.repair, progress=not args.no_progress)
    summary = run_farm(config)
    print(format_summary(summary), flush=True)
    if summary["status"] == "interrupted":
        return 130
    return 1 if summary["failed_characters"] and not summary["pairs"] else 0


_EPILOG = """\
defaults: 12 pairs per character, 512x768, Workbench (fast on CPU), 1 worker, seed 0, 20% of the
characters in the test split: a quick look at a new asset folder. The paper renders every library
pose per character (--poses-per-character 3817) at 512x768.

`make shards` runs `serialgen assets build --procedural 8` and then
  serialgen render --poses-per-character 12 --resolution 256x384 --workers 2
into data/shards (8 x 12 = 96 pairs, about a minute on 2 cores), then `serialgen shards verify`.
Override its Makefile variables: make shards CHARACTERS=100 PER_CHAR=50 RESOLUTION=512x768 WORKERS=4
(also SHARDS_DIR, ASSETS_DIR, POSES).

re-runs: the same command renders only what is missing. Every shard it keeps is checked first
against journal.jsonl (size and the tar's member list, from the headers); a shard that fails is
rendered again. --repair also compares every kept shard's sha256 (reads every byte). An --out
rendered with other settings or another rendering version is refused unless --overwrite.
"""


def register(sub, groups) -> None:
    p = sub.add_parser(
        "render", help="render (non-standard, standard) pairs into WebDataset shards on Ray",
        description="Render every accepted character of an asset folder: its standard image once, then "
                    "K non-standard images (library poses, random views, framings, expressions, lighting), "
                    "written as train/test WebDataset shards plus index.json. Workers that crash or hang are "
                    "replaced and their jobs retried; a character failing --max-attempts times is quarantined. "
                    "Re-running the same command renders only missing or damaged shards; Ctrl-C stops cleanly.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", required=True, metavar="DIR", help="folder from `serialgen assets build`")
    p.add_argument("--out", required=True, metavar="SHARDS", help="output folder for the shards")
    p.add_argument("--poses-per-character", type=int, default=12, metavar="K",
                   help="non-standard images per character (default 12; the paper: every library pose)")
    add_resolution_argument(p, help="image size", min_side=MIN_SIDE)
    p.add_argument("--engine", default=_DEFAULTS.engine, choices=["workbench", "eevee", "cycles"],
                   help=f"render engine (default {_DEFAULTS.engine}: fast on CPU)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Blender worker processes (Ray actors; default 1; 0 = in this process, no Ray)")
    p.add_argument("--address", default=None, metavar="A", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed (fixes every sample; default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of characters in the test split (default 0.2)")
    p.add_argument("--poses-per-shard", type=int, default=1000,
                   help="at most this many pairs per shard; a character with more is split (default 1000)")
    p.add_argument("--samples", type=int, default=_DEFAULTS.cycles_samples,
                   help=f"cycles/eevee samples per pixel (default {_DEFAULTS.cycles_samples})")
    p.add_argument("--supersample", type=int, default=_DEFAULTS.supersample, choices=[1, 2, 3, 4],
                   help="workbench anti-aliasing of the pairs' images: 1 renders at the size and filters "
                        "with the 2x2 kernel, k > 1 renders k x k larger and averages (docs/rendering.md; "
                        f"default {_DEFAULTS.supersample}; the standard image always uses at least "
                        f"{STANDARD_SUPERSAMPLE})")
    p.add_argument("--denoise", action="store_true", help="cycles: run the denoiser (slow on CPU)")
    p.add_argument("--cycles-device", default=_DEFAULTS.cycles_device, choices=["CPU", "GPU"],
                   help=f"cycles device (default {_DEFAULTS.cycles_device})")
    p.add_argument("--threads", type=int, default=0, help="render threads per worker (default: CPUs / workers)")
    p.add_argument("--cpus-per-worker", type=float, default=0,
                   help="Ray CPUs reserved per worker; also its render threads unless --threads "
                        "(default: the machine's or cluster's CPUs / workers)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="Ray GPUs per worker (0.5 packs two workers on a GPU); cycles renders on exactly "
                        "the assigned GPU (default 0: CPU workers)")
    p.add_argument("--job-timeout", type=float, default=0.0, metavar="S",
                   help="kill and retry a job running longer than S seconds (default 0: automatic, "
                        "10x the run's median time per pair; 600 s + 20 s per pair before any job ended)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="quarantine a character after this many failed jobs or worker crashes (default 3)")
    p.add_argument("--retry-quarantined", action="store_true",
                   help="render again the characters an earlier run of this folder quarantined")
    p.add_argument("--max-characters-per-worker", type=int, default=50,
                   help="recycle a worker process after this many characters (default 50)")
    p.add_argument("--rss-cap-mb", type=float, default=6000.0, help="recycle a worker past this RSS (default 6000)")
    p.add_argument("--limit-characters", type=int, default=None, metavar="N",
                   help="render only the first N characters, by id (N >= 1; default: all)")
    p.add_argument("--record-timings", action="store_true",
                   help="store per-stage timings in every meta.json (makes the shards non-reproducible)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what --out holds (shards of other settings or another rendering version) "
                        "and render everything again")
    p.add_argument("--repair", action="store_true",
                   help="also check the content (sha256) of every shard a re-run keeps, and render again "
                        "those that differ from the journal (reads every byte; default: size and member list)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    p.set_defaults(handler=_handle_render)
