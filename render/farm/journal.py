"""What a run folder already holds: the run's configuration, its journal, and resume decisions.

Files the farm keeps next to the shards (the shard format itself is ``docs/shard_format.md``):

* ``run.json``: the configuration that fixes the bytes (``FarmConfig.render_config``). A re-run with
  the same configuration resumes; another configuration is refused unless ``--overwrite``.
* ``journal.jsonl`` (format ``serialgen.render-journal/1``, its first line): one line per finished
  shard (path, split, samples, bytes, sha256, the failed samples of its job, its character and that
  character's standard pose, the std_pose.json its samples carry) and per quarantined character
  (id, reason), appended by the driver (one writer) and fsynced as each job ends. The standard pose
  is there so a resumed run can write the index's ``characters`` without reading shards. A resumed run trusts a journal line whose shard exists with the journalled size, so resuming
  costs one ``stat`` per shard instead of re-reading terabytes; a complete ``*.tar`` the journal does
  not know (the driver died between the worker's rename and the journal line) is summarised from
  disk, and its standard pose read from its first sample (so is a shard whose journal line has
  none: a journal written before the standard pose was journalled). A torn last line (driver
  killed mid-write) is ignored.
* ``index.json`` (written last) marks a finished run: a re-run of a finished run renders nothing.
* ``report.json``, ``logs/``: observability, never read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from serialgen.dataset import shards
from serialgen.errors import UserInputError

__all__ = ["RUN_NAME", "JOURNAL_NAME", "JOURNAL_FORMAT", "REPORT_FORMAT", "REPORT_NAME", "LOGS_NAME", "Journal",
           "JournalState", "Resume", "prepare_out", "finished_run", "standard_pose_on_disk"]

RUN_NAME = "run.json"
JOURNAL_NAME = "journal.jsonl"
REPORT_NAME = "report.json"
LOGS_NAME = "logs"
JOURNAL_FORMAT = "serialgen.render-journal/1"  # first line of journal.jsonl: {"kind": "header", "format": ...}
REPORT_FORMAT = "serialgen.render-report/1"  # report.json's "format"


class JournalState(NamedTuple):
    """What a journal says (later lines win)."""

    done: dict[str, shards.ShardSummary]  # shard path -> summary
    quarantined: dict[str, str]  # character -> reason
    sample_failures: dict[str, list[dict]]  # shard path -> failed samples of its job
    standard_poses: dict[str, dict]  # shard path -> its character's standard pose (when journalled)


class Journal:
    """Append-only record of finished shards and quarantined characters (driver side)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / JOURNAL_NAME
        self._f = None

    def read(self) -> JournalState:
        done: dict[str, shards.ShardSummary] = {}
        quarantined: dict[str, str] = {}
        sample_failures: dict[str, list[dict]] = {}
        standard_poses: dict[str, dict] = {}
        state = JournalState(done, quarantined, sample_failures, standard_poses)
        if not self.path.is_file():
            return state
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed driver
            if rec.get("kind") == "header" and rec.get("format") != JOURNAL_FORMAT:
                raise UserInputError(f"{self.path}: journal format {rec.get('format')!r}, expected {JOURNAL_FORMAT!r}; "
                                     "use a new folder or --overwrite")
            if rec.get("kind") == "shard":
                done[rec["path"]] = shards.ShardSummary(rec["path"], rec["split"], rec["samples"],
                                                        rec["bytes"], rec["sha256"])
                sample_failures[rec["path"]] = rec.get("failures", [])
                if rec.get("standard_pose") is not None:
                    standard_poses[rec["path"]] = rec["standard_pose"]
                else:
                    standard_poses.pop(rec["path"], None)
            elif rec.get("kind") == "quarantine":
                quarantined[rec["character"]] = rec["reason"]
        return state

    def _append(self, rec: dict) -> None:
        if self._f is None:
            new = not self.path.is_file() or self.path.stat().st_size == 0
            self._f = open(self.path, "a")
            if new:
                self._f.write(json.dumps({"kind": "header", "format": JOURNAL_FORMAT}) + "\n")
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def shard(self, summary: shards.ShardSummary, failures: list[dict] = (), character: str | None = None,
              standard_pose: dict | None = None) -> None:
        """A finished shard, with the samples of its job that failed (they go into the index), its
        character and that character's standard pose (the index's ``characters``)."""
        self._append({"kind": "shard", **summary.to_json(), "failures": list(failures), "character": character,
                      "standard_pose": standard_pose})

    def quarantine(self, character: str, reason: str) -> None:
        self._append({"kind": "quarantine", "character": character, "reason": reason})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class Resume:
    """What to keep from earlier runs in this folder."""

    keep: dict[str, shards.ShardSummary] = field(default_factory=dict)  # shard path -> summary
    quarantined: dict[str, str] = field(default_factory=dict)  # character -> reason
    read_from_disk: int = 0  # complete shards the journal did not know (summarised by reading them)
    sample_failures: list[dict] = field(default_factory=list)  # failed samples of the kept shards' jobs
    standard_poses: dict[str, dict] = field(default_factory=dict)  # kept shard path -> its standard pose


def _existing_tars(out: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for s in shards.SPLITS for p in (out / s).glob("*.tar"))


def finished_run(out: str | Path, render_config: dict, planned: set[str]) -> dict | None:
    """The index of a finished run of this configuration whose shards are all in place, else None.

    Checks (no shard is read): ``run.json`` equals ``render_config``; ``index.json`` loads; every
    indexed shard exists with its indexed size and is one of the planned shards. Bytes are checked
    by ``serialgen shards verify``, not here.
    """
    out = Path(out)
    run_path = out / RUN_NAME
    try:
        if json.loads(run_path.read_text()) != render_config:
            return None
        index = shards.read_index(out)
    except (OSError, ValueError):
        return None
    for entry in index.get("shards", []):
        path = out / entry["path"]
        if entry["path"] not in planned or not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
    return index


def prepare_out(out: str | Path, render_config: dict, planned: dict[str, str], overwrite: bool,
                retry_quarantined: bool) -> Resume:
    """Check ``out`` against this run and clean it for rendering; returns what to keep.

    ``planned``: {shard path: split} of every job of the plan. Refuses (``UserInputError``) a folder
    with shards of another configuration, or shards this plan does not produce, unless ``overwrite``
    (which deletes them, the journal and the logs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_path = out / RUN_NAME
    existing = _existing_tars(out)
    try:
        previous = json.loads(run_path.read_text()) if run_path.is_file() else None
    except json.JSONDecodeError:
        previous = None
    same_run = previous == render_config
    stray = [p for p in existing if p not in planned]
    if existing and not overwrite and (not same_run or stray):
        example = stray[0] if stray else existing[0]
        raise UserInputError(
            f"--out: {out} holds {len(existing)} shards of another run (e.g. {example}); "
            "use a new folder or --overwrite")
    (out / shards.INDEX_NAME).unlink(missing_ok=True)  # the index marks a finished run: not any more
    journal = Journal(out)
    if overwrite or not same_run:
        for rel in existing:
            (out / rel).unlink()
        existing = []
        journal.path.unlink(missing_ok=True)
        (out / REPORT_NAME).unlink(missing_ok=True)
        logs = out / LOGS_NAME
        if logs.is_dir():
            for p in sorted(logs.rglob("*.log")):
                p.unlink()
    for s in shards.SPLITS:  # temporaries of an interrupted run: never whole
        for tmp in (out / s).glob(".*.tmp"):
            tmp.unlink()
    run_path.write_text(json.dumps(render_config, indent=1, sort_keys=True) + "\n")
    state = journal.read()
    resume = Resume(quarantined={} if retry_quarantined else state.quarantined)
    on_disk = set(existing)
    for rel, split in planned.items():
        if rel not in on_disk:
            continue
        summary = state.done.get(rel)
        trusted = summary is not None and (out / rel).stat().st_size == summary.bytes
        if trusted:
            resume.keep[rel] = summary
            resume.sample_failures.extend(state.sample_failures.get(rel, []))
        else:
            resume.keep[rel] = shards.summarize_shard(out, rel, split)
            resume.read_from_disk += 1
        pose = state.standard_poses.get(rel) if trusted else None
        if pose is None:
            pose = standard_pose_on_disk(out / rel)
        if pose is not None:
            resume.standard_poses[rel] = pose
    return resume


def standard_pose_on_disk(path: Path) -> dict | None:
    """The std_pose.json of a shard's first sample (every sample of a shard carries its character's
    one standard pose), or None for a shard without samples."""
    for _key, sample in shards.iter_shard(path):
        return json.loads(sample["std_pose.json"])
    return None
