"""What a run folder already holds: the run's record, its journal, and what a re-run keeps.

Files the farm keeps next to the shards (the shard format itself is ``docs/shard_format.md``):

* ``run.json`` (format ``serialgen.render-run/2``): ``config``, the settings that fix the bytes
  (``FarmConfig.render_config``, the rendering version included); ``rendering_version``;
  ``code_fingerprint``, the code of the latest run, and ``code_fingerprints``, every code that ran
  on the folder since it was last started afresh; ``splits``, every planned character's split (a
  re-run keeps them: a recorded split always wins); ``assets``, the asset folder's accepted /
  rejected counts by reason and the rejected characters (what the dataset report shows, so it
  needs nothing but the shard folder). A re-run with the same config resumes; another config, or
  another rendering version, is refused in one line naming what differs, unless ``--overwrite``.
  A format 1 ``run.json`` (the bare config of older runs, which predates rendering versions) is
  read too, and refused as another rendering version.
* ``journal.jsonl`` (format ``serialgen.render-journal/2``, its first line; format 1 is read too):
  one line per finished shard, appended by the driver (one writer) and fsynced as each job ends:
  path, split, samples, bytes, sha256, ``members`` and ``members_sha256`` (the member count and the
  sha256 of every member's tar header: :func:`member_digest`), the failed samples of its job, its
  character, that character's standard pose (the std_pose.json its samples carry, so a resumed
  run writes the index's ``characters`` without reading shards), the shard's ``stats`` (the
  render-time histograms, ``dataset/render_stats.py``) and, in format 3, the character's
  ``standard`` tar (written by the job whose range starts at 0) with its own header digest; and
  one line per quarantined character (id, reason). A torn last line (driver killed mid-write) is
  ignored, and the next line starts on a line of its own.
* ``index.json`` (written last, through a temporary name) marks a finished run. A re-run replaces it
  only once the new one is written (``--overwrite`` deletes it with the shards it lists).
* ``stats.json``: the merged histograms of every shard (written just before the index).
* ``report.json``, ``logs/``: observability, never read back.

**What a re-run keeps** (:func:`inspect_out`): every planned shard on disk is checked before it is
kept. A shard the journal knows: its size, then its tar headers against the journal's digest, and
its samples plus its job's failed samples against the plan; its character's standard tar (format
3) the same way; with ``repair`` also the sha256 of both (a full read). A shard the journal does
not know (the driver died between the worker's rename and the journal line) is read whole: it must
read without damage and hold exactly the samples its job plans (and, for a job whose range starts
at 0, its standard tar must read whole). Anything else is **damaged**: it is deleted and rendered
again, and the report lists it with the reason. Reading a damaged shard never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from serialgen.dataset import shards, tarset
from serialgen.dataset.render_stats import STATS_NAME
from serialgen.errors import UserInputError

__all__ = ["RUN_NAME", "RUN_FORMAT", "JOURNAL_NAME", "JOURNAL_FORMAT", "REPORT_FORMAT", "REPORT_NAME", "LOGS_NAME",
           "PlannedShard", "Journal", "JournalState", "Resume", "member_digest", "read_run", "recorded_splits",
           "config_diff", "inspect_out", "prepare_out", "remove_temporaries", "standard_pose_on_disk"]

RUN_NAME = "run.json"
RUN_FORMAT = "serialgen.render-run/2"
JOURNAL_NAME = "journal.jsonl"
REPORT_NAME = "report.json"
LOGS_NAME = "logs"
JOURNAL_FORMAT = "serialgen.render-journal/2"  # first line of journal.jsonl: {"kind": "header", "format": ...}
_JOURNAL_READABLE = ("serialgen.render-journal/1", JOURNAL_FORMAT)
REPORT_FORMAT = "serialgen.render-report/1"  # report.json's "format"
_CHECK_THREADS = 16  # header checks are I/O-bound: on shared storage, latency, not CPU


@dataclass(frozen=True)
class PlannedShard:
    """What a job of the plan writes: its shard's split, character and sample keys (in order)."""

    split: str
    character: str
    keys: tuple[str, ...]
    first: bool = True  # its range starts at 0: in format 3 its job also writes the character's standard tar


_BLOCK = 512


def member_digest(path: str | Path, keys: set | None = None) -> tuple[int, str]:
    """(members, sha256 hex) of a tar's member list: the sha256 of every member's 512-byte header
    (name, size, type, mode, checksum, ...) in order, one ``pread`` per member, no data read (a
    1,000-pair shard of 4,000 members: ~0.05 s on a loaded 2-core box, where ``tarfile``'s walk,
    which parses every field, takes ~0.6 s and a full sha256 read ~2 s). ``keys``: a set to add each member's sample
    key to. ``EOFError`` for a tar that ends inside a header or without its end-of-archive block,
    ``ValueError`` for a header whose size field is not a number, ``OSError`` if it cannot be read."""
    h, n, pos = hashlib.sha256(), 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            header = os.pread(fd, _BLOCK, pos)
            if len(header) < _BLOCK:
                raise EOFError(f"ends after {n} members without the end-of-archive block")
            if not header.strip(b"\0"):
                return n, h.hexdigest()
            h.update(header)
            n += 1
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            if keys is not None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                keys.add(name.rpartition("/")[2].partition(".")[0])
            pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
    finally:
        os.close(fd)


class JournalState(NamedTuple):
    """What a journal says (later lines win)."""

    done: dict[str, shards.ShardSummary]  # shard path -> summary
    quarantined: dict[str, str]  # character -> reason
    lines: dict[str, dict]  # shard path -> its whole journal line (members, failures, pose, stats, ...)


class Journal:
    """Append-only record of finished shards and quarantined characters (driver side)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / JOURNAL_NAME
        self._f = None

    def read(self) -> JournalState:
        state = JournalState({}, {}, {})
        if not self.path.is_file():
            return state
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed driver
            if not isinstance(rec, dict):
                continue
            if rec.get("kind") == "header" and rec.get("format") not in _JOURNAL_READABLE:
                raise UserInputError(f"{self.path}: journal format {rec.get('format')!r}, expected {JOURNAL_FORMAT!r}; "
                                     "use a new folder or --overwrite")
            try:
                if rec.get("kind") == "shard":
                    state.done[rec["path"]] = shards.ShardSummary(rec["path"], rec["split"], int(rec["samples"]),
                                                                  int(rec["bytes"]), str(rec["sha256"]))
                    state.lines[rec["path"]] = rec
                elif rec.get("kind") == "quarantine":
                    state.quarantined[rec["character"]] = rec["reason"]
            except (KeyError, TypeError, ValueError):
                continue  # a line this code cannot use: its shard is checked like an unknown one
        return state

    def _append(self, rec: dict) -> None:
        if self._f is None:
            size = self.path.stat().st_size if self.path.is_file() else 0
            torn = False
            if size:  # a driver killed mid-line leaves no newline: start on a line of our own
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    torn = f.read(1) != b"\n"
            self._f = open(self.path, "a")
            if torn:
                self._f.write("\n")
            if not size:
                self._f.write(json.dumps({"kind": "header", "format": JOURNAL_FORMAT}) + "\n")
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def shard(self, summary: shards.ShardSummary, failures: list[dict] = (), character: str | None = None,
              standard_pose: dict | None = None, members: tuple[int, str] | None = None,
              stats: dict | None = None, standard: shards.StandardSummary | None = None,
              standard_members: tuple[int, str] | None = None) -> None:
        """A finished shard: its summary, the samples of its job that failed (they go into the
        index), its character and that character's standard pose (the index's ``characters``), its
        member list digest (``member_digest``: what a re-run checks), its render-time stats, and
        the character's standard tar when its job wrote one (format 3) with that tar's digest."""
        self._append({"kind": "shard", **summary.to_json(), "failures": list(failures), "character": character,
                      "standard_pose": standard_pose, "members": members[0] if members else None,
                      "members_sha256": members[1] if members else None, "stats": stats,
                      "standard": standard.to_json() if standard is not None else None,
                      "standard_members": list(standard_members) if standard_members else None})

    def quarantine(self, character: str, reason: str) -> None:
        self._append({"kind": "quarantine", "character": character, "reason": reason})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# -- run.json ---------------------------------------------------------------------------------------

def read_run(out: str | Path) -> dict | None:
    """The run record of ``out`` in format 2 (a format 1 file, the bare config, is converted), or
    None when there is none or it is not readable JSON."""
    path = Path(out) / RUN_NAME
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if rec.get("format") != RUN_FORMAT:  # format 1: the render config itself
        rec = {"format": RUN_FORMAT, "config": rec}
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    config.setdefault("rendering_version", rec.get("rendering_version"))  # None: from before it was recorded
    rec["config"] = config
    rec.setdefault("rendering_version", config["rendering_version"])
    return rec


def recorded_splits(out: str | Path) -> dict[str, str]:
    """{character: split} that ``out`` already records: run.json's ``splits``, the index's
    ``characters`` and the journal's shard lines (later sources win; they agree unless edited)."""
    out = Path(out)
    found: dict[str, str] = {}
    run = read_run(out)
    if run and isinstance(run.get("splits"), dict):
        found.update({c: s for c, s in run["splits"].items() if s in shards.SPLITS})
    try:
        characters = shards.read_index(out).get("characters") or {}
        found.update({c: r["split"] for c, r in characters.items()})
    except (OSError, ValueError):  # no index, or a damaged one: the other sources still count
        pass
    try:
        state = Journal(out).read()
    except UserInputError:
        return found
    for rel, line in state.lines.items():
        if isinstance(line.get("character"), str) and line.get("split") in shards.SPLITS:
            found[line["character"]] = line["split"]
    return found


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``name: old -> new`` for every setting that differs (nested settings as ``a.b``)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(none)"), new.get(key, "(none)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a) if not isinstance(a, str) else a} -> "
                       f"{json.dumps(b) if not isinstance(b, str) else b}")
    return out


# -- what a re-run keeps ----------------------------------------------------------------------------

@dataclass
class Resume:
    """What to keep from earlier runs in this folder (``inspect_out``), and what was damaged."""

    keep: dict[str, shards.ShardSummary] = field(default_factory=dict)  # shard path -> summary
    quarantined: dict[str, str] = field(default_factory=dict)  # character -> reason
    read_from_disk: int = 0  # complete shards the journal did not know (read whole and checked)
    sample_failures: list[dict] = field(default_factory=list)  # failed samples of the kept shards' jobs
    standard_poses: dict[str, dict] = field(default_factory=dict)  # kept shard path -> its standard pose
    stats: dict[str, dict] = field(default_factory=dict)  # kept shard path -> its render-time stats
    standards: dict[str, shards.StandardSummary] = field(default_factory=dict)  # character -> its kept standard tar
    damaged: dict[str, str] = field(default_factory=dict)  # shard path -> why it is rendered again
    adopted: dict[str, dict] = field(default_factory=dict)  # shard path -> journal fields of one read from disk
    existing: list[str] = field(default_factory=list)  # every pair *.tar in the folder
    existing_standards: list[str] = field(default_factory=list)  # every <split>/standard/*.tar
    fresh: bool = False  # overwrite / another run: everything in the folder goes


def _existing_tars(out: Path, sub: str = "") -> list[str]:
    return sorted(p.relative_to(out).as_posix() for s in shards.SPLITS for p in (out / s / sub).glob("*.tar"))


def _check_standard(out: Path, std: dict, members, repair: bool) -> tuple[shards.StandardSummary | None, str | None]:
    """(its summary, None) when the standard tar a journal line records is in place, else (None, why)."""
    try:
        summary = shards.StandardSummary.from_json(std)
        path = out / summary.path
        size = path.stat().st_size
    except (KeyError, TypeError, OSError) as exc:
        return None, f"its character's standard tar is missing or unknown ({type(exc).__name__})"
    if size != summary.bytes:
        return None, f"its character's standard tar {summary.path} has {size} bytes, the journal says {summary.bytes}"
    try:
        found = member_digest(path)
    except (OSError, EOFError, ValueError) as exc:
        return None, f"its character's standard tar {summary.path} has unreadable headers ({type(exc).__name__})"
    if members is not None and list(found) != list(members):
        return None, f"its character's standard tar {summary.path}: member list differs from the journal's"
    if repair and tarset.sha256_file(path)[0] != summary.sha256:
        return None, f"its character's standard tar {summary.path}: sha256 differs from the journal's"
    return summary, None


def _standard_on_disk(out: Path, plan: PlannedShard) -> tuple[shards.StandardSummary | None, str | None]:
    """(summary, None) of the character's standard tar read whole and checked, else (None, why)."""
    rel = shards.standard_relpath(plan.split, plan.character)
    try:
        shards.read_standard(out / rel, plan.character)
        sha, size = tarset.sha256_file(out / rel)
    except Exception as exc:  # missing or damaged: the job that writes it runs again; never fatal here
        text = str(exc).replace(f"{out / rel}: ", "")
        return None, f"its character's standard tar {rel}: {type(exc).__name__}: {text[:120]}"
    return shards.StandardSummary(rel, plan.split, plan.character, size, sha), None


def _check_journalled(out: Path, rel: str, plan: PlannedShard, line: dict, summary: shards.ShardSummary,
                      repair: bool) -> str | None:
    """Why a shard the journal knows cannot be kept (None: keep it). Cheap unless ``repair``."""
    path = out / rel
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if size != summary.bytes:
        return f"{size} bytes, the journal says {summary.bytes}"
    failed = {f.get("key") for f in line.get("failures") or [] if isinstance(f, dict)}
    if summary.samples + len(failed) != len(plan.keys):
        return (f"the journal records {summary.samples} samples and {len(failed)} failed ones, "
                f"the job plans {len(plan.keys)}")
    keys: set[str] = set()
    try:
        members = member_digest(path, keys)
    except (OSError, EOFError, ValueError) as exc:
        return f"unreadable tar headers ({type(exc).__name__}: {str(exc)[:100]})"
    if line.get("members_sha256") is not None:
        if list(members) != [line.get("members"), line.get("members_sha256")]:
            return f"its member list ({members[0]} members) differs from the journal's ({line.get('members')})"
    elif len(keys) != summary.samples or (keys and members[0] % len(keys)):  # a format 1 line: no digest
        return f"{len(keys)} samples in {members[0]} tar members, the journal says {summary.samples} samples"
    if repair:
        try:
            sha, _ = tarset.sha256_file(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if sha != summary.sha256:
            return "its sha256 differs from the journal's (content damaged)"
    return None


def _read_unjournalled(out: Path, rel: str, plan: PlannedShard) -> tuple[shards.ShardSummary | None, dict | None,
                                                                         bool, str | None]:
    """(summary, standard pose, pairs without std.png, None) of a whole shard the journal does not
    know that reads without a rejection (the format layer's reader: truncation, damaged headers,
    ...) and holds exactly its job's samples, in order (the writer checked each sample's members);
    else (None, None, False, why not). Pairs without std.png (format 3) need their standard tar."""
    path = out / rel
    try:
        sha, size = tarset.sha256_file(path)
        keys, pose, carries_standard = [], None, False
        for key, sample in shards.iter_shard(path):
            if pose is None:
                pose = json.loads(sample["std_pose.json"])
                carries_standard = "std.png" in sample  # formats 1-2: every pair carries it
            keys.append(key)
    except Exception as exc:  # any damage: tarfile, the format layer, JSON, I/O; never fatal here
        text = str(exc).replace(f"{path}: ", "")
        return None, None, False, f"unreadable ({type(exc).__name__}: {text[:160]})"
    if tuple(keys) != plan.keys:
        missing = len(set(plan.keys) - set(keys))
        return None, None, False, f"holds {len(keys)} samples, its job plans {len(plan.keys)} ({missing} missing)"
    return shards.ShardSummary(rel, plan.split, len(keys), size, sha), pose, bool(keys) and not carries_standard, None


def inspect_out(out: str | Path, run: dict, plan: dict[str, PlannedShard], overwrite: bool,
                retry_quarantined: bool, repair: bool = False) -> Resume:
    """Decide, without changing anything, what of ``out`` this run keeps (module docstring).

    ``run``: this run's record (``config``, ``rendering_version``, ...). Refuses
    (``UserInputError``, one line) a folder whose shards were rendered with another rendering
    version or other settings (naming what differs), or that holds shards this plan does not
    produce, unless ``overwrite``.
    """
    out = Path(out)
    existing = _existing_tars(out) if out.is_dir() else []
    previous = read_run(out)
    resume = Resume(existing=existing,
                    existing_standards=_existing_tars(out, shards.STANDARD_DIR) if out.is_dir() else [])
    if existing and not overwrite:
        if previous is None:
            raise UserInputError(f"--out: {out} holds {len(existing)} shards (e.g. {existing[0]}) but no readable "
                                 f"{RUN_NAME}; use a new folder or --overwrite")
        if previous["rendering_version"] != run["rendering_version"]:
            old = previous["rendering_version"]
            old = f"rendering version {old}" if old is not None else "a rendering version older than run.json records"
            raise UserInputError(f"--out: {out} was rendered with {old}, this code renders version "
                                 f"{run['rendering_version']}; use a new folder, or --overwrite to render it again")
        diff = config_diff(previous["config"], run["config"])
        if diff:
            more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise UserInputError(f"--out: {out} holds {len(existing)} shards rendered with other settings "
                                 f"({'; '.join(diff[:3])}{more}); use a new folder or --overwrite")
        stray = [p for p in existing if p not in plan]
        if stray:
            raise UserInputError(f"--out: {out} holds {len(stray)} shards this run does not plan (e.g. {stray[0]}: "
                                 "characters removed from the asset folder?); use a new folder or --overwrite")
    same_run = previous is not None and previous["config"] == run["config"]
    if overwrite or not same_run:
        resume.fresh = True
        return resume
    state = Journal(out).read()
    resume.quarantined = {} if retry_quarantined else dict(state.quarantined)
    on_disk = set(existing)
    known = [rel for rel in plan if rel in on_disk and rel in state.done]
    with ThreadPoolExecutor(min(_CHECK_THREADS, max(1, len(known)))) as pool:
        verdicts = dict(zip(known, pool.map(
            lambda rel: _check_journalled(out, rel, plan[rel], state.lines[rel], state.done[rel], repair), known)))
    for rel, planned in plan.items():
        if rel not in on_disk:
            continue
        if rel in state.done:
            why = verdicts[rel]
            line = state.lines[rel]
            standard = None
            if why is None and line.get("standard") is not None:
                standard, why = _check_standard(out, line["standard"], line.get("standard_members"), repair)
            if why is None:
                if standard is not None:
                    resume.standards[standard.character] = standard
                resume.keep[rel] = state.done[rel]
                resume.sample_failures.extend(f for f in line.get("failures") or [] if isinstance(f, dict))
                pose = line.get("standard_pose")
                if pose is None:  # a journal line from before the pose was journalled
                    pose = standard_pose_on_disk(out / rel)
                if pose is not None:
                    resume.standard_poses[rel] = pose
                if isinstance(line.get("stats"), dict):
                    resume.stats[rel] = line["stats"]
                continue
        else:
            summary, pose, needs_standard, why = _read_unjournalled(out, rel, planned)
            standard = standard_members = None
            if why is None and needs_standard:  # format 3 pairs: their standard tar must be whole
                if planned.first:
                    standard, why = _standard_on_disk(out, planned)
                    if standard is not None:
                        standard_members = member_digest(out / standard.path)
            if why is None:
                if standard is not None:
                    resume.standards[standard.character] = standard
                resume.keep[rel] = summary
                resume.read_from_disk += 1
                if pose is not None:
                    resume.standard_poses[rel] = pose
                try:
                    members = member_digest(out / rel)
                except (OSError, EOFError, ValueError):
                    members = None
                resume.adopted[rel] = {"character": planned.character, "standard_pose": pose, "members": members,
                                       "standard": standard, "standard_members": standard_members}
                continue
        resume.damaged[rel] = why
    return resume


def prepare_out(out: str | Path, run: dict, plan: dict[str, PlannedShard], overwrite: bool, retry_quarantined: bool,
                repair: bool = False, resume: Resume | None = None) -> Resume:
    """Make ``out`` ready for rendering (after :func:`inspect_out`, whose result may be passed):
    write ``run.json``; delete damaged shards and temporaries of interrupted runs; journal the
    shards adopted from disk; with a fresh start (``--overwrite`` or another run) delete every
    shard, the index, the journal, the report and the logs. A kept ``index.json`` stays until the
    new one replaces it."""
    out = Path(out)
    if resume is None:
        resume = inspect_out(out, run, plan, overwrite, retry_quarantined, repair)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out)
    if resume.fresh:
        for rel in resume.existing + resume.existing_standards:
            (out / rel).unlink(missing_ok=True)
        for name in (shards.INDEX_NAME, JOURNAL_NAME, REPORT_NAME, STATS_NAME):
            (out / name).unlink(missing_ok=True)
        logs = out / LOGS_NAME
        if logs.is_dir():
            for p in sorted(logs.rglob("*.log")):
                p.unlink()
    for rel in resume.damaged:
        (out / rel).unlink(missing_ok=True)
    remove_temporaries(out)
    # Every code version that rendered shards kept in this folder (same rendering version, other
    # code: allowed, and recorded): the report shows them.
    previous = read_run(out) if not resume.fresh else None
    history = set((previous or {}).get("code_fingerprints") or [])
    if previous and previous.get("code_fingerprint"):
        history.add(previous["code_fingerprint"])
    run = {**run, "code_fingerprints": sorted(history | {run.get("code_fingerprint")} - {None})}
    tmp = out / f".{RUN_NAME}.tmp"
    tmp.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / RUN_NAME)
    for rel, info in sorted(resume.adopted.items()):  # so that the next re-run checks them cheaply
        journal.shard(resume.keep[rel], [], info["character"], info["standard_pose"], info["members"],
                      standard=info["standard"], standard_members=info["standard_members"])
    journal.close()
    return resume


def remove_temporaries(out: Path) -> int:
    """Delete the hidden temporaries (``.<name>.tmp``) of shards and standard tars: never whole
    (an interrupted, crashed or killed job's). Returns how many."""
    n = 0
    for s in shards.SPLITS:
        for folder in (out / s, out / s / shards.STANDARD_DIR):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def standard_pose_on_disk(path: Path) -> dict | None:
    """The std_pose.json of a shard's first sample (every sample of a shard carries its character's
    one standard pose), or None for a shard without samples or one that cannot be read."""
    try:
        for _key, sample in shards.iter_shard(path):
            return json.loads(sample["std_pose.json"])
    except Exception:  # a damaged shard: the caller re-renders or falls back; never fatal here
        return None
    return None
