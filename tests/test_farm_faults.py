"""The render farm under faults, with real Ray actors and real Blender workers (64x96 renders).

Faults are real: a worker process is SIGKILLed from outside in the middle of a job, the driver gets
SIGINT, and poison character records crash (SIGKILL of its own process) or hang their worker
(``render/farm/faults.py``, enabled only by ``SERIALGEN_FAULT_INJECTION=1`` in the driver's
environment). Characters are procedural (closed surfaces: byte-reproducible across processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serialgen.cli import main

from farm_fixtures import SERIALGEN, build_characters, character_record, write_assets

pytestmark = [pytest.mark.blender, pytest.mark.ray, pytest.mark.slow]

CHARS = ("proc-000001", "proc-000002", "proc-000003")
PER_CHAR = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(meshes dir, poses.npz) of three procedural characters and a 30-pose library."""
    return build_characters(tmp_path_factory.mktemp("built"), CHARS)


@pytest.fixture(scope="module")
def assets(built, tmp_path_factory):
    """The three characters; proc-000002 sleeps 1 s per sample when fault injection is on (a long job
    to kill); without injection (the reference run) the record renders normally."""
    meshes, poses = built
    records = [character_record(c, **({"fault": "slow:1.0"} if c == "proc-000002" else {})) for c in CHARS]
    return write_assets(tmp_path_factory.mktemp("assets"), meshes, poses, records)


def _args(assets: Path, out: Path, workers: int, *extra) -> list[str]:
    return ["render", "--assets", str(assets), "--out", str(out), "--poses-per-character", str(PER_CHAR),
            "--poses-per-shard", "2", "--resolution", "64x96", "--workers", str(workers), "--no-progress", *extra]


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "SERIALGEN_FAULT_INJECTION": "1"}
    return subprocess.Popen(SERIALGEN + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _tars(out: Path) -> dict[str, bytes]:
    """{path: bytes} of every pair shard and standard tar (<split>/standard/*.tar)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for s in ("train", "test") for p in (out / s).rglob("*.tar")}


def _pairs(out: Path) -> dict[str, bytes]:
    """{path: bytes} of the pair shards only."""
    return {k: v for k, v in _tars(out).items() if "/standard/" not in k}


def _hidden(out: Path) -> list[str]:
    return [p.name for s in ("train", "test") if (out / s).is_dir() for p in (out / s).rglob(".*")]


def _expected_keys(characters, assets: Path) -> list[str]:
    from serialgen.dataset.shards import sample_key
    from serialgen.render.job import character_samples

    import numpy as np

    with np.load(assets / "poses.npz") as data:
        n = int(data["angles"].shape[0])
    return sorted(sample_key(c, p, v) for c in characters for p, v in character_samples(c, n, PER_CHAR, 0))


def _indexed_keys(out: Path) -> list[str]:
    from serialgen.dataset.shards import iter_shard

    index = json.loads((out / "index.json").read_text())
    return sorted(k for s in index["shards"] for k, _ in iter_shard(out / s["path"]))


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is not running either
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _log_pids(out: Path) -> set[int]:
    return {int(m) for p in (out / "logs").rglob("*.log") for m in re.findall(r"pid (\d+)", p.read_text())}


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """A clean run with one worker (no fault injection): {shard path: bytes}."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert os.environ.get("SERIALGEN_FAULT_INJECTION") != "1"
    assert main(_args(assets, out, 1)) == 0
    return out, _tars(out)


def test_one_and_two_workers_give_the_same_bytes(assets, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "shards"
    assert main(_args(assets, out, 2)) == 0
    assert len(_pairs(ref_out)) == len(CHARS) * PER_CHAR // 2 and len(ref) == len(_pairs(ref_out)) + len(CHARS)
    assert _tars(out) == ref
    assert _indexed_keys(out) == _indexed_keys(ref_out) == _expected_keys(CHARS, assets)
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_worker"]) == {"w0", "w1"} and all(w["jobs"] > 0 for w in report["per_worker"].values())


def test_sigkill_of_a_worker_mid_job_loses_and_duplicates_nothing(assets, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "shards"
    proc = _spawn(_args(assets, out, 2))
    try:
        # proc-000002's jobs write a sample, then sleep 1 s: kill its worker right after sample 1.
        def in_progress():
            for path in (out / "logs").rglob("proc-000002-*.log") if (out / "logs").is_dir() else []:
                text = path.read_text()
                if "sample 1/2" in text and "== ok" not in text:
                    return path, int(re.findall(r"pid (\d+)", text)[-1])
            return None

        log, pid = _wait_for(in_progress, 90, "a job of proc-000002 in progress")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    job = f"{log.parent.name}/{log.stem}.tar"
    died = [r for r in report["retries"] if r["kind"] == "died"]
    assert [r["job"] for r in died] == [job], report["retries"]
    assert report["quarantined"] == {}
    assert sum(len(w["processes"]) for w in report["per_worker"].values()) == 3  # 2 + 1 replacement
    # Every expected key exactly once, the same bytes as the clean one-worker run, nothing hidden.
    assert _indexed_keys(out) == _expected_keys(CHARS, assets)
    assert _tars(out) == ref
    assert _hidden(out) == []
    assert main(["shards", "verify", str(out)]) == 0
    assert "== driver: attempt 1" in log.read_text() and "died" in log.read_text()


def test_interrupt_then_rerun_renders_only_what_is_missing(built, tmp_path, capsys):
    meshes, poses = built
    # One pair per shard (12 jobs, one worker, in character order); the last character's jobs hang
    # after their sample (fault injection), so the run cannot finish before the interrupt arrives,
    # however fast or slow the machine: SIGINT goes out once the first 8 shards are whole and the
    # 9th job is stuck.
    records = [character_record(c, **({"fault": "hang"} if c == CHARS[-1] else {})) for c in CHARS]
    assets = write_assets(tmp_path / "assets", meshes, poses, records)
    out = tmp_path / "shards"
    args = _args(assets, out, 1, "--poses-per-shard", "1")
    proc = _spawn(args)
    try:
        def stuck():
            logs = list((out / "logs").rglob(f"{CHARS[-1]}-*.log")) if (out / "logs").is_dir() else []
            return any("sample 1/1" in p.read_text() for p in logs) and len(_pairs(out)) >= 8

        _wait_for(stuck, 120, f"a job of {CHARS[-1]} stuck after its sample")
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stdout and "Re-run the same command" in stdout
    assert not (out / "index.json").exists()
    assert _hidden(out) == []  # no half-written shard, not even a hidden one
    done = _pairs(out)
    assert len(done) == 2 * PER_CHAR  # the first two characters' shards; none of the stuck one's
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    pids = _log_pids(out)
    assert pids and _wait_for(lambda: not any(_alive(p) for p in pids), 15, "the workers to exit")
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in done}

    # The same command again (without fault injection): renders only the missing shards.
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["shards_kept"] == len(done)
    assert report["pairs_rendered"] == len(CHARS) * PER_CHAR - len(done)
    assert {a["job"] for a in report["attempts"]}.isdisjoint(done)
    assert all((out / rel).stat().st_mtime_ns == t for rel, t in mtimes.items())
    assert _indexed_keys(out) == _expected_keys(CHARS, assets)
    # The index knows every character's standard pose, also of those whose shards were all kept.
    from serialgen.dataset.shards import iter_shard

    index = json.loads((out / "index.json").read_text())
    assert set(index["characters"]) == set(CHARS)
    for entry in index["shards"]:
        for _key, sample in iter_shard(out / entry["path"]):
            char = json.loads(sample["meta.json"])["character"]
            listed = index["characters"][char]
            assert (listed["split"], listed["name"]) == (entry["split"], char)  # procedural: the name is the id
            assert listed["standard_pose"] == json.loads(sample["std_pose.json"])
            assert (out / listed["standard"]).is_file()

    # And once more: a finished run renders nothing and says so.
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to render" in capsys.readouterr().out


def test_poison_assets_are_quarantined_and_the_rest_is_rendered(built, tmp_path):
    meshes, poses = built
    poison = {"schema": "serialgen.character/1", "kind": "mannequin", "variant": "adult", "status": "accepted"}
    records = [character_record("proc-000001"), character_record("proc-000003"),
               {**poison, "id": "poison-crash", "fault": "crash"}, {**poison, "id": "poison-hang", "fault": "hang"}]
    assets = write_assets(tmp_path / "assets", meshes, poses, records)

    out = tmp_path / "shards"
    proc = _spawn(_args(assets, out, 2, "--poses-per-shard", "4", "--max-attempts", "2", "--job-timeout", "8"))
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    q = report["quarantined"]
    assert set(q) == {"poison-crash", "poison-hang"}
    assert "died x2" in q["poison-crash"]["reason"] and "timeout x2" in q["poison-hang"]["reason"]
    assert "quarantined characters: 2" in stdout and "poison-hang: failed 2 times" in stdout
    index = json.loads((out / "index.json").read_text())
    assert sorted(f["character"] for f in index["failures"]) == ["poison-crash", "poison-hang"]
    assert _indexed_keys(out) == _expected_keys(["proc-000001", "proc-000003"], assets)
    assert _hidden(out) == []
    assert main(["shards", "verify", str(out)]) == 0
    # The hung workers were killed, not left behind.
    pids = _log_pids(out)
    assert _wait_for(lambda: not any(_alive(p) for p in pids), 15, "the workers to exit")


def test_a_worker_with_other_code_stops_the_run(assets, tmp_path):
    """Workers import the code when they start: one running another version (a stale node, an edit
    during the run) would mix two versions of the data in one folder, so the driver refuses it."""
    from serialgen.errors import SerialgenError
    from serialgen.render.farm.driver import FarmConfig, load_characters, plan_jobs
    from serialgen.render.farm.pool import RayPool, code_fingerprint
    from serialgen.render.farm.schedule import JobBook
    from serialgen.render.scene import RenderSettings

    class Sink:
        def __init__(self):
            self.events = []

        def __getattr__(self, name):
            return lambda *args: self.events.append(name)

    config = FarmConfig(assets=str(assets), out=str(tmp_path / "out"), per_character=2)
    jobs = plan_jobs(config, load_characters(assets)[0])
    pool = RayPool(RenderSettings(width=64, height=96), 1, 1, 0, 1, 50, 6000.0, False)
    assert pool.code == code_fingerprint() and len(pool.code) == 16
    pool.code = "0" * 16  # as if the driver ran another version than the worker
    sink = Sink()
    with pytest.raises(SerialgenError, match="runs other serialgen code than the driver"):
        pool.run_all(JobBook(jobs), sink)
    assert "job_result" not in sink.events  # refused before any job
    import ray

    assert not ray.is_initialized()


def test_address_joins_an_existing_cluster_and_leaves_it_running(assets, reference, tmp_path):
    """`--address` joins a running cluster (here: one that another process started), sizes the
    workers from the cluster's CPUs, renders the same bytes, and does not shut the cluster down."""
    _, ref = reference
    owner = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=2, include_dashboard=False); "
                               "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = owner.stdout.readline().strip()
        assert re.fullmatch(r"[\d.]+:\d+", address), address
        out = tmp_path / "shards"
        done = subprocess.run(SERIALGEN + _args(assets, out, 2, "--address", address), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads((out / "report.json").read_text())
        assert report["cpus_per_worker"] == 1 and report["threads_per_worker"] == 1  # 2 cluster CPUs / 2 workers
        assert _tars(out) == ref
        assert owner.poll() is None  # the cluster outlives the run
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
