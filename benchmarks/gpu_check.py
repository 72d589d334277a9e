"""GPU readiness in one run: paper-size Stage I and Stage II training steps and Stage I inference.

    make gpu-check                                    # on the lent GPU machine (python3 benchmarks/gpu_check.py)
    python benchmarks/gpu_check.py --tiny --budget-s 120    # CPU smoke run of the same code, tiny models
    python benchmarks/gpu_check.py --tiny --only stage1-inference --steps 5  # Stage I inference fp32 vs bf16, CPU

What it measures, in this order, each as soon as the previous one ends:

1. Stage I training step at 512x768, bf16 autocast over fp32 trainable weights (fp32 in the CPU smoke
   run), batch 4 and 8, with and without gradient checkpointing: seconds per step (median of the timed steps) and peak GPU memory.
   Two SD1.5 UNets (ReferenceNet + denoiser, FBDM, RPIM, pose guider), the SD VAE and CLIP ViT-L/14,
   random-initialised from their configs (no weights: speed and memory do not depend on the values).
2. Stage I inference (``StandardizePipeline``: 20 DDIM steps, CFG) at 512x768, batch 4, fp32 and bf16:
   images per second. What pair building runs over ~300k pictures.
3. Stage II training step (IP-Adapter Full on SDXL, the real ``prepare_inputs`` + ``denoising_loss``):
   batch 4 and 8, with and without gradient checkpointing, bf16 frozen weights.

It fits the lent machine (/work/.library/device/README.md): Python 3.12 with torch, accelerate and
transformers but no diffusers and no package registry. So it runs the project from source (the
repository root is put on the import path as the ``serialgen`` package; nothing is installed), and when
diffusers cannot be imported it installs the pure-Python wheel found in ``--wheels`` (default ``.whl/``,
a folder to carry: ``pip download diffusers==0.42.1 --no-deps -d .whl``) into a temporary folder.
Nothing imports bpy or the render package (checked at the end).

It ends within ``--budget-s`` seconds (default 330, under the 6 minutes one device check may take): a
measurement that would not finish in the time left is skipped and named, every result is printed as
one JSON line the moment it exists (``gpu-check: {...}``), and ``--json FILE`` is rewritten after each,
so a run cut short still leaves everything it measured. A configuration that runs out of memory is
reported as ``"oom": true``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
WIDTH, HEIGHT = 512, 768  # the paper's size (serialgen.resolution.DEFAULT_RESOLUTION, not importable yet here)
PARTS = ("stage1-train", "stage1-inference", "stage2-train")


# ------------------------------------------------------------------------------------------ environment

def _use_source_tree() -> str:
    """Make ``serialgen.<part>`` importable from this checkout when the project is not installed.

    The distribution maps ``serialgen.training`` to ``training/`` and so on (pyproject's package-dir);
    without an install, putting the repository root on ``serialgen.__path__`` gives the same names."""
    if importlib.util.find_spec("serialgen") is None:
        sys.path.insert(0, str(ROOT))
    import serialgen

    if importlib.util.find_spec("serialgen.training") is None:
        serialgen.__path__.append(str(ROOT))
        return "source tree (not installed)"
    return "installed"


def _ensure_diffusers(wheels: Path) -> str:
    """diffusers' version, installing its pure-Python wheel from ``wheels`` (no registry) when missing."""
    if importlib.util.find_spec("diffusers") is None:
        found = sorted(wheels.glob("diffusers-*.whl"))
        if not found:
            raise SystemExit(f"gpu-check: diffusers is not installed and {wheels} holds no diffusers-*.whl "
                             "(here: pip download diffusers==0.42.1 --no-deps -d .whl, and carry .whl)")
        target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(target), str(found[-1])], check=True)
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    import diffusers

    return diffusers.__version__


# ------------------------------------------------------------------------------------------ bookkeeping

class Budget(Exception):
    """Raised by the alarm when the whole run's time is up."""


class Report:
    """Results printed one JSON line each, as they come, and mirrored to ``--json``."""

    def __init__(self, path: str | None, budget_s: float):
        self.path, self.budget_s = path, budget_s
        self.start = time.monotonic()
        self.data: dict[str, Any] = {"complete": False, "results": [], "skipped": []}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, **result: Any) -> None:
        result["at_s"] = round(time.monotonic() - self.start, 1)
        self.data["results"].append(result)
        print("gpu-check: " + json.dumps(result), flush=True)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        print("gpu-check: " + json.dumps({"skipped": what, "why": why}), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            tmp = Path(self.path).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


def _load(name: str):
    """A sibling benchmark script as a module (the paper-size model configs and step code live there)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(run_step: Callable[[], Any], sync: Callable[[], None], warmup: int, steps: int) -> tuple[float, Any]:
    """Median seconds of ``steps`` calls after ``warmup`` calls; returns (median, last result)."""
    out = None
    for _ in range(warmup):
        out = run_step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = run_step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ------------------------------------------------------------------------------------------ the checks

def _train_dtype(torch, device):
    """bf16 autocast on the GPU (the paper configs' mixed precision); fp32 in the CPU smoke run, where
    bf16 matrix products are emulated and a tiny step takes tens of seconds instead of one."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def stage1_checks(report: Report, torch, device, tiny: bool, batches: list[int], width: int, height: int,
                  warmup: int, steps: int, gen_steps: int, parts: tuple[str, ...]) -> None:
    bench = _load("stage1_gpu_step")
    from serialgen.training.common.tiny_models import build_tiny_scheduler

    dtype = _train_dtype(torch, device)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model, vae, clip = bench.build(tiny, device)
    model.to(device).train()
    vae.to(device, dtype=dtype).eval()
    clip.to(device, dtype=dtype).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    scheduler = build_tiny_scheduler()  # SD1.5's schedule
    report.add(check="stage1 build", seconds=round(time.perf_counter() - t0, 1),
               trainable_params_M=round(sum(p.numel() for p in trainable) / 1e6, 1))
    g = torch.Generator().manual_seed(0)
    cost = None  # seconds the last training configuration took, to judge whether the next one fits
    for batch_size in (batches if "stage1-train" in parts else []):
        shape = (batch_size, 3, height, width)
        batch = {"ref": (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype),
                 "std": (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype),
                 "ref_pose": torch.rand(shape, generator=g).to(device),
                 "std_pose": torch.rand(shape, generator=g).to(device),
                 "ref_mask": (torch.rand(batch_size, 1, height, width, generator=g) > 0.5).float().to(device)}
        for checkpointing in (True, False):
            what = f"stage1 train batch {batch_size} checkpointing {'on' if checkpointing else 'off'}"
            if cost is not None and report.left() < 1.5 * cost * batch_size / batches[0]:
                report.skip(what, "time budget")
                continue
            s0 = time.perf_counter()
            result = bench.measure(model, vae, clip, scheduler, optimizer, batch, dtype, device, checkpointing,
                                   warmup, steps)
            cost = time.perf_counter() - s0
            report.add(check=what, resolution=f"{width}x{height}", dtype=str(dtype).removeprefix("torch."), **result)
    del optimizer
    for p in trainable:
        p.grad = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    if "stage1-inference" in parts:
        stage1_inference(report, torch, (model, vae, clip), scheduler, batches[0], width, height, gen_steps, steps)
    del model, vae, clip
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def stage1_inference(report: Report, torch, networks, scheduler, n: int, width: int, height: int, gen_steps: int,
                     rounds: int) -> None:
    """Images/s of the standardization pipeline (DDIM, CFG 3.5) in fp32 and bf16 on the same random
    weights. The two dtypes alternate, one call each per round, so a change of machine load during the
    run touches both alike; each dtype gets one untimed call first."""
    from serialgen.training.stage1.data import canonical_pose_map
    from serialgen.training.stage1.pipeline import StandardizePipeline

    model, vae, clip = networks
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.eval()
    g = torch.Generator().manual_seed(3)
    refs = torch.rand(n, 3, height, width, generator=g) * 2 - 1
    masks = (torch.rand(n, 1, height, width, generator=g) > 0.5).float()
    poses = torch.rand(n, 3, height, width, generator=g)
    pipe = StandardizePipeline(model, vae, clip, scheduler, canonical_pose=canonical_pose_map((width, height)),
                               num_inference_steps=gen_steps, guidance_scale=3.5, resolution=(width, height))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    times: dict[str, list[float]] = {name: [] for name in dtypes}
    cpu_times: dict[str, list[float]] = {name: [] for name in dtypes}
    peaks: dict[str, float] = {}

    def call(name: str) -> tuple[float, float]:
        for module in networks:
            module.to(dtype=dtypes[name])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        pipe(refs, masks, poses, generator=torch.Generator().manual_seed(0))
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return time.perf_counter() - t0, time.process_time() - c0

    first = {name: call(name)[0] for name in dtypes}  # untimed: kernels chosen, caches warm
    for _ in range(max(rounds, 1)):
        if report.left() < 1.5 * sum(first.values()):
            break
        for name in dtypes:
            wall, cpu = call(name)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    for name in dtypes:
        seconds = statistics.median(times[name]) if times[name] else first[name]
        # CPU seconds of this process: on a shared CPU the figure that other load does not stretch
        cpu = {"cpu_seconds_per_call": round(statistics.median(cpu_times[name]), 3)} if not cuda and times[name] else {}
        report.add(check=f"stage1 inference {name} batch {n}", resolution=f"{width}x{height}", steps=gen_steps,
                   guidance=3.5, images_per_s=round(n / seconds, 3), seconds_per_call=round(seconds, 3), **cpu,
                   timed_calls=len(times[name]), peak_memory_gib=peaks.get(name),
                   **({} if times[name] else {"note": "untimed first call only (time budget)"}))
    fp32, bf16 = (statistics.median(times[k]) if times[k] else first[k] for k in ("fp32", "bf16"))
    report.add(check="stage1 inference bf16 / fp32 speed", ratio=round(fp32 / bf16, 3))


def stage2_checks(report: Report, torch, device, tiny: bool, batches: list[int], width: int, height: int,
                  warmup: int, steps: int) -> None:
    import contextlib

    bench = _load("stage2_gpu_step")
    from serialgen.training.stage2.components import build_tiny_components
    from serialgen.training.stage2.ip_adapter import AdapterView, attach_ip_adapter
    from serialgen.training.stage2.train import Stage2Denoiser, denoising_loss, prepare_inputs

    dtype = _train_dtype(torch, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    comps = build_tiny_components(0) if tiny else bench.build_full(str(device))
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.image_encoder):
        m.requires_grad_(False)
    comps.vae.to(device, torch.float32)  # as training: the SDXL VAE in fp32
    for m in (comps.text_encoder, comps.text_encoder_2, comps.image_encoder, comps.unet):
        m.to(device, dtype)
    params = attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size))
    view = AdapterView(comps.unet)
    optimizer = torch.optim.AdamW(view.parameters(), lr=1e-4, weight_decay=0.01)
    model = Stage2Denoiser(comps.unet).train()
    pipe = comps.pipeline()
    report.add(check="stage2 build", seconds=round(time.perf_counter() - t0, 1),
               trainable_params_M=round(sum(p.numel() for p in params) / 1e6, 1))
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if cuda else contextlib.nullcontext
    cost = None
    for batch_size in batches:
        data = bench.random_batch(batch_size, width, height)

        def step() -> float:
            inputs = prepare_inputs(comps, pipe, data, gen, drop={"image": 0.05, "text": 0.05, "both": 0.05},
                                    noise_offset=0.0, target_hw=(height, width), device=device)
            with autocast():
                loss = denoising_loss(model, inputs, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        for checkpointing in (True, False):
            what = f"stage2 train batch {batch_size} checkpointing {'on' if checkpointing else 'off'}"
            if cost is not None and report.left() < 1.5 * cost * batch_size / batches[0]:
                report.skip(what, "time budget")
                continue
            comps.unet.enable_gradient_checkpointing() if checkpointing else comps.unet.disable_gradient_checkpointing()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            s0 = time.perf_counter()
            try:
                seconds, loss = _timed(step, sync, warmup, steps)
                report.add(check=what, resolution=f"{width}x{height}", dtype=str(dtype).removeprefix("torch."),
                           seconds_per_step=round(seconds, 4),
                           samples_per_s=round(batch_size / seconds, 3), loss_finite=bool(loss == loss),
                           peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                report.add(check=what, oom=True)
            cost = time.perf_counter() - s0


def _size(text: str) -> tuple[int, int]:
    """``WxH``, multiples of 8 (serialgen.resolution's parser is not importable before the path is set)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be positive multiples of 8")
    return width, height


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models at 32x48, batches 2 and 4, on the CPU (a smoke run)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="the whole run ends within this many seconds, partial results kept (default 330)")
    ap.add_argument("--json", help="also write the results to this JSON file (rewritten after each result)")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"),
                    help="folder with the diffusers wheel, used only when diffusers is not installed (default .whl/)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first (default 1)")
    ap.add_argument("--gen-steps", type=int, default=None, help="DDIM steps of the inference check (default 20; tiny 2)")
    ap.add_argument("--resolution", type=_size, metavar="WxH", help="image size (default 512x768; tiny 32x48)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU runs: torch threads (default: up to 4; 1 keeps a shared machine's load out of the timings)")
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run only these checks (repeatable; default all, in this order: " + ", ".join(PARTS) + ")")
    args = ap.parse_args(argv)

    report = Report(args.json, args.budget_s)

    def out_of_time(signum, frame):
        raise Budget()

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(int(args.budget_s), 1))
    status = 0
    try:
        report.data["project"] = _use_source_tree()
        import torch

        report.data["diffusers"] = _ensure_diffusers(Path(args.wheels))
        import transformers

        cuda = torch.cuda.is_available() and not args.tiny
        device = torch.device("cuda" if cuda else "cpu")
        width, height = args.resolution or ((32, 48) if args.tiny else (WIDTH, HEIGHT))
        report.data.update(
            python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
            device=torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
            size="tiny models" if args.tiny else "paper (SD1.5 / SDXL configs, random weights)",
            resolution=f"{width}x{height}",
            budget_s=args.budget_s)
        print("gpu-check: " + json.dumps({k: v for k, v in report.data.items() if k not in ("results", "skipped")}),
              flush=True)
        if not cuda and not args.tiny:
            print("gpu-check: no CUDA device; run with --tiny for the CPU smoke run", file=sys.stderr)
            return 2
        if not cuda:
            torch.set_num_threads(args.threads or min(4, os.cpu_count() or 1))
        batches = [2, 4] if args.tiny else [4, 8]
        gen_steps = args.gen_steps or (2 if args.tiny else 20)
        parts = tuple(args.only or PARTS)
        if "stage1-train" in parts or "stage1-inference" in parts:
            stage1_checks(report, torch, device, args.tiny, batches, width, height, args.warmup, args.steps, gen_steps,
                          parts)
        if "stage2-train" in parts:
            if report.left() < 20:
                report.skip("stage2", "time budget")
            else:
                stage2_checks(report, torch, device, args.tiny, batches, width, height, args.warmup, args.steps)
        report.data["complete"] = not report.data["skipped"]
    except Budget:
        report.skip("the rest", f"the run reached --budget-s {args.budget_s:g}")
        status = 0
    finally:
        signal.alarm(0)
        loaded = sorted(m for m in sys.modules if m == "bpy" or m.startswith(("bpy.", "serialgen.render")))
        report.data["imported_render_or_bpy"] = loaded
        report.data["wall_s"] = round(time.monotonic() - report.start, 1)
        report.save()
        print("gpu-check: summary " + json.dumps(report.data, indent=1), flush=True)
    if report.data["imported_render_or_bpy"]:
        print(f"gpu-check: imported {report.data['imported_render_or_bpy']}: training must not reach render/", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
