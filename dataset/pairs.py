"""Stage II pair shards: (standardized reference, real target, caption) in WebDataset tar files.

Format ``serialgen.pairs`` version 1 (see docs/stage2.md); conventions follow the render shards
(:mod:`serialgen.dataset.shards`: key rule, deterministic tars, hidden temporary names, index fields). A pair set is a folder:

* ``pairs-000000.tar``, ``pairs-000001.tar``, ...: WebDataset tars, one sample per pair, members
  ``<key>.std_ref.png`` (Stage I output, RGB on white, 512x768), ``<key>.target.jpg`` (the real image,
  RGB, original size), ``<key>.caption.txt`` (UTF-8, may be empty), ``<key>.meta.json`` (source path,
  identity, sizes, standardizer), and optionally ``<key>.alt_ref.jpg`` (another real image of the
  same identity, the reference of the paper's paired one-stage baseline). Keys contain no dots.
* ``pairs-000000.json`` next to each tar: written after the tar is complete (its presence marks the
  shard done): sample count, bytes, sha256, skipped inputs with reasons.
* ``index.json``: format, format_version, members, versions, shard list (path, samples, bytes, sha256),
  totals (samples, skipped), and what built it.

A tar is written under a temporary name and renamed when complete, then its sidecar is written; a
rerun treats a shard as done only if both exist and the tar's size matches, and rebuilds the rest.
Member tar headers are deterministic (mtime 0, uid/gid 0, sorted by sample), so the same inputs give
byte-identical shards. Readable by stock ``webdataset.WebDataset`` and ``ray.data.read_webdataset``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from serialgen.dataset.shards import validate_key
from serialgen.errors import UserInputError

__all__ = [
    "PAIRS_FORMAT",
    "PAIRS_VERSION",
    "PAIR_MEMBERS",
    "PairSample",
    "PairShardWriter",
    "shard_name",
    "make_key",
    "completed_shards",
    "write_index",
    "read_index",
    "iter_shard",
    "iter_pairs",
    "scan_shard",
    "read_member",
    "verify_pairs",
]

PAIRS_FORMAT = "serialgen.pairs"  # named like the render shards' "serialgen.shards"
PAIRS_VERSION = 1
PAIR_MEMBERS = ("std_ref.png", "target.jpg", "caption.txt", "meta.json")  # required; alt_ref.jpg optional
OPTIONAL_MEMBERS = ("alt_ref.jpg",)
_KEY_RE = re.compile(r"[^A-Za-z0-9_-]+")


def shard_name(index: int) -> str:
    """``pairs-000042.tar``: the name of shard ``index`` (deterministic, so retries are idempotent)."""
    return f"pairs-{index:06d}.tar"


def make_key(ordinal: int, source: str) -> str:
    """A sample key: zero-padded ordinal plus a slug of the source path (no dots, <= 100 chars)."""
    slug = _KEY_RE.sub("_", source).strip("_")[-80:] or "x"
    return f"{ordinal:08d}_{slug}"


@dataclass
class PairSample:
    """One decoded-on-demand pair. Image members stay encoded bytes until asked for."""

    key: str
    std_ref: bytes
    target: bytes
    caption: str
    meta: dict[str, Any]
    alt_ref: bytes | None = None
    shard: str = ""

    def image(self, member: str) -> Any:
        """Decode ``std_ref`` / ``target`` / ``alt_ref`` into an RGB PIL image."""
        from PIL import Image

        data = getattr(self, member)
        if data is None:
            raise KeyError(f"{self.shard}:{self.key} has no {member}")
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")


def _encode_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)  # level 1: ~13 ms at 512x768
    return buf.getvalue()


def _encode_jpg(image: Any, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class ShardStats:
    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PAIRS_FORMAT, "format_version": PAIRS_VERSION, "path": self.name, "samples": self.samples,
            "bytes": self.bytes, "sha256": self.sha256, "skipped": self.skipped,
        }


class PairShardWriter:
    """Write one pair shard atomically: ``with PairShardWriter(dir, index) as w: w.add(...)``.

    The tar goes to ``.<name>.tmp`` (hidden, as the render shards do) and is renamed on a clean exit, then ``<name minus .tar>.json`` is
    written; on an exception the temporary file is removed and nothing final appears.
    """

    def __init__(self, out_dir: str | Path, index: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stats = ShardStats(shard_name(index))
        self.path = self.out_dir / self.stats.name
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()

    def __enter__(self) -> "PairShardWriter":
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        return self

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None, "use PairShardWriter as a context manager"
        self._tar.addfile(info, io.BytesIO(data))

    def add(
        self,
        key: str,
        std_ref: Any,
        target: Any,
        caption: str,
        meta: dict[str, Any],
        alt_ref: Any = None,
    ) -> None:
        """Append one pair. Images are PIL images or already-encoded bytes (PNG for std_ref, JPEG else)."""
        validate_key(key)  # the render shards' rule: [A-Za-z0-9_-]{1,90}, no dots
        if key in self._keys:
            raise ValueError(f"duplicate pair key {key!r} in {self.stats.name}")
        self._keys.add(key)
        members = {
            "std_ref.png": std_ref if isinstance(std_ref, bytes) else _encode_png(std_ref),
            "target.jpg": target if isinstance(target, bytes) else _encode_jpg(target),
            "caption.txt": caption.encode("utf-8"),
            "meta.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        if alt_ref is not None:
            members["alt_ref.jpg"] = alt_ref if isinstance(alt_ref, bytes) else _encode_jpg(alt_ref)
        for ext in sorted(members):
            self._member(f"{key}.{ext}", members[ext])
        self.stats.samples += 1

    def skip(self, source: str, reason: str) -> None:
        """Record an input that could not become a pair (unreadable image, standardizer failure)."""
        self.stats.skipped.append({"source": source, "reason": reason})

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tar is not None
        self._tar.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        self.stats.bytes = self._tmp.stat().st_size
        self.stats.sha256 = _sha256(self._tmp)
        self._tmp.replace(self.path)
        sidecar = self.path.with_suffix(".json")
        sidecar.write_text(json.dumps(self.stats.to_json(), indent=1), encoding="utf-8")


def _versions() -> dict[str, str | None]:
    """Versions of what wrote the set (no timestamps: the index stays deterministic)."""
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("serialgen", "torch", "diffusers", "ray", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def completed_shards(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{tar name: sidecar}`` for every shard that finished (tar + sidecar, sizes agree)."""
    out = {}
    d = Path(out_dir)
    if not d.is_dir():
        return out
    for sidecar in sorted(d.glob("pairs-*.json")):
        tar = sidecar.with_suffix(".tar")
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a torn sidecar: treat the shard as not done, it will be rebuilt
        if tar.is_file() and tar.stat().st_size == info.get("bytes"):
            out[tar.name] = info
    return out


def write_index(out_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """(Re)write ``index.json`` from the completed shards' sidecars; return it."""
    d = Path(out_dir)
    shards = completed_shards(d)
    index = {
        "format": PAIRS_FORMAT,
        "format_version": PAIRS_VERSION,
        "members": list(PAIR_MEMBERS) + [f"{m} (optional)" for m in OPTIONAL_MEMBERS],
        "versions": _versions(),
        "shards": [
            {"path": n, "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
            for n, s in sorted(shards.items())
        ],
        "samples": sum(s["samples"] for s in shards.values()),
        "skipped": sum(len(s.get("skipped", [])) for s in shards.values()),
        **(extra or {}),
    }
    tmp = d / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    tmp.replace(d / "index.json")
    return index


def read_index(pairs_dir: str | Path) -> dict[str, Any]:
    """Read and check a pair set's ``index.json`` (one-line errors for a missing or foreign index)."""
    d = Path(pairs_dir)
    path = d / "index.json"
    if not path.is_file():
        raise UserInputError(f"{path}: not found; expected a pair set written by `serialgen standardize`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    if index.get("format") != PAIRS_FORMAT:
        raise UserInputError(f"{path}: format is {index.get('format')!r}, expected {PAIRS_FORMAT!r}")
    if index.get("format_version") != PAIRS_VERSION:
        raise UserInputError(f"{path}: format_version {index.get('format_version')!r}, this reader reads {PAIRS_VERSION}")
    return index


def iter_shard(path: str | Path, stats: dict[str, int] | None = None) -> Iterator[PairSample]:
    """Yield the pairs of one tar in file order. Incomplete samples are skipped and counted in ``stats``."""
    path = Path(path)
    current: dict[str, bytes] = {}
    current_key: str | None = None

    def flush() -> PairSample | None:
        if current_key is None:
            return None
        missing = [m for m in PAIR_MEMBERS if m not in current]
        if missing:
            if stats is not None:
                stats["incomplete"] = stats.get("incomplete", 0) + 1
            return None
        try:
            meta = json.loads(current["meta.json"].decode("utf-8"))
        except ValueError:
            if stats is not None:
                stats["bad_meta"] = stats.get("bad_meta", 0) + 1
            return None
        return PairSample(
            key=current_key, std_ref=current["std_ref.png"], target=current["target.jpg"],
            caption=current["caption.txt"].decode("utf-8"), meta=meta,
            alt_ref=current.get("alt_ref.jpg"), shard=path.name,
        )

    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != current_key:
                sample = flush()
                if sample is not None:
                    yield sample
                current, current_key = {}, key
            f = tar.extractfile(info)
            if f is not None:
                current[ext] = f.read()
        sample = flush()
        if sample is not None:
            yield sample


def iter_pairs(pairs_dir: str | Path, stats: dict[str, int] | None = None) -> Iterator[PairSample]:
    """Every pair of a pair set, shard by shard in index order."""
    d = Path(pairs_dir)
    for shard in read_index(d)["shards"]:
        yield from iter_shard(d / shard["path"], stats)


def verify_pairs(pairs_dir: str | Path) -> dict[str, Any]:
    """Check every shard against the index: presence, size, sha256, sample count, complete members.

    Returns ``{"ok": bool, "shards": n, "samples": n, "problems": ["pairs-000001.tar: sha256 mismatch", ...]}``.
    """
    d = Path(pairs_dir)
    index = read_index(d)
    problems: list[str] = []
    samples = 0
    for shard in index["shards"]:
        p = d / shard["path"]
        if not p.is_file():
            problems.append(f"{shard['path']}: missing")
            continue
        if p.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['path']}: {p.stat().st_size} bytes, index says {shard['bytes']}")
        if _sha256(p) != shard["sha256"]:
            problems.append(f"{shard['path']}: sha256 mismatch")
        stats: dict[str, int] = {}
        try:
            n = sum(1 for _ in iter_shard(p, stats))
        except tarfile.TarError as exc:
            problems.append(f"{shard['path']}: unreadable tar ({exc})")
            continue
        samples += n
        if n != shard["samples"]:
            problems.append(f"{shard['path']}: {n} complete samples, index says {shard['samples']}")
        for what, count in stats.items():
            problems.append(f"{shard['path']}: {count} {what} samples")
    return {"ok": not problems, "shards": len(index["shards"]), "samples": samples, "problems": problems}


def scan_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Random-access table of one tar: ``[(key, {member ext: (byte offset, size)}), ...]`` in file order.

    Reads only the 512-byte headers (tarfile seeks over the data), so a 1 GB shard scans in
    milliseconds; :func:`read_member` then fetches any member with one seek. This is what lets the
    Stage II loader use a true global shuffle and resume mid-epoch without decoding skipped samples.
    """
    table: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            if not table or table[-1][0] != key:
                table.append((key, {}))
            table[-1][1][ext] = (info.offset_data, info.size)
    return table


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member located by :func:`scan_shard`."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: member at {offset} truncated ({len(data)} of {size} bytes)")
    return data
