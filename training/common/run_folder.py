"""A run folder's checkpoints, read without torch: which is the latest, its step, its config.

The training commands answer "is there anything to do?" and "does this resume fit?" from these before
any heavy import, so a finished run, a bad ``--max-steps`` or a mismatched resume is one line in a
fraction of a second, not after the 6-17 s it takes to import torch and diffusers. The weights side
(save, load, RNG state) is :mod:`serialgen.training.common.checkpointing`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from serialgen.errors import UserInputError

__all__ = [
    "CHECKPOINT_VERSION",
    "require_checkpoint",
    "read_train_state",
    "read_checkpoint_config",
    "latest_checkpoint",
    "rotate_checkpoints",
    "finished_message",
]

CHECKPOINT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def require_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path when it holds a checkpoint; else a one-line error."""
    path = Path(path)
    if not (path / "trainable.safetensors").is_file():
        raise UserInputError(f"{path}: not a checkpoint (expected trainable.safetensors, train_state.json, config.yaml)")
    return path


def read_train_state(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's ``train_state.json``; rejects an unknown format version."""
    path = require_checkpoint(checkpoint) / "train_state.json"
    state = json.loads(path.read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserInputError(f"{path}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    return state


def read_checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    """The run config dumped beside the checkpoint, as written (old key names are translated by the
    stage's config class when it is validated)."""
    return yaml.safe_load((require_checkpoint(checkpoint) / "config.yaml").read_text())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (keep <= 0 keeps all); returns what was removed."""
    root = Path(output_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    removed = [p for _, p in found[:-keep]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def finished_message(output_dir: str | Path, max_steps: int) -> str | None:
    """One line when the run in ``output_dir`` already reached ``max_steps`` (its latest checkpoint is
    at that step or beyond), else None: a finished run re-run has nothing to do."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    step = int(read_train_state(latest)["step"])
    if step < max_steps:
        return None
    return (f"{output_dir}: finished at step {step} (train.max_steps {max_steps}): nothing to do "
            f"(raise --max-steps to train on, or give a new --output-dir)")
