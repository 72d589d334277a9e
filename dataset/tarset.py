"""Tar sets: a folder of WebDataset tar shards described by an ``index.json``. The one format layer
under every dataset of the project.

A :class:`TarSetSchema` says what a set holds (its format name and versions, the members of a
sample, the checks a sample must pass, where its tars lie); this module does the rest the same way
for every schema. Two schemas use it: render pairs (:mod:`serialgen.dataset.shards`, format
``serialgen.shards``) and Stage II pairs (:mod:`serialgen.dataset.pairs`, format ``serialgen.pairs``).

* **Samples**: tar members ``<key>.<member>``, a sample's members next to each other. Keys match
  ``[A-Za-z0-9_-]{1,90}``: WebDataset splits a member name at its first dot into key and member, so a
  dot (or a slash, a space) in a key would make readers see another key.
* **Tars** are byte-deterministic: USTAR headers, members in the schema's order, mtime 0, uid/gid 0,
  empty user and group names, mode 0644. A tar is written under the hidden name ``.<name>.tmp``,
  fsynced and renamed, so a ``*.tar`` is always whole; its size and sha256 are counted as it is
  written (:class:`TarWriter`).
* **Index**: ``index.json``, a JSON object with ``format``, ``format_version``, ``versions`` (the
  packages that wrote it), ``shards`` (``path`` relative to the root with ``/`` separators,
  ``samples``, ``bytes``, ``sha256``) and the schema's own fields. Written last, through a temporary
  name, canonical (sorted keys), no timestamps: the same inputs give the same bytes.
* **Reading** an index checks the format and the version against those the schema reads; every
  problem is a :class:`TarSetError`, one line naming the file.
* **Verification** (:func:`verify`): listed shards exist with their size and sha256, no unlisted
  ``*.tar`` lies beside them, and (deep) every sample has its members, passes the schema's checks,
  and has a key no other sample of the set has.
* **Random access** (:func:`scan_shard`, :func:`read_member`): member offsets from the tar headers
  alone, then one seek per member.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import tarfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from serialgen.errors import UserInputError

__all__ = [
    "INDEX_NAME",
    "PNG_MAGIC",
    "JPEG_MAGIC",
    "TarSetError",
    "TarSetSchema",
    "TarSummary",
    "TarWriter",
    "VerifyReport",
    "validate_key",
    "index_path",
    "sha256_file",
    "iter_samples",
    "scan_shard",
    "read_member",
    "write_index",
    "read_index",
    "verify",
]

INDEX_NAME = "index.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,90}")


class TarSetError(UserInputError):
    """A tar set that cannot be read: a missing, unreadable or foreign index, or a version this
    code does not read. One line, naming the file."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key, else raise ``ValueError`` saying why and how to fix."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"sample key {key!r} is invalid: keys must match [A-Za-z0-9_-]{{1,90}} because WebDataset "
            "splits a member name at its first dot into key and extension, so a dot (or a slash, or "
            "a space) would make readers see a different key; derive keys from ids without dots")
    return key


# A sample check: (index, shard entry, key, {member: bytes}) -> problems, each without the shard's
# name (verify prefixes it). The index and entry give the set's context (e.g. its characters).
SampleCheck = Callable[[dict, dict, str, dict], list]
# An index check: (index file, index) -> None, raising TarSetError for what the schema's own
# fields get wrong (run by read_index after the format layer's checks).
IndexCheck = Callable[[Path, dict], None]


@dataclass(frozen=True)
class TarSetSchema:
    """What one kind of tar set holds.

    format: the index's ``format``. version: the ``format_version`` written; readable: the versions
    read (sets written before keep loading). members: the members every sample has; optional: those
    it may have; order: the tar order of all of them (default: members, then optional).
    shard_globs: where the set's tars lie, relative to the root (an unlisted tar there is a verify
    problem). packages: distributions whose versions the index records. check_index: the schema's
    own index checks; check_sample: its per-sample checks (deep verify). what: what a reader expected, for error messages
    ("a shard set written by `serialgen render`").
    """

    format: str
    version: int
    readable: tuple[int, ...]
    members: tuple[str, ...]
    optional: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    shard_globs: tuple[str, ...] = ("*.tar",)
    packages: tuple[str, ...] = ("serialgen",)
    check_index: IndexCheck | None = None
    check_sample: SampleCheck | None = None
    what: str = "a tar set"

    def __post_init__(self):
        every = set(self.members) | set(self.optional)
        if not self.order:
            object.__setattr__(self, "order", tuple(self.members) + tuple(self.optional))
        if set(self.order) != every or len(self.order) != len(every):
            raise ValueError(f"{self.format}: order {self.order} must list each member once")
        if self.version not in self.readable:
            raise ValueError(f"{self.format}: the version written ({self.version}) must be readable")

    def member_problem(self, key: str, names) -> str | None:
        """Why a sample with these member names is not one of this schema (None: it is)."""
        names = set(names)
        missing = [m for m in self.members if m not in names]
        extra = sorted(names - set(self.members) - set(self.optional))
        if not missing and not extra:
            return None
        expected = list(self.members) + [f"{m} (optional)" for m in self.optional]
        return f"sample {key} has members {sorted(names)}, expected {expected}"


@dataclass
class TarSummary:
    """A finished tar: where it is, how many samples, its size and sha256, and its keys in order."""

    path: Path
    samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)


class _HashingFile:
    """File wrapper that hashes and counts what is written (tarfile only writes sequentially)."""

    def __init__(self, f):
        self._f, self.sha = f, hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()


class TarWriter:
    """Write one tar of a schema at ``path``: under ``.<name>.tmp`` first, renamed by ``close``.

    ``write(key, members)`` adds a sample (members in the schema's order, deterministic headers);
    a bad key, a member set that is not the schema's, or a key already written is a ``ValueError``
    (a bug in the caller, not in data). As a context manager, an exception inside the block removes
    the temporary file (``abort``); ``close`` stays the caller's call.
    """

    def __init__(self, path: str | Path, schema: TarSetSchema):
        self.path = Path(path)
        self.schema = schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file = open(self.tmp, "wb")
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self._seen: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        validate_key(key)
        problem = self.schema.member_problem(key, members)
        if problem:
            raise ValueError(f"{self.path.name}: {problem}")
        if key in self._seen:
            raise ValueError(f"{self.path.name}: duplicate sample key {key!r}")
        for name in self.schema.order:
            if name not in members:
                continue
            data = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)
        self._seen.add(key)

    def close(self) -> TarSummary:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return TarSummary(self.path, len(self.keys), self._hash.size, self._hash.sha.hexdigest(), list(self.keys))

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MB blocks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, member): the file name split at its first dot, as WebDataset does."""
    key, _, member = name.rsplit("/", 1)[-1].partition(".")
    return key, member


def iter_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {member: bytes})`` per sample of one tar, in tar order (consecutive members
    with the same key form a sample). ``tarfile.TarError`` on a damaged tar."""
    key, sample = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, member = _split_name(info.name)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[member] = tar.extractfile(info).read()
    if sample:
        yield key, sample


def scan_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Random-access table of one tar: ``[(key, {member: (byte offset, size)}), ...]`` in tar order.

    Reads only the 512-byte headers (tarfile seeks over the data), so a 1 GB shard scans in
    milliseconds; :func:`read_member` then fetches any member with one seek. This is what lets a
    loader shuffle globally and resume mid-epoch without decoding the samples it skips.
    """
    table: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, member = _split_name(info.name)
            if not table or table[-1][0] != key:
                table.append((key, {}))
            table[-1][1][member] = (info.offset_data, info.size)
    return table


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member located by :func:`scan_shard`."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at {offset} truncated ({len(data)} of {size} bytes)")
    return data


def _package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of what wrote the set (no timestamps: the index stays deterministic)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in packages:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def index_path(root: str | Path) -> Path:
    """The index file of a set given as its folder or as the index file itself."""
    p = Path(root)
    return p if p.suffix == ".json" and not p.is_dir() else p / INDEX_NAME


def write_index(root: str | Path, schema: TarSetSchema, fields: dict) -> Path:
    """Write ``root/index.json``: ``format``, ``format_version``, ``versions`` and ``fields`` (which
    hold ``shards`` and the schema's own entries). Canonical JSON through a temporary name."""
    root = Path(root)
    reserved = {"format", "format_version", "versions"} & set(fields)
    if reserved:
        raise ValueError(f"write_index: {sorted(reserved)} are written by the format layer")
    index = {"format": schema.format, "format_version": schema.version,
             "versions": _package_versions(schema.packages), **fields}
    path = root / INDEX_NAME
    tmp = root / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _versions_text(versions: tuple[int, ...]) -> str:
    return "version " + ", ".join(str(v) for v in versions) if len(versions) == 1 else \
        "versions " + ", ".join(str(v) for v in versions)


def read_index(root: str | Path, schema: TarSetSchema) -> dict:
    """Load and check a set's index (``root`` is the set's folder or its index file).

    Raises TarSetError, one line naming the file, for a missing or unreadable index, another
    format, a version ``schema`` does not read (older or newer), or a malformed shard list.
    """
    path = index_path(root)
    if not path.is_file():
        raise TarSetError(f"{path}: not found; expected {schema.what}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TarSetError(f"{path}: not a JSON text file; expected {schema.what}") from None
    except json.JSONDecodeError as exc:
        raise TarSetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected {schema.what}") from None
    except OSError as exc:
        raise TarSetError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(index, dict):
        raise TarSetError(f"{path}: not a JSON object; expected {schema.what}")
    fmt, version = index.get("format"), index.get("format_version")
    readable = _versions_text(schema.readable)
    if fmt != schema.format:
        raise TarSetError(f"{path}: format {fmt!r}, expected {schema.format!r} {readable}")
    if version not in schema.readable or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(schema.readable)
        hint = "; written by a newer serialgen: update it to read this set" if newer else ""
        raise TarSetError(f"{path}: {fmt} format_version {version!r}; this serialgen reads {readable}{hint}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise TarSetError(f"{path}: no 'shards' list")
    for i, e in enumerate(shards):
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
              and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) for k in ("samples", "bytes")))
        if not ok:
            raise TarSetError(f"{path}: shards[{i}] is not {{path, samples, bytes, sha256}}: {str(e)[:120]}")
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts or "\\" in e["path"]:
            raise TarSetError(f"{path}: shards[{i}] path {e['path']!r} is not a relative path inside the set")
    if schema.check_index is not None:
        schema.check_index(path, index)
    return index


@dataclass
class VerifyReport:
    """What :func:`verify` found: the index (None if it did not load), one line per problem, and
    the shards and samples checked."""

    index: dict | None
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | Path, schema: TarSetSchema, deep: bool = True,
           on_sample: Callable[[dict, str, dict], None] | None = None) -> VerifyReport:
    """Check a set against its index; every problem is one line naming the shard.

    Checks: the index loads (else its one problem); every listed shard exists with the listed
    size and sha256; no ``*.tar`` under ``schema.shard_globs`` is missing from the index; and, with
    ``deep``, every sample has a valid key, the schema's members and passes its checks, keys are
    unique across the set, and each shard holds the listed number of samples. ``on_sample(entry,
    key, sample)`` sees every sample that passed, for checks across the set.
    """
    root = Path(root)
    try:
        index = read_index(root, schema)
    except TarSetError as exc:
        return VerifyReport(None, [str(exc)])
    root = index_path(root).parent
    report = VerifyReport(index)
    problems = report.problems
    seen_keys: dict[str, str] = {}
    listed = set()
    for entry in index["shards"]:
        rel = entry["path"]
        listed.add(rel)
        path = root / rel
        report.shards += 1
        if not path.is_file():
            problems.append(f"{rel}: listed in the index but missing")
            continue
        sha, size = sha256_file(path)
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, index says {entry['bytes']}")
        if sha != entry["sha256"]:
            problems.append(f"{rel}: sha256 {sha[:16]}... differs from the index ({entry['sha256'][:16]}...)")
            continue  # the content is wrong: a sample-level check would only repeat it
        if not deep:
            continue
        count = 0
        try:
            for key, sample in iter_samples(path):
                count += 1
                if not _KEY_RE.fullmatch(key):
                    problems.append(f"{rel}: sample key {key!r} is not [A-Za-z0-9_-]{{1,90}}")
                if key in seen_keys:
                    problems.append(f"{rel}: key {key} also in {seen_keys[key]}")
                seen_keys.setdefault(key, rel)
                problem = schema.member_problem(key, sample)
                if problem:
                    problems.append(f"{rel}: {problem}")
                    continue
                if schema.check_sample is not None:
                    found = schema.check_sample(index, entry, key, sample)
                    problems.extend(f"{rel}: {p}" for p in found)
                    if found:
                        continue
                if on_sample is not None:
                    on_sample(entry, key, sample)
        except tarfile.TarError as exc:
            problems.append(f"{rel}: unreadable tar ({exc})")
            continue
        report.samples += count
        if count != entry["samples"]:
            problems.append(f"{rel}: {count} samples, index says {entry['samples']}")
    for pattern in schema.shard_globs:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: shard not in the index (left from another run?)")
    return report
