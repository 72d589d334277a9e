"""The training commands as a user meets them (issue 14 items 5-6, issue 16 items 3-4):

- a bad ``--max-steps`` or a config error is one line, exit 2, in under a second, before torch loads
  (a negative value used to exit 0, and config errors took 6-17 s);
- a finished run re-run says there is nothing to do;
- ``train stage1`` shows a progress bar with the loss, steps/s and the time left, and draws
  ``loss.png`` at every checkpoint;
- the paper config will not composite onto procedural colour fields unless told to;
- renamed flags stop with what to write instead; library noise is filtered at start-up.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serialgen.cli import main
from serialgen.errors import UserInputError
from serialgen.training.common.config import config_to_dict, override, packaged_config

ROOT = Path(__file__).resolve().parents[1]

# Runs a command in a fresh interpreter and reports whether torch got imported (after the exit code).
_RUN = """
import sys
from serialgen.cli import main
code = main(sys.argv[1:])
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


def _run(*argv: str) -> tuple[int, str, str, float, bool]:
    """(exit code, stdout, stderr, wall seconds, torch imported) of `serialgen ARGV` in a fresh process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    wall = time.perf_counter() - t0
    out_lines = done.stdout.strip().splitlines()
    torch_loaded = bool(out_lines) and out_lines[-1].startswith("TORCH")
    code = int(out_lines[-1].split()[1]) if out_lines and out_lines[-1].split()[0] in ("TORCH", "NO-TORCH") else done.returncode
    return code, "\n".join(out_lines[:-1]), done.stderr.strip(), wall, torch_loaded


@pytest.mark.parametrize("argv, message", [
    (["train", "stage1", "--config", "stage1-tiny", "--max-steps", "-3"], "argument --max-steps: must be at least 1, got -3"),
    (["train", "stage1", "--config", "stage1-tiny", "--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
    (["train", "stage2", "--config", "stage2-tiny", "--max-steps", "-1"], "argument --max-steps: must be at least 1, got -1"),
    (["train", "stage2", "--config", "stage2-tiny", "--max-steps", "x"], "argument --max-steps: expected a whole number, got 'x'"),
    (["train", "stage1", "--config", "stage1-tiny", "--set", "train.learning_rate=fast"],
     "train.learning_rate must be a number, got 'fast'"),
    (["train", "stage2", "--config", "stage2-tiny", "--set", "train.batch_sise=4"], "unknown key train.batch_sise"),
    (["train", "stage1", "--config", "stage1-tiny", "--train-shards", "synthetic:x"], "expected synthetic:N"),
], ids=["s1-negative", "s1-zero", "s2-negative", "s2-word", "s1-type", "s2-key", "s1-data"])
def test_bad_arguments_fail_in_under_a_second_before_torch(argv, message):
    code, _, err, wall, torch_loaded = _run(*argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not torch_loaded
    assert wall < 1.0, f"{wall:.2f} s"


def _fake_run(out: Path, step: int, config: dict) -> None:
    """A run folder whose latest checkpoint is at ``step`` (the files a finished run leaves; no weights)."""
    ckpt = out / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"")
    (ckpt / "train_state.json").write_text(json.dumps({"version": 1, "step": step}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_finished_run_rerun_has_nothing_to_do(tmp_path):
    from serialgen.training.stage1.config import load_stage1_config
    from serialgen.training.stage2.config import load_stage2_config

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    _fake_run(s1, 30, config_to_dict(override(load_stage1_config("stage1-tiny"), {"output_dir": str(s1)})))
    _fake_run(s2, 6, config_to_dict(override(load_stage2_config("stage2-tiny"), {"output_dir": str(s2)})))
    for argv, run, step in ((["train", "stage1", "--config", "stage1-tiny"], s1, 30),
                            (["train", "stage2", "--config", "stage2-tiny"], s2, 6)):
        code, out, err, wall, torch_loaded = _run(*argv, "--output-dir", str(run), "--max-steps", str(step))
        assert code == 0, err
        assert out == (f"{run}: finished at step {step} (train.max_steps {step}): nothing to do "
                       "(raise --max-steps to train on, or give a new --output-dir)")
        assert not torch_loaded and wall < 1.0


def test_a_stage2_resume_with_another_mode_is_refused_before_torch(tmp_path):
    from serialgen.training.stage2.config import load_stage2_config

    run = tmp_path / "s2"
    _fake_run(run, 2, config_to_dict(override(load_stage2_config("stage2-tiny"), {"output_dir": str(run)})))
    code, _, err, wall, torch_loaded = _run("train", "stage2", "--config", "stage2-tiny", "--output-dir", str(run),
                                            "--max-steps", "4", "--mode", "unpaired")
    assert code == 2 and "resuming with a different mode ('two-stage' -> 'unpaired')" in err
    assert not torch_loaded and wall < 1.0


def _fake_sd15(root: Path) -> dict:
    """Folders that pass the weights-path check (config files only; nothing loads them here)."""
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (root / "sd15" / sub).mkdir(parents=True)
        (root / "sd15" / sub / name).write_text("{}")
    (root / "clip").mkdir()
    (root / "clip" / "config.json").write_text("{}")
    return {"pretrained_model": str(root / "sd15"), "image_encoder": str(root / "clip")}


def test_the_paper_config_refuses_procedural_backgrounds_unless_told(tmp_path):
    from serialgen.training.stage1.config import check_training_data, load_stage1_config

    paths = _fake_sd15(tmp_path)
    config = tmp_path / "stage1.yaml"
    data = yaml.safe_load(packaged_config("stage1").read_text())
    data["model"].update(paths)
    config.write_text(yaml.safe_dump(data))
    code, _, err, wall, torch_loaded = _run("train", "stage1", "--config", str(config), "--train-shards",
                                            str(tmp_path / "shards"), "--output-dir", str(tmp_path / "run"))
    assert code == 2 and len(err.splitlines()) == 1 and not torch_loaded and wall < 1.0
    assert ("stage1.yaml: data.backgrounds is not set: references would be composited onto procedural colour "
            "fields; pass --backgrounds DIR (images, or an assets folder), or --set data.procedural_backgrounds=true "
            "if that is meant") in err
    paper = load_stage1_config(config, [f"data.train_shards={tmp_path / 'shards'}"])
    with pytest.raises(UserInputError, match="data.backgrounds is not set"):
        check_training_data(paper)
    check_training_data(override(paper, {"data.backgrounds": str(tmp_path / "bg")}))  # --backgrounds DIR
    check_training_data(override(paper, {"data.procedural_backgrounds": True}))  # told to
    check_training_data(override(paper, {"data.train_shards": "synthetic:4"}))  # the toy set composites nothing
    tiny = load_stage1_config("stage1-tiny", [f"data.train_shards={tmp_path / 'shards'}"])
    check_training_data(tiny)  # the tiny config keeps procedural backgrounds


def test_the_paper_config_trains_on_estimated_inputs_once_annotated(tmp_path):
    from serialgen.training.stage1.config import check_training_data, load_stage1_config

    shards = tmp_path / "shards"
    shards.mkdir()
    paper = load_stage1_config("stage1", [f"data.train_shards={shards}", f"data.backgrounds={tmp_path}"])
    assert paper.data.estimated_share == 0.5
    with pytest.raises(UserInputError) as error:
        check_training_data(paper)
    assert str(error.value) == (f"stage1.yaml: data.estimated_share 0.5 needs the person estimator's annotations: "
                                f"{shards / 'annotations' / 'index.json'} not found; run `serialgen shards annotate "
                                f"{shards}` (docs/estimator.md), or --set data.estimated_share=0")
    check_training_data(override(paper, {"data.estimated_share": 0.0}))
    (shards / "annotations").mkdir()
    (shards / "annotations" / "index.json").write_text("{}")  # its content is the loader's to check
    check_training_data(paper)


def test_renamed_flags_say_what_to_write(capsys):
    for argv, message in (
        (["generate", "--standardizer", "identity", "--adapter", "a", "--ref", "r.png", "--out", "o", "--seeds", "4"],
         "--seeds was renamed: use --num-seeds N (images per prompt)"),
        (["generate", "--standardizer", "identity", "--adapter", "a", "--ref", "r.png", "--out", "o", "--quiet"],
         "--quiet was renamed: use --no-progress"),
        (["train", "stage2", "--config", "stage2-tiny", "--quiet"], "--quiet was renamed: use --no-progress"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_standardizer_names_its_own_flag(tmp_path, capsys):
    code = main(["generate", "--standardizer", str(tmp_path / "nope"), "--adapter", str(tmp_path / "a"),
                 "--ref", str(tmp_path / "r.png"), "--prompt", "p", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"serialgen: error: --standardizer {tmp_path / 'nope'}: not found; expected a Stage I checkpoint "
                   "folder, 'identity', 'none' or module:function")
    assert "--checkpoint" not in err


def test_help_names_the_defaults(capsys):
    for argv, wanted in ((["train", "stage1"], ["default: the config's train.max_steps", "(default)",
                                                 "default: the config's data.backgrounds"]),
                         (["train", "stage2"], ["default: the config's train.max_steps", "default: the config's mode"]),
                         (["generate"], ["(default 4)", "(default 0)", "else 20"]),
                         (["standardize"], ["(default 4)", "default auto: bf16 on CUDA, fp32 on CPU", "(default 0.94)"])):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for phrase in wanted:
            assert phrase in text, (argv, phrase)


def test_library_noise_is_filtered_once_at_start_up():
    from serialgen.training.common.quiet import filter_library_warnings

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    transformers_log = logging.getLogger("transformers.utils.import_utils")
    for log in (diffusers_log, transformers_log):
        log.addHandler(handler)
    try:
        filter_library_warnings()
        filter_library_warnings()  # idempotent
        for _ in range(3):
            diffusers_log.warning("There are modules in UNet2DConditionModel that should be kept in float32: []. "
                                  "Casting directly with `to()` can lead to inconsistent results")
            transformers_log.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                     "`CLIPImageProcessorPil` for backward compatibility.")
            diffusers_log.warning("There are modules in AutoencoderKL that should be kept in float32: ['norm']. x")
        assert seen == ["There are modules in AutoencoderKL that should be kept in float32: ['norm']. x"]
    finally:
        for log in (diffusers_log, transformers_log):
            log.removeHandler(handler)


def test_the_loss_curve_is_a_png_of_the_logged_losses(tmp_path):
    from PIL import Image

    from serialgen.training.common.run_log import plot_loss_curve

    metrics = tmp_path / "metrics.jsonl"
    assert plot_loss_curve(metrics, tmp_path / "loss.png") is None  # nothing logged yet: no picture
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s ** 0.5, "lr": 1e-4}) + "\n" for s in range(1, 61))
                       + '{"step": 61, "lo')  # a line cut by a crash is left out
    out = plot_loss_curve(metrics, tmp_path / "loss.png", title="Stage I, run")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (640, 360)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_train_stage1_shows_progress_and_draws_the_loss_curve(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "stage1", "--config", "stage1-tiny", "--output-dir", str(out), "--max-steps", "2",
            "--set", "data.resolution=32x48", "--set", "train.checkpoint_every=1", "--set", "validation.every=0"]
    done = subprocess.run([sys.executable, "-m", "serialgen.cli", *argv], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    bar = done.stderr.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("stage1:")][-1]
    assert "2/2" in last and "loss=" in last and "<" in last and "step" in last  # steps, ETA ([elapsed<left, rate])
    assert (out / "loss.png").is_file() and json.loads(done.stdout)["steps"] == [1, 2]
    again = subprocess.run([sys.executable, "-m", "serialgen.cli", *argv], capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    quiet = subprocess.run([sys.executable, "-m", "serialgen.cli", *argv[:-6], "--max-steps", "3", "--no-progress",
                            "--set", "data.resolution=32x48", "--set", "validation.every=0"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert quiet.returncode == 0 and "stage1:" not in quiet.stderr
