"""Stage II pairs: the tar-set schema ``serialgen.pairs`` (``docs/stage2.md``) on :mod:`.tarset`.

(standardized reference, real target, caption) per sample. A pair set is a folder:

* ``pairs-000000.tar``, ``pairs-000001.tar``, ...: one sample per pair, members (in tar order)
  ``<key>.alt_ref.jpg`` (optional: another real image of the same identity, the reference of the
  paper's paired one-stage baseline), ``<key>.caption.txt`` (UTF-8, may be empty),
  ``<key>.meta.json`` (source path, identity, sizes, standardizer), ``<key>.std_ref.png`` (Stage I
  output, RGB on white) and ``<key>.target.jpg`` (the real image, RGB, original size).
* ``pairs-000000.json`` beside each tar, written after the tar is complete (its presence marks the
  shard done, so a build resumes shard by shard): sample count, bytes, sha256, skipped inputs with
  reasons.
* ``index.json``: the format layer's fields (format, format_version, versions, shards) plus
  ``members``, ``samples``, ``skipped`` and what built the set.

Keys, deterministic tars, temporary names, digests, index reading and verification are the format
layer's; a rerun treats a shard as done only if its tar and sidecar both exist and the sizes agree.
Readable by stock ``webdataset.WebDataset`` and ``ray.data.read_webdataset``.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from serialgen.dataset import tarset
from serialgen.dataset.tarset import JPEG_MAGIC, PNG_MAGIC, TarSetError

__all__ = [
    "PAIRS_FORMAT",
    "PAIRS_VERSION",
    "PAIR_MEMBERS",
    "OPTIONAL_MEMBERS",
    "SCHEMA",
    "PairSample",
    "PairShardWriter",
    "shard_name",
    "make_key",
    "completed_shards",
    "write_index",
    "read_index",
    "iter_shard",
    "iter_pairs",
    "verify_pairs",
]

PAIRS_FORMAT = "serialgen.pairs"
PAIRS_VERSION = 1
PAIR_MEMBERS = ("std_ref.png", "target.jpg", "caption.txt", "meta.json")
OPTIONAL_MEMBERS = ("alt_ref.jpg",)
_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


def _check_sample(index: dict, entry: dict, key: str, sample: dict[str, bytes]) -> list[str]:
    """A pair's own checks: image signatures, UTF-8 caption, meta.json an object."""
    problems = []
    if not sample["std_ref.png"].startswith(PNG_MAGIC):
        problems.append(f"{key}.std_ref.png is not a PNG")
    for name in ("target.jpg", "alt_ref.jpg"):
        if name in sample and not sample[name].startswith(JPEG_MAGIC):
            problems.append(f"{key}.{name} is not a JPEG")
    try:
        sample["caption.txt"].decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{key}.caption.txt is not UTF-8")
    try:
        meta = json.loads(sample["meta.json"])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        problems.append(f"{key}.meta.json is not a JSON object")
    return problems


SCHEMA = tarset.TarSetSchema(
    format=PAIRS_FORMAT,
    version=PAIRS_VERSION,
    readable=(1,),
    members=PAIR_MEMBERS,
    optional=OPTIONAL_MEMBERS,
    order=tuple(sorted(PAIR_MEMBERS + OPTIONAL_MEMBERS)),
    shard_globs=("*.tar",),
    packages=("serialgen", "torch", "diffusers", "ray", "pillow"),
    check_sample=_check_sample,
    what="a pair set written by `serialgen standardize`",
)


def shard_name(index: int) -> str:
    """``pairs-000042.tar``: the name of shard ``index`` (deterministic, so retries are idempotent)."""
    return f"pairs-{index:06d}.tar"


def make_key(ordinal: int, source: str) -> str:
    """A sample key: zero-padded ordinal plus a slug of the source path (no dots, <= 100 chars)."""
    slug = _SLUG_RE.sub("_", source).strip("_")[-80:] or "x"
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
    """What a finished pair shard's sidecar records."""

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
    """Write one pair shard: ``with PairShardWriter(dir, index) as w: w.add(...)``.

    A :class:`tarset.TarWriter` of this schema (hidden temporary name, renamed on a clean exit),
    then the sidecar ``<name minus .tar>.json``; on an exception the temporary file is removed
    and nothing final appears.
    """

    def __init__(self, out_dir: str | Path, index: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stats = ShardStats(shard_name(index))
        self.path = self.out_dir / self.stats.name
        self._tar: tarset.TarWriter | None = None

    def __enter__(self) -> "PairShardWriter":
        self._tar = tarset.TarWriter(self.path, SCHEMA)
        return self

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
        assert self._tar is not None, "use PairShardWriter as a context manager"
        members = {
            "std_ref.png": std_ref if isinstance(std_ref, bytes) else _encode_png(std_ref),
            "target.jpg": target if isinstance(target, bytes) else _encode_jpg(target),
            "caption.txt": caption.encode("utf-8"),
            "meta.json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        if alt_ref is not None:
            members["alt_ref.jpg"] = alt_ref if isinstance(alt_ref, bytes) else _encode_jpg(alt_ref)
        self._tar.write(key, members)
        self.stats.samples += 1

    def skip(self, source: str, reason: str) -> None:
        """Record an input that could not become a pair (unreadable image, standardizer failure)."""
        self.stats.skipped.append({"source": source, "reason": reason})

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tar is not None
        if exc_type is not None:
            self._tar.abort()
            return
        done = self._tar.close()
        self.stats.bytes, self.stats.sha256 = done.bytes, done.sha256
        sidecar = self.path.with_suffix(".json")
        tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp.write_text(json.dumps(self.stats.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, sidecar)


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
    fields = {
        "members": list(PAIR_MEMBERS) + [f"{m} (optional)" for m in OPTIONAL_MEMBERS],
        "shards": [
            {"path": n, "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
            for n, s in sorted(shards.items())
        ],
        "samples": sum(s["samples"] for s in shards.values()),
        "skipped": sum(len(s.get("skipped", [])) for s in shards.values()),
        **(extra or {}),
    }
    tarset.write_index(d, SCHEMA, fields)
    return read_index(d)


def read_index(pairs_dir: str | Path) -> dict[str, Any]:
    """Read and check a pair set's ``index.json``: a one-line :class:`tarset.TarSetError` naming the
    file for a missing, unreadable or foreign index."""
    return tarset.read_index(pairs_dir, SCHEMA)


def iter_shard(path: str | Path, stats: dict[str, int] | None = None) -> Iterator[PairSample]:
    """Yield the pairs of one tar in file order. Incomplete samples and samples whose meta.json is
    not JSON are skipped and counted in ``stats`` (``incomplete``, ``bad_meta``)."""
    path = Path(path)

    def count(what: str) -> None:
        if stats is not None:
            stats[what] = stats.get(what, 0) + 1

    for key, sample in tarset.iter_samples(path):
        if any(m not in sample for m in PAIR_MEMBERS):
            count("incomplete")
            continue
        try:
            meta = json.loads(sample["meta.json"].decode("utf-8"))
        except ValueError:
            count("bad_meta")
            continue
        yield PairSample(
            key=key, std_ref=sample["std_ref.png"], target=sample["target.jpg"],
            caption=sample["caption.txt"].decode("utf-8"), meta=meta,
            alt_ref=sample.get("alt_ref.jpg"), shard=path.name,
        )


def iter_pairs(pairs_dir: str | Path, stats: dict[str, int] | None = None) -> Iterator[PairSample]:
    """Every pair of a pair set, shard by shard in index order."""
    d = tarset.index_path(pairs_dir).parent
    for shard in read_index(pairs_dir)["shards"]:
        yield from iter_shard(d / shard["path"], stats)


def verify_pairs(pairs_dir: str | Path) -> dict[str, Any]:
    """Check every shard against the index (:func:`tarset.verify`): presence, size, sha256, no
    unlisted tar, sample count, members, image signatures, captions, meta.json.

    Returns ``{"ok": bool, "shards": n, "samples": n, "problems": ["pairs-000001.tar: ...", ...]}``;
    an index that does not load is a TarSetError.
    """
    report = tarset.verify(pairs_dir, SCHEMA, deep=True)
    if report.index is None:
        raise TarSetError(report.problems[0])
    return {"ok": report.ok, "shards": report.shards, "samples": report.samples, "problems": report.problems}
