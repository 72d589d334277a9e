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
    "ForeignSetError",
    "TarSetSchema",
    "TarSummary",
    "TarWriter",
    "VerifyReport",
    "validate_key",
    "index_path",
    "sha256_file",
    "Rejected",
    "REJECT_REASONS",
    "read_samples",
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


class ForeignSetError(TarSetError):
    """The index is whole but not one this reader reads: another format, or a version older or
    newer than those it knows (the wrong folder, or the wrong serialgen): a usage error, where a
    :class:`TarSetError` that is not this one means a damaged index."""


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
    """Member name -> (key, member) as WebDataset splits it: the key is everything up to the first
    dot of the file name, directories included (``a/b.c.png`` -> ``a/b``, ``c.png``), so a member
    named ``../../x.ref.png`` never joins the sample ``x``."""
    head, sep, base = name.rpartition("/")
    key, _, member = base.partition(".")
    return head + sep + key, member


# Why a sample (or a shard) is rejected while reading; each is counted under this name.
REJECT_UNSAFE_NAME = "unsafe member name"  # absolute path or a '..' component
REJECT_LINK = "link member"  # symlink or hardlink
REJECT_SPECIAL = "special member"  # directory, FIFO, device, ...: not a regular file
REJECT_KEY = "invalid key"  # not [A-Za-z0-9_-]{1,90}
REJECT_DUPLICATE_MEMBER = "duplicate member"  # the same <key>.<member> twice in a sample
REJECT_DUPLICATE_KEY = "duplicate key in shard"  # a key whose members are not next to each other
REJECT_TOO_LARGE = "member too large"
REJECT_TRUNCATED = "truncated shard"  # ends inside a member or a header: the samples before are kept
REJECT_DAMAGED = "damaged shard"  # a header fails its checksum after whole samples: those are kept
REJECT_UNREADABLE = "unreadable shard"  # not a tar at all
REJECT_REASONS = (REJECT_UNSAFE_NAME, REJECT_LINK, REJECT_SPECIAL, REJECT_KEY, REJECT_DUPLICATE_MEMBER,
                  REJECT_DUPLICATE_KEY, REJECT_TOO_LARGE, REJECT_TRUNCATED, REJECT_DAMAGED, REJECT_UNREADABLE)
# A member larger than this is skipped unread (a 1000-pair shard's largest member is ~1 MB).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Rejected:
    """A sample (``key``) or a whole shard (``key`` None) that a reader refused, and why.

    reason: one of ``REJECT_REASONS``; detail: what was found (no shard name: readers add it)."""

    reason: str
    key: str | None
    detail: str


class _Damaged(Exception):
    """The tar stream ends or breaks inside a header or a member: ``truncated`` (cut) or not (a
    damaged header); ``member``: the name of the member whose data was cut (None: in a header)."""

    def __init__(self, message: str, truncated: bool = True, member: str | None = None):
        super().__init__(message)
        self.truncated, self.member = truncated, member


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# Header type flags: regular files, links, and the extended headers that describe the next member.
_REGULAR, _LINKS, _PAX, _PAX_GLOBAL, _GNU_LONG = (b"0", b"\0", b"7"), (b"1", b"2"), b"x", b"g", (b"L", b"K")


def _read_exact(f, n: int, what: str, member: str | None = None) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Damaged(f"ends inside {what} ({len(data)} of {n} bytes)", member=member)
    return data


def _skip(f, n: int, what: str, member: str | None = None) -> None:
    while n > 0:
        n -= len(_read_exact(f, min(n, 1 << 20), what, member))


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256: only for sizes past 8 GB; never a member of ours
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _Damaged(f"{what} field {text[:20]!r} is not octal", truncated=False) from None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _Damaged("malformed pax header", truncated=False) from None
        record = data[space + 1:pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise _Damaged("malformed pax header", truncated=False)
        k, _, v = record[:-1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_entries(f, max_member_bytes: int):
    """Yield ``(name, type flag, size, data or None)`` per member of a tar stream, from its 512-byte
    headers (USTAR, GNU and pax). ``data`` is None for a member that is not a regular file or is
    larger than ``max_member_bytes`` (skipped unread). Every header's checksum is checked; a stream
    that ends without the end-of-archive block, or inside a header or a member, raises ``_Damaged``
    (tarfile would take a bad header or a cut at a member boundary for the end of the archive).
    """
    long_name, pax = None, {}
    first = True
    while True:
        header = f.read(_BLOCK)
        if not header:
            if first:
                raise _Damaged("empty file", truncated=False)
            raise _Damaged("ends at a member boundary without the end-of-archive block")
        if len(header) != _BLOCK:
            raise _Damaged(f"ends inside a header ({len(header)} of {_BLOCK} bytes)")
        if header == _ZERO_BLOCK:
            if first:
                raise _Damaged("starts with an empty block: not a tar", truncated=False)
            return
        stored = _octal(header[148:156], "checksum")
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
        if stored not in (unsigned, signed):
            raise _Damaged("header checksum mismatch" if not first else "not a tar (header checksum mismatch)",
                           truncated=False)
        first = False
        kind = header[156:157]
        size = _octal(header[124:136], "size")
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0":  # POSIX: a path prefix before the name
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        text = name.decode("utf-8", "surrogateescape")
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (_PAX, _PAX_GLOBAL) + _GNU_LONG:
            if size > 1 << 20:
                raise _Damaged(f"extended header of {size} bytes", truncated=False)
            data = _read_exact(f, padded, "an extended header")[:size]
            if kind == _PAX:
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue  # global pax headers and GNU long link names change nothing we read
        if long_name is not None:
            text, long_name = long_name, None
        if pax:
            text = pax.get("path", text)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise _Damaged("malformed pax size", truncated=False) from None
                padded = -(-size // _BLOCK) * _BLOCK
            pax = {}
        if kind == b"5" and len(text) > 1:
            text = text.rstrip("/")  # a directory "k.ref.png/" is still a member of sample k
        what = f"member {text[:100]!r}"
        if kind in _REGULAR and size <= max_member_bytes:
            data = _read_exact(f, size, what, text)
            _skip(f, padded - size, what, text)
            yield text, kind, size, data
        else:
            if kind in _REGULAR or kind not in _LINKS + (b"3", b"4", b"5", b"6"):
                _skip(f, padded, what, text)  # links, devices, dirs, fifos have no data
            yield text, kind, size, None


def _member_reason(name: str, kind: bytes, size: int, key: str, max_member_bytes: int) -> str | None:
    """Why a member may not be part of a sample (None: it may)."""
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        return REJECT_UNSAFE_NAME
    if kind in _LINKS:
        return REJECT_LINK
    if kind not in _REGULAR:
        return REJECT_SPECIAL
    if not _KEY_RE.fullmatch(key):
        return REJECT_KEY
    if size > max_member_bytes:
        return REJECT_TOO_LARGE
    return None


def read_samples(fileobj, max_member_bytes: int | None = None) -> Iterator[tuple[str, dict[str, bytes]] | Rejected]:
    """Read one tar stream (a binary file object, read front to back once) into samples.

    Yields ``(key, {member: bytes})`` per sample and :class:`Rejected` per refused sample, in tar
    order. Consecutive members with the same key form a sample (keys split as WebDataset does,
    directories included). A sample is refused whole when one of its members has an unsafe name
    (absolute, ``..``), is a link or not a regular file, its key is not ``[A-Za-z0-9_-]{1,90}``, it
    repeats a member, its key appeared earlier in the tar, or a member is over ``max_member_bytes``
    (never read; default ``MAX_MEMBER_BYTES``). A tar that ends inside a header or a member, or without its end-of-archive block
    (cut at a member boundary), or whose next header is damaged, yields a ``truncated shard``
    rejection for the sample it was reading (the whole samples before it were yielded) and stops;
    one that is not a tar yields ``unreadable shard``. Nothing is written anywhere.
    """
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    seen: set[str] = set()
    key, members, why, detail = None, {}, None, ""

    def finish():
        if key is None:
            return None
        if why is not None:
            return Rejected(why, key, detail)
        return key, members

    try:
        for name, kind, size, data in _tar_entries(fileobj, max_member_bytes):
            k, member = _split_name(name)
            if k != key:
                done = finish()
                if done is not None:
                    yield done
                key, members, why, detail = k, {}, None, ""
                if k in seen:
                    why, detail = REJECT_DUPLICATE_KEY, f"{k[:100]!r} appears again after other keys"
                seen.add(k)
            reason = _member_reason(name, kind, size, k, max_member_bytes)
            if reason is None and member in members:
                reason = REJECT_DUPLICATE_MEMBER
            if reason is not None:
                if why is None:
                    why = reason
                    detail = f"member {name[:120]!r}" + (f" of {size} bytes" if reason == REJECT_TOO_LARGE else "")
                continue
            if why is None:
                members[member] = data
    except GeneratorExit:  # closed early (also at interpreter exit, when ``_Damaged`` may be gone)
        raise
    except _Damaged as exc:
        if key is None and not exc.truncated:
            yield Rejected(REJECT_UNREADABLE, None, str(exc))
            return
        if exc.member is not None and _split_name(exc.member)[0] != key:
            done = finish()  # the cut member starts the next sample: the one before is whole
            if done is not None:
                yield done
            key, why = _split_name(exc.member)[0], None
        elif why is not None:
            yield Rejected(why, key, detail)
        lost = key if why is None else None  # the sample being read when the tar broke: never whole
        yield Rejected(REJECT_TRUNCATED if exc.truncated else REJECT_DAMAGED, lost,
                       str(exc) + (f"; sample {lost!r} lost" if lost else ""))
        return
    except OSError as exc:  # the file itself could not be read
        yield Rejected(REJECT_UNREADABLE if key is None else REJECT_TRUNCATED, key,
                       f"read error ({type(exc).__name__}: {str(exc)[:100]})")
        return
    done = finish()
    if done is not None:
        yield done


def iter_samples(path: str | Path, on_reject: Callable[[Rejected], None] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {member: bytes})`` per sample of one tar file, in tar order (:func:`read_samples`).

    A refused sample or a damaged tar goes to ``on_reject`` (and reading goes on after a refused
    sample); without one it is a :class:`TarSetError` naming the file and the reason."""
    with open(path, "rb") as f:
        for item in read_samples(f):
            if isinstance(item, Rejected):
                if on_reject is None:
                    where = f" (sample {item.key!r})" if item.key else ""
                    raise TarSetError(f"{path}: {item.reason}{where}: {item.detail}")
                on_reject(item)
                continue
            yield item


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
    text = json.dumps(index, indent=1, sort_keys=True, allow_nan=False) + "\n"
    # The old index stays in place until the new one is whole on disk: a crash (or an error) at any
    # point leaves either the old index or the new one, never none and never half of one.
    tmp = root / f".{INDEX_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
    except RecursionError:  # json's parser recurses once per nesting level
        raise TarSetError(f"{path}: JSON nested too deeply to be an index; expected {schema.what}") from None
    except OSError as exc:
        raise TarSetError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(index, dict):
        raise TarSetError(f"{path}: not a JSON object; expected {schema.what}")
    fmt, version = index.get("format"), index.get("format_version")
    readable = _versions_text(schema.readable)
    if fmt != schema.format:
        raise ForeignSetError(f"{path}: format {fmt!r}, expected {schema.format!r} {readable}")
    if version not in schema.readable or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(schema.readable)
        hint = "; written by a newer serialgen: update it to read this set" if newer else ""
        raise ForeignSetError(f"{path}: {fmt} format_version {version!r}; this serialgen reads {readable}{hint}")
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
        rejected: list[Rejected] = []
        for key, sample in iter_samples(path, on_reject=rejected.append):
            count += 1
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
        for r in rejected:
            problems.append(f"{rel}: {r.reason}" + (f" (sample {r.key[:100]!r})" if r.key else "") + f": {r.detail}")
        if any(r.reason in (REJECT_TRUNCATED, REJECT_DAMAGED, REJECT_UNREADABLE) for r in rejected):
            continue  # the count would only repeat it
        report.samples += count
        if count != entry["samples"]:
            problems.append(f"{rel}: {count} samples, index says {entry['samples']}")
    for pattern in schema.shard_globs:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: shard not in the index (left from another run?)")
    return report
