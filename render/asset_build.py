"""The Blender probe of the asset build: every file read in its own worker process, with a timeout.

``assets_manifest`` decides what to accept and what to record but never starts Blender; its scanners
and ``assets_manifest.build.build_assets`` take a probe (``assets_manifest.probe.AssetProbe``).
:class:`BlenderProbe` is that probe for real files: each character or Blender motion file is
imported by ``python -m serialgen.render.inspect_asset``, each BVH file parsed and retargeted by
``python -m serialgen.assets_manifest.motion_worker`` (no Blender, but a stranger's file all the same)
and the HDRIs are decoded by ``python -m serialgen.render.exr_reader``, each a subprocess of its
own, so a crashing, hanging or memory-exhausting reader costs one asset (``import_failed`` /
``import_timeout``) and the caller never imports bpy.

The worker's last stdout line is one JSON object of facts; motion samples come back in an npz file
(``inspect_asset --motions``), read here into :class:`~serialgen.assets_manifest.probe.MotionSamples`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from serialgen.assets_manifest.motion_worker import load_motion
from serialgen.assets_manifest.probe import MotionSamples, ProbeError, ProbeFailure
from serialgen.assets_manifest.retarget import RetargetedMotion

__all__ = ["BlenderProbe", "IMPORT_TIMEOUT_S"]

IMPORT_TIMEOUT_S = float(os.environ.get("SERIALGEN_IMPORT_TIMEOUT", "120"))
EXR_TIMEOUT_S = 300.0


class BlenderProbe:
    """``AssetProbe`` on worker processes; ``timeout`` seconds per character or motion file (default
    ``SERIALGEN_IMPORT_TIMEOUT``, 120 s), BVH files included (parsed by a Blender-free worker)."""

    def __init__(self, timeout: float = IMPORT_TIMEOUT_S, exr_timeout: float = EXR_TIMEOUT_S):
        self.timeout = float(timeout)
        self.exr_timeout = float(exr_timeout)

    def _run(self, cmd: list[str], env: dict | None = None) -> dict | ProbeFailure:
        """Run one worker; its last stdout line that is a JSON object, or a failure (timeout, crash,
        ``ok: false``)."""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return ProbeFailure("import_timeout", f"import took longer than {self.timeout:.0f} s")
        facts = None
        for ln in reversed((proc.stdout or "").strip().splitlines()):
            if ln.startswith("{"):
                try:
                    facts = json.loads(ln)
                except ValueError:
                    pass
                break
        if not isinstance(facts, dict):
            err = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            return ProbeFailure("import_failed",
                                f"importer crashed (exit {proc.returncode}): {(err[-1] if err else '')[:300]}")
        if not facts.get("ok"):
            return ProbeFailure(facts.get("reason") or "import_failed", facts.get("detail") or "import failed")
        return facts

    @staticmethod
    def _limit(max_bytes: int | None) -> list[str]:
        return [] if max_bytes is None else ["--max-bytes", str(int(max_bytes))]

    def inspect_character(self, path: Path, max_bytes: int | None = None) -> dict | ProbeFailure:
        cmd = [sys.executable, "-m", "serialgen.render.inspect_asset", str(path), *self._limit(max_bytes)]
        # One thread per worker: two workers run at once on a 2-core machine.
        return self._run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def sample_motions(self, path: Path, max_fps: float, max_bytes: int | None = None) -> MotionSamples | ProbeFailure:
        with tempfile.TemporaryDirectory(prefix="serialgen-motion-") as tmp:
            npz = Path(tmp) / "motion.npz"
            res = self._run([sys.executable, "-m", "serialgen.render.inspect_asset", str(path), "--motions", str(npz),
                             "--max-fps", str(max_fps), *self._limit(max_bytes)])
            if isinstance(res, ProbeFailure):
                return res
            return _read_motion_npz(npz)

    def retarget_bvh(self, path: Path, max_fps: float,
                     max_bytes: int | None = None) -> tuple[RetargetedMotion, str] | ProbeFailure:
        with tempfile.TemporaryDirectory(prefix="serialgen-bvh-") as tmp:
            npz = Path(tmp) / "motion.npz"
            res = self._run([sys.executable, "-m", "serialgen.assets_manifest.motion_worker", str(path), str(npz),
                             "--max-fps", str(max_fps), *self._limit(max_bytes)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
            if isinstance(res, ProbeFailure):
                return res
            return load_motion(npz), str(res.get("up", "y"))

    def read_exrs(self, paths: Sequence[Path]) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="serialgen-exr-") as tmp:
            out = Path(tmp) / "exr.npz"
            cmd = [sys.executable, "-m", "serialgen.render.exr_reader", str(out), *map(str, paths)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.exr_timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ProbeError(str(exc)) from exc
            if proc.returncode != 0 or not out.is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ProbeError(f"bpy EXR reader failed (exit {proc.returncode}): {last}")
            try:
                with np.load(out) as z:
                    return [z[f"img{i}"] for i in range(len(paths))]
            except (OSError, KeyError, ValueError) as exc:
                raise ProbeError(f"bpy EXR reader output unreadable: {exc}") from exc


def _read_motion_npz(npz: Path) -> MotionSamples:
    """The worker's file (``inspect_asset.sample_motions``): ``bones`` and ``clips`` as JSON,
    ``rest_rot`` (B, 3, 3), and per clip k ``rot_k`` (F, B, 3, 3) and ``pos_k`` (F, B, 3)."""
    with np.load(npz, allow_pickle=False) as data:
        clips = json.loads(str(data["clips"]))
        return MotionSamples(bones=json.loads(str(data["bones"])), rest_rot=data["rest_rot"], clips=clips,
                             rot=[data[f"rot_{k}"] for k in range(len(clips))],
                             pos=[data[f"pos_{k}"] for k in range(len(clips))])
