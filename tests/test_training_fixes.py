"""Bugs that would first show on a GPU run, each caught on the CPU (issue 14, item 4):

- a resume with EMA put the EMA's shadow weights back on the CPU (safetensors loads there) while the
  model lives on the GPU; here the EMA lives on the ``meta`` device or in float64 instead;
- Stage II validation set the adapter scale on the UNet being trained and never put it back;
- Stage I inference had a dtype that no command could choose (`standardize --dtype`, and the
  standardizer that Stage II's pair building and `generate` run);
- Stage I asked DDP to search for unused parameters in every step although none are unused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel  # the class the training loop uses; imported once, at collection

from serialgen.training.common.checkpointing import load_checkpoint, save_checkpoint

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


def _ema_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = EMAModel(list(model.parameters()), decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(list(model.parameters()))
    path = save_checkpoint(tmp_path, 7, model, train_state={}, config={"seed": 0}, ema=ema)
    return model, ema, path


@pytest.mark.parametrize("placement", [{"dtype": torch.float64}, {"device": "meta"}], ids=["float64", "meta"])
def test_resume_keeps_the_ema_where_it_lives(tmp_path, placement):
    """The training loop places the EMA on the accelerator's device before the resume; loading must
    keep each shadow weight there (the old load left CPU float32 tensors: a device mix at the next step)."""
    model, saved_ema, path = _ema_checkpoint(tmp_path)
    fresh = EMAModel(list(model.parameters()), decay=0.9)
    fresh.to(**placement)
    load_checkpoint(path, model, ema=fresh)
    want_device = torch.device(placement.get("device", "cpu"))
    want_dtype = placement.get("dtype", torch.float32)
    assert [(p.device, p.dtype) for p in fresh.shadow_params] == [(want_device, want_dtype)] * 4
    assert fresh.optimization_step == saved_ema.optimization_step
    if want_device.type == "cpu":
        for got, expected in zip(fresh.shadow_params, saved_ema.shadow_params):
            assert torch.allclose(got, expected.double())


def test_ip_adapter_scale_comes_back_after_the_block():
    from serialgen.training.stage2.components import build_tiny_components
    from serialgen.training.stage2.ip_adapter import attach_ip_adapter, ip_adapter_scale

    comps = build_tiny_components(0)
    attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size))
    pipe = comps.pipeline()
    processors = [p for p in comps.unet.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]
    assert processors and all(p.scale == [1.0] for p in processors)
    with ip_adapter_scale(pipe, 0.3):
        assert all(p.scale == [0.3] for p in processors)
    assert all(p.scale == [1.0] for p in processors)
    with pytest.raises(RuntimeError), ip_adapter_scale(pipe, 0.5):
        raise RuntimeError("a validation grid that fails")
    assert all(p.scale == [1.0] for p in processors)  # also when the grid fails


@pytest.mark.slow
def test_stage2_validation_grid_leaves_the_training_scale_alone(tmp_path):
    """A validation grid at ip_adapter_scale 0.3 on the UNet being trained: afterwards the training
    forward must be the one at scale 1 again (before the fix every later step trained at 0.3)."""
    from serialgen.training.stage2.components import build_tiny_components
    from serialgen.training.stage2.ip_adapter import attach_ip_adapter
    from serialgen.training.stage2.train import Stage2Denoiser, _validation_grid
    from PIL import Image

    comps = build_tiny_components(0)
    attach_ip_adapter(comps.unet, int(comps.image_encoder.config.hidden_size))
    pipe = comps.pipeline()
    model = Stage2Denoiser(comps.unet)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 12, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 64, generator=g),
              torch.randn(1, 32, generator=g), torch.tensor([[96.0, 64, 0, 0, 96, 64]]),
              torch.randn(1, 257, 32, generator=g))
    with torch.no_grad():
        before = model(*inputs)
    _validation_grid(pipe, [Image.new("RGB", (64, 96), (200, 40, 40))], ["a person"], tmp_path / "grid.png",
                     resolution=(64, 96), steps=1, guidance_scale=1.0, ip_scale=0.3, seed=0)
    with torch.no_grad():
        after = model(*inputs)
    assert (tmp_path / "grid.png").is_file()
    assert torch.equal(before, after)


def _tiny_stage1_checkpoint(tmp_path: Path) -> Path:
    """A Stage I checkpoint of the tiny models at 32x48, written without training (step 1)."""
    from serialgen.training.common.config import config_to_dict, override
    from serialgen.training.stage1.components import build_components
    from serialgen.training.stage1.config import load_stage1_config
    from serialgen.training.stage1.data import canonical_pose_map

    config = override(load_stage1_config("stage1-tiny"), {"data.resolution": "32x48", "output_dir": str(tmp_path)})
    parts = build_components(config)
    return save_checkpoint(tmp_path, 1, parts.model, train_state={"data": {}}, config=config_to_dict(config),
                           extra_tensors={"canonical_pose": {"std_pose": canonical_pose_map((32, 48))}},
                           model_config=parts.model.model_config())


@pytest.mark.slow
def test_standardize_runs_in_the_dtype_asked_for(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from serialgen.cli import main
    from serialgen.training.stage2.build_pairs import load_standardizer

    ckpt = _tiny_stage1_checkpoint(tmp_path / "run")
    standardizer = load_standardizer(str(ckpt), dtype="bf16", steps=1)  # what pair building and generate run
    assert {p.dtype for p in standardizer.pipeline.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in standardizer.pipeline.vae.parameters()} == {torch.bfloat16}
    picture = tmp_path / "ref.png"
    Image.fromarray(np.full((48, 32, 3), (180, 40, 40), np.uint8)).save(picture)
    images = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.png"
        assert main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(out),
                     "--steps", "1", "--dtype", dtype]) == 0
        images[dtype] = np.asarray(Image.open(out), np.int16)
    assert images["fp32"].shape == images["bf16"].shape == (48, 32, 3)
    assert not np.array_equal(images["fp32"], images["bf16"])  # the bf16 run really ran in bf16 ...
    assert np.abs(images["fp32"] - images["bf16"]).mean() < 12  # ... and still computes the same thing
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(tmp_path / "x.png"),
              "--dtype", "fp8"])
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'fp8'" in err


def test_inference_dtype_defaults_to_bf16_on_cuda_only():
    from serialgen.errors import UserInputError
    from serialgen.training.stage1.pipeline import inference_dtype

    assert inference_dtype("auto", "cuda:0") == torch.bfloat16 and inference_dtype(None, "cpu") == torch.float32
    assert inference_dtype("fp16", "cpu") == torch.float16 and inference_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(UserInputError, match="--dtype fp8: expected auto, fp32, bf16, fp16"):
        inference_dtype("fp8", "cpu")


def test_ddp_does_not_search_for_unused_parameters_by_default():
    from serialgen.training.common.config import packaged_config
    from serialgen.training.stage1.config import Stage1Config, load_stage1_config

    assert Stage1Config().train.ddp_find_unused_parameters is False
    for name in ("stage1", "stage1-tiny"):
        assert load_stage1_config(packaged_config(name)).train.ddp_find_unused_parameters is False


_DDP_PROBE = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from serialgen.training.common.config import override
from serialgen.training.stage1.components import build_components
from serialgen.training.stage1.config import load_stage1_config

torch.set_num_threads(2)
parts = build_components(override(load_stage1_config("stage1-tiny"), {"data.resolution": "32x48"}))
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = DDP(parts.model.train(), find_unused_parameters=False)
g = torch.Generator().manual_seed(0)
# references kept, all dropped (CFG), mixed: every trainable parameter must get a gradient each time
for use in ([True, True], [False, False], [True, False]):
    out = model(torch.randn(2, 4, 6, 4, generator=g), torch.tensor([10, 900]), torch.randn(2, 4, 6, 4, generator=g),
                torch.randn(2, 1, 32, generator=g), torch.rand(2, 3, 48, 32, generator=g),
                torch.rand(2, 3, 48, 32, generator=g), (torch.rand(2, 1, 48, 32, generator=g) > 0.5).float(),
                torch.tensor(use))
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.slow
def test_ddp_without_the_unused_parameter_search_trains_stage1(tmp_path):
    """DDP with find_unused_parameters=False stops at the second backward when any trainable parameter
    got no gradient: three steps on a one-process gloo group prove that none is unused."""
    done = subprocess.run([sys.executable, "-c", _DDP_PROBE, str(tmp_path / "pg")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
