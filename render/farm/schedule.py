"""Which job runs next, when a failed job is retried, and when a character is quarantined.

Pure bookkeeping (no Ray, no bpy), shared by the Ray pool and the in-process pool and tested alone.

Rules (``docs/rendering.md``, "The farm"):

* **Affinity**: a worker that just finished a job of character C gets C's next job, so the character
  is loaded once per worker; a worker without one takes a character no other worker is on, when
  there is one (so two workers do not both load, and render the standard image of, one character).
* **Failures count per character** (an asset, not a job): a job that raised, whose worker process
  died (SIGKILL, segfault, out of memory) or that ran past its timeout counts one failure of its
  character and goes back to the queue (after the fresh work: a poison asset should not starve the
  rest). At ``max_attempts`` failures the character is **quarantined**: its queued jobs are dropped
  and the reason (kinds of failure, last error) goes into the report and the index.
* A ``bad_input`` failure (``UserInputError``: unknown kind, missing mesh file) is deterministic:
  quarantined at once, not retried.
* A ``lost`` failure (the node died, the actor could not be reached) is not the asset's fault: the job
  is retried without counting against the character, up to ``3 * max_attempts`` times per job.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass

from serialgen.render.job import RenderJob

__all__ = ["FAILURE_KINDS", "Failure", "JobBook"]

#: kind -> what it means (report and docs use these words).
FAILURE_KINDS = {
    "error": "the job raised (Python exception inside the worker)",
    "bad_input": "the record cannot be loaded (UserInputError): quarantined without retry",
    "died": "the worker process died (SIGKILL, segfault, killed by the OOM killer)",
    "oom": "Ray's memory monitor killed the worker (node memory pressure)",
    "timeout": "the job ran past its timeout; the driver killed the worker",
    "lost": "the worker's node died or became unreachable (not counted against the asset)",
}


@dataclass
class Failure:
    """One failed attempt (report row)."""

    job: str
    character: str
    attempt: int
    worker: str
    kind: str
    error: str
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        return d


class JobBook:
    """The queue of jobs of one run and the record of their attempts."""

    def __init__(self, jobs: list[RenderJob], max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.jobs = {j.name: j for j in jobs}
        self.by_char: dict[str, deque] = {}
        for job in jobs:
            self.by_char.setdefault(job.character["id"], deque()).append(job)
        self.order: deque = deque(self.by_char)  # characters with fresh jobs, in plan order
        self.retry: deque = deque()  # failed jobs waiting for another attempt
        self.attempts: dict[str, int] = {}  # job name -> attempts started
        self.in_flight: set[str] = set()
        self.done: set[str] = set()
        self.failures: list[Failure] = []
        self.char_failures: dict[str, list[Failure]] = {}
        self.quarantined: dict[str, dict] = {}  # character -> {"reason", "failures", "jobs_done", "jobs"}
        self._per_pair: list[float] = []  # seconds per pair of finished jobs (for automatic timeouts)

    # -- scheduling ---------------------------------------------------------------------------------

    def next(self, last_character: str | None = None) -> RenderJob | None:
        """The job a free worker should run (``last_character``: the one it has loaded), or None."""
        job = None
        queue = self.by_char.get(last_character)
        if queue and last_character not in self.char_failures:
            job = queue.popleft()
        while self.order and not self.by_char[self.order[0]]:
            self.order.popleft()
        if job is None and self.order:
            # A character no other worker is on, if any: each worker that takes a character loads
            # it and renders its standard image, so spreading the workers over characters loads
            # each character once (two workers starting on one character's jobs load it twice).
            busy = {self.jobs[name].character["id"] for name in self.in_flight}
            char = next((c for c in self.order if self.by_char[c] and c not in busy), self.order[0])
            job = self.by_char[char].popleft()
        if job is None and self.retry:
            job = self.retry.popleft()
        if job is not None:
            self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
            self.in_flight.add(job.name)
        return job

    def attempt_of(self, job: RenderJob) -> int:
        return self.attempts.get(job.name, 0)

    def has_queued(self) -> bool:
        return bool(self.retry) or any(self.by_char[c] for c in self.order)

    def finished(self) -> bool:
        return not self.in_flight and not self.has_queued()

    # -- outcomes -----------------------------------------------------------------------------------

    def succeeded(self, job: RenderJob, seconds: float = 0.0, pairs: int = 0) -> None:
        self.in_flight.discard(job.name)
        self.done.add(job.name)
        if pairs > 0 and seconds > 0:
            self._per_pair.append(seconds / pairs)

    def failed(self, job: RenderJob, kind: str, error: str, worker: str = "", seconds: float = 0.0) -> str:
        """Record a failed attempt; returns what happens to the job: "retry", "quarantined" or "dropped"
        (its character was quarantined meanwhile)."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}")
        char = job.character["id"]
        self.in_flight.discard(job.name)
        failure = Failure(job.name, char, self.attempt_of(job), worker, kind, error, seconds)
        self.failures.append(failure)
        if char in self.quarantined:
            return "dropped"
        if kind == "lost":
            if self.attempt_of(job) >= 3 * self.max_attempts:
                self._quarantine(char, [failure], f"lost its worker {self.attempt_of(job)} times")
                return "quarantined"
            self.retry.append(job)
            return "retry"
        counted = self.char_failures.setdefault(char, [])
        counted.append(failure)
        if kind == "bad_input" or len(counted) >= self.max_attempts:
            self._quarantine(char, counted, None)
            return "quarantined"
        self.retry.append(job)
        if char in self.order:  # its other jobs go after everybody else's fresh work
            self.order.remove(char)
            self.order.append(char)
        return "retry"

    def _drop_queued(self, char: str) -> None:
        self.by_char[char] = deque()
        self.retry = deque(j for j in self.retry if j.character["id"] != char)

    def _quarantine(self, char: str, failures: list[Failure], reason: str | None) -> None:
        if reason is None:
            kinds: dict[str, int] = {}
            for f in failures:
                kinds[f.kind] = kinds.get(f.kind, 0) + 1
            what = ", ".join(f"{k} x{n}" for k, n in kinds.items())
            if failures[-1].kind == "bad_input":
                reason = f"bad input (not retried): {failures[-1].error}"
            else:
                reason = f"failed {len(failures)} times ({what}); last: {failures[-1].error}"
        jobs = [n for n, j in self.jobs.items() if j.character["id"] == char]
        self.quarantined[char] = {
            "reason": reason,
            "failures": [f.to_json() for f in failures],
            "jobs": len(jobs),
            "jobs_done": sum(1 for n in jobs if n in self.done),
        }
        self._drop_queued(char)

    # -- timeouts -----------------------------------------------------------------------------------

    def seconds_per_pair(self) -> float | None:
        """Median seconds per pair of the jobs finished so far (None before the first)."""
        return statistics.median(self._per_pair) if self._per_pair else None

    def timeout_for(self, job: RenderJob, fixed: float = 0.0) -> float:
        """Seconds ``job`` may run. ``fixed`` > 0: that. Otherwise automatic: 10x the run's median
        time per pair (plus 120 s for loading and the standard image), and before any job finished
        600 s + 20 s per pair (generous: the slowest CPU setting measured, cycles with the denoiser,
        is ~10 s a pair on 2 cores)."""
        if fixed > 0:
            return fixed
        pairs = job.stop - job.start
        per_pair = self.seconds_per_pair()
        if per_pair is None:
            return 600.0 + 20.0 * pairs
        return max(120.0 + 10.0 * per_pair * pairs, 300.0)
