"""Render pairs: the tar-set schema ``serialgen.shards`` (``docs/shard_format.md``) on :mod:`.tarset`.

Format version 3 (what ``serialgen render`` writes) stores each character's standard image once:

* ``SHARDS/{train,test}/<character>-p<start>-<stop>.tar``: one sample per (non-standard, standard)
  pair, members ``<key>.ref.png`` (RGBA), ``<key>.ref_pose.json``, ``<key>.std_pose.json``,
  ``<key>.meta.json`` (``MEMBERS``), in this order; keys ``<character key>_p<pose>_v<view>``. Every
  pair sample has the same members, so stock webdataset, Ray Data and Hugging Face ``datasets``
  read the pair shards as they are; a reader joins the standard by the sample's character.
* ``SHARDS/{train,test}/standard/<character key>.tar``: ONE sample keyed by the character key,
  members ``std.png`` (RGB on white), ``std_pose.json``, ``meta.json`` (``STANDARD_MEMBERS``; meta
  schema ``serialgen.standard/1``).
* ``SHARDS/index.json``, written last: the pair shards (split, samples, bytes, sha256), the
  standard tars (``standard_shards``: split, character, bytes, sha256), the run's configuration,
  failures, package versions, the canonical standard pose (``standard_pose``) and per character
  its split, display name, own standard pose and standard tar (``characters``).

Versions 1 and 2 (the standard image repeated in every pair as ``std.png``; version 1 without
``standard_pose``/``characters``) still load, verify and preview.

Writing (the render job; deterministic: the same inputs give the same bytes)::

    from serialgen.dataset import shards
    # once per character, by the job whose range starts at 0 (re-writing gives the same bytes):
    std = shards.write_standard(out_dir, split, character_id, std_png, std_pose, std_meta)
    # -> StandardSummary(path="train/standard/<character key>.tar", split, character, bytes, sha256)
    with shards.ShardWriter(out_dir, "train/<shard>.tar", split) as w:   # pair shards, as before,
        w.write(key, {"ref.png": ..., "ref_pose.json": ..., "std_pose.json": ..., "meta.json": ...})
        summary = w.close()                                           # without std.png
    # the driver, last:
    shards.write_index(out_dir, pair_summaries, config, failures, standard_pose=...,
                       characters={id: {"split", "standard_pose", "name"}}, standards=[std, ...])

``std_meta`` is the standard's own meta (camera, head box, lighting, ...); ``write_standard``
adds ``schema``, ``key``, ``character`` and ``split``. ``write_index`` with ``standards`` writes
format version 3 and fills each character's ``standard`` (its tar's path); without it, version 2
(pairs carrying ``std.png``: sets written before the standard was stored once). ``ShardWriter``
takes either member set, the same for all samples of a tar.

The tar writing, digests, index reading and checks are the format layer's; this module adds what
is particular to render pairs: keys, splits (``assign_splits``), the PNG encoder and checks, the
sample, standard and index checks, and reading the standards back (``standard_paths``,
``read_standard``). No bpy: the render workers call the writer; ``verify`` and the loaders read.
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

import deflate  # libdeflate: PNG's zlib stream, ~2x stdlib zlib's speed at the same level
import numpy as np

from serialgen.dataset import tarset
from serialgen.dataset.tarset import INDEX_NAME, PNG_MAGIC, TarSetError, validate_key

__all__ = [
    "SHARD_FORMAT",
    "SHARD_FORMAT_VERSION",
    "SAMPLE_SCHEMA",
    "STANDARD_SCHEMA",
    "SCHEMA",
    "MEMBERS",
    "MEMBERS_V2",
    "STANDARD_MEMBERS",
    "SPLITS",
    "character_key",
    "sample_key",
    "split_of",
    "assign_splits",
    "encode_png",
    "png_problem",
    "decode_png",
    "json_bytes",
    "ShardSummary",
    "ShardWriter",
    "StandardSummary",
    "standard_relpath",
    "write_standard",
    "summarize_shard",
    "iter_shard",
    "write_index",
    "read_index",
    "standard_paths",
    "read_standard",
    "verify",
]

SHARD_FORMAT = "serialgen.shards"
SHARD_FORMAT_VERSION = 3  # 2: the index gains standard_pose and characters; 3: the standard stored once
SAMPLE_SCHEMA = "serialgen.sample/1"
STANDARD_SCHEMA = "serialgen.standard/1"  # the meta.json of a standard tar's one sample
MEMBERS = ("ref.png", "ref_pose.json", "std_pose.json", "meta.json")  # a pair, format 3
MEMBERS_V2 = ("ref.png", "std.png", "ref_pose.json", "std_pose.json", "meta.json")  # a pair, formats 1 and 2
STANDARD_MEMBERS = ("std.png", "std_pose.json", "meta.json")
SPLITS = ("train", "test")
STANDARD_DIR = "standard"  # <split>/standard/<character key>.tar

# PNG IHDR colour type the member must have: 6 = RGBA, 2 = RGB.
_PNG_COLOUR = {"ref.png": 6, "std.png": 2}


def character_key(character: str) -> str:
    """A character id as a key: characters other than ``[A-Za-z0-9_-]`` become ``-``. The key of the
    character's standard sample, and the start of its pairs' keys."""
    return validate_key(re.sub(r"[^A-Za-z0-9_-]", "-", str(character)))


def sample_key(character: str, pose_id: int, view: int) -> str:
    """Deterministic key of the pair (character, pose, view): ``<character>_p<pose:05d>_v<view>``."""
    return validate_key(f"{character_key(character)}_p{int(pose_id):05d}_v{int(view)}")


def split_of(character: str, test_fraction: float = 0.2) -> str:
    """``"train"`` or ``"test"`` for a character id, from a hash of the id (stable across runs and
    machines; about ``test_fraction`` of the characters are test)."""
    h = int.from_bytes(hashlib.sha256(f"serialgen-split/{character}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def assign_splits(ids, test_fraction: float, recorded: dict[str, str]) -> dict[str, str]:
    """``{id: "train" | "test"}`` for ``ids``: the split of a new set, stable once recorded.

    * A split in ``recorded`` (e.g. what a folder's earlier run wrote) always wins.
    * The test count of the whole set follows the fraction: ``round(test_fraction * N)`` for the N
      ids, at least 1 when N >= 2 and the fraction is above 0, and at most N - 1 when N >= 2 and it
      is below 1 (neither split empty). Recorded test characters count towards it.
    * The new ids that fill it are the first by hash rank (``sha256("serialgen-split/" + id)``, the
      hash ``split_of`` uses, ties by id): deterministic, and independent of the order of ``ids``.
      Recorded splits are never moved, so when they already hold more test characters than the
      fraction asks, every new id is train (the count then exceeds the target until the set grows).
    """
    if not 0.0 <= float(test_fraction) <= 1.0:
        raise ValueError(f"assign_splits: test_fraction {test_fraction} is outside [0, 1]")
    ids = sorted(set(ids))
    bad = {k: v for k, v in recorded.items() if v not in SPLITS}
    if bad:
        raise ValueError(f"assign_splits: recorded splits {bad} are not {' or '.join(SPLITS)}")
    n = len(ids)
    target = round(test_fraction * n)
    if n >= 2:
        target = max(target, 1 if test_fraction > 0 else 0)
        target = min(target, n - 1 if test_fraction < 1 else n)
    out = {i: recorded[i] for i in ids if i in recorded}
    new = sorted((i for i in ids if i not in recorded),
                 key=lambda i: (hashlib.sha256(f"serialgen-split/{i}".encode()).digest(), i))
    need = max(0, target - sum(1 for v in out.values() if v == "test"))
    for rank, i in enumerate(new):
        out[i] = "test" if rank < need else "train"
    return dict(sorted(out.items()))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


PNG_FILTERS = ("none", "sub", "up", "average", "paeth", "adaptive")
_FILTER_TYPE = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4}


def _filtered_rows(raw: np.ndarray, bpp: int, kind: str) -> np.ndarray:
    """The PNG filter ``kind`` applied to every row of ``raw`` ((h, w * bpp) uint8): (h, w * bpp) uint8.
    Vectorised over the whole image: every predictor uses the unfiltered bytes."""
    if kind == "none":
        return raw
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    if kind == "sub":
        return raw - left
    if kind == "up":
        return raw - up
    if kind == "average":
        return raw - ((left.astype(np.uint16) + up) >> 1).astype(np.uint8)
    upleft = np.zeros_like(raw)
    upleft[1:, bpp:] = raw[:-1, :-bpp]
    a, b, c = left.astype(np.int16), up.astype(np.int16), upleft.astype(np.int16)
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)
    return raw - pred


def encode_png(image: np.ndarray, compress_level: int = 6, filter: str = "none") -> bytes:
    """uint8 (H, W, 3|4) -> PNG bytes (8-bit RGB or RGBA), deterministic, no metadata chunks.

    Written directly: the row filter ``filter`` (one of ``PNG_FILTERS``; "adaptive" picks per row
    the filter with the smallest sum of absolute signed bytes, libpng's heuristic) and one zlib
    stream at ``compress_level`` (0-9, zlib's scale). The default, filter "none" at level 6, was
    chosen by the total cost per pair on real 512x768 renders (``benchmarks/loader.py --mode png``,
    docs/shard_format.md):
    against level 1 it stores ~25 % fewer bytes per reference for a few ms more encoding, once, at
    render time, and ~0.2 ms more decoding per read; the other filters save a few KB more for 2-10x
    the encode time and slower decodes. Any PNG reader decodes it.

    The zlib stream comes from libdeflate (the ``deflate`` package, pinned): at level 6 it took 6.4
    ms for a 512x768 reference where the standard library's zlib took 13.8, for 1 % fewer bytes
    (docs/shard_format.md). Why a pinned compressor and not the system's: its output is the same
    on every CPU for one version (no CPU-dependent match finding), while the standard library links
    whatever zlib the machine has (zlib 1.2/1.3, or zlib-ng-compat on some distributions), so two
    nodes of one farm could write different bytes for the same pixels.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"encode_png: compress_level {compress_level}, expected 0-9")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"encode_png: expected uint8 (H, W, 3|4), got {arr.dtype} {arr.shape}")
    if filter not in PNG_FILTERS:
        raise ValueError(f"encode_png: filter {filter!r}, expected one of {PNG_FILTERS}")
    h, w, c = arr.shape
    rows = arr.reshape(h, w * c)
    raw = np.empty((h, 1 + w * c), dtype=np.uint8)  # column 0: the per-row filter type
    if filter == "adaptive":
        best = None
        for kind in ("none", "sub", "up", "average", "paeth"):
            f = _filtered_rows(rows, c, kind)
            cost = np.abs(f.view(np.int8).astype(np.int32)).sum(axis=1)
            if best is None:
                best, raw[:, 1:], raw[:, 0] = cost, f, 0
            else:
                better = cost < best
                best = np.where(better, cost, best)
                raw[better, 1:] = f[better]
                raw[better, 0] = _FILTER_TYPE[kind]
    else:
        raw[:, 0] = _FILTER_TYPE[filter]
        raw[:, 1:] = _filtered_rows(rows, c, filter)
    header = struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0)
    return b"".join([PNG_MAGIC, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", deflate.zlib_compress(raw, compress_level)),
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


def _image_problems(key: str, sample: dict[str, bytes], names, decode: bool, sizes: dict) -> list[str]:
    """PNG members ``names`` of a sample: colour type, chunk CRCs and, with ``decode``, a decode
    (sizes recorded in ``sizes``)."""
    problems = []
    for name in names:
        colour = _PNG_COLOUR[name]
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
    return problems


def _json_problems(key: str, sample: dict[str, bytes], names, sizes: dict, parsed: dict) -> list[str]:
    """JSON members ``names``: valid JSON, pose files one [x, y, visible] per name and (when the image
    was decoded) of its image's size. Parsed members go into ``parsed``."""
    problems = []
    for name in names:
        try:
            parsed[name] = json.loads(sample[name])
        except (ValueError, RecursionError):
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
    return problems


def _check_sample(index: dict, entry: dict, key: str, sample: dict[str, bytes], decode: bool = False) -> list[str]:
    """A render pair's own checks: PNG colour types and chunk CRCs (with ``decode``, every image
    decoded and its size checked against its pose file), pose files, meta.json, and, when the index
    has ``characters``, that the sample's character is listed with its split and standard pose."""
    sizes, parsed = {}, {}
    problems = _image_problems(key, sample, [n for n in ("ref.png", "std.png") if n in sample], decode, sizes)
    problems += _json_problems(key, sample, ("ref_pose.json", "std_pose.json", "meta.json"), sizes, parsed)
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


def _relpath_problem(rel) -> str | None:
    if not isinstance(rel, str):
        return f"is {type(rel).__name__}, not a path"
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts or "\\" in rel or "" in parts:
        return f"{rel!r} is not a relative path inside the set"
    return None


def _characters_problem(characters, version: int = SHARD_FORMAT_VERSION) -> str | None:
    if not isinstance(characters, dict):
        return f"is {type(characters).__name__}, not an object of character ids"
    for cid, rec in characters.items():
        if not isinstance(rec, dict) or rec.get("split") not in SPLITS:
            return f"{cid!r} has no split {' or '.join(SPLITS)}"
        why = _pose_problem(rec.get("standard_pose"))
        if why:
            return f"{cid!r}: standard_pose {why}"
        if rec.get("name") is not None and not isinstance(rec.get("name"), str):
            return f"{cid!r}: name is {type(rec['name']).__name__}, not a string"
        if version >= 3 and rec.get("standard") is not None:
            why = _relpath_problem(rec["standard"])
            if why:
                return f"{cid!r}: standard {why}"
    return None


def _standard_entry_problem(e) -> str | None:
    if not isinstance(e, dict):
        return f"is {type(e).__name__}, not {{path, split, character, samples, bytes, sha256}}"
    ints = all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) for k in ("samples", "bytes"))
    if not (ints and isinstance(e.get("sha256"), str) and isinstance(e.get("character"), str)):
        return "is not {path, split, character, samples, bytes, sha256}"
    if e.get("split") not in SPLITS:
        return f"has split {e.get('split')!r}, not {' or '.join(SPLITS)}"
    why = _relpath_problem(e.get("path"))
    if why:
        return f"path {why}"
    if e["path"] != standard_relpath(e["split"], e["character"]):
        return f"path {e['path']!r} is not {standard_relpath(e['split'], e['character'])!r}"
    return None


def _check_index(path: Path, index: dict) -> None:
    for i, e in enumerate(index["shards"]):
        if e.get("split") not in SPLITS:
            raise TarSetError(f"{path}: shards[{i}] ({e['path']!r}) has split {e.get('split')!r}, not {' or '.join(SPLITS)}")
    version = index["format_version"]
    pose, characters = index.get("standard_pose"), index.get("characters")
    if pose is not None and _pose_problem(pose):
        raise TarSetError(f"{path}: standard_pose {_pose_problem(pose)}")
    if characters is not None and _characters_problem(characters, version):
        raise TarSetError(f"{path}: characters {_characters_problem(characters, version)}")
    if version < 3:
        return
    standards = index.get("standard_shards")
    if not isinstance(standards, list):
        raise TarSetError(f"{path}: format_version 3 without a 'standard_shards' list")
    if characters is None:
        raise TarSetError(f"{path}: format_version 3 without 'characters' (the join of pairs and standards)")
    for i, e in enumerate(standards):
        why = _standard_entry_problem(e)
        if why:
            raise TarSetError(f"{path}: standard_shards[{i}] {why}: {str(e)[:120]}")
        rec = characters.get(e["character"])
        if rec is None or rec.get("standard") != e["path"] or rec.get("split") != e["split"]:
            raise TarSetError(f"{path}: standard_shards[{i}] ({e['path']!r}) is not the standard of a listed "
                              f"character of its split")
    listed = {e["path"] for e in standards}
    for cid, rec in characters.items():
        if rec.get("standard") is not None and rec["standard"] not in listed:
            raise TarSetError(f"{path}: characters {cid!r}: standard {rec['standard']!r} is not in standard_shards")


SCHEMA = tarset.TarSetSchema(
    format=SHARD_FORMAT,
    version=SHARD_FORMAT_VERSION,
    readable=(1, 2, 3),
    members=MEMBERS,
    shard_globs=tuple(f"{s}/*.tar" for s in SPLITS),
    packages=("serialgen", "bpy", "webdataset", "ray", "numpy", "pillow"),
    check_index=_check_index,
    check_sample=_check_sample,
    what="a shard set written by `serialgen render` (its index.json is written when the run finishes)",
)
# Sets of formats 1 and 2: the same index checks, pairs that carry the standard image.
SCHEMA_V2 = replace(SCHEMA, version=2, members=MEMBERS_V2, order=())
# A standard tar: one sample keyed by the character key (not a set of its own: no index).
_STANDARD_TARS = tarset.TarSetSchema(format="serialgen.standard", version=1, readable=(1,), members=STANDARD_MEMBERS,
                                     shard_globs=tuple(f"{s}/{STANDARD_DIR}/*.tar" for s in SPLITS))


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
    """Write one pair shard at ``root/relpath`` (a :class:`tarset.TarWriter`): temporary name first,
    rename on ``close``. Use as a context manager; an exception inside the block removes the
    temporary file.

    Samples have the format 3 members (``MEMBERS``: no ``std.png``; the standard goes to
    :func:`write_standard`) or, for sets of format 2, ``MEMBERS_V2``: the first sample decides, the
    others must have the same members."""

    def __init__(self, root: str | Path, relpath: str, split: str):
        self.relpath = relpath
        self.split = split
        self._path = Path(root) / relpath
        self._tar: tarset.TarWriter | None = None

    def _writer(self, members: dict | None) -> tarset.TarWriter:
        if self._tar is None:
            schema = SCHEMA_V2 if members is not None and "std.png" in members else SCHEMA
            self._tar = tarset.TarWriter(self._path, schema)
        return self._tar

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps each name of ``MEMBERS`` (or ``MEMBERS_V2``) to its bytes."""
        self._writer(members).write(key, members)

    def close(self) -> ShardSummary:
        t = self._writer(None).close()
        return ShardSummary(self.relpath, self.split, t.samples, t.bytes, t.sha256, t.keys)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class StandardSummary:
    """A written standard tar (small: it travels back through Ray and into the journal)."""

    path: str  # <split>/standard/<character key>.tar
    split: str
    character: str
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {**asdict(self), "samples": 1}

    @classmethod
    def from_json(cls, d: dict) -> "StandardSummary":
        return cls(d["path"], d["split"], d["character"], d["bytes"], d["sha256"])


def standard_relpath(split: str, character: str) -> str:
    """Where a character's standard tar lies in a format 3 set: ``<split>/standard/<character key>.tar``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected {' or '.join(SPLITS)}")
    return f"{split}/{STANDARD_DIR}/{character_key(character)}.tar"


def write_standard(root: str | Path, split: str, character: str, std_png: bytes, std_pose: dict,
                   meta: dict) -> StandardSummary:
    """Write the standard tar of ``character`` (format 3): one sample keyed by the character key with
    ``std.png`` (an RGB PNG on white), ``std_pose.json`` (the std_pose.json dict its pairs carry)
    and ``meta.json`` (``meta`` plus ``schema``, ``key``, ``character``, ``split``).

    Deterministic (the same arguments give the same bytes, so a re-run or a retried job may write it
    again), under a temporary name, fsynced and renamed. Raises ValueError for arguments that are
    not a standard (a bug in the caller, not in data).
    """
    key = character_key(character)
    if _png_colour_type(std_png) != 2 or png_problem(std_png):
        raise ValueError(f"write_standard: std.png of {character} is not an intact RGB PNG")
    if _pose_problem(std_pose):
        raise ValueError(f"write_standard: std_pose of {character} {_pose_problem(std_pose)}")
    fixed = {"schema": STANDARD_SCHEMA, "key": key, "character": character, "split": split}
    clash = {k: meta[k] for k in fixed if k in meta and meta[k] != fixed[k]}
    if clash:
        raise ValueError(f"write_standard: meta {clash} disagrees with {fixed}")
    relpath = standard_relpath(split, character)
    with tarset.TarWriter(Path(root) / relpath, _STANDARD_TARS) as tar:
        tar.write(key, {"std.png": std_png, "std_pose.json": json_bytes(std_pose), "meta.json": json_bytes({**meta, **fixed})})
        done = tar.close()
    return StandardSummary(relpath, split, character, done.bytes, done.sha256)


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {member name: bytes}) per sample of a shard, in tar order (hostile or damaged
    content: a one-line :class:`TarSetError` naming the shard)."""
    return tarset.iter_samples(path)


def summarize_shard(root: str | Path, relpath: str, split: str) -> ShardSummary:
    """Summary of a shard already on disk (used when a run finds complete shards)."""
    path = Path(root) / relpath
    sha, size = tarset.sha256_file(path)
    keys = [k for k, _ in tarset.iter_samples(path)]
    return ShardSummary(relpath, split, len(keys), size, sha, keys)


def write_index(root: str | Path, shards: list[ShardSummary], config: dict, failures: list[dict], *,
                standard_pose: dict | None = None, characters: dict | None = None,
                standards: list[StandardSummary] | None = None) -> Path:
    """Write ``root/index.json`` (the last step of a run). Deterministic: no timestamps or timings.

    standard_pose: the canonical standard pose of the reference figure at the render resolution
    (a std_pose.json-format dict). characters: ``{id: {"split", "standard_pose", "name"}}``, each
    character's split, the std_pose.json its samples carry and its display name (optional). Either
    may be None (unknown, e.g. sets written by tests); readers then fall back as for a version 1
    index. standards: the standard tars (:func:`write_standard`): the index is then format 3, lists
    them as ``standard_shards`` and sets each character's ``standard`` (``characters`` required);
    without them it is format 2 (pairs that carry ``std.png``).
    """
    version = 3 if standards is not None else 2
    if standard_pose is not None and _pose_problem(standard_pose):
        raise ValueError(f"write_index: standard_pose {_pose_problem(standard_pose)}")
    if characters is not None and _characters_problem(characters, version):
        raise ValueError(f"write_index: characters {_characters_problem(characters, version)}")
    shards = sorted(shards, key=lambda s: s.path)
    splits = {s: {"shards": 0, "samples": 0, "bytes": 0} for s in SPLITS}
    for s in shards:
        splits[s.split]["shards"] += 1
        splits[s.split]["samples"] += s.samples
        splits[s.split]["bytes"] += s.bytes
    fields = {
        "sample_schema": SAMPLE_SCHEMA,
        "members": list(MEMBERS if version == 3 else MEMBERS_V2),
        "config": config,
        "splits": splits,
        "samples": sum(s.samples for s in shards),
        "shards": [s.to_json() for s in shards],
        "failures": sorted(failures, key=lambda f: (str(f.get("character")), str(f.get("key")))),
        "standard_pose": standard_pose,
        "characters": characters,
    }
    if version == 3:
        if characters is None:
            raise ValueError("write_index: standards need characters (the join of pairs and standards)")
        standards = sorted(standards, key=lambda s: s.path)
        # "standard" is this function's to fill: from the standards written, nothing else
        characters = {cid: {k: v for k, v in rec.items() if k != "standard"} for cid, rec in characters.items()}
        for std in standards:
            if std.character not in characters:
                raise ValueError(f"write_index: standard {std.path} of {std.character}, not in characters")
            characters[std.character]["standard"] = std.path
            splits[std.split]["standards"] = splits[std.split].get("standards", 0) + 1
            splits[std.split]["standard_bytes"] = splits[std.split].get("standard_bytes", 0) + std.bytes
        fields.update(characters=characters, standard_members=list(STANDARD_MEMBERS),
                      standard_shards=[s.to_json() for s in standards])
    return tarset.write_index(root, SCHEMA if version == 3 else SCHEMA_V2, fields)


def read_index(root: str | Path) -> dict:
    """Load and check a shard set's index (``root``: the set's folder or its index file).

    Reads format versions 1, 2 and 3; ``standard_pose`` and ``characters`` are None for version 1,
    ``standard_shards`` None before version 3. Anything wrong is a one-line
    :class:`tarset.TarSetError` naming the file (:class:`tarset.ForeignSetError` for another format
    or version).
    """
    index = tarset.read_index(root, SCHEMA)
    index.setdefault("standard_pose", None)
    index.setdefault("characters", None)
    index.setdefault("standard_shards", None)
    return index


def standard_paths(root: str | Path, index: dict) -> dict[str, Path]:
    """``{character id: standard tar}`` of a format 3 set (empty before format 3: the pairs carry
    their standard)."""
    folder = tarset.index_path(root).parent
    return {e["character"]: folder / e["path"] for e in index.get("standard_shards") or []}


def read_standard(path: str | Path, character: str | None = None) -> dict[str, bytes]:
    """The members of a standard tar (``STANDARD_MEMBERS``), checked: one sample, keyed by the
    character key (of ``character`` when given), with exactly those members. Anything else, or a
    missing or damaged tar, is a one-line :class:`TarSetError` naming the file."""
    try:
        samples = list(tarset.iter_samples(path))
    except OSError as exc:
        raise TarSetError(f"{path}: standard unreadable ({exc.strerror or exc})") from None
    if len(samples) != 1:
        raise TarSetError(f"{path}: {len(samples)} samples, a standard tar holds one")
    key, members = samples[0]
    problem = _STANDARD_TARS.member_problem(key, members)
    if problem:
        raise TarSetError(f"{path}: {problem}")
    if character is not None and key != character_key(character):
        raise TarSetError(f"{path}: key {key!r}, expected {character_key(character)!r}")
    return members


def _verify_standards(root: Path, index: dict, deep: bool, decode: bool, pair_characters: set[str]) -> list[str]:
    """Format 3: every listed standard tar exists with its size and sha256; (deep) holds one sample
    keyed by its character's key with the standard members, an intact RGB std.png, the standard
    meta and the std_pose.json listed for its character; no unlisted tar lies in a standard folder;
    every character with pairs has a standard."""
    problems = []
    characters = index["characters"]
    listed = set()
    for e in index["standard_shards"]:
        rel = e["path"]
        listed.add(rel)
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: standard listed in the index but missing")
            continue
        sha, size = tarset.sha256_file(path)
        if size != e["bytes"] or sha != e["sha256"]:
            problems.append(f"{rel}: {size} bytes / sha256 {sha[:16]}..., the index says {e['bytes']} / "
                            f"{e['sha256'][:16]}...")
            continue
        if not deep:
            continue
        try:
            members = read_standard(path, e["character"])
        except TarSetError as exc:
            problems.append(str(exc).replace(str(path), rel, 1))
            continue
        key = character_key(e["character"])
        sizes, parsed = {}, {}
        found = _image_problems(key, members, ("std.png",), decode, sizes)
        found += _json_problems(key, members, ("std_pose.json", "meta.json"), sizes, parsed)
        meta = parsed.get("meta.json")
        if isinstance(meta, dict) and (meta.get("schema"), meta.get("key"), meta.get("character"), meta.get("split")) != (
                STANDARD_SCHEMA, key, e["character"], e["split"]):
            found.append(f"{key}.meta.json is not the standard meta of {e['character']} ({e['split']})")
        elif meta is not None and not isinstance(meta, dict):
            found.append(f"{key}.meta.json is not an object")
        if "std_pose.json" in parsed and parsed["std_pose.json"] != characters[e["character"]]["standard_pose"]:
            found.append(f"{key}.std_pose.json differs from the index's standard_pose of {e['character']}")
        problems += [f"{rel}: {p}" for p in found]
    for pattern in _STANDARD_TARS.shard_globs:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: standard not in the index (left from another run?)")
    for cid in sorted(pair_characters):
        if isinstance(cid, str) and cid in characters and not characters[cid].get("standard"):
            problems.append(f"{INDEX_NAME}: character {cid} has pairs but no standard")
    return problems


def verify(root: str | Path, deep: bool = True, decode: bool = False) -> list[str]:
    """Check every shard against the index; return one line per problem (empty = all good).

    The format layer's checks (:func:`tarset.verify`: sizes, sha256, unlisted shards, members,
    keys unique across shards, hostile or damaged tar members) plus, with ``deep``, PNG colour types
    and chunk CRCs, pose files and meta.json of every sample, and, when the index lists
    ``characters``, that every sample's character is listed with its shard's split and standard
    pose, and that every listed character has samples (or failures that say why not). Format 3:
    the standard tars too (:func:`_verify_standards`). ``decode`` (implies ``deep``) also decodes
    every image and checks its size against its pose file.
    """
    deep = deep or decode
    try:
        index = read_index(root)
    except TarSetError as exc:
        return [str(exc)]
    schema = SCHEMA if index["format_version"] >= 3 else SCHEMA_V2
    if decode:
        schema = replace(schema, check_sample=partial(_check_sample, decode=True))
    seen: set[str] = set()
    report = tarset.verify(root, schema, deep,
                           on_sample=lambda entry, key, sample: seen.add(json.loads(sample["meta.json"]).get("character")))
    characters = index["characters"]
    if index["format_version"] >= 3:
        report.problems += _verify_standards(tarset.index_path(root).parent, index, deep, decode, seen)
    if deep and characters is not None and report.ok:
        failed = {f.get("character") for f in index.get("failures", [])}
        for cid in sorted(set(characters) - seen - failed):
            report.problems.append(f"{INDEX_NAME}: character {cid} is listed in characters but has no sample "
                                   "and no failure")
    return report.problems
