"""Render pairs: the tar-set schema ``serialgen.shards`` (``docs/shard_format.md``) on :mod:`.tarset`.

* ``SHARDS/{train,test}/<character>-p<start>-<stop>.tar``: one sample per (non-standard, standard)
  pair, members ``<key>.ref.png`` (RGBA), ``<key>.std.png`` (RGB), ``<key>.ref_pose.json``,
  ``<key>.std_pose.json``, ``<key>.meta.json``, in this order; keys ``<character>_p<pose>_v<view>``.
* ``SHARDS/index.json``, written last: the shards (split, samples, bytes, sha256), the run's
  configuration, failures, package versions and, from format version 2, the canonical standard
  pose (``standard_pose``) and each character's split and own standard pose (``characters``).
  Version 1 indexes (neither field) still load.

The tar writing, digests, index reading and checks are the format layer's; this module adds what
is particular to render pairs: keys, splits, the PNG encoder, the sample and index checks. No bpy:
the render workers call the writer; ``verify`` and the loaders read.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from serialgen.dataset import tarset
from serialgen.dataset.tarset import INDEX_NAME, PNG_MAGIC, TarSetError, validate_key

__all__ = [
    "SHARD_FORMAT",
    "SHARD_FORMAT_VERSION",
    "SAMPLE_SCHEMA",
    "SCHEMA",
    "MEMBERS",
    "SPLITS",
    "sample_key",
    "split_of",
    "encode_png",
    "png_problem",
    "decode_png",
    "json_bytes",
    "ShardSummary",
    "ShardWriter",
    "summarize_shard",
    "iter_shard",
    "write_index",
    "read_index",
    "verify",
]

SHARD_FORMAT = "serialgen.shards"
SHARD_FORMAT_VERSION = 2  # 2: the index gains standard_pose and characters
SAMPLE_SCHEMA = "serialgen.sample/1"
MEMBERS = ("ref.png", "std.png", "ref_pose.json", "std_pose.json", "meta.json")
SPLITS = ("train", "test")

# PNG IHDR colour type the member must have: 6 = RGBA, 2 = RGB.
_PNG_COLOUR = {"ref.png": 6, "std.png": 2}


def sample_key(character: str, pose_id: int, view: int) -> str:
    """Deterministic key of the pair (character, pose, view): ``<character>_p<pose:05d>_v<view>``."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", character)
    return validate_key(f"{safe}_p{int(pose_id):05d}_v{int(view)}")


def split_of(character: str, test_fraction: float = 0.2) -> str:
    """``"train"`` or ``"test"`` for a character id, from a hash of the id (stable across runs and
    machines; about ``test_fraction`` of the characters are test)."""
    h = int.from_bytes(hashlib.sha256(f"serialgen-split/{character}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, 3|4) -> PNG bytes (8-bit RGB or RGBA), deterministic, no metadata chunks.

    Written directly: filter type 0 (none) on every row, one zlib stream at ``compress_level``.
    On our renders (flat-shaded figures on transparent or white ground) this measured ~3x faster
    than Pillow at level 1 and ~8% smaller (``benchmarks/render.py``). Any PNG reader decodes it.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"encode_png: expected uint8 (H, W, 3|4), got {arr.dtype} {arr.shape}")
    h, w, c = arr.shape
    raw = np.zeros((h, 1 + w * c), dtype=np.uint8)  # column 0: the per-row filter byte (0)
    raw[:, 1:] = arr.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0)
    return b"".join([PNG_MAGIC, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level)),
                     _png_chunk(b"IEND", b"")])


def png_problem(data: bytes) -> str | None:
    """Why ``data`` is not an intact PNG (None: it is): the signature, then every chunk's length and
    CRC-32 up to ``IEND`` (IHDR first, at least one IDAT, nothing after IEND).

    The loader's damage check. A flipped byte anywhere in a PNG changes a chunk's CRC (or its
    length or type, which then fail the walk), while PNG decoders may still return an image with
    wrong pixels: libspng as the loader calls it does not check IDAT CRCs or the zlib checksum, and
    PIL stops reading before the zlib checksum. One ``zlib.crc32`` pass over the file's bytes
    (~0.05 ms for a 200 KB member here), no decompression.
    """
    if not data.startswith(PNG_MAGIC):
        return "not a PNG (no signature)"
    pos, end, first, idat = 8, len(data), True, False
    crc32, view = zlib.crc32, memoryview(data)
    while True:
        if pos + 12 > end:
            return f"ends inside a chunk header at byte {pos}"
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        stop = pos + 8 + length
        if length > 0x7FFFFFFF or stop + 4 > end:
            return f"chunk {kind!r} at byte {pos} runs past the end"
        if first and kind != b"IHDR":
            return f"first chunk is {kind!r}, not IHDR"
        if crc32(view[pos + 4:stop]) != int.from_bytes(data[stop:stop + 4], "big"):
            return f"CRC mismatch in chunk {kind!r} at byte {pos}"
        first = False
        idat = idat or kind == b"IDAT"
        pos = stop + 4
        if kind == b"IEND":
            if not idat:
                return "no IDAT chunk"
            return None if pos == end else f"{end - pos} bytes after IEND"


MAX_PIXELS = 64 * 1024 * 1024  # a PNG larger than this is refused before decoding (a PNG bomb)


def _png_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, colour type) from a PNG's IHDR, read before decoding (bomb check)."""
    if len(data) < 33 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[25]


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """Decode a PNG member to an (H, W, 4) ("RGBA", references) or (H, W, 3) ("RGB", standards)
    uint8 array.

    libspng (``pyspng``) decodes plain 8-bit RGB/RGBA, about 1.5-2x faster than PIL; anything else
    (palette, grey, 16-bit) goes through PIL. RGBA from a PNG without alpha is refused (a reference
    without alpha has no mask); RGB from RGBA is flattened onto white (standards are on white).
    Raises ValueError/OSError on a broken file.
    """
    import pyspng  # here, not at the top: render workers import this module to write shards
    from PIL import Image

    from serialgen.imaging import flatten_on_white, has_alpha

    w, h, colour = _png_header(data)
    if w * h > MAX_PIXELS:
        raise ValueError(f"image of {w}x{h} pixels is larger than the {MAX_PIXELS} limit")
    if data[24] == 8 and colour == (6 if mode == "RGBA" else 2):
        try:
            arr = pyspng.load(data)
        except RuntimeError as exc:  # pyspng reports every decode failure as RuntimeError
            raise ValueError(str(exc)) from None
        if arr.shape != (h, w, len(mode)):
            raise ValueError(f"decoded shape {arr.shape} does not match the header's {w}x{h}")
        return arr
    im = Image.open(io.BytesIO(data))
    im.load()
    if mode == "RGBA":
        if not has_alpha(im):
            raise ValueError(f"reference image has no alpha channel (PNG mode {im.mode})")
        return np.asarray(im.convert("RGBA"))
    return np.asarray(flatten_on_white(im))


def json_bytes(obj) -> bytes:
    """Canonical JSON (sorted keys, compact) so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _pose_problem(pose) -> str | None:
    """Why ``pose`` is not a std_pose.json-format dict (None: it is)."""
    if not isinstance(pose, dict):
        return f"is {type(pose).__name__}, not a pose object"
    w, h, names, kps = pose.get("width"), pose.get("height"), pose.get("names"), pose.get("keypoints")
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        return "has no positive integer width and height"
    if not (isinstance(names, (list, tuple)) and isinstance(kps, (list, tuple)) and len(names) == len(kps)
            and all(isinstance(p, (list, tuple)) and len(p) == 3 for p in kps)):
        return "keypoints are not one [x, y, visible] per name"
    return None


def _png_colour_type(data: bytes) -> int | None:
    if not data.startswith(PNG_MAGIC) or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    return data[25]


def _check_sample(index: dict, entry: dict, key: str, sample: dict[str, bytes], decode: bool = False) -> list[str]:
    """A render pair's own checks: PNG colour types and chunk CRCs (with ``decode``, every image
    decoded and its size checked against its pose file), pose files, meta.json, and, when the index
    has ``characters``, that the sample's character is listed with its split and standard pose."""
    problems = []
    sizes = {}
    for name, colour in _PNG_COLOUR.items():
        got = _png_colour_type(sample[name])
        if got != colour:
            problems.append(f"{key}.{name} is not a PNG of colour type {colour} (got {got})")
            continue
        why = png_problem(sample[name])
        if why:
            problems.append(f"{key}.{name}: {why}")
            continue
        if decode:
            try:
                arr = decode_png(sample[name], "RGBA" if colour == 6 else "RGB")
                sizes[name] = (arr.shape[1], arr.shape[0])
            except (ValueError, OSError, EOFError, zlib.error) as exc:
                problems.append(f"{key}.{name} does not decode ({type(exc).__name__}: {str(exc)[:100]})")
    parsed = {}
    for name in ("ref_pose.json", "std_pose.json", "meta.json"):
        try:
            parsed[name] = json.loads(sample[name])
        except ValueError:
            problems.append(f"{key}.{name} is not valid JSON")
            continue
        if name.endswith("pose.json"):
            why = _pose_problem(parsed[name])
            if why:
                problems.append(f"{key}.{name} {why}")
                continue
            image = name.replace("_pose.json", ".png")
            size = (parsed[name]["width"], parsed[name]["height"])
            if image in sizes and sizes[image] != size:
                problems.append(f"{key}.{name} is for {size[0]}x{size[1]}, {image} is {sizes[image][0]}x{sizes[image][1]}")
    meta = parsed.get("meta.json")
    if meta is None:
        return problems
    if not isinstance(meta, dict) or meta.get("schema") != SAMPLE_SCHEMA or meta.get("key") != key:
        got = (meta.get("schema"), meta.get("key")) if isinstance(meta, dict) else (None, None)
        problems.append(f"{key}.meta.json has schema {got[0]!r} / key {got[1]!r}, expected {SAMPLE_SCHEMA!r} / {key!r}")
        return problems
    characters = index.get("characters")
    if characters is None:  # a version 1 index, or a set written without it
        return problems
    char = meta.get("character")
    listed = characters.get(char) if isinstance(char, str) else None
    if listed is None:
        problems.append(f"{key}: character {char!r} is not in the index's characters")
    elif listed.get("split") != entry.get("split"):
        problems.append(f"{key}: character {char} is {listed.get('split')!r} in the index's characters, "
                        f"its shard is {entry.get('split')!r}")
    elif "std_pose.json" in parsed and parsed["std_pose.json"] != listed.get("standard_pose"):
        problems.append(f"{key}.std_pose.json differs from the index's standard_pose of {char}")
    return problems


def _characters_problem(characters) -> str | None:
    if not isinstance(characters, dict):
        return f"is {type(characters).__name__}, not an object of character ids"
    for cid, rec in characters.items():
        if not isinstance(rec, dict) or rec.get("split") not in SPLITS:
            return f"{cid!r} has no split {' or '.join(SPLITS)}"
        why = _pose_problem(rec.get("standard_pose"))
        if why:
            return f"{cid!r}: standard_pose {why}"
    return None


def _check_index(path: Path, index: dict) -> None:
    for i, e in enumerate(index["shards"]):
        if e.get("split") not in SPLITS:
            raise TarSetError(f"{path}: shards[{i}] ({e['path']!r}) has split {e.get('split')!r}, not {' or '.join(SPLITS)}")
    pose, characters = index.get("standard_pose"), index.get("characters")
    if pose is not None and _pose_problem(pose):
        raise TarSetError(f"{path}: standard_pose {_pose_problem(pose)}")
    if characters is not None and _characters_problem(characters):
        raise TarSetError(f"{path}: characters {_characters_problem(characters)}")


SCHEMA = tarset.TarSetSchema(
    format=SHARD_FORMAT,
    version=SHARD_FORMAT_VERSION,
    readable=(1, 2),
    members=MEMBERS,
    shard_globs=tuple(f"{s}/*.tar" for s in SPLITS),
    packages=("serialgen", "bpy", "webdataset", "ray", "numpy", "pillow"),
    check_index=_check_index,
    check_sample=_check_sample,
    what="a shard set written by `serialgen render` (its index.json is written when the run finishes)",
)


@dataclass
class ShardSummary:
    """What a finished shard reports (small: this travels back through Ray)."""

    path: str  # relative to the shard root, with "/" separators
    split: str
    samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)

    def to_json(self, with_keys: bool = False) -> dict:
        d = asdict(self)
        if not with_keys:
            d.pop("keys")
        return d


class ShardWriter:
    """Write one shard at ``root/relpath`` (a :class:`tarset.TarWriter` of this schema): temporary
    name first, rename on ``close``. Use as a context manager; an exception inside the block
    removes the temporary file."""

    def __init__(self, root: str | Path, relpath: str, split: str):
        self.relpath = relpath
        self.split = split
        self._tar = tarset.TarWriter(Path(root) / relpath, SCHEMA)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps each name of ``MEMBERS`` to its bytes."""
        self._tar.write(key, members)

    def close(self) -> ShardSummary:
        t = self._tar.close()
        return ShardSummary(self.relpath, self.split, t.samples, t.bytes, t.sha256, t.keys)

    def abort(self) -> None:
        self._tar.abort()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {member name: bytes}) per sample of a shard, in tar order."""
    return tarset.iter_samples(path)


def summarize_shard(root: str | Path, relpath: str, split: str) -> ShardSummary:
    """Summary of a shard already on disk (used when a run finds complete shards)."""
    path = Path(root) / relpath
    sha, size = tarset.sha256_file(path)
    keys = [k for k, _ in tarset.iter_samples(path)]
    return ShardSummary(relpath, split, len(keys), size, sha, keys)


def write_index(root: str | Path, shards: list[ShardSummary], config: dict, failures: list[dict], *,
                standard_pose: dict | None = None, characters: dict | None = None) -> Path:
    """Write ``root/index.json`` (the last step of a run). Deterministic: no timestamps or timings.

    standard_pose: the canonical standard pose of the reference figure at the render resolution
    (a std_pose.json-format dict). characters: ``{id: {"split", "standard_pose"}}``, each
    character's split and the std_pose.json its samples carry. Either may be None (unknown, e.g.
    sets written by tests); readers then fall back as for a version 1 index.
    """
    if standard_pose is not None and _pose_problem(standard_pose):
        raise ValueError(f"write_index: standard_pose {_pose_problem(standard_pose)}")
    if characters is not None and _characters_problem(characters):
        raise ValueError(f"write_index: characters {_characters_problem(characters)}")
    shards = sorted(shards, key=lambda s: s.path)
    splits = {s: {"shards": 0, "samples": 0, "bytes": 0} for s in SPLITS}
    for s in shards:
        splits[s.split]["shards"] += 1
        splits[s.split]["samples"] += s.samples
        splits[s.split]["bytes"] += s.bytes
    return tarset.write_index(root, SCHEMA, {
        "sample_schema": SAMPLE_SCHEMA,
        "members": list(MEMBERS),
        "config": config,
        "splits": splits,
        "samples": sum(s.samples for s in shards),
        "shards": [s.to_json() for s in shards],
        "failures": sorted(failures, key=lambda f: (str(f.get("character")), str(f.get("key")))),
        "standard_pose": standard_pose,
        "characters": characters,
    })


def read_index(root: str | Path) -> dict:
    """Load and check a shard set's index (``root``: the set's folder or its index file).

    Reads format versions 1 and 2; a version 1 index is returned with ``standard_pose`` and
    ``characters`` set to None. Anything wrong is a one-line :class:`tarset.TarSetError` naming the file.
    """
    index = tarset.read_index(root, SCHEMA)
    index.setdefault("standard_pose", None)
    index.setdefault("characters", None)
    return index


def verify(root: str | Path, deep: bool = True, decode: bool = False) -> list[str]:
    """Check every shard against the index; return one line per problem (empty = all good).

    The format layer's checks (:func:`tarset.verify`: sizes, sha256, unlisted shards, members,
    keys unique across shards, hostile or damaged tar members) plus, with ``deep``, PNG colour types
    and chunk CRCs, pose files and meta.json of every sample, and, when the index lists
    ``characters``, that every sample's character is listed with its shard's split and standard
    pose, and that every listed character has samples (or failures that say why not). ``decode``
    (implies ``deep``) also decodes every image and checks its size against its pose file.
    """
    seen: set[str] = set()
    schema = SCHEMA if not decode else replace(SCHEMA, check_sample=partial(_check_sample, decode=True))
    report = tarset.verify(root, schema, deep or decode,
                           on_sample=lambda entry, key, sample: seen.add(json.loads(sample["meta.json"]).get("character")))
    characters = report.index.get("characters") if report.index is not None else None
    if (deep or decode) and characters is not None and report.ok:
        failed = {f.get("character") for f in report.index.get("failures", [])}
        for cid in sorted(set(characters) - seen - failed):
            report.problems.append(f"{INDEX_NAME}: character {cid} is listed in characters but has no sample "
                                   "and no failure")
    return report.problems
