"""The render farm driver: plan jobs from the manifests, run Blender workers on Ray, write the index.

Planning happens here, on the driver (no bpy); rendering happens in Blender worker processes, one
``bpy`` per process (Ray actors, each its own process). Work items are ``(character, sample range)``
jobs (:class:`serialgen.render.job.RenderJob`) whose shard names are deterministic
(``<split>/<character>-p<start>-<stop>.tar``), so a retried or re-run job rewrites the same file.
Workers write their shard straight into the output folder (temporary name, renamed when complete)
and send back only a small summary; the driver writes ``index.json`` last.

Re-running the same command (same ``run.json`` configuration) keeps the shards that are already
complete and renders only the missing ones; a different configuration into a folder that holds
shards is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serialgen.dataset import shards
from serialgen.errors import UserInputError
from serialgen.render.job import RenderJob
from serialgen.render.scene import RenderSettings

__all__ = ["FarmConfig", "load_characters", "plan_jobs", "run_farm", "format_summary"]

RUN_NAME = "run.json"
REPORT_NAME = "report.json"


@dataclass
class FarmConfig:
    """Everything a render run depends on. ``render_config()`` is the part that fixes the samples."""

    assets: str
    out: str
    settings: RenderSettings = field(default_factory=RenderSettings)
    per_character: int = 12
    seed: int = 0
    test_fraction: float = 0.2
    poses_per_shard: int = 1000
    workers: int = 1
    cpus_per_worker: int = 0  # 0: the machine's CPUs divided among the workers
    address: str | None = None
    max_characters_per_worker: int = 50
    rss_cap_mb: float = 6000.0
    limit_characters: int | None = None
    record_timings: bool = False
    overwrite: bool = False
    progress: bool = True

    def render_config(self) -> dict:
        """The settings that determine the bytes of the shards (not workers, threads, paths)."""
        settings = self.settings.to_json()
        settings.pop("threads")
        return {"settings": settings, "per_character": self.per_character, "seed": self.seed,
                "test_fraction": self.test_fraction, "poses_per_shard": self.poses_per_shard,
                "record_timings": self.record_timings, "limit_characters": self.limit_characters}


def load_characters(assets_dir: Path) -> tuple[list[dict], int]:
    """Accepted character records of ``assets_dir/characters.jsonl`` (and how many were rejected)."""
    path = Path(assets_dir) / "characters.jsonl"
    if not path.is_file():
        raise UserInputError(f"--assets: {path} not found (run `serialgen assets build --out {assets_dir}`)")
    accepted, rejected = [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if rec.get("status", "accepted") != "accepted":
            rejected += 1
            continue
        if not isinstance(rec.get("id"), str) or not rec["id"]:
            raise UserInputError(f"{path}:{n}: accepted record without an id")
        accepted.append(rec)
    if not accepted:
        raise UserInputError(f"{path}: no accepted characters ({rejected} rejected); nothing to render")
    return sorted(accepted, key=lambda r: r["id"]), rejected


def _pose_count(poses_path: Path) -> int:
    if not poses_path.is_file():
        raise UserInputError(f"--assets: {poses_path} not found (run `serialgen assets build`)")
    import numpy as np

    try:
        with np.load(poses_path, allow_pickle=False) as data:
            n = int(data["angles"].shape[0])
    except (KeyError, ValueError, OSError) as exc:
        raise UserInputError(f"{poses_path}: not a pose library ({exc})") from None
    if n == 0:
        raise UserInputError(f"{poses_path}: the pose library is empty")
    return n


def plan_jobs(config: FarmConfig, characters: list[dict]) -> list[RenderJob]:
    """One job per (character, range of at most ``poses_per_shard`` samples), in character order."""
    assets = Path(config.assets).resolve()
    poses_path = assets / "poses.npz"
    jobs = []
    for rec in characters:
        split = shards.split_of(rec["id"], config.test_fraction)
        safe = shards.sample_key(rec["id"], 0, 0).rsplit("_p", 1)[0]
        for start in range(0, config.per_character, config.poses_per_shard):
            stop = min(start + config.poses_per_shard, config.per_character)
            jobs.append(RenderJob(
                character=rec, assets_dir=str(assets), out_dir=str(Path(config.out).resolve()),
                shard=f"{split}/{safe}-p{start:06d}-{stop:06d}.tar", split=split, start=start, stop=stop,
                per_character=config.per_character, run_seed=config.seed, poses_path=str(poses_path)))
    return jobs


def _prepare_out(config: FarmConfig, jobs: list[RenderJob]) -> dict:
    """Check the output folder against the plan; returns {shard: summary} of complete shards to keep."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / RUN_NAME
    wanted = {j.shard for j in jobs}
    existing = sorted(f"{p.parent.name}/{p.name}" for s in shards.SPLITS for p in (out / s).glob("*.tar"))
    previous = json.loads(run_path.read_text()) if run_path.is_file() else None
    same_run = previous == config.render_config()
    stray = [p for p in existing if p not in wanted]
    if existing and not config.overwrite and (not same_run or stray):
        example = stray[0] if stray else existing[0]
        raise UserInputError(
            f"--out: {out} holds {len(existing)} shards of another run (e.g. {example}); "
            "use a new folder or --overwrite")
    (out / shards.INDEX_NAME).unlink(missing_ok=True)  # the index marks a finished run: not anymore
    if config.overwrite or not same_run:
        for rel in existing:
            (out / rel).unlink()
        existing = []
    for s in shards.SPLITS:  # temporaries of an interrupted run
        for tmp in (out / s).glob(".*.tmp"):
            tmp.unlink()
    run_path.write_text(json.dumps(config.render_config(), indent=1, sort_keys=True) + "\n")
    keep = {}
    for job in jobs:
        if job.shard in existing:
            keep[job.shard] = shards.summarize_shard(out, job.shard, job.split)
    return keep


class _Scheduler:
    """Hands out jobs so that consecutive jobs of one character go to the worker that has it loaded."""

    def __init__(self, jobs: list[RenderJob]):
        self.by_char: dict[str, deque] = {}
        for job in jobs:
            self.by_char.setdefault(job.character["id"], deque()).append(job)
        self.order = deque(self.by_char)

    def next(self, last_character: str | None) -> RenderJob | None:
        if last_character in self.by_char and self.by_char[last_character]:
            return self.by_char[last_character].popleft()
        while self.order:
            char = self.order[0]
            if self.by_char[char]:
                return self.by_char[char].popleft()
            self.order.popleft()
        return None


class _LocalPool:
    """Runs jobs in this process (``workers=0``): no Ray, for debugging and for measuring Ray's cost."""

    def __init__(self, config: FarmConfig, settings: RenderSettings):
        from serialgen.render.job import BlenderWorker

        self.worker = BlenderWorker(settings, config.max_characters_per_worker, config.rss_cap_mb,
                                    config.record_timings)

    def run_all(self, scheduler: _Scheduler, on_result) -> None:
        last = None
        while (job := scheduler.next(last)) is not None:
            on_result(self.worker.run(job), "local-0")
            last = job.character["id"]
        self.worker.unload()


class _RayActor:
    """The Ray actor body: one Blender worker per actor process."""

    def __init__(self, settings: RenderSettings, max_characters: int, rss_cap_mb: float, record_timings: bool):
        from serialgen.render.job import BlenderWorker

        self.worker = BlenderWorker(settings, max_characters, rss_cap_mb, record_timings)

    def run(self, job: RenderJob) -> dict:
        result = self.worker.run(job)
        result["recycle"] = self.worker.should_recycle()
        result["pid"] = os.getpid()
        return result

    def ready(self) -> int:
        return os.getpid()


class _RayPool:
    def __init__(self, config: FarmConfig, settings: RenderSettings, cpus_per_worker: int):
        import ray

        self.ray = ray
        self.config, self.settings = config, settings
        self.started_ray = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if config.address:
                ray.init(address=config.address, **kwargs)
            else:
                ray.init(num_cpus=max(config.workers * cpus_per_worker, 1), **kwargs)
            self.started_ray = True
        self.actor_cls = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(_RayActor)
        self.serial = 0

    def _new_actor(self):
        self.serial += 1
        c = self.config
        return self.actor_cls.remote(self.settings, c.max_characters_per_worker, c.rss_cap_mb, c.record_timings)

    def run_all(self, scheduler: _Scheduler, on_result) -> None:
        ray = self.ray
        actors = {}  # actor -> (name, last character)
        pending = {}  # object ref -> (actor, job)
        for i in range(self.config.workers):
            actors[self._new_actor()] = (f"worker-{i}", None)
        try:
            def submit(actor):
                name, last = actors[actor]
                job = scheduler.next(last)
                if job is None:
                    return
                actors[actor] = (name, job.character["id"])
                pending[actor.run.remote(job)] = (actor, job)

            for actor in list(actors):
                submit(actor)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                actor, job = pending.pop(ref)
                name = actors[actor][0]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker process died (segfault, OOM)
                    result = {"job": job.name, "character": job.character["id"], "status": "failed",
                              "shard": None, "pairs": 0, "timings_s": {}, "recycle": True,
                              "error": f"worker died: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
                    result["failures"] = [{"character": job.character["id"], "key": None, "error": result["error"]}]
                on_result(result, name)
                if result.get("recycle"):
                    # Past its RSS cap or character count: replace the process (memory back to the OS).
                    del actors[actor]
                    ray.kill(actor)
                    actor = self._new_actor()
                    actors[actor] = (name, None)
                submit(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
            if self.started_ray:
                ray.shutdown()


def run_farm(config: FarmConfig) -> dict:
    """Render everything ``config`` asks for; returns the run summary (also in ``report.json``)."""
    t0 = time.perf_counter()
    characters, rejected = load_characters(Path(config.assets))
    if config.limit_characters is not None:
        characters = characters[: config.limit_characters]
    n_poses = _pose_count(Path(config.assets) / "poses.npz")
    if config.per_character < 1:
        raise UserInputError(f"--poses-per-character must be >= 1, got {config.per_character}")
    if config.workers < 0:
        raise UserInputError(f"--workers must be >= 0, got {config.workers}")
    jobs = plan_jobs(config, characters)
    keep = _prepare_out(config, jobs)
    todo = [j for j in jobs if j.shard not in keep]
    cpus = config.cpus_per_worker or max(1, (os.cpu_count() or 1) // max(config.workers, 1))
    settings = RenderSettings(**{**config.settings.to_json(), "threads": config.settings.threads or cpus})

    summaries = dict(keep)
    failures: list[dict] = []
    job_reports: list[dict] = []
    stage_totals: dict[str, float] = {}
    per_worker: dict[str, dict] = {}
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(j.stop - j.start for j in todo), unit="pair", desc="render", file=sys.stderr,
                   dynamic_ncols=True)

    def on_result(result: dict, worker: str) -> None:
        if result.get("shard"):
            s = result["shard"]
            summaries[s["path"]] = shards.ShardSummary(**s)
        failures.extend(result.get("failures", []))
        for k, v in result.get("timings_s", {}).items():
            stage_totals[k] = stage_totals.get(k, 0.0) + v
        w = per_worker.setdefault(worker, {"jobs": 0, "pairs": 0, "seconds": 0.0})
        w["jobs"] += 1
        w["pairs"] += result.get("pairs", 0)
        w["seconds"] += result.get("timings_s", {}).get("job", 0.0)
        job_reports.append({k: v for k, v in result.items() if k not in ("shard",)})
        if bar is not None:
            bar.update(max(result.get("pairs", 0), 0))
            bar.set_postfix(shards=len(summaries), failed=len(failures), refresh=False)

    if todo:
        if config.workers == 0:
            pool = _LocalPool(config, settings)
        else:
            pool = _RayPool(config, settings, cpus)
        pool.run_all(_Scheduler(todo), on_result)
    if bar is not None:
        bar.close()

    index_config = {**config.render_config(), "characters": len(characters), "rejected_characters": rejected,
                    "poses": n_poses}
    shard_list = sorted(summaries.values(), key=lambda s: s.path)
    shards.write_index(config.out, shard_list, index_config, failures)
    wall = time.perf_counter() - t0
    pairs_rendered = sum(r.get("pairs", 0) for r in job_reports)
    summary = {
        "out": str(config.out),
        "pairs": sum(s.samples for s in shard_list),
        "pairs_rendered": pairs_rendered,
        "shards": len(shard_list),
        "shards_kept": len(keep),
        "bytes": sum(s.bytes for s in shard_list),
        "seconds": round(wall, 2),
        "pairs_per_s": round(pairs_rendered / wall, 3) if wall > 0 else None,
        "failed_characters": sorted({f["character"] for f in failures if f.get("key") is None}),
        "failed_samples": sum(1 for f in failures if f.get("key") is not None),
        "failures": failures,
        "rejected_characters": rejected,
        "workers": config.workers,
        "threads_per_worker": settings.threads,
        "engine": settings.engine,
        "resolution": [settings.width, settings.height],
        "stage_seconds": {k: round(v, 3) for k, v in sorted(stage_totals.items())},
        "per_worker": per_worker,
        "jobs": job_reports,
    }
    report = Path(config.out) / REPORT_NAME
    report.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """The human summary printed at the end of ``serialgen render``."""
    mb = summary["bytes"] / 1e6
    per_pair = summary["bytes"] / summary["pairs"] / 1e3 if summary["pairs"] else 0.0
    lines = [
        f"rendered {summary['pairs_rendered']} pairs in {summary['seconds']:.1f} s "
        f"({summary['pairs_per_s'] or 0:.2f} pairs/s, {summary['workers']} workers x "
        f"{summary['threads_per_worker']} threads, {summary['engine']} "
        f"{summary['resolution'][0]}x{summary['resolution'][1]})",
        f"dataset: {summary['pairs']} pairs in {summary['shards']} shards"
        + (f" ({summary['shards_kept']} kept from before)" if summary["shards_kept"] else "")
        + f", {mb:.1f} MB ({per_pair:.0f} KB/pair) -> {summary['out']}",
    ]
    if summary["stage_seconds"]:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items() if k != "job")
        lines.append(f"time by stage (all workers): {stages}")
    if summary["rejected_characters"]:
        lines.append(f"rejected characters in the manifest: {summary['rejected_characters']}")
    failed = summary["failed_characters"]
    lines.append(f"failures: {len(failed)} characters, {summary['failed_samples']} samples")
    for f in summary["failures"][:5]:
        lines.append(f"  {f['character']} {f.get('key') or ''}: {f['error']}")
    return "\n".join(lines)
