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
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from serialgen.errors import SerialgenError
from serialgen.render.farm import faults
from serialgen.render.farm.schedule import JobBook
from serialgen.render.job import BlenderWorker, RenderJob
from serialgen.render.scene import RenderSettings

__all__ = ["CODE_FILES", "CODE_DISTRIBUTIONS", "log_path", "code_files", "code_fingerprint", "check_reachable", "FarmWorker", "LocalPool", "RayPool", "classify_ray_error"]

WAIT_WARNING_S = 60.0  # a worker not started after this long gets a note on the progress bar
_THREAD_VARS = ("LP_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# The code that decides a sample's bytes: (package, glob under its folder). Rendering (render/**),
# the assets and their geometry (assets_manifest/**), flatten-on-white of the standard image
# (serialgen/imaging.py) and the shard writer (dataset/tarset.py, dataset/shards.py).
CODE_FILES = (("serialgen.render", "**/*.py"), ("serialgen.assets_manifest", "**/*.py"),
              ("serialgen", "imaging.py"), ("serialgen.dataset", "tarset.py"), ("serialgen.dataset", "shards.py"))
# Libraries whose version changes pixels or bytes: Blender, numpy, Pillow (supersampling, gain LUTs).
CODE_DISTRIBUTIONS = ("bpy", "numpy", "pillow")


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


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line error for a ``host:port`` nobody listens on: ``ray.init`` would retry it for many
    minutes, deaf to Ctrl-C. Other forms ("auto", "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SerialgenError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                             "start one with `ray start --head` or give the head's host:port") from None


def _token_auth_for(address: str) -> None:
    """Ray 2.60 clusters use token authentication by default, but ``ray.init(address=host:port)``
    does not pick up an existing token by itself (``address="auto"`` does), and then times out.
    With a token at hand and no explicit ``RAY_AUTH_MODE``, ask for token mode (a cluster without
    authentication accepts it too; checked with Ray 2.60)."""
    if os.environ.get("RAY_AUTH_MODE") is not None or address == "auto":
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


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


class FarmWorker:
    """One Blender worker process (the Ray actor body; also used in-process by ``LocalPool``)."""

    def __init__(self, settings: RenderSettings, slot: str, max_characters: int, rss_cap_mb: float,
                 record_timings: bool, threads: int, use_gpus: bool = False, capture_stderr: bool = True):
        # Thread counts first: Mesa's llvmpipe reads LP_NUM_THREADS when Blender makes its EGL
        # context, so a worker must not inherit "all cores" from the node.
        if threads:
            for var in _THREAD_VARS:
                os.environ[var] = str(threads)
        self.slot = slot
        self.threads = threads
        self.capture_stderr = capture_stderr
        self.gpu_ids: list[str] = []
        self.device = "cpu"
        self.code = code_fingerprint()
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
        self._log = None
        self._inject = faults.inject
        self.worker.after_sample = self._after_sample

    def _after_sample(self, job: RenderJob, key: str, written: int) -> None:
        if self._log is not None and _log_progress(written, job.stop - job.start):
            self._log.write(f"sample {written}/{job.stop - job.start} {key}\n")
            self._log.flush()
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
        with open(path, "a", buffering=1) as log:
            log.write(f"== attempt {attempt} worker {info['slot']} pid {info['pid']} host {info['host']} "
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
                 threads: int):
        self.args = (settings, "local-0", max_characters, rss_cap_mb, record_timings, threads)

    def run_all(self, book: JobBook, sink) -> None:
        worker = FarmWorker(*self.args, use_gpus=False, capture_stderr=False)
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
                 address: str | None = None, job_timeout: float = 0.0, max_start_failures: int = 0):
        import ray

        self.ray = ray
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.job_timeout = job_timeout
        self.max_start_failures = max_start_failures or 3 * workers + 2
        self.code = code_fingerprint()
        self.started_ray = False
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                check_reachable(address)
                _token_auth_for(address)
                try:
                    ray.init(address=address, **kwargs)
                except ConnectionError as exc:
                    raise SerialgenError(f"--address {address}: cannot connect to the Ray cluster ({exc}); is it "
                                         "running (`ray status`), and is its auth token here (~/.ray/auth_token "
                                         "or RAY_AUTH_TOKEN)?") from None
            else:
                cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
                gpus = None
                if gpus_per_worker:  # a local cluster sees the node's GPUs; ask for what we need
                    gpus = max(1, math.ceil(workers * gpus_per_worker))
                ray.init(num_cpus=max(math.ceil(workers * cpus), 1), num_gpus=gpus, **kwargs)
            self.started_ray = True
        self.cpus_per_worker = cpus_per_worker or self._auto_cpus(workers)
        # Render threads = reserved CPUs (at least 1), unless --threads says otherwise.
        self.threads = threads or max(1, int(self.cpus_per_worker))
        self.settings = replace(settings, threads=self.threads)
        self.actor_args = (max_characters, rss_cap_mb, record_timings, self.threads)
        opts = dict(num_cpus=self.cpus_per_worker, max_restarts=0, max_task_retries=0)
        if gpus_per_worker:
            opts["num_gpus"] = gpus_per_worker
        self.actor_cls = ray.remote(**opts)(FarmWorker)

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
            use_gpus=bool(self.gpus_per_worker), capture_stderr=True)
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

    def run_all(self, book: JobBook, sink) -> None:
        """Run every job of ``book``; report through ``sink`` (``worker_started``, ``worker_event``,
        ``job_result``, ``job_failed``). ``KeyboardInterrupt`` propagates after the actors are killed."""
        ray = self.ray
        slots = [_Slot(f"w{i}") for i in range(self.workers)]
        running: dict[object, _Running] = {}
        starting: dict[object, _Slot] = {}
        start_failures = 0  # in a row
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
            if self.started_ray:
                ray.shutdown()
