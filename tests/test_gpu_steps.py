"""Paper-size training steps on a CUDA device (marker `gpu`; skipped without one; never in CI).

One optimizer step of each stage at 512x768 with random-initialised models of the paper's sizes (the
configs of SD1.5 + CLIP ViT-L/14 for Stage I, SDXL + OpenCLIP ViT-H/14 for Stage II, as built by
`benchmarks/stage1_gpu_step.py` and `benchmarks/stage2_gpu_step.py`), bf16 autocast with fp32 trainable
weights, gradient checkpointing on. Each must give a finite loss; peak memory is recorded
(`record_property`, shown with `pytest -rA` / in the JUnit XML) and printed.

    pytest -m gpu tests/test_gpu_steps.py -s
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from serialgen.resolution import DEFAULT_RESOLUTION

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WIDTH, HEIGHT = DEFAULT_RESOLUTION


def _benchmark(name: str):
    """The benchmark script as a module: the paper-size model configs live there, in one place."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def test_stage1_paper_size_step_bf16_with_gradient_checkpointing(record_property):
    from serialgen.training.common.tiny_models import build_tiny_scheduler

    bench = _benchmark("stage1_gpu_step")
    device, dtype, batch_size = torch.device("cuda"), torch.bfloat16, 4  # the paper: batch 4 per GPU
    model, vae, clip = bench.build(tiny=False)
    model.to(device).train()
    model.enable_gradient_checkpointing()
    vae.to(device, dtype=dtype).eval()
    clip.to(device, dtype=dtype).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, 3, HEIGHT, WIDTH)
    batch = {"ref": (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype),
             "std": (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype),
             "ref_pose": torch.rand(shape, generator=g).to(device), "std_pose": torch.rand(shape, generator=g).to(device),
             "ref_mask": (torch.rand(batch_size, 1, HEIGHT, WIDTH, generator=g) > 0.5).float().to(device)}
    torch.cuda.reset_peak_memory_stats()
    before = [p.detach().clone() for p in trainable[:4]]
    loss = bench.step(model, vae, clip, build_tiny_scheduler(), optimizer, batch, dtype, device)
    peak = _peak_gib()
    record_property("stage1_peak_memory_gib", peak)
    print(f"stage1 512x768 batch {batch_size} bf16 + gradient checkpointing: loss {loss:.4f}, peak {peak} GiB")
    assert math.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable[:4]))  # the optimizer stepped


def test_stage2_paper_size_step_bf16_with_gradient_checkpointing(record_property):
    from serialgen.training.stage2.ip_adapter import AdapterView, attach_ip_adapter
    from serialgen.training.stage2.train import Stage2Denoiser, denoising_loss, prepare_inputs

    bench = _benchmark("stage2_gpu_step")
    device, dtype, batch_size = "cuda", torch.bfloat16, 8  # the paper: batch 8 per GPU
    comps = bench.build_full(device)
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.image_encoder):
        m.requires_grad_(False)
    comps.vae.to(device, torch.float32)  # as training: SDXL's VAE in fp32
    for m in (comps.text_encoder, comps.text_encoder_2, comps.image_encoder, comps.unet):
        m.to(device, dtype)
    params = attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size))
    comps.unet.enable_gradient_checkpointing()
    view = AdapterView(comps.unet)
    optimizer = torch.optim.AdamW(view.parameters(), lr=1e-4, weight_decay=0.01)
    model = Stage2Denoiser(comps.unet).train()
    pipe = comps.pipeline()
    data = bench.random_batch(batch_size, WIDTH, HEIGHT)
    torch.cuda.reset_peak_memory_stats()
    inputs = prepare_inputs(comps, pipe, data, torch.Generator(device=device).manual_seed(0),
                            drop={"image": 0.05, "text": 0.05, "both": 0.05}, noise_offset=0.0,
                            target_hw=(HEIGHT, WIDTH), device=device)
    before = params[0].detach().clone()
    with torch.autocast(device_type="cuda", dtype=dtype):
        loss = denoising_loss(model, inputs, dtype)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    peak = _peak_gib()
    record_property("stage2_peak_memory_gib", peak)
    print(f"stage2 512x768 batch {batch_size} bf16 + gradient checkpointing: loss {loss.item():.4f}, peak {peak} GiB")
    assert math.isfinite(loss.item())
    assert not torch.equal(before, params[0])
