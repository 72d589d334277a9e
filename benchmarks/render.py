"""Render benchmark: where an image's time goes, against a bare ``bpy.ops.render.render`` loop.

Modes (all in one process unless noted; numbers go to stdout as a table and to ``--json``):

* ``stages`` (default): one Blender worker, one character; per non-standard image the pipeline's
  stages (pose = pose + view/framing + camera + lighting; render = render + read back; keypoints;
  encode = PNG + JSON; write = tar append) and, **interleaved on the same scene state** (same pose,
  camera, light, settings), two bare loops on that frame: ``bpy.ops.render.render()`` alone, and
  render + save with Blender's PNG writer (what a plain render loop that keeps its images does).
  Interleaving cancels drift from other load on a shared machine. Reports pipeline/bare per image
  (wall and process CPU time, Blender's render threads included) and per pair (the standard image
  amortised over ``--per-character``), rendering/2's render stage on the same state (2x2
  supersample, dithered TGA, Pillow reduce) and its bare 2x render, the anti-aliasing quality (PSNR
  of the pipeline's frame against that 2x2 supersampled frame), the load average, and PNG levels
  0/1/3/6 of our encoder on a real frame. Then whole jobs through ``BlenderWorker.run`` (the
  production loop), encoding in line (CPU workers) and ahead in a background thread (GPU workers),
  alternated: wall and CPU per image and both against the bare loops.
* ``farm``: ``serialgen render`` end to end (Ray, ``--workers``) on an asset folder; pairs/s, bytes
  per pair, time by stage.
* ``rss``: load, render and unload ``--characters`` characters in one worker (cycling through the
  asset folder's characters), RSS after each; shows whether the purge keeps memory flat.

Usage::

    .venv/bin/python benchmarks/render.py --assets data/assets --mode stages --images 30
    .venv/bin/python benchmarks/render.py --assets data/assets --mode farm --characters 4 --per-character 12
    .venv/bin/python benchmarks/render.py --assets data/assets --mode rss --characters 50

Without ``--assets`` the built-in mannequin and a fresh 200-pose library are used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from serialgen.resolution import add_resolution_argument


def _characters(assets: Path | None, n: int) -> list[dict]:
    if assets is None:
        return [{"id": f"mannequin-{v}", "kind": "mannequin", "variant": v}
                for v in ("adult", "child", "heavy")][: max(n, 1)]
    from serialgen.render.farm.driver import load_characters

    return load_characters(assets)[0]


def _poses_path(assets: Path | None, scratch: Path) -> Path:
    if assets is not None:
        return assets / "poses.npz"
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library

    return save_pose_library(build_pose_library(200, seed=0), scratch / "poses.npz")


def _psnr(a, b) -> float:
    """PSNR (dB) of two uint8 RGBA frames on premultiplied alpha (colour where the figure is)."""
    import numpy as np

    def pm(x):
        f = x.astype(np.float64)
        return np.concatenate([f[..., :3] * f[..., 3:] / 255.0, f[..., 3:]], -1)

    mse = float(np.mean((pm(a) - pm(b)) ** 2))
    return 99.0 if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def bench_stages(args, scratch: Path) -> dict:
    import numpy as np

    from serialgen.dataset import shards
    from serialgen.render.bpy_utils import import_bpy
    from serialgen.render.job import BlenderWorker, RenderJob, character_samples
    from serialgen.render.scene import RenderSettings, render_rgba, set_render_scale, time_bare_render

    bpy = import_bpy()
    settings = RenderSettings(engine=args.engine, width=args.width, height=args.height, threads=args.threads,
                              supersample=args.supersample)
    worker = BlenderWorker(settings)
    record = _characters(args.assets, 1)[0] if args.character is None else next(
        r for r in _characters(args.assets, 10**6) if r["id"] == args.character)
    poses = _poses_path(args.assets, scratch)
    job = RenderJob(record, str(args.assets or ""), str(scratch), "train/bench.tar", "train", 0, args.images,
                    args.images, 0, str(poses))
    t = time.perf_counter()
    loaded = worker._load_character(record, job.assets_dir)
    load_s = time.perf_counter() - t
    library = worker._pose_library(job.poses_path)
    t = time.perf_counter()
    worker._render_standard(loaded)
    std_s = time.perf_counter() - t
    plan = character_samples(loaded.char_id, len(library.angles), args.images + 2, 0)
    writer = shards.ShardWriter(scratch, "train/bench.tar", "train")
    rows, cpu, bare, bare_cpu, bare_write, old, old_bare, quality = [], [], [], [], [], [], [], []
    still = str(scratch / "bare.png")
    scene = worker.scene
    for i, (pose_id, view) in enumerate(plan):
        c0 = time.process_time()
        rendered = worker._render_sample(job, loaded, library, pose_id, view)
        members = worker._encode_sample(rendered)  # in line here, to time each stage
        key, timings = rendered.key, rendered.timings
        t = time.perf_counter()
        writer.write(key, members)
        timings["write"] = time.perf_counter() - t
        c1 = time.process_time()
        # Bare, interleaved: the same scene state rendered again with nothing around it, at the
        # size the pipeline renders (its own render call, nothing before or after).
        b, bw = time_bare_render(scene, still)
        c2 = time.process_time()
        bpy.ops.render.render()
        c3 = time.process_time()
        # rendering/2's render stage on the same state: 2x2 supersample with Blender's dither, TGA,
        # Pillow read and reduce; and its bare 2x render. Its frame is the AA reference.
        k = set_render_scale(scene, settings, standard=True)
        scene.render.dither_intensity = 1.0
        t = time.perf_counter()
        reference = render_rgba(scene, k)
        old_s = time.perf_counter() - t
        scene.render.dither_intensity = 0.0
        t = time.perf_counter()
        bpy.ops.render.render()
        old_bare_s = time.perf_counter() - t
        frame = worker._render(scene)  # the pipeline's frame before the light's gain (deterministic)
        if i >= 2:  # the first frames warm caches (shaders, BVH): not steady state
            rows.append(timings)
            cpu.append(c1 - c0)
            bare.append(b)
            bare_cpu.append(c3 - c2)
            bare_write.append(bw)
            old.append(old_s)
            old_bare.append(old_bare_s)
            quality.append(_psnr(frame, reference))
    summary = writer.close()
    run_loop = _time_run_loop(worker, record, args, poses, scratch)
    stages = ("pose", "render", "keypoints", "encode", "write")
    mean = {s: statistics.fmean(r[s] for r in rows) for s in stages}
    per_image = sum(mean.values())
    bare_mean = statistics.fmean(bare)
    per_pair = per_image + std_s / args.per_character
    old_per_image = per_image - mean["render"] + statistics.fmean(old)
    # PNG levels on a real frame.
    frame = worker._render(scene)
    png = {}
    for level in (0, 1, 3, 6):
        t = time.perf_counter()
        for _ in range(3):
            data = shards.encode_png(frame, level)
        png[level] = {"ms": round((time.perf_counter() - t) / 3 * 1e3, 2), "kb": round(len(data) / 1e3, 1)}
    worker.unload()
    return {
        "mode": "stages", "engine": args.engine, "resolution": [args.width, args.height], "threads": args.threads,
        "supersample": args.supersample, "character": record["id"], "images": len(rows),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "load_s": round(load_s, 3), "standard_image_s": round(std_s, 3),
        "stage_ms": {s: round(v * 1e3, 2) for s, v in mean.items()},
        "pipeline_ms_per_image": round(per_image * 1e3, 2),
        "pipeline_cpu_ms_per_image": round(statistics.fmean(cpu) * 1e3, 2),
        "bare_render_ms": round(bare_mean * 1e3, 2),
        "bare_render_cpu_ms": round(statistics.fmean(bare_cpu) * 1e3, 2),
        "bare_render_save_png_ms": round(statistics.fmean(bare_write) * 1e3, 2),
        "pipeline_over_bare_render": round(per_image / bare_mean, 3),
        "pipeline_over_bare_render_cpu": round(statistics.fmean(cpu) / statistics.fmean(bare_cpu), 3),
        "pipeline_over_bare_render_save": round(per_image / statistics.fmean(bare_write), 3),
        "per_pair_ms_with_std_amortised": round(per_pair * 1e3, 2),
        "rendering2_render_stage_ms": round(statistics.fmean(old) * 1e3, 2),
        "rendering2_bare_2x_render_ms": round(statistics.fmean(old_bare) * 1e3, 2),
        "rendering2_pipeline_ms_per_image": round(old_per_image * 1e3, 2),
        "rendering2_pipeline_over_its_bare_2x": round(old_per_image / statistics.fmean(old_bare), 3),
        # The production loop (``BlenderWorker.run``) with the encode of sample i in a background thread
        # while sample i + 1 renders (GPU workers) and encoding in line (CPU workers), alternated.
        **run_loop,
        **{f"run_loop_{m}_over_bare_render": round(run_loop[f"run_loop_{m}_ms_per_image"] / (bare_mean * 1e3), 3)
           for m in ("inline", "ahead")},
        **{f"run_loop_{m}_over_bare_render_cpu": round(run_loop[f"run_loop_{m}_cpu_ms_per_image"]
                                                       / (statistics.fmean(bare_cpu) * 1e3), 3)
           for m in ("inline", "ahead")},
        **{f"run_loop_{m}_over_bare_render_save": round(run_loop[f"run_loop_{m}_ms_per_image"]
                                                        / (statistics.fmean(bare_write) * 1e3), 3)
           for m in ("inline", "ahead")},
        "psnr_vs_2x2_supersample_db": {"mean": round(statistics.fmean(quality), 2), "min": round(min(quality), 2)},
        "bytes_per_pair": round(summary.bytes / max(summary.samples, 1)),
        "png_levels": png,
    }


def _time_run_loop(worker, record: dict, args, poses: Path, scratch: Path, repeats: int = 3) -> dict:
    """Wall and process CPU per image of whole jobs through ``BlenderWorker.run`` (the character
    and its standard image already loaded), encoding in line (what the farm's CPU workers do) and
    ahead in a thread (its GPU workers), alternated ``repeats`` times; the first image of each job
    is not counted apart."""
    from serialgen.render.job import RenderJob

    n = args.images
    out: dict[str, list[float]] = {"ahead": [], "ahead_cpu": [], "inline": [], "inline_cpu": []}
    for r in range(repeats):
        for mode in ("ahead", "inline") if r % 2 == 0 else ("inline", "ahead"):
            worker.encode_ahead = mode == "ahead"
            job = RenderJob(record, str(args.assets or ""), str(scratch), f"train/run-{mode}-{r}.tar", "train",
                            0, n, n, 0, str(poses))
            t, c = time.perf_counter(), time.process_time()
            result = worker.run(job)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if result["status"] != "ok" or result["pairs"] != n:
                raise RuntimeError(f"run loop: {result.get('error') or result['failures']}")
            out[mode].append(wall / n)
            out[mode + "_cpu"].append(cpu / n)
            (scratch / job.shard).unlink(missing_ok=True)
    worker.encode_ahead = False
    ms = {k: round(statistics.fmean(v) * 1e3, 2) for k, v in out.items()}
    return {"run_loop_inline_ms_per_image": ms["inline"], "run_loop_inline_cpu_ms_per_image": ms["inline_cpu"],
            "run_loop_ahead_ms_per_image": ms["ahead"], "run_loop_ahead_cpu_ms_per_image": ms["ahead_cpu"]}


def bench_farm(args, scratch: Path) -> dict:
    from serialgen.render.farm.driver import FarmConfig, run_farm
    from serialgen.render.scene import RenderSettings

    if args.assets is None:
        assets = scratch / "assets"
        assets.mkdir()
        _poses_path(None, assets)
        recs = _characters(None, args.characters)
        (assets / "characters.jsonl").write_text("".join(json.dumps({**r, "status": "accepted"}) + "\n" for r in recs))
    else:
        assets = args.assets
    out = scratch / "shards"
    config = FarmConfig(assets=str(assets), out=str(out), per_character=args.per_character,
                        settings=RenderSettings(engine=args.engine, width=args.width, height=args.height),
                        workers=args.workers, limit_characters=args.characters, progress=False)
    s = run_farm(config)
    return {"mode": "farm", "workers": args.workers, "threads_per_worker": s["threads_per_worker"],
            "engine": args.engine, "resolution": [args.width, args.height], "pairs": s["pairs"],
            "seconds": s["seconds"], "pairs_per_s": s["pairs_per_s"],
            "bytes_per_pair": round(s["bytes"] / max(s["pairs"], 1)), "stage_seconds": s["stage_seconds"],
            "failures": len(s["failures"])}


def bench_rss(args, scratch: Path) -> dict:
    from serialgen.render.job import BlenderWorker, RenderJob
    from serialgen.render.scene import RenderSettings

    worker = BlenderWorker(RenderSettings(engine=args.engine, width=args.width, height=args.height,
                                          threads=args.threads), max_characters=10**9)
    records = _characters(args.assets, 3)
    poses = _poses_path(args.assets, scratch)
    rss = [worker.rss_mb()]
    t0 = time.perf_counter()
    for i in range(args.characters):
        rec = records[i % len(records)]
        job = RenderJob(rec, str(args.assets or ""), str(scratch), f"train/rss-{i:04d}.tar", "train", 0,
                        args.per_character_rss, args.per_character_rss, i, str(poses))
        result = worker.run(job)
        if result["status"] != "ok":
            print(result.get("traceback"), file=sys.stderr)
        (scratch / job.shard).unlink(missing_ok=True)
        worker.unload()  # remove + purge, as between characters of a run
        rss.append(worker.rss_mb())
    half = len(rss) // 2
    return {"mode": "rss", "characters": args.characters, "distinct_characters": len(records),
            "images_per_character": args.per_character_rss + 1, "seconds": round(time.perf_counter() - t0, 1),
            "rss_mb_start": round(rss[0]), "rss_mb_after_first": round(rss[1]),
            "rss_mb_end": round(rss[-1]),
            "rss_mb_per_character_second_half": round((rss[-1] - rss[half]) / max(len(rss) - 1 - half, 1), 2),
            "rss_mb_series": [round(r) for r in rss]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["stages", "farm", "rss"], default="stages")
    p.add_argument("--assets", type=Path, default=None, help="asset folder (default: built-in mannequins)")
    p.add_argument("--engine", default="workbench")
    add_resolution_argument(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=20, help="stages: non-standard images measured")
    p.add_argument("--per-character", type=int, default=12, help="pairs per character (std amortisation; farm)")
    p.add_argument("--characters", type=int, default=50, help="rss: characters to cycle; farm: characters used")
    p.add_argument("--per-character-rss", type=int, default=1, help="rss: non-standard images per character")
    p.add_argument("--workers", type=int, default=1, help="farm: Ray workers")
    p.add_argument("--supersample", type=int, default=1, choices=[1, 2, 3, 4],
                   help="stages: workbench anti-aliasing of non-standard images (default 1: 1x + the 2x2 kernel)")
    p.add_argument("--character", default=None, help="stages: character id (default: the first)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    args.width, args.height = args.resolution
    with tempfile.TemporaryDirectory(prefix="serialgen-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        fn = {"stages": bench_stages, "farm": bench_farm, "rss": bench_rss}[args.mode]
        result = fn(args, Path(tmp))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
