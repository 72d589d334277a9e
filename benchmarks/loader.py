"""Loader benchmark: throughput in several output configurations, and where a pair's time goes.

Modes (one process, one torch thread, i.e. one DataLoader worker on one core):

* ``configs`` (default): ``serialgen data bench`` (``dataset/cli.py``: the full pipeline and, in the
  same run, interleaved, the raw PNG decode of the same members) for uint8 batch 8, float32 batch 8
  and float32 single samples; a table of pairs/s and both ratios (raw decode = ref + std per pair,
  and ref only).
* ``steps``: the per-pair steps of the uint8 batch path on real samples held in memory, timed one
  by one (tar reading is timed separately, as stock webdataset reads the shards).
* ``ab``: the loader of an earlier commit (``--baseline REV``: its ``dataset/{posemap,compositing,
  loader}.py``, loaded under the same module names) against the working tree's, in the same process,
  interleaved in 0.3 s slices with the raw decodes (ref + std, ref only); ``--batch-size``,
  ``--dtype``. The fair before/after comparison on a shared machine.
* ``alternatives``: each optimised step against the way it was done before, on the same real
  samples, interleaved round by round so that load from other jobs hits both alike: premultiply
  (numpy on the rim vs PIL ``convert("RGBa")``), resize (torch given a true channels-last tensor vs
  the planar path + ``Image.merge``), blend (premultiplied ``paste`` vs straight-alpha ``paste``
  after un-premultiplying), pose drawing (Python floats vs numpy scalars), PIL -> numpy of an RGBA
  image (Arrow view vs ``np.asarray``).

Usage::

    .venv/bin/python benchmarks/loader.py SHARDS --backgrounds ASSETS [--mode configs|steps|alternatives]
    .venv/bin/python benchmarks/loader.py SHARDS --backgrounds ASSETS --mode ab --baseline 94afd90 --dtype uint8

Make real shards first, e.g. ``serialgen assets build --procedural 4 --out /tmp/a && serialgen render
--assets /tmp/a --out /tmp/s --poses-per-character 24 --resolution 512x768 --workers 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import warnings

import numpy as np

from serialgen.resolution import add_resolution_argument


def _configs(args) -> list[dict]:
    from serialgen.dataset import cli

    rows = []
    for dtype, batch in (("uint8", 8), ("uint8", 0), ("float32", 8), ("float32", 0)):
        ns = argparse.Namespace(shards=args.shards, backgrounds=args.backgrounds, split="train", resolution=args.resolution,
                                seed=0, std_pose="per_character", canonical_share=0.0, canonical_pose=None,
                                seconds=args.seconds, warmup=2.0,
                                batch_size=batch, dtype=dtype, json=True)
        rows.append(cli.bench(ns))
    print("| output | pipeline pairs/s (per CPU-s) | raw decode ref+std pairs/s | ratio | raw decode ref only | ratio "
          "| load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out = f"{r['dtype']}, " + (f"batch {r['batch_size']}" if r["batch_size"] else "single samples")
        print(f"| {out} | {r['pairs_per_s']:.1f} ({r['pairs_per_cpu_s']:.1f}) | {r['raw_decode_pairs_per_s']:.1f} | "
              f"{r['ratio']:.3f} | {r['raw_decode_ref_only_pairs_per_s']:.1f} | {r['ratio_ref_only']:.3f} | "
              f"{r['load_average_1min']} |")
    return rows


def _samples(shards: str) -> tuple[list[dict], float]:
    """The samples of the set's train shards as the loader's tar stage gives them (our reader), and
    the CPU ms per sample that reading took."""
    from serialgen.dataset import loader as L

    urls = L.resolve_shards(shards)
    stats = L.LoaderStats()
    t0 = time.thread_time()
    samples = list(L._read_shards(({"url": u} for u in urls), stats))
    return samples, (time.thread_time() - t0) / max(1, len(samples)) * 1e3


def _steps(args) -> dict:
    """Where a pair's time goes in the uint8 batch-8 path, step by step, on real samples held in
    memory (this thread's CPU time; tar reading timed apart, over the same shards)."""
    import torch

    from serialgen.dataset import compositing as C
    from serialgen.dataset import loader as L
    from serialgen.dataset import posemap as pm
    from serialgen.dataset import shards as shards_fmt

    torch.set_num_threads(1)
    samples, _ = _samples(args.shards)
    tar_ms = sum(_samples(args.shards)[1] for _ in range(3)) / 3
    cfg = L.LoaderConfig(resolution=args.resolution, batch_size=8, dtype="uint8")
    ds = L.RenderPairDataset(args.shards, args.backgrounds, cfg)
    proc = L._SampleProcessor(ds, L.LoaderStats(), random.Random(0))
    for s in (samples * 4)[: ds.config.background_pool + 16]:  # fill the background pool (start-up, not steady state)
        proc(dict(s))
    times: dict[str, float] = {}

    def tick(name, t):
        now = time.thread_time()
        times[name] = times.get(name, 0.0) + now - t
        return now

    n = 0
    size = args.resolution
    for _ in range(args.rounds):
        batch = []
        for s in samples:
            t = time.thread_time()
            meta = json.loads(s["meta.json"])
            pose = pm.parse_pose(s["ref_pose.json"])
            t = tick("meta.json + ref_pose.json parsing", t)
            L._check_png(s["ref.png"])
            t = tick("ref.png CRC check", t)
            ref = shards_fmt.decode_png(s["ref.png"], "RGBA")
            t = tick("ref.png decode (pyspng)", t)
            std, own = proc._standard(s, meta, s["__url__"])
            std_pose = proc._std_pose(own)
            t = tick("standard + its pose map (cached per character)", t)
            bg = proc.backgrounds.sample_array()
            t = tick("background window", t)
            placed = C.prepare_reference(ref, pose, proc.composite_cfg, proc.rng)
            t = tick("prepare the character: bbox, jitter + premultiply (fused), resample", t)
            region = pm.draw_pose_region(placed.pose, size)
            t = tick("reference pose map (its box)", t)
            batch.append((L._Composite(placed, bg), region, std, std_pose))
            n += 1
            if len(batch) == 8:
                t = time.thread_time()
                L._composites_tensors([b[0] for b in batch], "uint8", True)
                t = tick("collate: composite + mask written into the batch (fused)", t)
                L._images_tensor([b[1] for b in batch], "ref_pose", "uint8", True)
                t = tick("collate: pose map", t)
                L._images_tensor([b[2] for b in batch], "std", "uint8", True)
                L._images_tensor([b[3] for b in batch], "std_pose", "uint8", True)
                t = tick("collate: std + std_pose copies", t)
                batch = []
    result = {"tar reading + grouping (tarset.read_samples)": tar_ms}
    result.update({k: v / n * 1e3 for k, v in times.items()})
    total = sum(result.values())
    for k, v in result.items():
        print(f"  {k:66s} {v:7.3f} ms")
    print(f"  {'total':66s} {total:7.3f} ms  ({1e3 / total:.1f} pairs/s without shuffling and stage overhead)")
    return {"ms_per_pair": result, "total_ms": total}


def _alternatives(args) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from serialgen.dataset import compositing as C
    from serialgen.dataset import loader as L
    from serialgen.dataset import posemap as pm
    from serialgen.dataset import shards as shards_fmt

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    samples, _ = _samples(args.shards)
    samples = samples[:24]
    refs = [shards_fmt.decode_png(s["ref.png"], "RGBA") for s in samples]
    poses = [pm.parse_pose(s["ref_pose.json"]) for s in samples]
    boxes = []
    for r in refs:
        x0, y0, x1, y1 = Image.fromarray(r, "RGBA").getbbox(alpha_only=True)
        boxes.append(np.ascontiguousarray(r[y0:y1, x0:x1]))
    crops = [Image.fromarray(b, "RGBA") for b in boxes]
    prem = [C.premultiply(b) for b in boxes]
    size = lambda b: (round(b.shape[1] * 0.9), round(b.shape[0] * 0.9))  # noqa: E731
    placed = [C._resize_premultiplied(p, size(p))[0] for p in prem]
    straight = [p.convert("RGBA") for p in placed]
    bg = Image.new("RGB", (placed[0].width + 64, placed[0].height + 64), (30, 120, 200))

    def planar_resize(p):  # the previous path: a (1, 4, h, w) view torch does not see as channels-last
        t = torch.from_numpy(p).permute(2, 0, 1)[None]
        w, h = size(p)
        planes = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].numpy()
        return Image.merge("RGBa", [Image.frombuffer("L", (w, h), planes[i], "raw", "L", 0, 1) for i in range(4)])

    def old_draw(d, pose, origin, k, feet, hands, face):  # the previous pm._draw: numpy scalars in the loops
        xy, vis = pose.xy - origin, pose.visible
        ok = vis[pm._LIMBS_A] & vis[pm._LIMBS_B]
        if ok.any():
            idx = np.flatnonzero(ok)
            for j, poly in zip(idx, pm._limb_polygons(xy[pm._LIMBS_A[idx]], xy[pm._LIMBS_B[idx]], 4.0 * k)):
                d.polygon(poly.ravel().tolist(), fill=pm._LIMB_FILL[j])
        r = 4.0 * k
        for i in np.flatnonzero(vis[:24]):
            x, y = xy[i]
            d.ellipse((x - r, y - r, x + r, y + r), fill=pm.BODY_COLOURS[i] if i < 18 else pm.FOOT_COLOURS[i - 18])
        for off in (24, 45):
            hv, hxy = vis[off:off + 21], xy[off:off + 21]
            if not hv.any():
                continue
            for e, (a, b) in enumerate(pm.HAND_EDGES):
                if hv[a] and hv[b]:
                    d.line((*hxy[a], *hxy[b]), fill=pm.HAND_EDGE_COLOURS[e], width=max(1, int(round(2 * k))))
            for i in np.flatnonzero(hv):
                x, y = hxy[i]
                d.ellipse((x - r, y - r, x + r, y + r), fill=pm.HAND_POINT_COLOUR)

    def draw_old(pose):
        current = pm._draw
        pm._draw = old_draw
        try:
            return pm.draw_pose_region(pose, args.resolution)
        finally:
            pm._draw = current

    def draw_new(pose):
        return pm.draw_pose_region(pose, args.resolution)

    pairs = {
        "premultiply": (lambda i: C.premultiply(boxes[i]), lambda i: crops[i].convert("RGBa")),
        "resize (scale 0.9)": (lambda i: C._resize_premultiplied(prem[i], size(prem[i])),
                               lambda i: planar_resize(prem[i])),
        "blend onto background": (lambda i: bg.paste(placed[i], (0, 0), placed[i]),
                                  lambda i: bg.paste(placed[i].convert("RGBA"), (0, 0), straight[i])),
        "pose map (region)": (lambda i: draw_new(poses[i]), lambda i: draw_old(poses[i])),
        "RGBA image -> numpy": (lambda i: C._rgba_array(crops[i]), lambda i: np.asarray(crops[i])),
    }
    for new, old in pairs.values():  # warm up (first calls import pyarrow, fill caches)
        new(0), old(0)
    acc = {k: [0.0, 0.0] for k in pairs}
    n = 0
    for _ in range(args.rounds):
        for i in range(len(samples)):
            for k, (new, old) in pairs.items():
                for j, fn in enumerate((new, old)):
                    t = time.thread_time()
                    fn(i)
                    acc[k][j] += time.thread_time() - t
            n += 1
    out = {}
    print(f"  {'step':24s} {'now':>9s} {'before':>9s}")
    for k, (a, b) in acc.items():
        out[k] = {"now_ms": a / n * 1e3, "before_ms": b / n * 1e3}
        print(f"  {k:24s} {a / n * 1e3:7.3f} ms {b / n * 1e3:7.3f} ms")
    return out


def _load_baseline(rev: str):
    """The loader module of commit ``rev`` (with its own compositing and posemap), imported beside
    the current one: each old module is executed under its real name, then the current modules are
    put back, so the old loader keeps references to the old helpers."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    import serialgen.dataset.loader  # noqa: F401 - the current modules, to restore afterwards

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="loader-baseline-"))
    names = ("posemap", "compositing", "loader")
    current = {n: sys.modules[f"serialgen.dataset.{n}"] for n in names}
    try:
        for n in names:
            src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:dataset/{n}.py"], check=True,
                                 capture_output=True).stdout
            (tmp / f"{n}.py").write_bytes(src)
            spec = importlib.util.spec_from_file_location(f"serialgen.dataset.{n}", tmp / f"{n}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        return sys.modules["serialgen.dataset.loader"]
    finally:
        sys.modules.update({f"serialgen.dataset.{n}": m for n, m in current.items()})


def _ab(args) -> dict:
    """The loader of commit ``--baseline`` (on ``--baseline-shards``, e.g. a format 2 copy of the same
    renders for a loader from before format 3) against this one, in one process, interleaved in
    0.3 s slices with the raw decodes of this set's members."""
    import torch

    from serialgen.dataset import cli
    from serialgen.dataset import loader as new_loader

    if not args.baseline:
        raise SystemExit("--mode ab needs --baseline REV (a commit whose dataset/loader.py to compare against)")
    torch.set_num_threads(1)
    old_loader = _load_baseline(args.baseline)
    bs = args.batch_size or None
    its = {"before": _reader(old_loader, args.baseline_shards or args.shards, args.backgrounds, args.resolution,
                             batch_size=bs, dtype=args.dtype),
           "now": _reader(new_loader, args.shards, args.backgrounds, args.resolution, batch_size=bs, dtype=args.dtype)}
    load0 = os.getloadavg()[0]
    rates = _interleaved(its, bs or 1, args.seconds, cli._raw_members(new_loader.RenderPairDataset(args.shards), 256))
    rate = {k: v["pairs_per_s"] for k, v in rates.items()}
    out = {"baseline": args.baseline, "batch_size": args.batch_size, "dtype": args.dtype,
           **{f"{k}_pairs_per_s": round(v, 1) for k, v in rate.items()},
           **{f"{k}_pairs_per_cpu_s": round(v["pairs_per_cpu_s"], 1) for k, v in rates.items()},
           "speedup": round(rate["now"] / rate["before"], 3),
           "ratio_before": round(rate["before"] / rate["raw"], 3), "ratio_now": round(rate["now"] / rate["raw"], 3),
           "ratio_now_ref_only": round(rate["now"] / rate["raw_ref"], 3),
           "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(out))
    return out


def _interleaved(its: dict, per_item: int, seconds: float, members, slice_s: float = 0.3) -> dict:
    """Pairs per wall-clock second and per CPU-second of this thread for each iterator in ``its``,
    run in turns (``slice_s`` each) with 0.1 s slices of the raw decode of the same members (ref +
    std per pair, and ref only), so that other jobs on the machine slow all alike."""
    from serialgen.dataset.shards import decode_png as dec

    names = list(its) + ["raw", "raw_ref"]
    counts, wall, cpu = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    i = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for k, it in its.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            while time.perf_counter() - t0 < slice_s:
                next(it)
                counts[k] += per_item
            wall[k] += time.perf_counter() - t0
            cpu[k] += time.thread_time() - c0
        for k in ("raw", "raw_ref"):
            t0, c0 = time.perf_counter(), time.thread_time()
            while time.perf_counter() - t0 < 0.1:
                ref, std = members[i % len(members)]
                dec(ref, "RGBA")
                if k == "raw":
                    dec(std, "RGB")
                i += 1
                counts[k] += 1
            wall[k] += time.perf_counter() - t0
            cpu[k] += time.thread_time() - c0
    return {k: {"pairs_per_s": counts[k] / wall[k], "pairs_per_cpu_s": counts[k] / cpu[k] if cpu[k] else float("nan")}
            for k in names}


def _reader(L, shards, backgrounds, resolution, **cfg):
    """An endless iterator of a loader (module ``L``) with its background pool already full."""
    names = {f.name for f in dataclasses.fields(L.LoaderConfig)}
    out_size = {"resolution" if "resolution" in names else "size": resolution}  # a baseline before the rename
    config = L.LoaderConfig(**out_size, resampled=True, **cfg)
    it = iter(L.RenderPairDataset(shards, backgrounds, config))
    for _ in range((config.background_pool + 32) // (cfg.get("batch_size") or 1)):
        next(it)
    return it


def _check(args) -> dict:
    """Issue 12.3: the loader with and without the damage check (PNG chunk CRCs), side by side in
    one process, interleaved in 0.3 s slices with the raw decodes."""
    import torch

    from serialgen.dataset import cli
    from serialgen.dataset import loader as L

    torch.set_num_threads(1)
    bs = args.batch_size or None
    its = {"checked": _reader(L, args.shards, args.backgrounds, args.resolution, batch_size=bs, dtype=args.dtype),
           "unchecked": _reader(L, args.shards, args.backgrounds, args.resolution, batch_size=bs, dtype=args.dtype,
                                integrity_check=False)}
    load0 = os.getloadavg()[0]
    rates = _interleaved(its, bs or 1, args.seconds, cli._raw_members(L.RenderPairDataset(args.shards), 256))
    out = {"batch_size": args.batch_size, "dtype": args.dtype,
           **{f"{k}_pairs_per_s": round(v["pairs_per_s"], 1) for k, v in rates.items()},
           **{f"{k}_pairs_per_cpu_s": round(v["pairs_per_cpu_s"], 1) for k, v in rates.items()},
           "check_cost": round(1 - rates["checked"]["pairs_per_s"] / rates["unchecked"]["pairs_per_s"], 4),
           "check_cost_cpu": round(1 - rates["checked"]["pairs_per_cpu_s"] / rates["unchecked"]["pairs_per_cpu_s"], 4),
           "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(out))
    return out


# -- route 2 of issue 15.3: compositing, masks and pose maps as batched torch ops "on the device" ---------

def _route2_worker(proc, sample: dict, size) -> dict:
    """What a DataLoader worker would still do on route 2: parse, check, decode, find the box, draw
    the placement and jitter (the same random draws as route 1), cut the box, take the background
    window, the cached standard. No compositing, no mask, no pose map."""
    from PIL import Image

    from serialgen.dataset import compositing as C
    from serialgen.dataset import loader as L
    from serialgen.dataset import posemap as pm
    from serialgen.dataset import shards as S

    meta = json.loads(sample["meta.json"])
    pose = pm.parse_pose(sample["ref_pose.json"])
    L._check_png(sample["ref.png"])
    ref = S.decode_png(sample["ref.png"], "RGBA")
    std, own = proc._standard(sample, meta, sample["__url__"])
    std_pose = proc._std_pose(own)
    background = proc.backgrounds.sample_array()  # the draws in route 1's order
    bbox = Image.fromarray(ref, "RGBA").getbbox(alpha_only=True)
    x0, y0, x1, y1 = bbox
    dx0, dy0, dw, dh = C.place_reference(bbox, (ref.shape[1], ref.shape[0]), proc.composite_cfg, proc.rng)
    amount = proc.composite_cfg.jitter
    r = proc.rng
    contrast, bright = 1 + r.uniform(-amount, amount), 1 + r.uniform(-amount, amount)
    gains = [bright * (1 + r.uniform(-amount / 2, amount / 2)) for _ in range(3)]
    sx, sy = dw / (x1 - x0), dh / (y1 - y0)
    return {"box": np.ascontiguousarray(ref[y0:y1, x0:x1]), "place": (dx0, dy0, dw, dh), "contrast": contrast,
            "gains": gains, "background": background, "std": std, "std_pose": std_pose,
            "pose": pose.transformed(sx, sy, dx0 - x0 * sx, dy0 - y0 * sy, size)}


def _route2_collate(items: list[dict], size):
    """The worker's batch: boxes padded into one (B, Hm, Wm, 4) uint8 tensor, the background windows
    (B, H, W, 3), placement and jitter parameters, keypoints (B, 66, 3)."""
    import torch

    from serialgen.dataset import loader as L

    w, h = size
    hm = max(it["box"].shape[0] for it in items)
    wm = max(it["box"].shape[1] for it in items)
    boxes = torch.zeros((len(items), hm, wm, 4), dtype=torch.uint8)
    bgs = L._empty((len(items), h, w, 3), torch.uint8)
    for b, it in enumerate(items):
        bh, bw = it["box"].shape[:2]
        boxes[b, :bh, :bw] = torch.from_numpy(it["box"])
        bgs[b].copy_(torch.from_numpy(np.ascontiguousarray(it["background"])))
    std = L._images_tensor([it["std"] for it in items], "std", "uint8", True)
    std_pose = L._images_tensor([it["std_pose"] for it in items], "std_pose", "uint8", True)
    params = torch.tensor([[*it["place"], *it["box"].shape[:2], it["contrast"], *it["gains"]] for it in items],
                          dtype=torch.float32)
    kps = torch.from_numpy(np.stack([it["pose"].as_array() for it in items]))
    return {"boxes": boxes, "backgrounds": bgs, "params": params, "keypoints": kps, "std": std, "std_pose": std_pose}


def _route2_device(batch: dict, size, draw_pose: bool = True) -> dict:
    """Route 2's work in the training step, as batched torch ops (run here on the CPU, one thread):
    jitter + premultiply the padded boxes, place and resample them with one ``grid_sample`` (per
    sample affine grids; bilinear without antialiasing: the batched op has none), blend over the
    backgrounds, threshold the mask, and rasterise the pose maps (DWPose's limbs as distance-to-
    segment ellipses, joint discs) for the whole batch at once."""
    import torch
    import torch.nn.functional as F

    from serialgen.dataset import posemap as pm

    w, h = size
    boxes = batch["boxes"].permute(0, 3, 1, 2).float()  # (B, 4, Hm, Wm)
    p = batch["params"]
    B, _, hm, wm = boxes.shape
    contrast, gains = p[:, 6], p[:, 7:10]
    rgb = ((boxes[:, :3] - 128) * contrast[:, None, None, None] + 128) * gains[:, :, None, None]
    rgb = rgb.add_(0.5).floor_().clamp_(0, 255)
    a = boxes[:, 3:4]
    prem = torch.cat([rgb * a / 255, a], 1)
    dx0, dy0, dw, dh, bh, bw = (p[:, i] for i in range(6))
    # output pixel centre (x + 0.5) -> box pixel (x + 0.5 - dx0) * bw / dw, in the padded box's [-1, 1]
    theta = torch.zeros((B, 2, 3))
    theta[:, 0, 0] = (w / dw) * (bw / wm)
    theta[:, 0, 2] = ((w / 2 - dx0) / dw * bw) * 2 / wm - 1
    theta[:, 1, 1] = (h / dh) * (bh / hm)
    theta[:, 1, 2] = ((h / 2 - dy0) / dh * bh) * 2 / hm - 1
    grid = F.affine_grid(theta, (B, 4, h, w), align_corners=False)
    placed = F.grid_sample(prem, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bg = batch["backgrounds"].permute(0, 3, 1, 2).float()
    alpha = placed[:, 3:4]
    ref = (placed[:, :3] + bg * (1 - alpha / 255)).round_().clamp_(0, 255).to(torch.uint8)
    mask = (alpha < 128).to(torch.uint8)
    out = {"ref": ref, "ref_mask": mask}
    if draw_pose:
        out["ref_pose"] = _route2_pose_maps(batch["keypoints"], size)
    return out


def _route2_pose_maps(kps, size):
    """DWPose maps for a batch, rasterised with tensor ops: each limb an ellipse (distance to its
    segment, scaled along it), then joint discs, then hand edges and points, in DWPose's order."""
    import torch

    from serialgen.dataset import posemap as pm

    w, h = size
    k = pm.line_scale(size)
    B = kps.shape[0]
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    canvas = torch.zeros((B, 3, h, w))
    vis = kps[..., 2] > 0
    xy = kps[..., :2]

    def paint(hit, colour):
        canvas.mul_(~hit[:, None]).add_(hit[:, None] * torch.tensor(colour, dtype=torch.float32)[None, :, None, None])

    limbs = list(zip(pm._LIMBS_A.tolist(), pm._LIMBS_B.tolist()))
    for j, (ia, ib) in enumerate(limbs):
        ok = vis[:, ia] & vis[:, ib]
        if not ok.any():
            continue
        a, b = xy[:, ia], xy[:, ib]
        c = (a + b) / 2
        d = b - a
        half = torch.linalg.norm(d, dim=1).clamp_min(1e-3) / 2
        u = d / (2 * half[:, None])
        rx = (xs[None] - c[:, 0, None, None]) * u[:, 0, None, None] + (ys[None] - c[:, 1, None, None]) * u[:, 1, None, None]
        ry = -(xs[None] - c[:, 0, None, None]) * u[:, 1, None, None] + (ys[None] - c[:, 1, None, None]) * u[:, 0, None, None]
        hit = ((rx / half[:, None, None]) ** 2 + (ry / (4.0 * k)) ** 2 <= 1) & ok[:, None, None]
        paint(hit, pm._LIMB_FILL[j])
    r2 = (4.0 * k) ** 2
    for i in range(24):
        ok = vis[:, i]
        if not ok.any():
            continue
        hit = (((xs[None] - xy[:, i, 0, None, None]) ** 2 + (ys[None] - xy[:, i, 1, None, None]) ** 2) <= r2) & ok[:, None, None]
        paint(hit, pm.BODY_COLOURS[i] if i < 18 else pm.FOOT_COLOURS[i - 18])
    half_w = max(1, int(round(2 * k))) / 2
    for off in (24, 45):
        for e, (ia, ib) in enumerate(pm.HAND_EDGES):
            ok = vis[:, off + ia] & vis[:, off + ib]
            if not ok.any():
                continue
            a, b = xy[:, off + ia], xy[:, off + ib]
            d = b - a
            t = (((xs[None] - a[:, 0, None, None]) * d[:, 0, None, None] + (ys[None] - a[:, 1, None, None])
                  * d[:, 1, None, None]) / (d ** 2).sum(1).clamp_min(1e-6)[:, None, None]).clamp(0, 1)
            px = a[:, 0, None, None] + t * d[:, 0, None, None] - xs[None]
            py = a[:, 1, None, None] + t * d[:, 1, None, None] - ys[None]
            paint((px ** 2 + py ** 2 <= half_w ** 2) & ok[:, None, None], pm.HAND_EDGE_COLOURS[e])
        for i in range(21):
            ok = vis[:, off + i]
            if not ok.any():
                continue
            hit = (((xs[None] - xy[:, off + i, 0, None, None]) ** 2 + (ys[None] - xy[:, off + i, 1, None, None]) ** 2)
                   <= r2) & ok[:, None, None]
            paint(hit, pm.HAND_POINT_COLOUR)
    return canvas.to(torch.uint8)


def _routes(args) -> dict:
    """Issue 15.3: route 1 (everything in the worker, the character's box composited by the fused
    compiled passes) against route 2 (the worker reads and decodes; compositing, masks and pose maps
    are batched torch ops in the training step, timed here on the CPU), per pair, counting ALL the
    work, on the same real samples held in memory, interleaved batch by batch. Route 2 is also
    timed with the pose maps drawn in the worker (PIL, as route 1) and only compositing + mask on
    the device."""
    import torch

    from serialgen.dataset import loader as L
    from serialgen.dataset import posemap as pm

    torch.set_num_threads(1)
    samples, tar_ms = _samples(args.shards)
    size = args.resolution
    cfg = L.LoaderConfig(resolution=size, batch_size=8, dtype="uint8")
    ds = L.RenderPairDataset(args.shards, args.backgrounds, cfg)
    procs = {k: L._SampleProcessor(ds, L.LoaderStats(), random.Random(0)) for k in ("route1", "route2", "route2a")}
    for proc in procs.values():
        for s in (samples * 4)[: cfg.background_pool + 16]:
            proc(dict(s))
    cpu = {k: 0.0 for k in ("route1", "route2 worker", "route2 device", "route2a worker", "route2a device")}
    n = 0
    agreement = None
    for r in range(args.rounds):
        for start in range(0, len(samples) - 7, 8):
            chunk = samples[start:start + 8]
            t = time.thread_time()
            one = procs["route1"].collate([procs["route1"](dict(s)) for s in chunk])
            cpu["route1"] += time.thread_time() - t
            t = time.thread_time()
            batch = _route2_collate([_route2_worker(procs["route2"], dict(s), size) for s in chunk], size)
            t1 = time.thread_time()
            two = _route2_device(batch, size, draw_pose=True)
            t2 = time.thread_time()
            if agreement is None:  # the same samples, draws and backgrounds: how close are the two routes?
                m1, m2 = one["ref_mask"] == 0, two["ref_mask"] == 0
                agreement = {"ref_mean_abs_diff": float((one["ref"].float() - two["ref"].float()).abs().mean()),
                             "mask_iou": float((m1 & m2).sum() / (m1 | m2).sum()),
                             "pose_map_pixels_equal": float((one["ref_pose"] == two["ref_pose"]).all(1).float().mean())}
            cpu["route2 worker"] += t1 - t
            cpu["route2 device"] += t2 - t1
            t = time.thread_time()
            items = [_route2_worker(procs["route2a"], dict(s), size) for s in chunk]
            L._images_tensor([pm.draw_pose_region(it["pose"], size) for it in items], "ref_pose", "uint8", True)
            batch = _route2_collate(items, size)
            t1 = time.thread_time()
            _route2_device(batch, size, draw_pose=False)
            cpu["route2a worker"] += t1 - t
            cpu["route2a device"] += time.thread_time() - t1
            n += 8
    ms = {k: v / n * 1e3 + (tar_ms if "device" not in k else 0.0) for k, v in cpu.items()}
    totals = {"route 1 (fused, in the worker)": ms["route1"],
              "route 2 (compositing, masks, pose maps on the device)": ms["route2 worker"] + ms["route2 device"],
              "route 2a (compositing, masks on the device; pose maps in the worker)":
                  ms["route2a worker"] + ms["route2a device"]}
    print(f"ms per pair (this thread's CPU time, tar reading {tar_ms:.3f} ms included, {n} pairs per route, "
          f"load {os.getloadavg()[0]:.2f}):")
    for k, v in ms.items():
        print(f"  {k:24s} {v:8.3f}")
    for k, v in totals.items():
        print(f"  total, {k:70s} {v:8.3f} ms  ({1e3 / v:.1f} pairs per CPU-second)")
    print(f"  route 2 against route 1 on the first batch: {json.dumps(agreement)}")
    return {"ms_per_pair": ms, "totals": totals, "tar_ms": tar_ms, "agreement": agreement}


class _StdlibZlib:
    """``encode_png``'s compressor swapped for the standard library's zlib (the comparison row)."""

    @staticmethod
    def zlib_compress(data, level):
        import zlib

        return zlib.compress(data, level)


def _png(args) -> dict:
    """PNG levels and filters on the set's real images: per option, encode ms (this thread's CPU
    time, as the render job pays it), bytes, and decode ms with the loader's decoder (pyspng), for
    the references (RGBA) and the standards (RGB); options interleaved round by round so that load
    from other jobs hits all alike. Bytes per pair at the default shard size (1,000 pairs of one
    character): ref.png + the three JSON members + their tar headers and padding + the standard tar
    shared by 1,000 pairs."""
    from serialgen.dataset import shards as S
    from serialgen.dataset import tarset as T

    index = S.read_index(args.shards)
    root = T.index_path(args.shards).parent
    refs, json_bytes = [], []
    for e in index["shards"]:
        for key, m in S.iter_shard(root / e["path"]):
            refs.append(S.decode_png(m["ref.png"], "RGBA"))
            json_bytes.append(sum(len(m[k]) for k in ("ref_pose.json", "std_pose.json", "meta.json")))
    stds = [S.decode_png(S.read_standard(p, c)["std.png"], "RGB") for c, p in S.standard_paths(args.shards, index).items()]
    refs = refs[: args.limit]
    # (filter, level, compressor): every filter with libdeflate (what encode_png uses), and the
    # standard library's zlib for filter "none" (what it used before), side by side.
    options = [(f, lvl, "libdeflate") for f in ("none", "sub", "up", "paeth", "adaptive") for lvl in (1, 3, 6, 9)]
    options += [("none", lvl, "zlib") for lvl in (1, 3, 6, 9)]

    def encode(arr, o):
        if o[2] == "libdeflate":
            return S.encode_png(arr, o[1], o[0])
        real = S.deflate
        S.deflate = _StdlibZlib  # the same PNG, its zlib stream from the standard library
        try:
            return S.encode_png(arr, o[1], o[0])
        finally:
            S.deflate = real

    stats = {o: {"ref_enc": 0.0, "ref_dec": 0.0, "ref_bytes": 0, "std_enc": 0.0, "std_dec": 0.0, "std_bytes": 0, "n": 0,
                 "ns": 0} for o in options}
    for _ in range(args.rounds):
        for o in options:
            st = stats[o]
            for arr in refs:
                t = time.thread_time()
                png = encode(arr, o)
                t1 = time.thread_time()
                S.decode_png(png, "RGBA")
                st["ref_enc"] += t1 - t
                st["ref_dec"] += time.thread_time() - t1
                st["ref_bytes"] += len(png)
                st["n"] += 1
            for arr in stds:
                t = time.thread_time()
                png = encode(arr, o)
                t1 = time.thread_time()
                S.decode_png(png, "RGB")
                st["std_enc"] += t1 - t
                st["std_dec"] += time.thread_time() - t1
                st["std_bytes"] += len(png)
                st["ns"] += 1
    pad = lambda n: 512 + -(-n // 512) * 512  # noqa: E731  a tar member: header + data padded to 512
    json_per_pair = sum(pad(j // 3) * 3 for j in json_bytes) / len(json_bytes)
    rows = []
    for o, st in stats.items():
        ref_b, std_b = st["ref_bytes"] / st["n"], st["std_bytes"] / max(1, st["ns"])
        v3 = pad(ref_b) + json_per_pair + (pad(std_b) + 2 * 512 + 1536) / 1000  # + the standard tar, shared
        v2 = v3 + pad(std_b)  # formats 1-2: std.png in every pair
        rows.append({"filter": o[0], "level": o[1], "compressor": o[2], "ref_kb": ref_b / 1e3, "ref_enc_ms": st["ref_enc"] / st["n"] * 1e3,
                     "ref_dec_ms": st["ref_dec"] / st["n"] * 1e3, "std_kb": std_b / 1e3,
                     "std_enc_ms": st["std_enc"] / max(1, st["ns"]) * 1e3,
                     "std_dec_ms": st["std_dec"] / max(1, st["ns"]) * 1e3,
                     "pair_kb_v3": v3 / 1e3, "pair_kb_v2": v2 / 1e3})
    print(f"{len(refs)} references, {len(stds)} standards, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
    print("| compressor | filter | level | ref KB | ref encode ms | ref decode ms | std KB | std encode ms | std decode ms "
          "| KB per pair, format 3 | format 2 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['compressor']} | {r['filter']} | {r['level']} | {r['ref_kb']:.1f} | {r['ref_enc_ms']:.2f} | {r['ref_dec_ms']:.2f} | "
              f"{r['std_kb']:.1f} | {r['std_enc_ms']:.2f} | {r['std_dec_ms']:.2f} | {r['pair_kb_v3']:.1f} | "
              f"{r['pair_kb_v2']:.1f} |")
    return {"rows": rows, "json_bytes_per_pair": json_per_pair}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="shard set (folder, index.json, .tar or brace pattern)")
    p.add_argument("--backgrounds", default=None, help="backgrounds folder or assets folder (default: procedural)")
    p.add_argument("--mode", choices=("configs", "steps", "alternatives", "ab", "png", "check", "routes"),
                   default="configs")
    p.add_argument("--limit", type=int, default=24, help="png: references measured")
    p.add_argument("--baseline", default=None, help="ab: the earlier commit to compare against")
    p.add_argument("--baseline-shards", default=None,
                   help="ab: the set the baseline reads (default SHARDS; a format 2 copy for a loader before format 3)")
    p.add_argument("--batch-size", type=int, default=8, help="ab, check: batch size (0 = single samples)")
    p.add_argument("--dtype", choices=("uint8", "float32"), default="uint8", help="ab, check: output dtype")
    add_resolution_argument(p, help="output size, width x height")
    p.add_argument("--seconds", type=float, default=10.0, help="configs, ab: measuring time (per configuration)")
    p.add_argument("--rounds", type=int, default=5, help="steps/alternatives: passes over the samples")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    print(f"loader benchmark, mode {args.mode}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    modes = {"configs": _configs, "steps": _steps, "alternatives": _alternatives, "ab": _ab, "png": _png,
             "check": _check, "routes": _routes}
    result = modes[args.mode](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": args.mode, "load_average_1min": os.getloadavg()[0], "result": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
