"""`make gpu-check` (benchmarks/gpu_check.py), run here on the CPU at tiny size the way the lent GPU
machine runs it: the project not installed (from source), and nothing that machine lacks importable
(bpy, the render package, webdataset, pyspng, Ray, anny). It must finish inside its time budget and
leave every result it measured, also when the budget cuts it short."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# The GPU machine: no editable install of serialgen, no Blender, no data-side packages.
_AS_ON_THE_GPU_MACHINE = """
import importlib.abc, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "_EditableFinder"]
ABSENT = ("bpy", "mathutils", "webdataset", "pyspng", "ray", "anny", "serialgen.render")

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ABSENT or name.startswith(tuple(a + "." for a in ABSENT)):
            raise ImportError(f"{name} is not on the GPU machine")
        return None

sys.meta_path.insert(0, Absent())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict, float]:
    out = tmp_path / "gpu-check.json"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _AS_ON_THE_GPU_MACHINE, str(SCRIPT), "--tiny", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return done, json.loads(out.read_text()), time.perf_counter() - t0


def test_gpu_check_runs_from_source_without_the_render_side(tmp_path):
    done, report, wall = _run(tmp_path, "--budget-s", "240", "--steps", "1", "--warmup", "0", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["project"] == "source tree (not installed)"
    assert report["imported_render_or_bpy"] == []
    checks = {r.get("check") for r in report["results"]}
    # every kind ran at least once; on a loaded machine the budget may skip later configurations (named)
    assert {"stage1 train batch 2 checkpointing on", "stage1 inference fp32 batch 2", "stage1 inference bf16 batch 2",
            "stage2 train batch 2 checkpointing on"} <= checks, checks
    wanted = {f"stage{s} train batch {b} checkpointing {c}" for s in (1, 2) for b in (2, 4) for c in ("on", "off")}
    assert wanted <= checks | {k["what"] for k in report["skipped"] if k["why"] == "time budget"}
    assert report["complete"] is (not report["skipped"]) and wall < 240 + 15
    for result in report["results"]:
        if result.get("check", "").startswith(("stage1 train", "stage2 train")):
            assert result["seconds_per_step"] > 0 and not result.get("oom")
        if result.get("check") in ("stage1 inference fp32 batch 2", "stage1 inference bf16 batch 2"):
            assert result["images_per_s"] > 0 and result["timed_calls"] >= 1
    assert any(r.get("check") == "stage1 inference bf16 / fp32 speed" and r["ratio"] > 0 for r in report["results"])
    lines = [line for line in done.stdout.splitlines() if line.startswith("gpu-check: {")]
    assert len(lines) >= len(report["results"])  # each result printed the moment it existed


def test_gpu_check_keeps_what_it_measured_when_the_budget_runs_out(tmp_path):
    # 200 steps per configuration: more than 12 s of work on any machine, so the budget cuts it
    done, report, wall = _run(tmp_path, "--budget-s", "12", "--only", "stage1-train", "--steps", "200", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["complete"] is False and report["skipped"]
    assert wall < 12 + 15  # the alarm stops it (plus interpreter start and the last write)
    assert "summary" in done.stdout
