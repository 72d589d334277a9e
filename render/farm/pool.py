"""Worker pools of the render farm: Blender worker processes as Ray actors, or one in-process worker.

:class:`FarmWorker` is the body of one worker process: it pins thread counts before Blender makes
its GL context, selects the Ray-assigned GPU for Cycles, and runs each job with its stdout/stderr
(Blender's C-level output included) appended to ``OUT/logs/<split>/<shard>.log``, one header line per
attempt (worker, pid, host, GPUs, threads) and one line per written sample.

:class:`RayPool` keeps ``workers`` actors busy with jobs from a :class:`JobBook` and survives their
deaths: an actor that dies (SIGKILL, segfault, OOM kill) fails its job, and a new actor takes its
slot; a job past its timeout gets its actor killed (the job then fails as ``timeout``); a worker past
its RSS cap or character count is replaced on purpose. Actors are created with ``max_restarts=0``
and replaced by the driver, so every retry runs in a fresh process and is counted in the report.
Only small dicts travel through Ray (job in, summary out); shards go straight to the output folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from serialgen.errors import SerialgenError
from serialgen.ray_local import init_ray
from serialgen.render.farm import faults
from serialgen.render.farm.journal import member_digest
from serialgen.render.farm.report import display_name
from serialgen.render.farm.schedule import JobBook
from serialgen.render.job import BlenderWorker, RenderJob
from serialgen.render.scene import RenderSettings

__all__ = ["CODE_FILES", "CODE_DISTRIBUTIONS", "log_path", "code_files", "code_fingerprint", "FarmWorker", "LocalPool", "RayPool", "classify_ray_error"]

WAIT_WARNING_S = 60.0  # a worker not started after this long gets a note on the progress bar
PROGRESS_EVERY_S = 0.25  # a worker reports its job's progress at most this often
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# The code that decides a sample's bytes: (package, glob under its folder). Rendering (render/**),
# the assets and their geometry (assets_manifest/**), flatten-on-white of the standard image
# (serialgen/imaging.py) and the shard writer (dataset/tarset.py, dataset/shards.py).
CODE_FILES = (("serialgen.render", "**/*.py"), ("serialgen.assets_manifest", "**/*.py"),
              ("serialgen", "imaging.py"), ("serialgen.dataset", "tarset.py"), ("serialgen.dataset", "shards.py"))
# Libraries whose version changes pixels or bytes: Blender, numpy, Pillow (TGA read-back,
# supersampling), libdeflate (the PNGs' zlib streams: dataset/shards.encode_png).
CODE_DISTRIBUTIONS = ("bpy", "numpy", "pillow", "deflate")


def code_files(roots: dict[str, Path] | None = None) -> list[tuple[str, Path]]:
    """(label, path) of every file :func:`code_fingerprint` reads, sorted; the label is
    ``package/relative/path`` (the same on every machine). ``roots``: package -> folder, for
    packages not to be looked up where Python imports them from (tests)."""
    import importlib

    out = []
    for package, pattern in CODE_FILES:
        root = (roots or {}).get(package)
        if root is None:
            root = Path(importlib.import_module(package).__file__).parent
        for path in root.glob(pattern):
            if path.is_file() and "__pycache__" not in path.parts:
                out.append((f"{package}/{path.relative_to(root).as_posix()}", path))
    return sorted(out)


def code_fingerprint(roots: dict[str, Path] | None = None) -> str:
    """sha256 (16 hex) of the code that decides a sample's bytes (:data:`CODE_FILES`: every ``.py``
    under render/ and assets_manifest/, serialgen/imaging.py, dataset/tarset.py and dataset/shards.py)
    and of the versions of :data:`CODE_DISTRIBUTIONS`.

    Worker processes import the code when they start, so a node with another install, or an edit
    of the working tree during a run, would silently mix two versions of the data in one folder.
    The driver refuses workers whose fingerprint differs from its own.
    """
    import hashlib
    from importlib import metadata

    h = hashlib.sha256()
    for label, path in code_files(roots):
        h.update(f"{label}\0".encode())
        h.update(path.read_bytes())
    for dist in CODE_DISTRIBUTIONS:
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:16]


def _log_progress(written: int, total: int) -> bool:
    """Which samples get a progress line: the first two, every 25th, the last (a line per sample
    would be thousands of small appends per second to shared storage on a big cluster)."""
    return written <= 2 or written % 25 == 0 or written == total


def log_path(job: RenderJob) -> Path:
    """``OUT/logs/<split>/<shard name without .tar>.log`` (one file per job, all attempts appended)."""
    rel = Path(job.shard)
    return Path(job.out_dir) / "logs" / rel.parent / (rel.stem + ".log")


@contextlib.contextmanager
def _redirect_fds(log, capture_stderr: bool):
    """Point fd 1 (and 2) at ``log`` for the duration: Blender prints from C, past ``sys.stdout``."""
    fds = (1, 2) if capture_stderr else (1,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    try:
        for fd in fds:
            os.dup2(log.fileno(), fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _task_pool_of(threads: int):
    """Blender's task pool (oneTBB: parallel mesh and depsgraph evaluation) takes as many threads as
    the process may use CPUs when bpy is imported, and bpy as a module has no setting for it: a
    "1-thread" worker on a 2-core node used ~1.1-1.25 cores, so two of them oversubscribed the
    node. While bpy is imported the process is confined to ``threads`` CPUs (which ones: by pid,
    so that workers starting together do not share one), then may run on every CPU again; the
    pool keeps its size. No-op when bpy is already imported or without ``sched_setaffinity``."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not threads or len(allowed) <= threads or "bpy" in sys.modules:
        yield
        return
    cpus = sorted(allowed)
    first = os.getpid() % len(cpus)
    os.sched_setaffinity(0, {cpus[(first + i) % len(cpus)] for i in range(threads)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


class FarmWorker:
    """One Blender worker process (the Ray actor body; also used in-process by ``LocalPool``).

    ``progress``: where the worker reports how many samples of the running job it has written (at
    most every :data:`PROGRESS_EVERY_S` seconds, and at the job's last sample): a Ray actor handle
    with a ``report(job, attempt, written)`` method (``RayPool``), or such a callable
    (``LocalPool``), or None. ``log_dir``: Blender's and the GL driver's output while the worker
    starts (``EGL Error`` lines, ...) goes to ``log_dir/workers/<slot>.log`` instead of the terminal.
    """

    def __init__(self, settings: RenderSettings, slot: str, max_characters: int, rss_cap_mb: float,
                 record_timings: bool, threads: int, use_gpus: bool = False, capture_stderr: bool = True,
                 progress=None, log_dir: str | None = None):
        # Thread counts first: Mesa's llvmpipe reads LP_NUM_THREADS when Blender makes its EGL
        # context, so a worker must not inherit "all cores" from the node. One thread means one:
        # LP_NUM_THREADS=1 would still rasterise on a second thread while the first one waits for
        # it (a hand-off per draw), 0 rasterises in the calling thread (docs/scaling.md).
        if threads:
            for var in _THREAD_VARS:
                os.environ[var] = str(threads)
            os.environ["LP_NUM_THREADS"] = str(threads if threads > 1 else 0)
        self.slot = slot
        self.threads = threads
        self.capture_stderr = capture_stderr
        self.gpu_ids: list[str] = []
        self.device = "cpu"
        self.code = code_fingerprint()
        self._report = progress.report.remote if hasattr(progress, "report") else progress
        self._last_report = 0.0
        self._attempt = 0
        with _task_pool_of(threads):
            if log_dir is not None:
                start_log = Path(log_dir) / "workers" / f"{slot}.log"
                start_log.parent.mkdir(parents=True, exist_ok=True)
                with open(start_log, "a", buffering=1) as log, _redirect_fds(log, capture_stderr=True):
                    self.worker = BlenderWorker(settings, max_characters, rss_cap_mb, record_timings)
            else:
                self.worker = BlenderWorker(settings, max_characters, rss_cap_mb, record_timings)
        if use_gpus:
            import ray

            self.gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
            if settings.engine == "cycles":
                from serialgen.render.farm.gpu import configure_cycles_gpus

                self.device = configure_cycles_gpus(self.worker.scene, self.gpu_ids)
            else:  # OpenGL/EGL engines: no per-process device choice in bpy (see farm/gpu.py)
                self.device = (f"{settings.engine} on the EGL default device; ray gpu ids {self.gpu_ids}, "
                               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}")
        # A GPU renders: this process's CPU waits meanwhile, so the next sample's encode runs then.
        self.worker.encode_ahead = use_gpus
        self._log = None
        self._inject = faults.inject
        self.worker.after_sample = self._after_sample

    def _after_sample(self, job: RenderJob, key: str, written: int) -> None:
        total = job.stop - job.start
        if self._log is not None and _log_progress(written, total):
            self._log.write(f"sample {written}/{total} {key}\n")
            self._log.flush()
        if self._report is not None:
            now = time.monotonic()
            if written == total or now - self._last_report >= PROGRESS_EVERY_S:
                self._last_report = now
                self._report(job.name, self._attempt, written)
        self._inject(job.character, written)

    def info(self) -> dict:
        """Who this worker is (logged at start and in the report)."""
        return {"slot": self.slot, "pid": os.getpid(), "host": socket.gethostname(), "threads": self.threads,
                "gpu_ids": self.gpu_ids, "device": self.device, "code": self.code}

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: RenderJob, attempt: int = 1) -> dict:
        """Render ``job`` (never raises for job failures: they come back in the summary)."""
        cpu0 = time.process_time()  # all threads of this process (Blender's and Mesa's included)
        path = log_path(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = self.info()
        self._attempt, self._last_report = attempt, time.monotonic()
        with open(path, "a", buffering=1) as log:
            log.write(f"== attempt {attempt} of {job.name} ({display_name(job.character)}) worker {info['slot']} "
                      f"pid {info['pid']} host {info['host']} "
                      f"threads {info['threads']} gpus {info['gpu_ids']} device {info['device']} "
                      f"start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            self._log = log
            try:
                with _redirect_fds(log, self.capture_stderr):
                    result = self.worker.run(job)
            finally:
                self._log = None
            if result["status"] == "ok":
                log.write(f"== ok {result['pairs']} pairs in {result['timings_s'].get('job', 0):.2f} s, "
                          f"{len(result['failures'])} failed samples, rss {result.get('rss_mb')} MB\n")
            else:
                log.write(f"== failed: {result.get('error')}\n{result.get('traceback', '')}")
            for f in result["failures"]:
                if f.get("key"):
                    log.write(f"   sample {f['key']} failed: {f['error']}\n")
        if result["status"] == "ok":
            # The member list as written, from the headers: what a re-run checks the shard against.
            try:
                result["members"] = member_digest(Path(job.out_dir) / job.shard)
                if result.get("standard") is not None:
                    result["standard_members"] = member_digest(Path(job.out_dir) / result["standard"]["path"])
            except (OSError, EOFError, ValueError):
                result["members"] = result["standard_members"] = None
        result["cpu_s"] = round(time.process_time() - cpu0, 4)
        result["recycle"] = self.worker.should_recycle()
        result["pid"] = os.getpid()
        result["attempt"] = attempt
        return result

    def unload(self) -> None:
        self.worker.unload()


class LocalPool:
    """Jobs in this process (``--workers 0``): no Ray, for debugging and for measuring Ray's cost.

    Retries of failed jobs and quarantine work as with Ray; a crash or hang takes the whole run down
    (there is no other process to survive it), and timeouts are not enforced.
    """

    def __init__(self, settings: RenderSettings, max_characters: int, rss_cap_mb: float, record_timings: bool,
                 threads: int, log_dir: str | None = None):
        self.args = (settings, "local-0", max_characters, rss_cap_mb, record_timings, threads)
        self.log_dir = log_dir

    def run_all(self, book: JobBook, sink) -> None:
        # Blender's output goes to the logs as on Ray (the progress bar draws on its own copy of
        # the terminal); progress comes straight from the worker.
        worker = FarmWorker(*self.args, use_gpus=False, capture_stderr=True, progress=sink.job_progress,
                            log_dir=self.log_dir)
        sink.worker_started("local-0", worker.info())
        last = None
        try:
            while (job := book.next(last)) is not None:
                attempt = book.attempt_of(job)
                t = time.perf_counter()
                result = worker.run(job, attempt)
                sink.job_result("local-0", job, result, time.perf_counter() - t)
                last = job.character["id"] if result["status"] == "ok" else None
        finally:
            worker.unload()


def classify_ray_error(exc: BaseException) -> tuple[str, str]:
    """(failure kind, one-line error) for an exception from ``ray.get`` on a job."""
    import ray

    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")[:300]
    name = type(exc).__name__
    lowered = str(exc).lower()
    if isinstance(exc, ray.exceptions.OutOfMemoryError) or "memory monitor" in lowered or "oom" in name.lower():
        return "oom", f"{name}: {first}"
    if isinstance(exc, (ray.exceptions.NodeDiedError, ray.exceptions.ActorUnavailableError)) or (
            "its node has died" in lowered or "node died" in lowered):
        return "lost", f"{name}: {first}"
    if isinstance(exc, ray.exceptions.RayActorError):
        return "died", f"worker process died ({name}): {first}"
    return "error", f"{name}: {first}"


class _RayLogging:
    """While a pool lives, what Ray's Python logger says on the driver (the token authentication
    notice, connection warnings) goes to ``path`` (``OUT/logs/ray-driver.log``), not to the terminal
    where it would tear the progress bar. ``ray.init(configure_logging=False)`` removes the "ray"
    logger's handlers first thing, and records without a handler go to ``sys.stderr`` as it is at
    that moment; so ``starting()`` points ``sys.stderr`` at the file while Ray starts, and
    ``started()`` then gives the logger a handler for the rest of the run. ``path`` None: nothing
    changes."""

    def __init__(self, path: Path | None):
        self.logger = logging.getLogger("ray")
        self.file = None
        self.handler = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)

    def starting(self):
        return contextlib.redirect_stderr(self.file) if self.file is not None else contextlib.nullcontext()

    def started(self) -> None:
        if self.file is not None and self.handler is None:
            self.handler = logging.StreamHandler(self.file)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.logger.addHandler(self.handler)

    def restore(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler = None
        if self.file is not None:
            self.file.close()
            self.file = None


class _ProgressBoard:
    """Ray actor: the latest sample count each running job attempt reported (``report``), handed to
    the driver and forgotten (``take``)."""

    def __init__(self):
        self.counts: dict[tuple[str, int], int] = {}

    def report(self, job: str, attempt: int, written: int) -> None:
        key = (job, attempt)
        self.counts[key] = max(written, self.counts.get(key, 0))

    def take(self) -> dict[tuple[str, int], int]:
        counts, self.counts = self.counts, {}
        return counts


@dataclass
class _Slot:
    name: str
    actor: object = None
    generation: int = 0
    ready_ref: object = None
    starting_since: float = 0.0
    warned: bool = False
    busy: bool = False
    last_character: str | None = None
    pid: int | None = None
    info: dict = field(default_factory=dict)


@dataclass
class _Running:
    slot: _Slot
    job: RenderJob
    attempt: int
    started: float
    timeout: float
    killed: str | None = None  # "timeout" once the driver killed the actor for it


class RayPool:
    """``workers`` Blender actors on Ray, replaced when they die, killed when a job times out."""

    def __init__(self, settings: RenderSettings, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                 threads: int, max_characters: int, rss_cap_mb: float, record_timings: bool,
                 address: str | None = None, job_timeout: float = 0.0, max_start_failures: int = 0,
                 report_progress: bool = False, log_dir: str | None = None):
        import ray

        self.ray = ray
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.job_timeout = job_timeout
        self.max_start_failures = max_start_failures or 3 * workers + 2
        self.code = code_fingerprint()
        self._ray_logging = _RayLogging(Path(log_dir) / "ray-driver.log" if log_dir else None)
        kwargs = dict(log_to_driver=False, configure_logging=False)
        if not address:
            cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
            kwargs["num_cpus"] = max(math.ceil(workers * cpus), 1)
            if gpus_per_worker:  # a local cluster sees the node's GPUs; ask for what we need
                kwargs["num_gpus"] = max(1, math.ceil(workers * gpus_per_worker))
        try:
            with self._ray_logging.starting():
                self.started_ray = init_ray(address, **kwargs)
        except BaseException:
            self._ray_logging.restore()
            raise
        self._ray_logging.started()
        self.cpus_per_worker = cpus_per_worker or self._auto_cpus(workers)
        # Render threads = reserved CPUs (at least 1), unless --threads says otherwise.
        self.threads = threads or max(1, int(self.cpus_per_worker))
        self.settings = replace(settings, threads=self.threads)
        self.actor_args = (max_characters, rss_cap_mb, record_timings, self.threads)
        opts = dict(num_cpus=self.cpus_per_worker, max_restarts=0, max_task_retries=0)
        if gpus_per_worker:
            opts["num_gpus"] = gpus_per_worker
        self.actor_cls = ray.remote(**opts)(FarmWorker)
        self.log_dir = log_dir
        # Per-pair progress for the bar: workers tell a small actor (no CPU reserved), the driver
        # asks it twice a second. Only with a bar: it costs one more process.
        self.progress = ray.remote(num_cpus=0, max_restarts=0)(_ProgressBoard).remote() if report_progress else None

    def _auto_cpus(self, workers: int) -> float:
        """CPUs per worker when not given: the cluster's CPUs shared by the workers, at most one
        node's worth (an actor cannot span nodes)."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        per_node = [n.get("Resources", {}).get("CPU", 0) for n in nodes]
        total = sum(per_node)
        if not total:
            return 1
        return max(1, min(int(total // workers), int(max(per_node))))

    def _start(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.actor = self.actor_cls.remote(
            self.settings, f"{slot.name}.{slot.generation}", *self.actor_args,
            use_gpus=bool(self.gpus_per_worker), capture_stderr=True, progress=self.progress, log_dir=self.log_dir)
        slot.ready_ref = slot.actor.info.remote()
        slot.busy, slot.last_character, slot.pid = False, None, None
        slot.starting_since, slot.warned = time.monotonic(), False

    def _kill(self, slot: _Slot) -> None:
        if slot.actor is not None:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead: nothing to do
                pass
        slot.actor, slot.ready_ref, slot.busy = None, None, False

    def _poll_progress(self, sink) -> None:
        try:
            counts = self.ray.get(self.progress.take.remote(), timeout=10)
        except self.ray.exceptions.RayError:  # the bar is a convenience: without the board it moves per job
            self._kill_progress()
            return
        for (job, attempt), written in counts.items():
            sink.job_progress(job, attempt, written)

    def _kill_progress(self) -> None:
        try:
            self.ray.kill(self.progress, no_restart=True)
        except Exception:  # already gone
            pass
        self.progress = None

    def run_all(self, book: JobBook, sink) -> None:
        """Run every job of ``book``; report through ``sink`` (``worker_started``, ``worker_event``,
        ``job_progress``, ``job_result``, ``job_failed``). ``KeyboardInterrupt`` propagates after the actors are killed."""
        ray = self.ray
        slots = [_Slot(f"w{i}") for i in range(self.workers)]
        running: dict[object, _Running] = {}
        starting: dict[object, _Slot] = {}
        start_failures = 0  # in a row
        last_poll = time.monotonic()
        for slot in slots:
            self._start(slot)
            starting[slot.ready_ref] = slot
        try:
            while True:
                # Feed idle, started workers.
                for slot in slots:
                    if slot.actor is None or slot.ready_ref is not None or slot.busy:
                        continue
                    job = book.next(slot.last_character)
                    if job is None:
                        continue
                    attempt = book.attempt_of(job)
                    ref = slot.actor.run.remote(job, attempt)
                    running[ref] = _Running(slot, job, attempt, time.monotonic(),
                                            book.timeout_for(job, self.job_timeout))
                    slot.busy = True
                    slot.last_character = job.character["id"]
                if not running and not book.has_queued():
                    break
                if not running and not starting:  # queued work but no worker: start them again
                    for slot in slots:
                        if slot.actor is None:
                            self._start(slot)
                            starting[slot.ready_ref] = slot
                refs = list(running) + list(starting)
                done, _ = ray.wait(refs, num_returns=1, timeout=0.5)
                if self.progress is not None and time.monotonic() - last_poll >= 0.5:
                    last_poll = time.monotonic()
                    self._poll_progress(sink)
                for ref in done:
                    if ref in starting:
                        slot = starting.pop(ref)
                        try:
                            slot.info = ray.get(ref)
                        except ray.exceptions.RayError as exc:
                            start_failures += 1
                            kind, error = classify_ray_error(exc)
                            sink.worker_event(slot.name, "start_failed", None, error)
                            self._kill(slot)
                            if start_failures >= self.max_start_failures:
                                raise SerialgenError(f"render workers fail to start ({start_failures} times in a "
                                                     f"row); last error: {error}") from None
                            self._start(slot)
                            starting[slot.ready_ref] = slot
                            continue
                        if slot.info.get("code") != self.code:
                            raise SerialgenError(
                                f"worker {slot.info.get('slot')} on {slot.info.get('host')} runs other serialgen code "
                                f"than the driver (fingerprint {slot.info.get('code')} vs {self.code}): install the "
                                "same version on every node, and do not edit the source during a run")
                        start_failures = 0
                        slot.ready_ref, slot.pid = None, slot.info.get("pid")
                        sink.worker_started(slot.name, slot.info)
                        continue
                    run = running.pop(ref)
                    seconds = time.monotonic() - run.started
                    slot = run.slot
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        kind, error = classify_ray_error(exc)
                        if run.killed == "timeout":
                            kind, error = "timeout", f"timeout: killed after {seconds:.0f} s (limit {run.timeout:.0f} s)"
                        sink.job_failed(slot.name, run.job, run.attempt, kind, error, seconds)
                        sink.worker_event(slot.name, kind, slot.pid, error)
                        self._kill(slot)
                        self._start(slot)  # a fresh process for the slot
                        starting[slot.ready_ref] = slot
                        continue
                    slot.busy = False
                    sink.job_result(slot.name, run.job, result, seconds)
                    if result["status"] != "ok":
                        slot.last_character = None
                    if result.get("recycle"):
                        # Past its RSS cap or character count: a new process gives the memory back.
                        sink.worker_event(slot.name, "recycled", slot.pid, f"rss {result.get('rss_mb')} MB")
                        self._kill(slot)
                        self._start(slot)
                        starting[slot.ready_ref] = slot
                # Timeouts: kill the actor; its job fails as "timeout" once Ray reports the death.
                now = time.monotonic()
                for ref, run in running.items():
                    if run.killed is None and now - run.started > run.timeout:
                        run.killed = "timeout"
                        try:
                            self.ray.kill(run.slot.actor, no_restart=True)
                        except Exception:  # died on its own meanwhile: reported as such
                            pass
                # A worker Ray cannot place (the cluster lacks the CPUs/GPUs asked for) waits
                # silently: say so (once per worker start) rather than look hung.
                for slot in starting.values():
                    if not slot.warned and now - slot.starting_since > WAIT_WARNING_S:
                        slot.warned = True
                        sink.worker_event(slot.name, "waiting", None,
                                          f"not started after {now - slot.starting_since:.0f} s: does the cluster have "
                                          f"{self.cpus_per_worker} CPUs and {self.gpus_per_worker} GPUs free for it?")
                # Idle workers with nothing left to do give their resources back (clusters).
                if not book.has_queued():
                    for slot in slots:
                        if slot.actor is not None and not slot.busy and slot.ready_ref is None:
                            self._kill(slot)
        finally:
            for slot in slots:
                self._kill(slot)
            if self.progress is not None:
                self._kill_progress()
            if self.started_ray:
                ray.shutdown()
            self._ray_logging.restore()
