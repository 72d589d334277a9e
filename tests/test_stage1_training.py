"""Stage I training loop, resume, configs, CLI (standardize, eval) and metrics on tiny models (CPU).

Everything that trains (the module fixtures) is `slow`; metric and config checks are the fast tier.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from serialgen.cli import main
from serialgen.errors import UserInputError
from serialgen.training.common.config import override, packaged_config
from serialgen.training.common.image_metrics import psnr, ssim
from serialgen.training.stage1.config import load_stage1_config

torch.set_num_threads(2)

OVERFIT_STEPS = 16
K = 3  # interruption step of the resume test


def tiny_config(**train):
    config = load_stage1_config("stage1-tiny")
    return override(config, {
        "data.train_shards": "synthetic:2",
        "data.resolution": "32x48",  # latents 4 x 6: the step cost is mostly per-op overhead
        "train.learning_rate": 2e-3,
        "train.max_steps": OVERFIT_STEPS,
        "train.checkpoint_every": 0,  # only at the end
        "validation.every": 1000,  # and so only at the end
        "train.ema": True,
        "inference.num_inference_steps": 2,
        **{f"train.{key}": value for key, value in train.items()},
    })


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """An uninterrupted overfit run on 2 samples (also the reference for the resume test)."""
    from serialgen.training.stage1.train import train_stage1

    out = tmp_path_factory.mktemp("overfit")
    return train_stage1(tiny_config(), output_dir=out, resume="never")


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """The same run stopped after step K (checkpointed there), then resumed for one step."""
    from serialgen.training.stage1.train import train_stage1

    out = tmp_path_factory.mktemp("resumed")
    first = train_stage1(tiny_config(checkpoint_every=K), output_dir=out, resume="never", stop_after=K)
    second = train_stage1(tiny_config(checkpoint_every=K), output_dir=out, resume="auto", stop_after=1)
    return first, second


@pytest.mark.slow
def test_overfit_on_two_samples_lowers_the_loss(overfit_run):
    losses = [overfit_run.losses[s] for s in sorted(overfit_run.losses)]
    assert len(losses) == OVERFIT_STEPS
    start, end = np.mean(losses[:3]), np.mean(losses[-5:])
    assert end < 0.65 * start, losses
    lines = [json.loads(line) for line in (overfit_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, OVERFIT_STEPS + 1))
    assert {"loss", "lr", "samples_per_s"} <= set(lines[0])
    assert list((overfit_run.output_dir / "tensorboard").iterdir())
    grid = overfit_run.output_dir / "validation" / f"step-{OVERFIT_STEPS:08d}.png"
    assert Image.open(grid).size[0] > 3 * 32  # ref | predicted | target


@pytest.mark.slow
def test_resume_gives_the_same_loss_as_an_uninterrupted_run(overfit_run, interrupted_run):
    first, second = interrupted_run
    assert first.last_step == K and second.first_step == K + 1 and second.last_step == K + 1
    for step in range(1, K + 1):
        assert first.losses[step] == pytest.approx(overfit_run.losses[step], rel=1e-6)
    assert second.losses[K + 1] == pytest.approx(overfit_run.losses[K + 1], rel=1e-6)
    ckpt = first.last_checkpoint
    assert {p.name for p in ckpt.iterdir()} >= {"trainable.safetensors", "ema.safetensors", "optimizer.pt",
                                                 "rng-0.pt", "train_state.json", "config.yaml", "model_config.json"}
    # the canonical map for pictures: the reference figure at the model's size, not a training sample's map
    from safetensors.torch import load_file

    from serialgen.training.stage1.data import canonical_pose_map

    stored = load_file(str(ckpt / "canonical_pose.safetensors"))["std_pose"]
    assert torch.equal(stored, canonical_pose_map((32, 48)))
    model_config = json.loads((ckpt / "model_config.json").read_text())
    assert model_config["_class_name"] == "StandardizationModel" and model_config["use_fbdm"] is True
    assert model_config["unet"]["block_out_channels"] == [32, 64]
    assert (first.output_dir / "config.yaml").is_file()  # the run config, also beside every checkpoint
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == K
    # metrics.jsonl describes one consistent run after the resume
    steps = [json.loads(line)["step"] for line in (second.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, K + 2))


@pytest.mark.slow
def test_standardize_cli_writes_an_image(interrupted_run, tmp_path, capsys):
    ckpt = interrupted_run[0].last_checkpoint
    picture = tmp_path / "ref.png"
    rgba = np.zeros((80, 50, 4), np.uint8)
    rgba[20:70, 15:35] = (200, 30, 30, 255)  # an opaque figure on a transparent background
    Image.fromarray(rgba).save(picture)
    out = tmp_path / "out"
    assert main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(out), "--steps", "2"]) == 0
    image = Image.open(out / "ref.png")
    assert image.size == (32, 48) and image.mode == "RGB"
    assert main(["standardize", "--checkpoint", str(ckpt), "--input", "synthetic:2", "--out", str(out), "--steps", "2"]) == 0
    assert len(list(out.glob("synthetic-*.png"))) == 2
    capsys.readouterr()
    # another size: the same canonical figure, drawn at that size (the stored map is for the model's own)
    assert main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(out / "x.png"),
                 "--steps", "1", "--resolution", "64x96"]) == 0
    assert Image.open(out / "x.png").size == (64, 96)
    with pytest.raises(SystemExit):
        main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(out), "--width", "64"])
    assert "--width was renamed: use --resolution WxH" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_prints_psnr_and_ssim(interrupted_run, capsys):
    ckpt = interrupted_run[0].last_checkpoint
    assert main(["eval", "standardization", "--checkpoint", str(ckpt), "--shards", "synthetic:3", "--steps", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3
    assert 0 < summary["psnr"] < 60 and -1 <= summary["ssim"] <= 1
    assert summary["settings"]["ssim"] == {"window": 11, "sigma": 1.5, "data_range": 1.0, "space": "RGB [0,1]",
                                         "library": "scikit-image"}
    assert main(["eval", "standardization", "--checkpoint", str(ckpt), "--shards", "synthetic:2", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "PSNR" in table and "SSIM" in table and "copy input" in table


def test_psnr_ssim_identical_and_against_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 40, 30, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(2))
    for i in range(2):
        x, y = (t[i].permute(1, 2, 0).double().numpy() for t in (a, b))
        ref_ssim = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=-1)
        assert ssim(a, b)[i].item() == pytest.approx(ref_ssim, abs=1e-5)
        assert psnr(a, b)[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-4)


def test_missing_weights_path_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "stage1.yaml"
    config.write_text(packaged_config("stage1").read_text().replace("models/stable-diffusion-v1-5", str(tmp_path / "sd15")))
    code = main(["train", "stage1", "--config", str(config), "--train-shards", "synthetic:2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"stage1.yaml: model.pretrained_model {tmp_path / 'sd15'} not found" in err
    assert "diffusers-layout Stable Diffusion 1.5 folder (unet/, vae/, scheduler/)" in err


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(packaged_config("stage1-tiny").read_text().replace("learning_rate:", "learning_rat:"))
    with pytest.raises(UserInputError, match=r"unknown key train.learning_rat \(valid keys of train: batch_size, "):
        load_stage1_config(bad)
    with pytest.raises(UserInputError, match="mixed_precision"):
        load_stage1_config("stage1-tiny", ["train.mixed_precision=fp8"])
    paper = load_stage1_config("stage1")
    assert (paper.data.resolution, paper.train.batch_size, paper.inference.num_inference_steps) == ((512, 768), 4, 20)


@pytest.mark.slow
def test_train_cli_ablation_switches_leave_out_fbdm_and_rpim(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "ablation"
    code = main(["train", "stage1", "--config", "stage1-tiny", "--output-dir", str(out), "--max-steps", "1",
                 "--train-shards", "synthetic:2", "--no-fbdm", "--no-rpim", "--set", "data.resolution=32x48",
                 "--set", "inference.num_inference_steps=1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    names = load_file(f"{summary['checkpoint']}/trainable.safetensors").keys()
    assert not any(n.startswith(("fbdm.", "rpim.")) for n in names)
    assert any(n.startswith("pose_guider.") for n in names)
    config = load_stage1_config(f"{summary['checkpoint']}/config.yaml")
    assert config.model.fbdm is False and config.model.rpim is False
    # resuming that run with the ablation switches off is refused in one line, before any weight loads
    assert main(["train", "stage1", "--config", "stage1-tiny", "--output-dir", str(out), "--max-steps", "2",
                 "--train-shards", "synthetic:2", "--set", "data.resolution=32x48"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the weights belong to a model with use_fbdm=False" in err
