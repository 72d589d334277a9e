"""The one config system of both training stages (training/common/config.py): same names for the same
settings, strict keys, `--set`, immutability, and the translation of the first release's key names."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serialgen.errors import UserInputError
from serialgen.training.common.config import config_from_dict, config_to_dict, override, packaged_config
from serialgen.training.stage1.config import Stage1Config, load_stage1_config
from serialgen.training.stage2.config import Stage2Config, load_stage2_config

REPO = Path(__file__).resolve().parents[1]

# What the first release wrote into every Stage I checkpoint (config version 1), for stage1-tiny.
OLD_STAGE1 = """\
version: 1
seed: 42
output_dir: runs/stage1-tiny
model:
  pretrained_model: null
  pretrained_unet: null
  image_encoder: null
  tiny: true
  tiny_seed: 0
  fbdm: true
  rpim: false
  rpim_channels: [16, 32, 64, 128]
  pose_guider_channels: [16, 32, 96, 256]
  gradient_checkpointing: true
data:
  train_shards: synthetic:8
  val_shards: null
  backgrounds: null
  epoch_length: 2000
  width: 64
  height: 96
  num_workers: 0
train:
  batch_size: 2
  max_steps: 3
  learning_rate: 0.001
  adam_beta1: 0.8
  adam_beta2: 0.99
  adam_weight_decay: 0.02
  adam_epsilon: 1.0e-07
  mixed_precision: 'no'
  checkpoint_every: 10
  checkpoints_keep: 5
  validate_every: 15
  validation_samples: 3
  log_every: 1
inference:
  num_inference_steps: 10
  guidance_scale: 2.0
"""

# ... and into every Stage II run folder and checkpoint.
OLD_STAGE2 = """\
version: 1
seed: 5
mode: two-stage
output_dir: /tmp/run
models: {kind: tiny, sdxl: null, image_encoder: null, vae: null}
data:
  pairs: []
  synthetic: 8
  resolution: [64, 96]
  random_crop: false
  num_workers: 0
  unpaired_augment: {flip: 0.5, min_scale: 0.7, jitter: 0.1}
train:
  batch_size: 2
  max_steps: 2
  learning_rate: 0.001
  weight_decay: 0.03
  adam_betas: [0.85, 0.995]
  adam_eps: 1.0e-06
  keep_checkpoints: 2
validation:
  every: 0
  num_references: 2
  num_inference_steps: 2
  guidance_scale: 3.0
  ip_adapter_scale: 0.5
"""


def _keys(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out |= _keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_the_same_settings_have_the_same_names_in_both_stages():
    shared = _keys(Stage1Config) & _keys(Stage2Config)
    assert {
        "version", "seed", "output_dir", "model.pretrained_model", "model.image_encoder", "model.tiny", "model.tiny_seed",
        "data.resolution", "data.num_workers", "train.batch_size", "train.max_steps", "train.gradient_accumulation_steps",
        "train.learning_rate", "train.adam_beta1", "train.adam_beta2", "train.adam_weight_decay", "train.adam_epsilon",
        "train.max_grad_norm", "train.mixed_precision", "train.gradient_checkpointing", "train.noise_offset",
        "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.tensorboard",
        "validation.every", "validation.num_references", "inference.num_inference_steps", "inference.guidance_scale",
    } <= shared
    old_names = {r.old[i] for cls in (Stage1Config, Stage2Config) for r in cls.RENAMED for i in range(len(r.old))}
    assert not old_names & (_keys(Stage1Config) | _keys(Stage2Config))


def test_packaged_configs_load_silently_and_configs_folder_is_the_same(capsys):
    for name, load in (("stage1", load_stage1_config), ("stage1-tiny", load_stage1_config),
                       ("stage2", load_stage2_config), ("stage2-tiny", load_stage2_config)):
        config = load(name)
        assert config.version == 2 and load(REPO / "configs" / f"{name}.yaml") == config
        assert (REPO / "configs" / f"{name}.yaml").read_bytes() == packaged_config(name).read_bytes()
    assert capsys.readouterr().err == ""  # no old key names in the packaged configs


def test_old_stage1_config_is_translated_with_a_one_line_notice(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(OLD_STAGE1)
    config = load_stage1_config(tmp_path / "config.yaml")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("serialgen: config.yaml: old config key names translated: data.width + data.height -> "
                          "data.resolution, model.gradient_checkpointing -> train.gradient_checkpointing, "
                          "train.checkpoints_keep -> train.keep_checkpoints, train.validate_every -> validation.every, "
                          "train.validation_samples -> validation.num_references")
    assert config.data.resolution == (64, 96) and config.train.gradient_checkpointing is True
    assert (config.train.keep_checkpoints, config.validation.every, config.validation.num_references) == (5, 15, 3)
    assert (config.train.adam_beta1, config.train.adam_beta2, config.train.adam_epsilon) == (0.8, 0.99, 1e-7)
    assert config.model.rpim is False and config.version == 2
    # the same from a mapping (a checkpoint's config.yaml, as StandardizePipeline.from_checkpoint reads it)
    assert config_from_dict(Stage1Config, yaml.safe_load(OLD_STAGE1), "ckpt/config.yaml") == config
    assert "ckpt/config.yaml: old config key names translated" in capsys.readouterr().err


def test_old_stage2_config_is_translated_with_a_one_line_notice(capsys):
    config = config_from_dict(Stage2Config, yaml.safe_load(OLD_STAGE2), "run/config.yaml")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("serialgen: run/config.yaml: old config key names translated: ")
    for note in ("models.kind -> model.tiny", "models.sdxl -> model.pretrained_model", "train.weight_decay -> "
                 "train.adam_weight_decay", "train.adam_betas -> train.adam_beta1 + train.adam_beta2",
                 "train.adam_eps -> train.adam_epsilon", "validation.guidance_scale -> inference.guidance_scale",
                 "validation.ip_adapter_scale -> inference.ip_adapter_scale"):
        assert note in err
    assert config.model.tiny is True and config.model.tiny_seed == 5  # the first release seeded tiny models by `seed`
    assert (config.train.adam_beta1, config.train.adam_beta2, config.train.adam_epsilon) == (0.85, 0.995, 1e-6)
    assert config.train.adam_weight_decay == 0.03 and config.data.resolution == (64, 96)
    assert (config.inference.num_inference_steps, config.inference.guidance_scale, config.inference.ip_adapter_scale) == (2, 3.0, 0.5)
    sdxl = yaml.safe_load(OLD_STAGE2.replace("kind: tiny, sdxl: null, image_encoder: null",
                                             "kind: sdxl, sdxl: /m/sdxl, image_encoder: /m/vit"))
    model = config_from_dict(Stage2Config, sdxl).model
    assert (model.tiny, model.pretrained_model, model.image_encoder) == (False, "/m/sdxl", "/m/vit")


def test_old_spellings_that_cannot_be_translated_name_the_renamed_key(tmp_path, capsys):
    bad = tmp_path / "half.yaml"
    bad.write_text(OLD_STAGE1.replace("  height: 96\n", ""))
    with pytest.raises(UserInputError, match=r"half.yaml: data.width was renamed \(data.width \+ data.height -> "
                                             r"data.resolution\) and cannot be translated without data.height: "
                                             r"write data.resolution=WxH"):
        load_stage1_config(bad)
    bad.write_text(OLD_STAGE1.replace("  checkpoints_keep: 5\n", "  checkpoints_keep: 5\n  keep_checkpoints: 5\n"))
    with pytest.raises(UserInputError, match="train.keep_checkpoints is given together with its old name "
                                             "train.checkpoints_keep"):
        load_stage1_config(bad)
    with pytest.raises(UserInputError, match=r"--set data.width: renamed .*; use --set data.resolution=WxH"):
        load_stage1_config("stage1-tiny", ["data.width=32"])
    with pytest.raises(UserInputError, match=r"--set train.adam_betas: renamed .*; use --set train.adam_beta1=B1 "):
        load_stage2_config("stage2-tiny", ["train.adam_betas=[0.9, 0.99]"])
    capsys.readouterr()
    # a plain rename in --set is translated, with the notice
    assert load_stage1_config("stage1-tiny", ["train.checkpoints_keep=7"]).train.keep_checkpoints == 7
    assert "--set: old config key names translated: train.checkpoints_keep -> train.keep_checkpoints" in capsys.readouterr().err


def test_unknown_keys_and_bad_values_are_one_line_errors_listing_the_section():
    with pytest.raises(UserInputError) as err:
        load_stage2_config("stage2-tiny", ["train.drop.imag=0.1"])
    assert str(err.value) == "--set: unknown key train.drop.imag (valid keys of train.drop: image, text, both)"
    with pytest.raises(UserInputError, match=r"^--set: unknown key vaildation \(valid top-level keys: version, seed, "):
        load_stage1_config("stage1-tiny", ["vaildation.every=3"])
    with pytest.raises(UserInputError, match=r"data.resolution: 60x96: width and height must be multiples of 8"):
        load_stage1_config("stage1-tiny", ["data.resolution=60x96"])
    with pytest.raises(UserInputError, match=r"train.batch_size must be >= 1, got 0"):
        load_stage2_config("stage2-tiny", ["train.batch_size=0"])
    with pytest.raises(UserInputError, match=r"expected KEY=VALUE"):
        load_stage2_config("stage2-tiny", ["train.batch_size"])
    with pytest.raises(UserInputError, match=r"model.tiny must be true or false, got 'yes please'"):
        load_stage2_config("stage2-tiny", ["model.tiny=yes please"])


def test_every_zero_disables_validation_in_both_stages_and_sizes_are_one_spelling():
    one = load_stage1_config("stage1-tiny", ["validation.every=0", "data.resolution=[32, 48]"])
    two = load_stage2_config("stage2-tiny", ["validation.every=0", "data.resolution=32x48"])
    assert one.validation.every == two.validation.every == 0
    assert one.data.resolution == two.data.resolution == (32, 48)
    assert config_to_dict(one)["data"]["resolution"] == config_to_dict(two)["data"]["resolution"] == "32x48"


def test_configs_are_immutable_and_override_makes_a_new_validated_one():
    config = load_stage2_config("stage2-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.max_steps = 9  # type: ignore[misc]
    longer = override(config, {"train.max_steps": 9, "output_dir": "/tmp/x"})
    assert (longer.train.max_steps, longer.output_dir) == (9, "/tmp/x")
    assert (config.train.max_steps, config.output_dir) == (4, "runs/stage2-tiny")
    with pytest.raises(UserInputError, match="train.max_steps must be >= 1"):
        override(config, {"train.max_steps": 0})
    with pytest.raises(UserInputError, match="unknown key train.max_step "):
        override(config, {"train.max_step": 3})
    assert config_from_dict(Stage2Config, config_to_dict(config), config.source) == config


def test_a_bad_config_fails_before_torch_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batchsize: 3}\n")
    code = ("import sys; from serialgen.cli import main; "
            f"rcs = [main(['train', stage, '--config', {str(bad)!r}]) for stage in ('stage1', 'stage2')]; "
            "print(rcs, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[2, 2] False"
    assert out.stderr.count("unknown key train.batchsize (valid keys of train: batch_size,") == 2
