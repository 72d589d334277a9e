"""Render farm benchmark: the same jobs in one plain process and on Ray with 1 worker x 1 thread,
1 worker x 2 threads and 2 workers x 1 thread, and the cost of a no-op re-run, all in one run
(numbers to stdout as JSON, and ``--json``).

Configurations (same characters, pairs, resolution, engine; each into a fresh folder):

* ``plain``: ``--workers 0`` (no Ray; this process renders), 2 render threads;
* ``ray1x1``: 1 Ray worker x 1 thread (``num_cpus=1``, llvmpipe in the calling thread, Blender
  ``threads=1``): the base of the scaling ratio;
* ``ray1x2``: 1 Ray worker x 2 threads (``LP_NUM_THREADS=2``, Blender ``threads=2``);
* ``ray2x1``: 2 Ray workers x 1 thread each;

run in the order plain, ray1x1, ray1x2, ray2x1, then backwards (``--repeats 2``), so that drift
from other load on a shared machine cancels in the means. Reported per configuration: wall
seconds of ``run_farm`` (includes Ray start, worker start, character loads, Ray shutdown), pairs/s
on the wall clock, pairs/s inside the jobs (pairs / summed job seconds x workers), CPU seconds per
pair of the worker processes (all their threads) and of everything (the workers, this driver
process and Ray's own processes: GCS, raylet, agents, dashboard API server, monitors; sampled
every 0.2 s; with ``--address`` the cluster's processes are another process's and not counted),
which other load barely distorts. Then the scaling ratio ``ray2x1 / ray1x1`` (wall,
inside jobs, and an idle-box estimate: the serial part of a run, as measured, plus the busiest
worker's CPU seconds, i.e. what the wall would be if each process had a core of its own),
``ray1x2 / ray1x1``, Ray against the plain process, the no-op re-run of a finished folder, Ray's
fixed costs per run (cluster start, first worker ready, shutdown, against making the worker
in-process; and joining / leaving a cluster that is already running instead), and the 1-minute
load average before and after.

    .venv/bin/python benchmarks/farm.py [--assets DIR] [--characters 4] [--per-character 48] \
        [--resolution 512x768] [--repeats 2] [--configs plain,ray1x1,ray1x2,ray2x1] [--address A] \
        [--json out.json]

Without ``--assets``, ``--characters`` procedural characters are built into a scratch folder first
(~4 s each, not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from serialgen.resolution import add_resolution_argument, format_resolution


def _build_assets(root: Path, n: int) -> Path:
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data

    root.mkdir(parents=True, exist_ok=True)
    save_pose_library(build_pose_library(200, seed=0), root / "poses.npz")
    records = []
    for i in range(n):
        cid = f"proc-{i:06d}"
        desc = describe_character(cid, 0)
        save_mesh_data(build_mesh_data(desc), root / "meshes" / f"{cid}.npz")
        records.append({"schema": "serialgen.character/1", "id": cid, "kind": "procedural", "status": "accepted",
                        "mesh_file": f"meshes/{cid}.npz", "expressions": desc["expressions"]})
    (root / "characters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


CONFIGS = {"plain": (0, 2), "ray1x1": (1, 1), "ray1x2": (1, 2), "ray2x1": (2, 1)}  # name -> (workers, threads)


class _CpuMeter:
    """CPU seconds of this process and every process under it (Ray's daemons, the worker actors),
    sampled every 0.2 s in a thread (processes that end keep their last sample)."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.seen: dict[int, tuple[str, float]] = {}
        self.base = self._own()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _own(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    def _loop(self) -> None:
        while not self.stop.is_set():
            for p in self.me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    self.seen[p.pid] = (p.name(), t.user + t.system)
                except self.psutil.Error:
                    pass
            self.stop.wait(0.2)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        by: dict[str, float] = {"driver": self._own() - self.base}
        for name, cpu in self.seen.values():
            key = "workers" if name.startswith("ray::FarmWorker") else "ray"
            by[key] = by.get(key, 0.0) + cpu
        return by


def _run(assets: Path, out: Path, workers: int, threads: int, args) -> dict:
    from serialgen.render.farm.driver import FarmConfig, run_farm
    from serialgen.render.scene import RenderSettings

    config = FarmConfig(assets=str(assets), out=str(out), per_character=args.per_character,
                        settings=RenderSettings(width=args.width, height=args.height, threads=threads),
                        workers=workers, cpus_per_worker=threads, limit_characters=args.characters,
                        address=args.address if workers else None, progress=False)
    meter = _CpuMeter()
    t = time.perf_counter()
    s = run_farm(config)
    wall = time.perf_counter() - t
    cpu = meter.finish()
    pairs = max(s["pairs_rendered"], 1)
    busy = sum(w["busy_s"] for w in s["per_worker"].values())
    worker_cpu = [w["cpu_s"] for w in s["per_worker"].values()]
    index = json.loads((out / "index.json").read_text())
    # The serial part of the run: everything but the jobs (Ray start, worker start, shutdown, the
    # driver's planning and index), taken as the wall minus the busiest worker's busy time.
    serial = wall - max(w["busy_s"] for w in s["per_worker"].values())
    return {"wall_s": wall, "shards": {e["path"]: e["sha256"] for e in index["shards"]}, "pairs": s["pairs_rendered"],
            "busy_s": busy, "in_job_pairs_per_s": s["pairs_rendered"] / busy * max(workers, 1) if busy else None,
            "bytes_per_pair": s["bytes"] / max(s["pairs"], 1), "failures": len(s["failures"]),
            "job_overhead_s": s["job_overhead_s_mean"], "cpu_s_per_pair": sum(worker_cpu) / pairs,
            "cpu_s_per_pair_all": sum(cpu.values()) / pairs, "cpu_s_by_part": cpu,
            "serial_s": serial, "idle_estimate_s": serial + max(worker_cpu), "stage_seconds": s["stage_seconds"]}


def _ray_fixed_costs() -> dict:
    """Seconds of Ray's fixed costs per run: start a local cluster, start one Blender worker actor
    (until it answers), shut down; against making the same worker in this process."""
    import ray

    from serialgen.ray_local import init_ray
    from serialgen.render.farm.pool import FarmWorker
    from serialgen.render.scene import RenderSettings

    settings = RenderSettings(width=64, height=96, threads=1)
    t = time.perf_counter()
    init_ray(None, num_cpus=1, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t
    actor_cls = ray.remote(num_cpus=1, max_restarts=0)(FarmWorker)
    t = time.perf_counter()
    actor = actor_cls.remote(settings, "w0.1", 50, 6000.0, False, 1)
    ray.get(actor.info.remote())
    actor_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.kill(actor)
    ray.shutdown()
    shutdown_s = time.perf_counter() - t
    # In a fresh interpreter, as --workers 0 pays it (this process has bpy imported already).
    code = ("import time; t = time.perf_counter(); from serialgen.render.farm.pool import FarmWorker; "
            "from serialgen.render.scene import RenderSettings; "
            "FarmWorker(RenderSettings(width=64, height=96, threads=1), 'local', 50, 6000.0, False, 1, "
            "capture_stderr=False); print(time.perf_counter() - t)")
    local_s = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.strip().splitlines()[-1])
    # Joining a cluster that is already running (`ray start --head` once, then --address): what a
    # run then pays instead of the start and the shutdown.
    owner = subprocess.Popen([sys.executable, "-c", "import sys, ray; from serialgen.ray_local import init_ray; "
                              "init_ray(None, num_cpus=1); print(ray.get_runtime_context().gcs_address, flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        address = owner.stdout.readline().strip()
        t = time.perf_counter()
        init_ray(address, log_to_driver=False, configure_logging=False)
        join_s = time.perf_counter() - t
        t = time.perf_counter()
        ray.shutdown()  # disconnects; the cluster stays
        leave_s = time.perf_counter() - t
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)
    return {"ray_init_s": round(init_s, 2), "actor_ready_s": round(actor_s, 2), "ray_shutdown_s": round(shutdown_s, 2),
            "in_process_worker_s": round(local_s, 2),
            "fixed_overhead_s": round(init_s + actor_s + shutdown_s - local_s, 2),
            "join_running_cluster_s": round(join_s, 2), "leave_running_cluster_s": round(leave_s, 2)}


def _mean(rs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=Path, default=None)
    p.add_argument("--characters", type=int, default=4)
    p.add_argument("--per-character", type=int, default=48)
    add_resolution_argument(p)
    p.add_argument("--repeats", type=int, default=2, help="forward then backward blocks (default 2 = one of each)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {','.join(CONFIGS)} (default all)")
    p.add_argument("--address", default=None, metavar="A",
                   help="Ray configurations join this running cluster instead of starting one per run "
                        "(e.g. one started with serialgen.ray_local.init_ray in another process)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.width, args.height = args.resolution
    order = [c for c in args.configs.split(",") if c]
    unknown = [c for c in order if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serialgen-bench-farm-") as tmp:
        scratch = Path(tmp)
        assets = args.assets or _build_assets(scratch / "assets", args.characters)
        runs: dict[str, list[dict]] = {k: [] for k in order}
        last_out = None
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                workers, threads = CONFIGS[name]
                out = scratch / f"{name}-{r}"
                runs[name].append(_run(assets, out, workers, threads, args))
                print(f"{name} #{r}: {runs[name][-1]['wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
                if workers:
                    last_out = (out, workers, threads)
        import ray

        if ray.is_initialized():  # --address: the runs joined a cluster and stay connected to it
            ray.shutdown()
        # Ray's fixed costs of a fresh local cluster (not measured with --address: a cluster started by
        # `ray start` on this machine would be joined by any address-less ray.init).
        fixed = None if args.address else _ray_fixed_costs()
        # No-op re-run of a finished folder: in-process and as the whole command.
        from serialgen.render.farm.driver import FarmConfig, run_farm
        from serialgen.render.scene import RenderSettings

        out, workers, threads = last_out or (scratch / f"{order[-1]}-0", 0, 2)
        cfg = FarmConfig(assets=str(assets), out=str(out), per_character=args.per_character,
                         settings=RenderSettings(width=args.width, height=args.height, threads=threads), workers=workers,
                         cpus_per_worker=threads, limit_characters=args.characters, progress=False)
        t = time.perf_counter()
        noop = run_farm(cfg)
        noop_s = time.perf_counter() - t
        cmd = [sys.executable, "-c", "import sys; from serialgen.cli import main; sys.exit(main(sys.argv[1:]))",
               "render", "--assets", str(assets), "--out", str(out), "--poses-per-character",
               str(args.per_character), "--resolution", format_resolution(args.resolution), "--workers", str(workers),
               "--threads", str(threads), "--limit-characters", str(args.characters)]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        noop_cli_s = time.perf_counter() - t
    result = {"characters": args.characters, "pairs_per_run": args.characters * args.per_character,
              "address": args.address,
              "resolution": [args.width, args.height], "engine": "workbench", "repeats": args.repeats,
              "load_avg_1min_before": round(load_before[0], 2), "load_avg_1min_after": round(os.getloadavg()[0], 2),
              "cpus": os.cpu_count(), "configs": {}}
    for name, rs in runs.items():
        workers, threads = CONFIGS[name]
        pairs = rs[0]["pairs"]
        result["configs"][name] = {
            "workers": workers, "threads_per_worker": threads, "wall_s": [round(r["wall_s"], 2) for r in rs],
            "pairs_per_s_wall": round(pairs / _mean(rs, "wall_s"), 3),
            "pairs_per_s_in_jobs": round(_mean(rs, "in_job_pairs_per_s"), 3),
            "bytes_per_pair": round(rs[0]["bytes_per_pair"]), "failures": sum(r["failures"] for r in rs),
            "job_overhead_ms": round(1e3 * _mean(rs, "job_overhead_s"), 2),
            "cpu_s_per_pair": round(_mean(rs, "cpu_s_per_pair"), 3),
            "cpu_s_per_pair_all_processes": round(_mean(rs, "cpu_s_per_pair_all"), 3),
            "cpu_s_by_part": {k: round(statistics.fmean(r["cpu_s_by_part"].get(k, 0.0) for r in rs), 2)
                              for k in sorted({k for r in rs for k in r["cpu_s_by_part"]})},
            "serial_s": round(_mean(rs, "serial_s"), 2),
            "idle_box_estimate_s": round(_mean(rs, "idle_estimate_s"), 2),
            "stage_seconds": rs[-1]["stage_seconds"]}
    c = result["configs"]
    digests = {f"{name}#{i}": r["shards"] for name, rs in runs.items() for i, r in enumerate(rs)}
    first = next(iter(digests.values()))
    result["same_shard_bytes_in_all_runs"] = all(d == first for d in digests.values())
    if not result["same_shard_bytes_in_all_runs"]:
        result["shard_sha256_by_run"] = {n: {k: v[:12] for k, v in d.items()} for n, d in digests.items()}

    def ratio(a: str, b: str, key: str, inverse: bool = False):
        if a not in c or b not in c:
            return None
        x, y = c[a][key], c[b][key]
        return round((y / x) if inverse else (x / y), 3)

    result["scaling_ray2x1_over_ray1x1"] = {
        "wall": ratio("ray2x1", "ray1x1", "pairs_per_s_wall"),
        "in_jobs": ratio("ray2x1", "ray1x1", "pairs_per_s_in_jobs"),
        "idle_box_estimate": ratio("ray2x1", "ray1x1", "idle_box_estimate_s", inverse=True)}
    result["ray1x2_over_ray1x1_wall"] = ratio("ray1x2", "ray1x1", "pairs_per_s_wall")
    result["ray2x1_over_ray1x2_wall"] = ratio("ray2x1", "ray1x2", "pairs_per_s_wall")
    result["ray2x1_over_plain_wall"] = ratio("ray2x1", "plain", "pairs_per_s_wall")
    if "ray1x2" in c and "plain" in c:  # same threads, with and without Ray: what Ray itself costs
        result["ray_overhead_s_per_run"] = round(statistics.fmean(c["ray1x2"]["wall_s"]) - statistics.fmean(c["plain"]["wall_s"]), 2)
    result["ray_fixed_costs"] = fixed
    result["noop_rerun"] = {"run_farm_s": round(noop_s, 3), "status": noop["status"],
                            "cli_process_s": round(noop_cli_s, 2), "cli_rc": done.returncode,
                            "cli_says": done.stdout.strip().splitlines()[-1][:160] if done.stdout.strip() else done.stderr[-300:]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
