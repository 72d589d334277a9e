"""JSONL manifests of inputs (characters, motions, backgrounds), ``report.json``, path sanitising and
incremental re-scanning. Format documented in ``docs/assets.md``.

One JSON object per line. Every record has ``schema`` (``serialgen.<kind>/<version>``), ``id``,
``kind``, ``status`` (``accepted`` | ``rejected``), ``reason`` (null, or a snake_case reason when
rejected), ``detail`` (human text), ``path`` (or null), ``sha256`` (of the file, or null) and
``stats`` (dict); kinds add their own fields. Paths of files written under the asset folder are
stored relative to it (portable folder); a user's own files are stored as absolute paths.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from serialgen.errors import UserInputError

__all__ = [
    "MANIFEST_VERSION",
    "REPORT_SCHEMA",
    "MANIFEST_FILES",
    "DEFAULT_MAX_BYTES",
    "InputEntry",
    "walk_inputs",
    "find_files",
    "entry_record",
    "parse_size",
    "format_bytes",
    "make_record",
    "reject",
    "write_jsonl",
    "read_jsonl",
    "read_previous",
    "sha256_file",
    "safe_relpath",
    "resolve_record_path",
    "file_stats",
    "incremental_scan",
    "count_records",
    "write_report",
    "read_report",
]

MANIFEST_VERSION = 1
REPORT_SCHEMA = "serialgen.report/1"
# record kind -> manifest file name under the asset folder (contract 1)
MANIFEST_FILES = {"character": "characters.jsonl", "motion": "motions.jsonl", "background": "backgrounds.jsonl"}
# Rejection reasons are snake_case (the ones in use: docs/assets.md).
_REASON_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# The default cap on one asset with its resources (``assets build --max-asset-size``): a glTF
# whose buffer is a 3 GB file was read whole (3.6 GB peak); real characters are a few MB to a few
# hundred (4K textures).
DEFAULT_MAX_BYTES = 1 << 30
_REQUIRED = ("schema", "id", "kind", "status", "reason", "detail", "path", "sha256", "stats")


def _schema_for(kind: str, version: int = MANIFEST_VERSION) -> str:
    """``serialgen.<kind>/<version>``, e.g. ``serialgen.background/1``."""
    if kind not in MANIFEST_FILES:
        raise ValueError(f"unknown manifest kind {kind!r} (expected one of {sorted(MANIFEST_FILES)})")
    return f"serialgen.{kind}/{version}"


def _check_id(asset_id: str) -> str:
    """Ids become file names and shard key parts: letters, digits, ``-`` and ``_`` only (no dots,
    no slashes), at most 128 characters."""
    if not isinstance(asset_id, str) or not _ID_RE.match(asset_id):
        raise UserInputError(f"invalid asset id {asset_id!r}: use letters, digits, '-' and '_' (no dots or slashes)")
    return asset_id


def make_record(schema_kind: str, asset_id: str, kind: str, *, status: str = "accepted", reason: str | None = None,
                detail: str = "", path: str | None = None, sha256: str | None = None,
                stats: dict | None = None, **fields) -> dict:
    """A manifest record with the common fields first, then kind-specific ``fields``."""
    rec = {
        "schema": _schema_for(schema_kind), "id": _check_id(asset_id), "kind": kind, "status": status,
        "reason": reason, "detail": detail, "path": path, "sha256": sha256, "stats": dict(stats or {}),
    }
    rec.update(fields)
    return _validate_record(rec)


def reject(record: dict, reason: str, detail: str) -> dict:
    """Mark a record rejected with a snake_case ``reason`` and a human ``detail`` (in place)."""
    record["status"], record["reason"], record["detail"] = "rejected", reason, detail
    return _validate_record(record)


def _validate_record(rec: dict, where: str = "record") -> dict:
    """Check the common fields; raise UserInputError naming ``where`` and the problem."""
    if not isinstance(rec, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise UserInputError(f"{where}: missing field(s) {', '.join(missing)}")
    m = re.match(r"^serialgen\.([a-z_]+)/(\d+)$", str(rec["schema"]))
    if not m or m.group(1) not in MANIFEST_FILES:
        raise UserInputError(f"{where}: unknown schema {rec['schema']!r}")
    if int(m.group(2)) != MANIFEST_VERSION:
        raise UserInputError(f"{where}: schema {rec['schema']!r} unsupported (this version reads /{MANIFEST_VERSION})")
    if rec["status"] not in ("accepted", "rejected"):
        raise UserInputError(f"{where}: status must be 'accepted' or 'rejected', got {rec['status']!r}")
    if rec["status"] == "rejected" and not (isinstance(rec["reason"], str) and _REASON_RE.match(rec["reason"])):
        raise UserInputError(f"{where}: a rejected record needs a snake_case reason, got {rec['reason']!r}")
    if rec["status"] == "accepted" and rec["reason"] is not None:
        raise UserInputError(f"{where}: an accepted record has reason null, got {rec['reason']!r}")
    if not isinstance(rec["stats"], dict):
        raise UserInputError(f"{where}: stats must be an object")
    if not isinstance(rec["id"], str) or not _ID_RE.match(rec["id"]):
        raise UserInputError(f"{where}: invalid asset id {rec['id']!r} (letters, digits, '-' and '_' only)")
    return rec


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Validate and write records, one per line (UTF-8), through a temporary file and a rename."""
    path = Path(path)
    lines = []
    for i, rec in enumerate(records):
        _validate_record(rec, f"{path.name} record {i + 1}")
        lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict]:
    """Read and validate a manifest; ``kind`` (character/motion/background) checks the schema kind.
    Any problem is one UserInputError naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: manifest not found")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{where}: invalid JSON ({exc.msg})") from None
            _validate_record(rec, where)
            if kind is not None and not rec["schema"].startswith(f"serialgen.{kind}/"):
                raise UserInputError(f"{where}: expected a {kind} record, got schema {rec['schema']!r}")
            out.append(rec)
    return out


def read_previous(path: str | Path, kind: str) -> list[dict]:
    """Records of an earlier build for incremental re-scans; a missing or unreadable manifest just
    means 'nothing to reuse' (the build then redoes everything)."""
    try:
        return read_jsonl(path, kind) if Path(path).is_file() else []
    except UserInputError:
        return []


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def safe_relpath(path: str | Path, root: str | Path) -> str:
    """POSIX path of ``path`` relative to ``root``; refuses anything outside ``root``."""
    rel = os.path.relpath(Path(path).resolve(), Path(root).resolve())
    p = PurePosixPath(Path(rel).as_posix())
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise UserInputError(f"{path}: not inside the asset folder {root}")
    return str(p)


def resolve_record_path(assets_dir: str | Path, path: str) -> Path:
    """A manifest ``path`` -> absolute Path. Relative paths are inside ``assets_dir``; a relative
    path that is absolute-looking, has ``..``, a backslash or a NUL is refused (a hand-edited or
    hostile manifest must not reach files outside the folder)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise UserInputError(f"manifest path {path!r}: empty or invalid")
    if os.path.isabs(path):
        return Path(path)
    p = PurePosixPath(path)
    if "\\" in path or ".." in p.parts:
        raise UserInputError(f"manifest path {path!r}: must stay inside {assets_dir} (no '..' or backslashes)")
    return Path(assets_dir).resolve() / p


@dataclass(frozen=True)
class InputEntry:
    """One thing found under an input path. ``reason`` None: a file to read (``path`` resolved);
    otherwise why it is not read, with ``path`` as found:

    * ``unsupported_format``: a regular file whose extension the scanner does not read;
    * ``too_large``: a file over the size limit (not read, not even hashed);
    * ``broken_link``: a symbolic link that leads nowhere (dangling) or in a loop;
    * ``resource_outside_asset``: a symbolic link leading out of the input folder (judged from where
      it points, before looking whether that exists: the answer reveals nothing outside);
    * ``not_a_file``: a FIFO, socket or device (never opened: reading a FIFO blocks forever);
    * ``unreadable_file``: a file or folder that cannot be stat'ed or listed (permissions).
    """

    path: Path
    reason: str | None = None
    detail: str = ""
    size: int | None = None
    mtime_ns: int | None = None


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def walk_inputs(paths: Iterable, extensions: Iterable[str], max_bytes: int | None = None,
                what: str = "supported") -> list[InputEntry]:
    """Everything under ``paths`` (files or folders, recursive, hidden files included), each once:
    files with a suffix in ``extensions`` to read, and an entry with a reason for everything else
    (see :class:`InputEntry`). Order: the paths as given, each folder sorted depth-first; the order
    decides which of two duplicates a scanner keeps (the first). A path named directly is followed
    even when it is a link (the user chose it); links found inside a folder are followed only when
    they stay inside it, and then add nothing (their target is found on its own). ``what`` names the
    file kind in the ``unsupported_format`` detail."""
    exts = {e.lower() for e in extensions}
    out: list[InputEntry] = []
    seen: set[Path] = set()

    def regular(path: Path, st) -> None:
        if path in seen:
            return
        seen.add(path)
        size, mtime = int(st.st_size), int(st.st_mtime_ns)
        if path.suffix.lower() not in exts:
            out.append(InputEntry(path, "unsupported_format",
                                  f"{path.name}: not a {what} file ({path.suffix.lower() or 'no extension'})", size,
                                  mtime))
        elif max_bytes is not None and size > max_bytes:
            out.append(InputEntry(path, "too_large", f"{path.name}: {format_bytes(size)}, over the limit of "
                                                     f"{format_bytes(max_bytes)}", size, mtime))
        else:
            out.append(InputEntry(path, None, "", size, mtime))

    def special(path: Path, st) -> None:
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        out.append(InputEntry(path, "not_a_file", f"{path.name}: {kind}, not read"))

    def walk(folder: Path, root: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.append(InputEntry(folder, "unreadable_file", f"{folder.name}: cannot list the folder ({exc.strerror})"))
            return
        for e in entries:
            path = Path(e.path)
            try:
                if e.is_symlink():
                    target = os.path.realpath(path)
                    if not _inside(target, root):
                        out.append(InputEntry(path, "resource_outside_asset",
                                              f"{path.name}: a symbolic link leading outside the input folder"))
                        continue
                    try:
                        st = os.stat(path)
                    except OSError as exc:
                        why = "a symbolic link loop" if exc.errno == errno.ELOOP else "a dangling symbolic link"
                        out.append(InputEntry(path, "broken_link", f"{path.name}: {why}"))
                        continue
                    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                        special(path, st)
                    continue  # a file or folder inside the input folder: found on its own
                st = e.stat(follow_symlinks=False)
            except OSError as exc:
                out.append(InputEntry(path, "unreadable_file", f"{path.name}: cannot stat ({exc.strerror})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                walk(path, root)
            elif stat.S_ISREG(st.st_mode):
                regular(path, st)
            else:
                special(path, st)

    for p in map(Path, paths):
        p = p.expanduser()
        try:
            st = os.stat(p)
        except OSError as exc:
            out.append(InputEntry(p.absolute(), "unreadable_file", f"{p.name}: cannot stat ({exc.strerror})"))
            continue
        real = p.resolve()
        if stat.S_ISDIR(st.st_mode):
            walk(real, str(real))
        elif stat.S_ISREG(st.st_mode):
            regular(real, st)
        else:
            special(real, st)
    return out


def find_files(paths: Iterable, extensions: Iterable[str]) -> list[Path]:
    """The readable files of :func:`walk_inputs` (no size limit)."""
    return [e.path for e in walk_inputs(paths, extensions) if e.reason is None]


def entry_record(schema_kind: str, prefix: str, kind: str, entry: InputEntry) -> dict:
    """The rejected record of an input entry that is not read (id from the path's hash: nothing
    was hashed or opened)."""
    rid = f"{prefix}-{hashlib.sha256(str(entry.path).encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"
    stats = {} if entry.size is None else {"file_size": entry.size, "mtime_ns": entry.mtime_ns}
    return make_record(schema_kind, rid, kind, status="rejected", reason=entry.reason, detail=entry.detail,
                       path=str(entry.path), sha256=None, stats=stats)


def parse_size(text: str) -> int:
    """``"512M"``, ``"1.5G"``, ``"2048"`` (bytes; K, M, G, T are powers of 1024) -> bytes. ValueError
    with the reason for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size such as 512M or 2G, got {text!r}")
    n = float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    if n < 1:
        raise ValueError(f"must be at least 1 byte, got {text!r}")
    return int(n)


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GiB"


def file_stats(path: str | Path) -> dict:
    """The fingerprint that decides whether a file changed: size and modification time (ns)."""
    st = os.stat(path)
    return {"file_size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def incremental_scan(
    files: Iterable[str | Path],
    previous: Iterable[dict],
    process: Callable[[Path, str], dict],
    *,
    on_error: Callable[[Path, str, Exception], dict] | None = None,
    progress: Callable[[], None] | None = None,
) -> tuple[list[dict], dict]:
    """Process files, reusing earlier records for unchanged files.

    A file is unchanged when a previous record has the same absolute ``path`` and the same
    ``stats.file_size`` and ``stats.mtime_ns`` (not even hashed), or the same ``sha256`` (touched
    but identical: the record is reused with the new fingerprint). Otherwise
    ``process(path, sha256) -> record`` runs; an exception from it becomes
    ``on_error(path, sha256, exc)`` (a rejected record), so one bad file never stops a scan.
    Returns (records in input order, {"reused": n, "processed": n}).
    """
    by_path = {}
    for rec in previous:
        if rec.get("path"):
            by_path[str(rec["path"])] = rec
    out, counts = [], Counter(reused=0, processed=0)
    for f in files:
        path = Path(f).resolve()
        fp = file_stats(path)
        prev = by_path.get(str(path))
        if prev and all(prev.get("stats", {}).get(k) == v for k, v in fp.items()):
            out.append(prev)
            counts["reused"] += 1
        else:
            sha = sha256_file(path)
            if prev and prev.get("sha256") == sha:
                rec = dict(prev, stats={**prev.get("stats", {}), **fp})
                counts["reused"] += 1
            else:
                try:
                    rec = process(path, sha)
                except Exception as exc:  # noqa: BLE001 - a bad asset never stops the scan
                    if on_error is None:
                        raise
                    rec = on_error(path, sha, exc)
                rec["stats"] = {**rec.get("stats", {}), **fp}
                counts["processed"] += 1
            out.append(rec)
        if progress is not None:
            progress()
    return out, dict(counts)


def count_records(records: Iterable[dict]) -> dict:
    """{"total", "by_status", "by_kind": {kind: {status: n}}, "by_reason": {reason: n}}."""
    by_status, by_reason, by_kind = Counter(), Counter(), {}
    total = 0
    for rec in records:
        total += 1
        by_status[rec["status"]] += 1
        by_kind.setdefault(rec["kind"], Counter())[rec["status"]] += 1
        if rec["status"] == "rejected":
            by_reason[rec["reason"]] += 1
    return {
        "total": total,
        "by_status": {"accepted": by_status["accepted"], "rejected": by_status["rejected"]},
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "by_reason": dict(sorted(by_reason.items())),
    }


def write_report(out_dir: str | Path, manifests: dict[str, list[dict]], **extra) -> Path:
    """``report.json``: {"schema": "serialgen.report/1", "manifests": {name: count_records(...)},
    plus ``extra`` sections (poses, timings...)."""
    report = {"schema": REPORT_SCHEMA, "manifests": {k: count_records(v) for k, v in manifests.items()}}
    report.update(extra)
    path = Path(out_dir) / "report.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_report(path: str | Path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read report ({exc})") from None
    if report.get("schema") != REPORT_SCHEMA:
        raise UserInputError(f"{path}: schema {report.get('schema')!r} is not {REPORT_SCHEMA}")
    return report
