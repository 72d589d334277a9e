"""Run folders and checkpoints written by the first release still load, resume and standardize.

The first release saved its configs with the version-1 key names (Stage I: `data.width`/`data.height`,
`train.checkpoints_keep`, ...; Stage II: `models.kind`, `train.adam_betas`, ...) and no
`model_config.json`. Each test trains a tiny run, rewrites its saved configs exactly as the first
release wrote them (`yaml.safe_dump` of its config dict, in its field order), removes what it did not
write, and checks that the current code translates them (with the one-line notice) instead of refusing
them, and that resuming and standardizing give the same results as from the untouched run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from serialgen.cli import main
from serialgen.training.common.config import config_to_dict

pytestmark = pytest.mark.slow

NOTICE = "old config key names translated"


def _stage1_as_first_release(new: dict) -> dict:
    """A current Stage I config dict in the first release's layout (its Stage1Config.to_dict())."""
    m, d, t, v = new["model"], new["data"], dict(new["train"]), new["validation"]
    width, height = (int(x) for x in d["resolution"].split("x"))
    gradient_checkpointing = t.pop("gradient_checkpointing")
    t.pop("tensorboard")
    train = {k: t[k] for k in ("batch_size", "max_steps", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                               "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                               "max_grad_norm", "mixed_precision", "ema", "ema_decay", "reference_dropout",
                               "min_snr_gamma", "noise_offset", "zero_terminal_snr", "prediction_type", "checkpoint_every")}
    train.update(checkpoints_keep=t["keep_checkpoints"], validate_every=v["every"],
                 validation_samples=v["num_references"], log_every=t["log_every"],
                 ddp_find_unused_parameters=t["ddp_find_unused_parameters"])
    return {"version": 1, "seed": new["seed"], "output_dir": new["output_dir"],
            "model": {**m, "gradient_checkpointing": gradient_checkpointing},
            "data": {k: d[k] for k in ("train_shards", "val_shards", "backgrounds", "epoch_length")}
            | {"width": width, "height": height, "num_workers": d["num_workers"]},
            "train": train, "inference": new["inference"]}


def _stage2_as_first_release(new: dict) -> dict:
    """A current Stage II config dict in the first release's layout (its DEFAULTS tree)."""
    m, d, t, v, i = new["model"], new["data"], new["train"], new["validation"], new["inference"]
    assert m["tiny_seed"] == new["seed"]  # the first release seeded the tiny models with the run seed
    return {
        "version": 1, "seed": new["seed"], "mode": new["mode"], "output_dir": new["output_dir"],
        "models": {"kind": "tiny" if m["tiny"] else "sdxl", "sdxl": m["pretrained_model"],
                   "image_encoder": m["image_encoder"], "vae": m["vae"]},
        "data": {"pairs": d["pairs"], "synthetic": d["synthetic"],
                 "resolution": [int(x) for x in d["resolution"].split("x")], "random_crop": d["random_crop"],
                 "num_workers": d["num_workers"], "unpaired_augment": d["unpaired_augment"]},
        "train": {"batch_size": t["batch_size"], "max_steps": t["max_steps"], "learning_rate": t["learning_rate"],
                  "weight_decay": t["adam_weight_decay"], "adam_betas": [t["adam_beta1"], t["adam_beta2"]],
                  "adam_eps": t["adam_epsilon"], "gradient_accumulation_steps": t["gradient_accumulation_steps"],
                  "mixed_precision": t["mixed_precision"], "max_grad_norm": t["max_grad_norm"],
                  "noise_offset": t["noise_offset"], "drop": t["drop"],
                  "gradient_checkpointing": t["gradient_checkpointing"], "checkpoint_every": t["checkpoint_every"],
                  "keep_checkpoints": t["keep_checkpoints"], "log_every": t["log_every"], "tensorboard": t["tensorboard"]},
        "validation": {"every": v["every"], "references": v["references"], "num_references": v["num_references"],
                       "prompts": v["prompts"], "num_inference_steps": i["num_inference_steps"],
                       "guidance_scale": i["guidance_scale"], "ip_adapter_scale": i["ip_adapter_scale"], "seed": v["seed"]},
    }


def _make_first_release_folder(run: Path, convert) -> None:
    """Rewrite every saved config of `run` with the old key names; drop what the first release did not write."""
    for path in [run / "config.yaml", *run.glob("checkpoints/*/config.yaml")]:
        if path.parent == run and not path.is_file():
            continue
        saved = yaml.safe_load(path.read_text())
        if saved["version"] != 1:
            path.write_text(yaml.safe_dump(convert(saved), sort_keys=False))
    for path in [run / "model_config.json", *run.glob("checkpoints/*/model_config.json")]:
        path.unlink(missing_ok=True)


def _picture(path: Path) -> Path:
    rgba = np.zeros((80, 50, 4), np.uint8)
    rgba[20:70, 15:35] = (200, 30, 30, 255)
    Image.fromarray(rgba).save(path)
    return path


def test_stage1_run_of_the_first_release_resumes_and_standardizes(tmp_path, capsys):
    base = ["--config", "stage1-tiny", "--train-shards", "synthetic:2", "--set", "data.resolution=32x48",
            "--set", "inference.num_inference_steps=2", "--set", "train.checkpoint_every=2"]
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["train", "stage1", "--output-dir", str(new), "--max-steps", "2", *base]) == 0
    shutil.copytree(new, old)
    _make_first_release_folder(old, _stage1_as_first_release)
    ckpt_old, ckpt_new = old / "checkpoints/step-00000002", new / "checkpoints/step-00000002"
    saved = yaml.safe_load((ckpt_old / "config.yaml").read_text())
    assert saved["version"] == 1 and saved["data"]["width"] == 32 and "checkpoints_keep" in saved["train"]
    capsys.readouterr()

    # standardize: the old checkpoint's config is translated (one notice line), the image is the same
    picture = _picture(tmp_path / "ref.png")
    for ckpt, out in ((ckpt_new, tmp_path / "std_new.png"), (ckpt_old, tmp_path / "std_old.png")):
        assert main(["standardize", "--checkpoint", str(ckpt), "--input", str(picture), "--out", str(out), "--steps", "2"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if NOTICE in line]
    assert len(notices) == 1 and str(ckpt_old / "config.yaml") in notices[0]
    assert "data.width + data.height -> data.resolution" in notices[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "std_new.png")), np.asarray(Image.open(tmp_path / "std_old.png")))

    # eval standardization reads the same translated config
    assert main(["eval", "standardization", "--checkpoint", str(ckpt_old), "--shards", "synthetic:2", "--steps", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["resolution"] == "32x48"

    # resume with the old checkpoint's own config as --config: translated, and the same step 3 as the new run
    for run, config in ((new, "stage1-tiny"), (old, str(ckpt_old / "config.yaml"))):
        args = ["train", "stage1", "--output-dir", str(run), "--max-steps", "3", *base]
        args[args.index("--config") + 1] = config
        assert main(args) == 0
    out = capsys.readouterr()
    assert NOTICE in out.err and "resumed from" not in out.err  # resume message goes to stdout
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (new, old)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    assert (old / "checkpoints/step-00000003/model_config.json").is_file()  # what the current release adds


def test_stage2_run_of_the_first_release_resumes_and_generates(tmp_path, capsys):
    from serialgen.training.stage2.config import load_stage2_config
    from serialgen.training.stage2.train import train_stage2

    config = load_stage2_config("stage2-tiny", ["train.max_steps=2"])
    new, old = tmp_path / "new", tmp_path / "old"
    train_stage2(config, output_dir=new, progress=False)
    shutil.copytree(new, old)
    _make_first_release_folder(old, _stage2_as_first_release)
    assert yaml.safe_load((old / "config.yaml").read_text())["models"]["kind"] == "tiny"
    capsys.readouterr()

    # resume (the current config against the translated checkpoint config): same adapter as the new run
    for run in (new, old):
        summary = train_stage2(config, output_dir=run, max_steps=4, progress=False)
        assert summary["resumed_from"] == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if NOTICE in line]) == 1 and "models.kind -> model.tiny" in err
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "ip_adapter.safetensors")) for run in (new, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # generate from an old adapter folder (its config.yaml is the old one; no model_config.json)
    _make_first_release_folder(old, _stage2_as_first_release)
    ref = tmp_path / "alice.png"
    Image.new("RGB", (60, 90), (30, 160, 60)).save(ref)
    rc = main(["generate", "--standardizer", "identity", "--adapter", str(old), "--ref", str(ref), "--prompt", "a person",
               "--num-seeds", "1", "--out", str(tmp_path / "series"), "--steps", "1", "--no-progress"])
    assert rc == 0
    assert NOTICE in capsys.readouterr().err
    record = json.loads((tmp_path / "series" / "series.json").read_text())
    assert record["settings"]["resolution"] == "64x96" and record["settings"]["guidance_scale"] == 3.0
    assert record["model"] == config_to_dict(config.model)
