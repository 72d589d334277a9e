"""``serialgen data preview`` and ``serialgen data bench``: look at loader outputs, measure the loader.

The benchmark runs the full pipeline (read tar -> decode -> composite -> pose maps -> tensors, in
batches as training uses it) in this one process with one torch thread, i.e. what one DataLoader
worker delivers on one core, and in the same run, interleaved in short slices so that a busy
machine slows all alike, the raw PNG decode of the same members with the decoder the pipeline uses:
ref.png + std.png per pair (the headline ratio: what a reader that decodes every image of a pair
does) and ref.png only (what the pipeline decodes per pair, since it caches the standard per
character); plus ref + std with PIL. It reports the rates and both ratios. Rates are given per
wall-clock second and per CPU-second of the measuring thread (on a shared machine the second says
what the work costs a core; the ratios use wall time, which the interleaving keeps fair).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

from serialgen.resolution import add_resolution_argument, format_resolution

__all__ = ["register", "bench"]

_COLUMNS = ("reference (composited)", "mask (white = background)", "reference pose", "standard", "standard pose")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS",
                   help="shard set folder (with index.json or train/ test/), index.json, .tar, or a brace pattern")
    p.add_argument("--backgrounds", metavar="DIR", default=None,
                   help="background images: a folder (jpg/png/webp, searched recursively) or an assets folder; "
                        "default: procedural colour fields")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="shard split when SHARDS is a folder or an index (default: train)")
    add_resolution_argument(p, help="output size, width x height")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling and augmentation (default: 0)")
    p.add_argument("--std-pose", choices=("per_character", "canonical"), default="per_character",
                   help="standard pose map: each character's own (default: the map that agrees with its standard "
                        "image, as training uses it) or one canonical map (the reference figure's)")
    p.add_argument("--canonical-share", type=float, default=0.0, metavar="P",
                   help="with per_character: probability that a sample gets the canonical map instead (default 0)")
    p.add_argument("--canonical-pose", metavar="JSON", default=None,
                   help="std_pose.json-format file with the canonical standard keypoints (default: the index's "
                        "standard_pose, else the reference figure at the standard camera)")


def register(sub, groups) -> None:
    data = groups["data"]
    p = data.add_parser("preview", help="draw a grid of loader outputs (composite, mask, pose maps, standard)",
                        description="Draw a grid of loader outputs, one row per sample: "
                                    + ", ".join(_COLUMNS) + ".")
    _common(p)
    p.add_argument("--out", required=True, metavar="PNG", help="output image")
    p.add_argument("--count", type=int, default=6, help="rows (samples), default 6")
    p.add_argument("--thumb-height", type=int, default=256, help="tile height in pixels (default 256)")
    p.set_defaults(handler=_handle_preview)

    b = data.add_parser("bench", help="loader throughput per worker process, with raw PNG decode in the same run",
                        description="Pairs/s of the full loader pipeline in one process (one DataLoader worker, "
                                    "one torch thread) and, interleaved in the same run, the raw PNG decode rate "
                                    "of the same members (ref.png + std.png per pair, and ref.png only); prints "
                                    "the rates and both ratios.")
    _common(b)
    b.add_argument("--seconds", type=float, default=10.0,
                   help="measuring time, split between the pipeline (60 %%) and raw decodes (default 10)")
    b.add_argument("--warmup", type=float, default=2.0,
                   help="seconds run first and not counted, and at least until the background pool is full "
                        "(default 2)")
    b.add_argument("--batch-size", type=int, default=8,
                   help="batch size collated in the worker (default 8, as training reads); 0 = single samples")
    b.add_argument("--dtype", choices=("uint8", "float32"), default="uint8",
                   help="output tensors: uint8 (default: what training uses, converted on the device) or float32")
    b.add_argument("--json", action="store_true", help="print one JSON object (default: a few lines of text)")
    b.set_defaults(handler=_handle_bench)


def _dataset(args, **overrides):
    from serialgen.dataset.loader import LoaderConfig, RenderPairDataset
    from serialgen.errors import UserInputError

    if not 0.0 <= args.canonical_share <= 1.0:
        raise UserInputError(f"--canonical-share {args.canonical_share}: must be a probability in [0, 1]")
    cfg = LoaderConfig(resolution=args.resolution, split=args.split, seed=args.seed, std_pose=args.std_pose,
                       canonical_share=args.canonical_share, canonical_pose=args.canonical_pose, **overrides)
    return RenderPairDataset(args.shards, args.backgrounds, cfg)


# ---------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------

def preview_grid(samples: list[dict], thumb_height: int = 256):
    """One row per uint8 sample (tensors (C, H, W)): composite, mask, ref pose, std, std pose."""
    import numpy as np
    from PIL import Image, ImageDraw

    def tile(t):
        arr = t.permute(1, 2, 0).numpy()
        if arr.shape[2] == 1:
            arr = np.repeat(arr * 255, 3, axis=2).astype(np.uint8)
        im = Image.fromarray(np.ascontiguousarray(arr))
        return im.resize((max(1, round(im.width * thumb_height / im.height)), thumb_height), Image.BILINEAR)

    rows = [[tile(s[k]) for k in ("ref", "ref_mask", "ref_pose", "std", "std_pose")] for s in samples]
    tw, th, header, pad = rows[0][0].width, thumb_height, 18, 4
    grid = Image.new("RGB", (5 * (tw + pad) + pad, header + len(rows) * (th + pad) + pad), (40, 40, 40))
    d = ImageDraw.Draw(grid)
    for c, name in enumerate(_COLUMNS):
        d.text((pad + c * (tw + pad), 3), name, fill=(230, 230, 230))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (tw + pad), header + pad + r * (th + pad)))
    return grid


def _handle_preview(args) -> int:
    from serialgen.errors import UserInputError

    if args.count < 1:
        raise UserInputError(f"--count {args.count}: must be at least 1")
    if args.thumb_height < 16:
        raise UserInputError(f"--thumb-height {args.thumb_height}: must be at least 16")
    ds = _dataset(args, dtype="uint8", shuffle_buffer=50, shuffle_initial=10)
    samples = []
    for s in ds:
        samples.append(s)
        if len(samples) >= args.count:
            break
    if not samples:
        raise UserInputError(f"{args.shards}: no readable sample ({ds.stats.summary()})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(samples, args.thumb_height).save(out)
    print(f"preview: {len(samples)} samples -> {out} ({ds.stats.summary()})")
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def _raw_members(ds, limit: int) -> list[tuple[bytes, bytes]]:
    """(ref.png, std.png) bytes of the first ``limit`` usable pairs of the dataset's shards: a
    format 3 pair's std.png from its character's standard tar (the join the loader does)."""
    from serialgen.dataset import shards, tarset

    out, standards = [], {}
    for url in ds.urls:
        try:
            with open(url, "rb") as f:
                for got in tarset.read_samples(f):
                    if isinstance(got, tarset.Rejected) or "ref.png" not in got[1]:
                        continue
                    sample = got[1]
                    std = sample.get("std.png")
                    if std is None:
                        char = json.loads(sample["meta.json"]).get("character")
                        if char not in standards:
                            try:
                                standards[char] = shards.read_standard(ds.standard_paths[char], char)["std.png"]
                            except (KeyError, tarset.TarSetError, TypeError):
                                standards[char] = None
                        std = standards[char]
                    if std is not None:
                        out.append((sample["ref.png"], std))
                    if len(out) >= limit:
                        return out
        except (OSError, ValueError):
            continue
    return out


RAW_DECODE_DEFINITION = ("ref.png (RGBA) + std.png (RGB) of each pair, decoded with the pipeline's decoder: what a "
                         "reader that decodes every image member of a pair does")
RAW_DECODE_REF_ONLY_DEFINITION = ("ref.png only: what the pipeline itself decodes per pair (it decodes std.png "
                                  "once per character and reuses it)")


def bench(args) -> dict:
    """Run the benchmark described in the module doc; returns the result dict.

    Warm-up runs for ``args.warmup`` seconds and at least until the background pool is full (its
    first ``background_pool`` samples each decode a background: a start-up cost, not the steady
    state). Then, in turns, a 0.3 s slice of the pipeline and 0.1 s slices of three raw decodes of
    the same members: ref + std with the pipeline's decoder (``raw_decode_pairs_per_s``, the
    headline ratio), ref only (``raw_decode_ref_only_pairs_per_s``) and ref + std with PIL.
    """
    import torch

    from serialgen.dataset import shards as S
    from serialgen.errors import UserInputError

    torch.set_num_threads(1)
    batch = args.batch_size or None
    ds = _dataset(args, resampled=True, batch_size=batch, dtype=args.dtype)
    members = _raw_members(ds, 256)
    if not members:
        raise UserInputError(f"{args.shards}: no sample with ref.png and std.png")

    def decode_pil(data):
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        im.load()
        return im

    def raw_pair(ref, std):
        S.decode_png(ref, "RGBA")
        S.decode_png(std, "RGB")

    def raw_ref(ref, std):
        S.decode_png(ref, "RGBA")

    def raw_pil(ref, std):
        decode_pil(ref)
        decode_pil(std)

    pipe = iter(ds)
    per_item = batch or 1
    t_end = time.perf_counter() + args.warmup
    warm = 0
    while time.perf_counter() < t_end or warm < ds.config.background_pool + 16:
        next(pipe)
        warm += per_item
    names = ("pipe", "raw", "raw_ref", "pil")
    counts = dict.fromkeys(names, 0)
    times = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)  # this thread's CPU time: what the work costs on a core it had to share
    i = 0
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        t0, c0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() - t0 < 0.3:
            next(pipe)
            counts["pipe"] += per_item
        times["pipe"] += time.perf_counter() - t0
        cpu["pipe"] += time.thread_time() - c0
        for name, dec in (("raw", raw_pair), ("raw_ref", raw_ref), ("pil", raw_pil)):
            t0, c0 = time.perf_counter(), time.thread_time()
            while time.perf_counter() - t0 < 0.1:
                dec(*members[i % len(members)])
                i += 1
                counts[name] += 1
            times[name] += time.perf_counter() - t0
            cpu[name] += time.thread_time() - c0
    stats = ds.stats
    rate = {k: counts[k] / times[k] for k in names}
    cpu_rate = {k: counts[k] / cpu[k] if cpu[k] > 0 else float("nan") for k in names}
    hits = stats.std_cache_hits + stats.std_cache_misses
    return {
        "pairs_per_s": round(rate["pipe"], 2),
        "raw_decode_pairs_per_s": round(rate["raw"], 2),
        "ratio": round(rate["pipe"] / rate["raw"], 3),
        "raw_decode_ref_only_pairs_per_s": round(rate["raw_ref"], 2),
        "ratio_ref_only": round(rate["pipe"] / rate["raw_ref"], 3),
        "pairs_per_cpu_s": round(cpu_rate["pipe"], 2),
        "raw_decode_pairs_per_cpu_s": round(cpu_rate["raw"], 2),
        "raw_decode_ref_only_pairs_per_cpu_s": round(cpu_rate["raw_ref"], 2),
        "raw_decoder": "pyspng",
        "raw_decode_pil_pairs_per_s": round(rate["pil"], 2),
        "raw_decode_definition": RAW_DECODE_DEFINITION,
        "raw_decode_ref_only_definition": RAW_DECODE_REF_ONLY_DEFINITION,
        "resolution": format_resolution(args.resolution),
        "batch_size": batch or 0,
        "dtype": args.dtype,
        "seconds": round(sum(times.values()), 2),
        "samples_measured": counts["pipe"],
        "warmup_samples": warm,
        "std_cache_hit_rate": round(stats.std_cache_hits / hits, 3) if hits else None,
        "backgrounds": len(ds.background_paths) or "procedural",
        "skipped": dict(stats.skipped),
        "skipped_where": stats.keys,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }


def _handle_bench(args) -> int:
    from serialgen.errors import UserInputError

    if args.seconds <= 0 or args.warmup < 0 or args.batch_size < 0:
        raise UserInputError("--seconds must be > 0, --warmup and --batch-size >= 0")
    result = bench(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"loader bench ({result['resolution']}, batch {result['batch_size']}, {result['dtype']}, "
          f"1 process, 1 torch thread, {result['seconds']} s, load average {result['load_average_1min']} on "
          f"{result['cpus']} CPUs)")
    print(f"  full pipeline               {result['pairs_per_s']:8.1f} pairs/s")
    print(f"  raw decode, ref + std       {result['raw_decode_pairs_per_s']:8.1f} pairs/s ({result['raw_decoder']}; "
          f"PIL: {result['raw_decode_pil_pairs_per_s']:.1f})   ratio {result['ratio']:.3f}")
    print(f"  raw decode, ref only        {result['raw_decode_ref_only_pairs_per_s']:8.1f} pairs/s "
          f"({result['raw_decoder']})   ratio {result['ratio_ref_only']:.3f}")
    print(f"  per CPU-second of this thread (the same work, without the time other jobs held the core): pipeline "
          f"{result['pairs_per_cpu_s']:.1f}, raw ref + std {result['raw_decode_pairs_per_cpu_s']:.1f}, raw ref only "
          f"{result['raw_decode_ref_only_pairs_per_cpu_s']:.1f} pairs/s")
    print("  (ref + std: " + RAW_DECODE_DEFINITION + "; ref only: " + RAW_DECODE_REF_ONLY_DEFINITION + ")")
    print(f"  standard-image cache hit rate {result['std_cache_hit_rate']}, backgrounds {result['backgrounds']}, "
          f"skipped {result['skipped'] or 'none'}")
    return 0
