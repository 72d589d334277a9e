"""What a render run tells its user: the progress bar, per-worker statistics, the printed report.

* Progress bar (tqdm, on stderr): pairs done / to do (advancing per pair as workers report their
  jobs' progress), pairs/s, elapsed and ETA (tqdm's own), and a postfix with shards done / planned,
  failed attempts (retries) and quarantined characters.
* ``WorkerStats``: per worker slot (``w0``, ``w1``, ...; a slot keeps its name across replacement
  processes ``w0.1``, ``w0.2``): jobs, pairs, busy seconds, CPU seconds (all threads of the
  process: the cost of a pair independent of other load), pairs/s while busy, processes started,
  deaths, timeouts, recycles.
* :func:`format_summary`: the human report printed at the end of ``serialgen render`` (also built
  from ``report.json``).
"""

from __future__ import annotations

import os
import sys

__all__ = ["display_name", "Progress", "WorkerStats", "format_summary", "worker_table"]


def display_name(record: dict) -> str:
    """What people read for a character: its ``display_name`` (e.g. ``Knight-e48437`` for the file
    Knight.glb), else its id (procedural characters)."""
    name = record.get("display_name")
    return name if isinstance(name, str) and name else str(record.get("id"))


class Progress:
    """The tqdm bar of a run (or nothing with ``enabled=False``).

    It advances per pair: workers report how many samples of their job they have written
    (``job_progress``, at most a few times a second), so the bar moves while a 1,000-pair job runs,
    not once per finished shard. The bar draws on its own copy of the terminal's stderr, so it keeps
    drawing while a job's output (Blender's, EGL's) is redirected into the job's log.
    """

    def __init__(self, pairs: int, shards_planned: int, shards_done: int, enabled: bool = True):
        self.shards_planned, self.shards_done = shards_planned, shards_done
        self.retries = 0
        self.quarantined = 0
        self.enabled = enabled
        self.bar = None
        self._file = None
        self._partial: dict[str, int] = {}  # job in flight -> pairs it has reported
        if enabled:
            from tqdm import tqdm

            sys.stderr.flush()
            self._file = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
            self.bar = tqdm(total=pairs, unit="pair", desc="render", file=self._file, dynamic_ncols=True,
                            smoothing=0.1)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.shards_done}/{self.shards_planned}, retries {self.retries}, "
                                     f"quarantined {self.quarantined}", refresh=True)

    def job_progress(self, job: str, written: int) -> None:
        """The job in flight has written ``written`` pairs so far."""
        if self.bar is not None:
            step = written - self._partial.get(job, 0)
            if step > 0:
                self._partial[job] = written
                self.bar.update(step)

    def job_done(self, job: str, planned_pairs: int) -> None:
        self.shards_done += 1
        if self.bar is not None:
            # A job that lost samples still moves the bar by its plan, so the ETA stays honest.
            self.bar.update(planned_pairs - self._partial.pop(job, 0))
            self._postfix()

    def job_failed(self, job: str) -> None:
        """An attempt failed: the pairs it reported will be rendered again."""
        if self.bar is not None and self._partial.get(job):
            self.bar.update(-self._partial.pop(job))

    def failed(self, quarantined_pairs: int = 0, quarantined: bool = False, jobs_dropped: int = 0) -> None:
        self.retries += 1
        if quarantined:
            self.quarantined += 1
            self.shards_planned -= jobs_dropped
        if self.bar is not None:
            if quarantined_pairs:
                self.bar.update(quarantined_pairs)  # work that will not be done
            self._postfix()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self._file)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._file.close()
            self.bar = None


class WorkerStats:
    """Per-slot counters (``to_json`` goes into ``report.json``)."""

    def __init__(self):
        self.slots: dict[str, dict] = {}

    def _slot(self, name: str) -> dict:
        return self.slots.setdefault(name, {"processes": [], "jobs": 0, "pairs": 0, "busy_s": 0.0, "cpu_s": 0.0, "died": 0,
                                            "timeouts": 0, "errors": 0, "recycled": 0, "start_failed": 0})

    def started(self, name: str, info: dict) -> None:
        self._slot(name)["processes"].append({k: info.get(k) for k in ("slot", "pid", "host", "threads",
                                                                       "gpu_ids", "device")})

    def job(self, name: str, pairs: int, seconds: float, ok: bool, cpu_s: float = 0.0) -> None:
        s = self._slot(name)
        s["jobs"] += 1
        s["pairs"] += pairs
        s["busy_s"] += seconds
        s["cpu_s"] += cpu_s
        if not ok:
            s["errors"] += 1

    def event(self, name: str, kind: str) -> None:
        s = self._slot(name)
        key = {"died": "died", "oom": "died", "lost": "died", "timeout": "timeouts", "recycled": "recycled",
               "start_failed": "start_failed", "error": "errors"}.get(kind)
        if key:
            s[key] += 1

    def to_json(self) -> dict:
        out = {}
        for name, s in sorted(self.slots.items()):
            out[name] = {**s, "busy_s": round(s["busy_s"], 2), "cpu_s": round(s["cpu_s"], 2),
                         "pairs_per_s": round(s["pairs"] / s["busy_s"], 3) if s["busy_s"] > 0 else None}
        return out


def worker_table(per_worker: dict) -> list[str]:
    """Lines of the per-worker table."""
    header = f"{'worker':<8}{'procs':>6}{'jobs':>6}{'pairs':>7}{'busy s':>9}{'pairs/s':>9}{'died':>6}{'timeout':>8}{'recycled':>9}"
    lines = [header]
    for name, s in per_worker.items():
        rate = f"{s['pairs_per_s']:.2f}" if s.get("pairs_per_s") else "-"
        lines.append(f"{name:<8}{len(s['processes']):>6}{s['jobs']:>6}{s['pairs']:>7}{s['busy_s']:>9.1f}{rate:>9}"
                     f"{s['died']:>6}{s['timeouts']:>8}{s['recycled']:>9}")
    return lines


def format_summary(summary: dict) -> str:
    """The human report printed at the end of ``serialgen render``."""
    if summary.get("status") == "nothing_to_do":
        return (f"nothing to render: {summary['out']} is complete ({summary['pairs']} pairs in "
                f"{summary['shards']} shards, {len(summary.get('quarantined', {}))} quarantined characters); "
                "index.json and the shards are unchanged")
    mb = summary["bytes"] / 1e6
    per_pair = summary["bytes"] / summary["pairs"] / 1e3 if summary["pairs"] else 0.0
    lines = []
    if summary.get("status") == "interrupted":
        lines.append(f"interrupted: {summary['shards']} of {summary['shards_planned']} shards are complete; "
                     "no index.json yet. Re-run the same command to render the rest.")
    lines += [
        f"rendered {summary['pairs_rendered']} pairs in {summary['seconds']:.1f} s "
        f"({summary['pairs_per_s'] or 0:.2f} pairs/s, {summary['workers']} workers x "
        f"{summary['threads_per_worker']} threads, {summary['engine']} "
        f"{summary['resolution'][0]}x{summary['resolution'][1]})",
        f"dataset: {summary['pairs']} pairs in {summary['shards']} shards"
        + (f" ({summary['shards_kept']} kept from before)" if summary["shards_kept"] else "")
        + f", {mb:.1f} MB ({per_pair:.0f} KB/pair) -> {summary['out']}",
    ]
    damaged = summary.get("damaged") or {}
    if damaged:
        lines.append(f"damaged shards rendered again: {len(damaged)}")
        for rel, why in list(damaged.items())[:5]:
            lines.append(f"  {rel}: {why}")
    if summary.get("stage_seconds"):
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items() if k != "job")
        lines.append(f"time by stage (all workers): {stages}")
    if summary.get("per_worker"):
        lines += worker_table(summary["per_worker"])
    if summary.get("rejected_characters"):
        lines.append(f"rejected characters in the manifest: {summary['rejected_characters']}")
    retries = summary.get("retries", [])
    if retries:
        kinds: dict[str, int] = {}
        for r in retries:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        lines.append(f"failed attempts: {len(retries)} ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))})")
    quarantined = summary.get("quarantined", {})
    if quarantined:
        lines.append(f"quarantined characters: {len(quarantined)}")
        for char, q in sorted(quarantined.items()):
            name = q.get("name") or char
            lines.append(f"  {name if name == char else f'{name} ({char})'}: {q['reason']}")
    failed = summary["failed_characters"]
    lines.append(f"failures: {len(failed)} characters, {summary['failed_samples']} samples")
    for f in [f for f in summary["failures"] if f.get("key")][:5]:
        lines.append(f"  {f['character']} {f['key']}: {f['error']}")
    if summary.get("logs"):
        lines.append(f"per-job logs: {summary['logs']}")
    return "\n".join(lines)
