"""The render farm driver: plan jobs from the manifests, run Blender workers, write the index.

Planning happens here, on the driver (no bpy); rendering happens in Blender worker processes, one
``bpy`` per process (Ray actors, :mod:`serialgen.render.farm.pool`). Work items are
``(character, sample range)`` jobs (:class:`serialgen.render.job.RenderJob`) whose shard names are
deterministic (``<split>/<character>-p<start>-<stop>.tar``), so a retried or re-run job rewrites the
same file with the same bytes. Workers write their shard straight into the output folder (temporary
name, renamed when complete) and send back only a small summary (with the character's standard
pose); the driver journals each finished shard and writes ``index.json`` last, with the canonical
standard pose of the reference figure and each character's split and own standard pose
(:func:`canonical_standard_pose`, :func:`characters_of`; ``docs/shard_format.md``).

Faults (``docs/rendering.md``, "The farm"): a worker that dies is replaced and its job retried; a job
past its timeout is killed and retried; a character that fails ``max_attempts`` times is quarantined
(:mod:`serialgen.render.farm.schedule`); Ctrl-C (or SIGTERM) stops the workers, leaves only whole
shards and writes no index; re-running the same command renders what is missing
(:mod:`serialgen.render.farm.journal`), and a finished run renders nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from serialgen.assets_manifest.geometry.standard_form import reference_standard_keypoints
from serialgen.dataset import shards
from serialgen.errors import SerialgenError, UserInputError
from serialgen.dataset.render_stats import STATS_NAME, Histograms
from serialgen.render.farm.journal import (LOGS_NAME, REPORT_FORMAT, REPORT_NAME, RUN_FORMAT, Journal, PlannedShard,
                                           Resume, inspect_out, prepare_out, recorded_splits, remove_temporaries)
from serialgen.ray_local import check_reachable
from serialgen.render.farm.pool import LocalPool, RayPool, code_fingerprint, log_path
from serialgen.render.farm.report import Progress, WorkerStats, display_name
from serialgen.render.farm.schedule import JobBook
from serialgen.render.job import RENDERING_VERSION, RenderJob, character_samples
from serialgen.render.keypoints import pose_record
from serialgen.render.scene import RenderSettings

__all__ = ["FarmConfig", "load_characters", "assets_summary", "plan_jobs",
           "planned_shards", "run_farm", "canonical_standard_pose", "characters_of", "merged_stats"]


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
    cpus_per_worker: float = 0  # 0: local: the machine's CPUs / workers; cluster: its CPUs / workers
    gpus_per_worker: float = 0.0  # > 0: GPU workers (fractions pack several on one GPU)
    address: str | None = None
    job_timeout: float = 0.0  # seconds per job; 0: automatic (schedule.JobBook.timeout_for)
    max_attempts: int = 3  # failures of one character before it is quarantined
    retry_quarantined: bool = False
    max_characters_per_worker: int = 50
    rss_cap_mb: float = 6000.0
    limit_characters: int | None = None
    record_timings: bool = False
    overwrite: bool = False
    repair: bool = False  # also compare every kept shard's sha256 with the journal (a full read)
    progress: bool = True

    def render_config(self) -> dict:
        """The settings that determine the bytes of the shards (not workers, threads, paths)."""
        settings = self.settings.to_json()
        settings.pop("threads")
        return {"settings": settings, "per_character": self.per_character, "seed": self.seed,
                "test_fraction": self.test_fraction, "poses_per_shard": self.poses_per_shard,
                "record_timings": self.record_timings, "limit_characters": self.limit_characters,
                "rendering_version": RENDERING_VERSION}


def load_characters(assets_dir: Path) -> tuple[list[dict], list[dict]]:
    """(accepted, rejected) character records of ``assets_dir/characters.jsonl``, accepted sorted by id."""
    path = Path(assets_dir) / "characters.jsonl"
    if not path.is_file():
        raise UserInputError(f"--assets: {path} not found (run `serialgen assets build --out {assets_dir}`)")
    accepted, rejected = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise UserInputError(f"{path}:{n}: not a character record (a JSON object)")
        if rec.get("status", "accepted") != "accepted":
            rejected.append(rec)
            continue
        if not isinstance(rec.get("id"), str) or not rec["id"]:
            raise UserInputError(f"{path}:{n}: accepted record without an id")
        accepted.append(rec)
    if not accepted:
        raise UserInputError(f"{path}: no accepted characters ({len(rejected)} rejected); nothing to render")
    return sorted(accepted, key=lambda r: r["id"]), rejected


def assets_summary(assets_dir: Path, accepted: list[dict], rejected: list[dict]) -> dict:
    """What run.json records of the asset folder for the dataset report: characters accepted and
    rejected (by reason, and each rejected one with its name and reason), and the asset build's own
    per-manifest counts from its report.json when it has one."""
    by_reason: dict[str, int] = {}
    for rec in rejected:
        reason = str(rec.get("reason") or rec.get("status"))
        by_reason[reason] = by_reason.get(reason, 0) + 1
    out = {"path": str(Path(assets_dir).resolve()), "characters_accepted": len(accepted),
           "characters_rejected": len(rejected), "rejected_by_reason": dict(sorted(by_reason.items())),
           "rejected": [{"id": rec.get("id"), "name": display_name(rec), "reason": rec.get("reason"),
                         "detail": rec.get("detail")} for rec in rejected]}
    try:
        report = json.loads((Path(assets_dir) / "report.json").read_text())
        out["manifests"] = report["manifests"]
    except (OSError, ValueError, KeyError, TypeError):  # an asset folder without (a readable) report
        out["manifests"] = None
    return out


def _pose_count(poses_path: Path) -> int:
    if not poses_path.is_file():
        raise UserInputError(f"--assets: {poses_path} not found (run `serialgen assets build`)")
    try:
        with np.load(poses_path, allow_pickle=False) as data:
            n = int(data["angles"].shape[0])
    except (KeyError, ValueError, OSError) as exc:
        raise UserInputError(f"{poses_path}: not a pose library ({exc})") from None
    if n == 0:
        raise UserInputError(f"{poses_path}: the pose library is empty")
    return n


def plan_jobs(config: FarmConfig, characters: list[dict], splits: dict[str, str] | None = None) -> list[RenderJob]:
    """One job per (character, range of at most ``poses_per_shard`` samples), in character order.
    ``splits``: {character: split} (default: ``shards.assign_splits`` with nothing recorded)."""
    assets = Path(config.assets).resolve()
    poses_path = assets / "poses.npz"
    if splits is None:
        splits = shards.assign_splits([r["id"] for r in characters], config.test_fraction, {})
    jobs = []
    for rec in characters:
        split = splits[rec["id"]]
        safe = shards.sample_key(rec["id"], 0, 0).rsplit("_p", 1)[0]
        for start in range(0, config.per_character, config.poses_per_shard):
            stop = min(start + config.poses_per_shard, config.per_character)
            jobs.append(RenderJob(
                character=rec, assets_dir=str(assets), out_dir=str(Path(config.out).resolve()),
                shard=f"{split}/{safe}-p{start:06d}-{stop:06d}.tar", split=split, start=start, stop=stop,
                per_character=config.per_character, run_seed=config.seed, poses_path=str(poses_path)))
    return jobs


def planned_shards(jobs: list[RenderJob], n_poses: int) -> dict[str, PlannedShard]:
    """{shard path: what its job writes} (the sample keys in order: what a kept shard must hold)."""
    plans = {}
    samples: dict[str, list] = {}
    for job in jobs:
        char = job.character["id"]
        if char not in samples:
            samples[char] = character_samples(char, n_poses, job.per_character, job.run_seed)
        keys = tuple(shards.sample_key(char, p, v) for p, v in samples[char][job.start:job.stop])
        plans[job.shard] = PlannedShard(job.split, char, keys, job.start == 0)
    return plans


def _validate(config: FarmConfig) -> None:
    if config.per_character < 1:
        raise UserInputError(f"--poses-per-character must be >= 1, got {config.per_character}")
    if config.limit_characters is not None and config.limit_characters < 1:
        raise UserInputError(f"--limit-characters must be >= 1 (leave it out to render every character), "
                             f"got {config.limit_characters}")
    if config.workers < 0:
        raise UserInputError(f"--workers must be >= 0, got {config.workers}")
    if config.cpus_per_worker < 0 or config.gpus_per_worker < 0:
        raise UserInputError("--cpus-per-worker and --gpus-per-worker must be >= 0")
    if config.gpus_per_worker and config.workers == 0:
        raise UserInputError("--gpus-per-worker needs Ray workers (--workers >= 1)")
    if config.max_attempts < 1:
        raise UserInputError(f"--max-attempts must be >= 1, got {config.max_attempts}")
    if config.job_timeout < 0:
        raise UserInputError(f"--job-timeout must be >= 0 (0 = automatic), got {config.job_timeout}")
    if config.address and config.workers:
        check_reachable(config.address)  # before the output folder is touched


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (cluster schedulers, ``kill``) stops a run like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Driver:
    """Receives the pool's events: updates the job book, the journal, the progress bar, the stats."""

    def __init__(self, book: JobBook, journal: Journal, progress: Progress, plan: dict[str, PlannedShard],
                 resume: Resume, names: dict[str, str]):
        self.book, self.journal, self.progress, self.plan, self.names = book, journal, progress, plan, names
        self.summaries: dict[str, shards.ShardSummary] = dict(resume.keep)  # shard path -> summary
        self.standard_poses = dict(resume.standard_poses)  # shard path -> its character's standard pose
        self.stats = dict(resume.stats)  # shard path -> its render-time histograms (to_json form)
        self.standards = dict(resume.standards)  # character -> its standard tar (format 3)
        self.workers = WorkerStats()
        self.sample_failures: list[dict] = []
        self.stage_totals: dict[str, float] = {}
        self.attempts: list[dict] = []
        self.overheads: list[float] = []
        self.pairs_rendered = 0

    def worker_started(self, slot: str, info: dict) -> None:
        self.workers.started(slot, info)

    def worker_event(self, slot: str, kind: str, pid, detail: str) -> None:
        self.workers.event(slot, kind)
        if kind in ("start_failed", "recycled", "waiting"):
            self.progress.note(f"worker {slot}: {kind} ({detail})")

    def job_progress(self, job_name: str, attempt: int, written: int) -> None:
        """A worker wrote ``written`` samples of the job's attempt so far (late reports of an
        attempt that already ended are ignored)."""
        job = self.book.jobs.get(job_name)
        if job is not None and job_name in self.book.in_flight and self.book.attempt_of(job) == attempt:
            self.progress.job_progress(job_name, written)

    def _missing_samples(self, job: RenderJob, result: dict) -> tuple[list[dict], list[str]]:
        """(failures to add for planned samples the shard lacks and the job did not report,
        keys in the shard its job does not plan)."""
        planned = self.plan[job.shard].keys
        written = result["shard"].get("keys") or []
        reported = {f.get("key") for f in result.get("failures", []) if f.get("key")}
        missing = [{"character": job.character["id"], "key": k,
                    "error": "missing from the shard (the job neither wrote nor reported it)"}
                   for k in planned if k not in set(written) and k not in reported]
        return missing, [k for k in written if k not in set(planned)]

    def job_result(self, slot: str, job: RenderJob, result: dict, seconds: float) -> None:
        ok = result["status"] == "ok"
        extra: list[str] = []
        if ok:
            missing, extra = self._missing_samples(job, result)
            result.setdefault("failures", []).extend(missing)
            if extra:
                ok = False
                result["status"] = "failed"
                result["error"] = f"the shard holds {len(extra)} samples its job does not plan (e.g. {extra[0]})"
        self.workers.job(slot, result.get("pairs", 0), seconds, ok, result.get("cpu_s", 0.0))
        # What the job cost beyond its own work: Ray's dispatch and result transfer, the log set-up.
        overhead = max(seconds - result.get("timings_s", {}).get("job", seconds), 0.0)
        self.overheads.append(overhead)
        self.attempts.append({"job": job.name, "character": job.character["id"], "worker": slot,
                              "attempt": result.get("attempt"), "pid": result.get("pid"),
                              "status": result["status"], "pairs": result.get("pairs", 0),
                              "seconds": round(seconds, 3), "overhead_s": round(overhead, 4),
                              "error": result.get("error")})
        if not ok:
            kind = "bad_input" if str(result.get("error", "")).startswith("UserInputError") else "error"
            self._failed(slot, job, result.get("attempt") or self.book.attempt_of(job), kind,
                         result.get("error", "unknown error"), seconds)
            return
        summary = shards.ShardSummary(**result["shard"])
        summary.keys = []  # the driver needs counts and hashes, not keys
        self.summaries[summary.path] = summary
        self.standard_poses[summary.path] = result["standard_pose"]
        if isinstance(result.get("stats"), dict):
            self.stats[summary.path] = result["stats"]
        standard = None
        if result.get("standard") is not None:  # format 3: the job whose range starts at 0 wrote it
            standard = shards.StandardSummary.from_json(result["standard"])
            self.standards[standard.character] = standard
        failed_samples = [f for f in result.get("failures", []) if f.get("key")]
        self.journal.shard(summary, failed_samples, job.character["id"], result["standard_pose"],
                           result.get("members"), result.get("stats"), standard, result.get("standard_members"))
        self.book.succeeded(job, seconds, result.get("pairs", 0))
        self.pairs_rendered += result.get("pairs", 0)
        self.sample_failures.extend(failed_samples)
        for k, v in result.get("timings_s", {}).items():
            self.stage_totals[k] = self.stage_totals.get(k, 0.0) + v
        self.progress.job_done(job.name, job.stop - job.start)

    def job_failed(self, slot: str, job: RenderJob, attempt: int, kind: str, error: str, seconds: float) -> None:
        """The worker process died or was killed under the job: it could not log that itself."""
        self.workers.job(slot, 0, seconds, True)
        try:
            path = log_path(job)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as log:
                log.write(f"== driver: attempt {attempt} on {slot} failed after {seconds:.1f} s: {kind}: {error}\n")
        except OSError:
            pass  # the log is a convenience; never fail the run for it
        self.attempts.append({"job": job.name, "character": job.character["id"], "worker": slot,
                              "attempt": attempt, "pid": None, "status": kind, "pairs": 0,
                              "seconds": round(seconds, 2), "error": error})
        self._failed(slot, job, attempt, kind, error, seconds)

    def _failed(self, slot: str, job: RenderJob, attempt: int, kind: str, error: str, seconds: float) -> None:
        char = job.character["id"]
        outcome = self.book.failed(job, kind, error, slot, seconds)
        self.progress.job_failed(job.name)
        if outcome == "quarantined":
            reason = self.book.quarantined[char]["reason"]
            self.journal.quarantine(char, reason)
            dropped = [j for j in self.book.jobs.values() if j.character["id"] == char and j.name not in self.book.done]
            self.progress.failed(sum(j.stop - j.start for j in dropped), quarantined=True, jobs_dropped=len(dropped))
            self.progress.note(f"quarantined {self.names.get(char, char)}: {reason}")
        else:
            self.progress.failed()


def canonical_standard_pose(width: int, height: int) -> dict:
    """The canonical standard pose (std_pose.json format) of the reference figure at the render
    resolution: ``geometry.standard_form.reference_standard_keypoints`` through ``pose_record``.
    Every keypoint of the reference figure is defined; its mask says which are in the frame."""
    uv, visible = reference_standard_keypoints(width, height)
    return pose_record(np.column_stack([uv, visible]), visible, width, height)


def characters_of(jobs: list[RenderJob], summaries: dict, standard_poses: dict[str, dict]) -> dict:
    """The index's ``characters``: ``{id: {"split", "name", "standard_pose"}}`` for every character
    with a finished shard (its standard pose from that shard's job or journal line, its display
    name from its record)."""
    out = {}
    for job in jobs:
        pose = standard_poses.get(job.shard) if job.shard in summaries else None
        if pose is not None:
            out.setdefault(job.character["id"], {"split": job.split, "name": display_name(job.character),
                                                 "standard_pose": pose})
    return out


def merged_stats(paths: list[str], stats: dict[str, dict]) -> dict | None:
    """``stats.json``: the render-time histograms of every shard in ``paths``, merged (None when a
    shard has none: rendered by code that did not count them; the report then samples the shards)."""
    if not paths or any(p not in stats for p in paths):
        return None
    total = Histograms()
    for p in sorted(paths):
        total.merge(Histograms.from_json(stats[p], source=p))
    return total.to_json()


def _index_matches(out: Path, keep: dict[str, shards.ShardSummary]) -> bool:
    """True when ``out``'s index loads and lists exactly the kept shards, with their sizes and hashes."""
    try:
        index = shards.read_index(out)
    except (OSError, ValueError):
        return False
    listed = {e["path"]: (e["bytes"], e["sha256"]) for e in index.get("shards", [])}
    return listed == {p: (s.bytes, s.sha256) for p, s in keep.items()}


def _nothing_to_do(config: FarmConfig, out: Path, t0: float) -> dict:
    index = shards.read_index(out)
    entries = index.get("shards", [])
    quarantined = {f["character"]: {"reason": f["error"]} for f in index.get("failures", []) if f.get("key") is None}
    return {"status": "nothing_to_do", "out": str(config.out), "pairs": index.get("samples", 0), "pairs_rendered": 0,
            "shards": len(entries), "shards_kept": len(entries), "bytes": sum(e["bytes"] for e in entries),
            "seconds": round(time.perf_counter() - t0, 3), "quarantined": quarantined,
            "failed_characters": sorted(quarantined), "failures": index.get("failures", []), "damaged": {}}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_farm(config: FarmConfig) -> dict:
    """Render everything ``config`` asks for; returns the run summary (also in ``report.json``).

    ``summary["status"]``: "complete", "interrupted" (Ctrl-C / SIGTERM: whole shards kept, the old
    index, if any, untouched) or "nothing_to_do" (a finished run of the same configuration whose
    shards all pass the checks: nothing is written).
    """
    t0 = time.perf_counter()
    _validate(config)
    characters, rejected = load_characters(Path(config.assets))
    if config.limit_characters is not None:
        characters = characters[: config.limit_characters]
    n_poses = _pose_count(Path(config.assets) / "poses.npz")
    settings = config.settings
    if config.gpus_per_worker and settings.engine == "cycles":
        settings = replace(settings, cycles_device="GPU")
        config = replace(config, settings=settings)
    out = Path(config.out)
    ids = [r["id"] for r in characters]
    splits = shards.assign_splits(ids, config.test_fraction, {} if config.overwrite else recorded_splits(out))
    jobs = plan_jobs(config, characters, splits)
    plan = planned_shards(jobs, n_poses)
    names = {r["id"]: display_name(r) for r in characters}
    run = {"format": RUN_FORMAT, "config": config.render_config(), "rendering_version": RENDERING_VERSION,
           "code_fingerprint": code_fingerprint(), "splits": dict(sorted(splits.items())),
           "assets": assets_summary(Path(config.assets), characters, rejected)}
    resume = inspect_out(out, run, plan, config.overwrite, config.retry_quarantined, config.repair)
    todo = [j for j in jobs if j.shard not in resume.keep and j.character["id"] not in resume.quarantined]
    if not todo and not resume.fresh and not resume.damaged and not resume.adopted and _index_matches(out, resume.keep):
        return _nothing_to_do(config, out, t0)
    prepare_out(out, run, plan, config.overwrite, config.retry_quarantined, config.repair, resume=resume)

    local_cpus = os.cpu_count() or 1
    if config.workers == 0:
        threads = settings.threads or int(config.cpus_per_worker) or local_cpus
    else:
        threads = settings.threads or int(config.cpus_per_worker) or max(1, local_cpus // config.workers)
    book = JobBook(todo, config.max_attempts)
    journal = Journal(out)
    progress = Progress(sum(j.stop - j.start for j in todo), len(jobs) - len(
        [j for j in jobs if j.character["id"] in resume.quarantined and j.shard not in resume.keep]),
        len(resume.keep), enabled=config.progress and bool(todo))
    for rel, why in sorted(resume.damaged.items()):
        progress.note(f"damaged shard {rel} ({why}): rendering it again")
    driver = _Driver(book, journal, progress, plan, resume, names)
    status = "complete"
    pool_info = {"cpus_per_worker": config.cpus_per_worker, "threads": threads}
    try:
        with _sigterm_as_interrupt():
            if todo:
                if config.workers == 0:
                    pool = LocalPool(settings, config.max_characters_per_worker, config.rss_cap_mb,
                                     config.record_timings, threads, log_dir=str(out / LOGS_NAME))
                else:
                    pool = RayPool(settings, config.workers, config.cpus_per_worker,
                                   config.gpus_per_worker, settings.threads,
                                   config.max_characters_per_worker, config.rss_cap_mb,
                                   config.record_timings, address=config.address,
                                   job_timeout=config.job_timeout, report_progress=progress.enabled,
                                   log_dir=str(out / LOGS_NAME))
                    pool_info = {"cpus_per_worker": pool.cpus_per_worker, "threads": pool.threads}
                    threads = pool.threads
                pool.run_all(book, driver)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        progress.close()
        journal.close()
    # The pool is shut down (its workers are gone): temporaries of crashed, killed, quarantined or
    # interrupted jobs are never whole, so none may stay (a re-run would remove them anyway).
    remove_temporaries(out)

    quarantined = {c: {"reason": r, "from_earlier_run": True} for c, r in resume.quarantined.items()}
    quarantined.update(book.quarantined)
    for char, q in quarantined.items():
        q["name"] = names.get(char, char)
    char_failures = [{"character": c, "key": None, "error": q["reason"]} for c, q in sorted(quarantined.items())]
    failures = char_failures + resume.sample_failures + driver.sample_failures
    shard_list = sorted(driver.summaries.values(), key=lambda s: s.path)
    index_config = {**config.render_config(), "characters": len(characters), "rejected_characters": len(rejected),
                    "poses": n_poses}
    if status == "complete":
        # stats.json first: the index, written last, is what marks the set finished.
        stats = merged_stats([s.path for s in shard_list], driver.stats)
        if stats is not None:
            _write_json(out / STATS_NAME, stats)
        else:
            (out / STATS_NAME).unlink(missing_ok=True)
        characters = characters_of(jobs, driver.summaries, driver.standard_poses)
        # Format 3 (each character's standard image in its own tar) when the jobs wrote standards.
        standards = [driver.standards[c] for c in sorted(characters) if c in driver.standards]
        if standards and len(standards) != len(characters):
            missing = sorted(set(characters) - set(driver.standards))
            raise SerialgenError(f"--out: {out} mixes pairs with and without a standard tar (e.g. {missing[0]}): "
                                 "rendered by two versions of serialgen; render it again with --overwrite")
        shards.write_index(out, shard_list, index_config, failures,
                           standard_pose=canonical_standard_pose(settings.width, settings.height),
                           characters=characters, standards=standards or None)
        # A character quarantined before any of its shards was whole may have written its
        # standard tar: not in the index, it would only make `shards verify` fail.
        listed = {s.path for s in standards}
        for split in shards.SPLITS:
            for path in (out / split / shards.STANDARD_DIR).glob("*.tar"):
                if path.relative_to(out).as_posix() not in listed:
                    path.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    summary = {
        "format": REPORT_FORMAT,
        "status": status,
        "out": str(config.out),
        "pairs": sum(s.samples for s in shard_list),
        "pairs_rendered": driver.pairs_rendered,
        "shards": len(shard_list),
        "shards_planned": len(jobs),
        "shards_kept": len(resume.keep),
        "shards_read_from_disk": resume.read_from_disk,
        "damaged": dict(sorted(resume.damaged.items())),
        "bytes": sum(s.bytes for s in shard_list),
        "seconds": round(wall, 2),
        "pairs_per_s": round(driver.pairs_rendered / wall, 3) if wall > 0 else None,
        "failed_characters": sorted(quarantined),
        "failed_samples": len(resume.sample_failures) + len(driver.sample_failures),
        "failures": failures,
        "quarantined": quarantined,
        "retries": [f.to_json() for f in book.failures],
        "rejected_characters": len(rejected),
        "workers": config.workers,
        "cpus_per_worker": pool_info["cpus_per_worker"],
        "gpus_per_worker": config.gpus_per_worker,
        "threads_per_worker": threads,
        "max_attempts": config.max_attempts,
        "job_timeout_s": config.job_timeout or "auto",
        "engine": settings.engine,
        "resolution": [settings.width, settings.height],
        "stage_seconds": {k: round(v, 3) for k, v in sorted(driver.stage_totals.items())},
        "job_overhead_s_mean": round(sum(driver.overheads) / len(driver.overheads), 4) if driver.overheads else None,
        "per_worker": driver.workers.to_json(),
        "attempts": driver.attempts,
        "logs": str(out / LOGS_NAME) if todo else None,
    }
    (out / REPORT_NAME).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
    return summary
