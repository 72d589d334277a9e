"""The Stage I training loader: shards -> (composited reference, mask, pose maps, standard) tensors.

A stock WebDataset pipeline (``webdataset.DataPipeline`` of ``SimpleShardList`` / ``ResampledShards``,
``tarfile_to_samples``, ``shuffle``, ``map``, ``batched``) wrapped in ``RenderPairDataset``, a torch
``IterableDataset`` that adds what the stages leave to the user: exact node/worker splitting with a
clear error instead of a hang, seeds that make every run reproducible, and a count of every skipped
sample or shard (a warning summary when a reader finishes; never a crash on bad data).

Per sample (``batch_size=None``) or per batch (a leading ``B`` dimension), by default
(``dtype="uint8"``, the fast path training uses: 4x fewer bytes written and sent between processes,
converted on the device by ``to_model_range``):

=================  ==========================  ===========================================================
key                shape, dtype                meaning
=================  ==========================  ===========================================================
``ref``            (3, H, W) uint8 0..255      the reference composited onto a random background
``ref_mask``       (1, H, W) uint8 {0, 1}      1 = background (from alpha >= 128, transformed with ``ref``)
``ref_pose``       (3, H, W) uint8 0..255      OpenPose/DWPose map of the reference keypoints
``std``            (3, H, W) uint8 0..255      the standard image (fit into H x W, padded white)
``std_pose``       (3, H, W) uint8 0..255      the character's standard-pose map (or the canonical one)
``ref_keypoints``  (66, 3) float32             [x, y, visible] in output pixels, ``KEYPOINT_NAMES`` order
``meta``           dict                        ``meta.json`` as stored
``__key__``        str                         the sample key; ``__url__`` the shard
=================  ==========================  ===========================================================

``to_model_range`` (on any device) gives the model's ranges: images (the VAE's inputs)
``x / 127.5 - 1`` in [-1, 1], pose maps conditioning images ``x / 255`` in [0, 1] (as ControlNet and
Animate Anyone's pose guider take them), masks float {0, 1}; ``dtype="float32"`` does that in the
worker instead (4x the bytes: for tools, not training). Single samples are contiguous; batches
(``batch_size=B``: collated inside the workers) are (B, C, H, W) in ``torch.channels_last`` memory
(the HWC bytes as decoded: no transpose copy on the CPU; call ``.contiguous()`` on the device if a
consumer needs it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tarfile
import time
import warnings
import zlib
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field, fields
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from serialgen.assets_manifest.geometry.standard_form import reference_standard_keypoints
from serialgen.dataset.annotations import ANNOTATION_DIR, AnnotationReader, EstimateMixer
from serialgen.dataset.compositing import (
    BackgroundPool,
    CompositeConfig,
    EmptyReferenceError,
    PlacedReference,
    list_background_images,
    prepare_reference,
)
from serialgen.dataset.posemap import Pose, RegionImage, draw_pose_map, draw_pose_region, parse_pose
from serialgen.dataset import tarset
from serialgen.dataset.shards import (MEMBERS, STANDARD_DIR, character_key, decode_png, png_problem, read_index,
                                      read_standard, standard_paths)
from serialgen.dataset.tarset import INDEX_NAME, TarSetError, index_path
from serialgen.errors import UserInputError
from serialgen.imaging import fit_transform, letterbox
from serialgen.resolution import DEFAULT_RESOLUTION, parse_resolution

__all__ = [
    "LoaderConfig",
    "LoaderStats",
    "RenderPairDataset",
    "make_loader",
    "open_dataset",
    "resolve_shards",
    "to_model_range",
]

IMAGE_KEYS = ("ref", "ref_pose", "std", "std_pose")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, KeyError, TypeError, IndexError,
                  Image.DecompressionBombError)

log = logging.getLogger("serialgen.dataset.loader")



@dataclass
class LoaderConfig:
    """Everything that shapes what the loader yields; saved with training configs (``asdict``).

    resolution: output (width, height). split: shard set when SHARDS is a folder or an index.
    resampled: infinite training mode (shards drawn with replacement per reader); otherwise one
    epoch, every sample exactly once across all ranks and workers. epoch_length: in resampled mode,
    samples (or batches when batched) per reader per epoch (``with_epoch``); None = endless.
    shuffle_buffer / shuffle_initial: sample shuffle buffer (raw, undecoded samples, ~250 KB each).
    std_pose: "per_character" (the default: each character's own standard keypoints, the map that
    agrees with its standard image; from the index's ``characters``, else the sample's
    std_pose.json) or "canonical" (one map, the reference figure's, for every sample).
    canonical_share: with "per_character", the probability that a sample gets the canonical map
    instead (what inference on real photos has: no per-character standard skeleton there).
    canonical_pose: a std_pose.json-format file with the canonical standard keypoints; None takes
    the index's ``standard_pose`` if any, else the reference figure at the size of the first
    sample's std_pose.json (read once in the main process so every rank and worker agrees).
    integrity_check: check every PNG member's chunk CRCs before decoding (damaged members that
    would still decode are skipped and counted). estimated_share: the probability that a sample's
    reference mask and pose map are the person estimator's instead of the exact ones (train as you
    infer; from ``annotations``, default ``<shard set>/annotations``, written by `serialgen shards
    annotate`; docs/estimator.md). rank / world_size: None = from torch.distributed
    or the RANK / WORLD_SIZE environment (as webdataset does).
    """

    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    split: str = "train"
    resampled: bool = False
    epoch_length: int | None = None
    shuffle_buffer: int = 500
    shuffle_initial: int = 100
    seed: int = 0
    std_pose: str = "per_character"
    canonical_share: float = 0.0
    canonical_pose: str | None = None
    scale_range: tuple[float, float] = (0.8, 1.1)
    max_crop: float = 0.1
    jitter: float = 0.06
    background_pool: int = 32
    background_refresh: float = 0.02
    background_zoom: float = 1.5
    background_jitter: float = 0.15
    std_cache: int = 8
    integrity_check: bool = True
    estimated_share: float = 0.0
    annotations: str | None = None
    dtype: str = "uint8"
    batch_size: int | None = None
    partial_batches: bool = True
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self):
        r = self.resolution
        self.resolution = parse_resolution(r if isinstance(r, str) else tuple(int(v) for v in r), "resolution")
        self.scale_range = tuple(float(v) for v in self.scale_range)
        if self.std_pose not in ("canonical", "per_character"):
            raise UserInputError(f"std_pose={self.std_pose!r}: expected 'canonical' or 'per_character'")
        if not 0.0 <= float(self.canonical_share) <= 1.0:
            raise UserInputError(f"canonical_share={self.canonical_share}: expected a probability in [0, 1]")
        if not 0.0 <= float(self.estimated_share) <= 1.0:
            raise UserInputError(f"estimated_share={self.estimated_share}: expected a probability in [0, 1]")
        if self.dtype not in ("float32", "uint8"):
            raise UserInputError(f"dtype={self.dtype!r}: expected 'float32' or 'uint8'")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserInputError(f"batch_size={self.batch_size}: must be at least 1")
        if self.shuffle_buffer < 0 or self.std_cache < 1:
            raise UserInputError("shuffle_buffer must be >= 0 and std_cache >= 1")
        self.composite_config()  # validates scale_range, max_crop, jitter

    def composite_config(self) -> CompositeConfig:
        return CompositeConfig(resolution=self.resolution, scale_range=self.scale_range, max_crop=self.max_crop, jitter=self.jitter)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserInputError(f"loader config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Skips and counts
# ---------------------------------------------------------------------------------------------

_KEYS_KEPT = 10_000  # distinct keys remembered per (reason, shard): a whole bad shard, bounded


@dataclass
class LoaderStats:
    """What a reader (a process, or a DataLoader worker) read and refused.

    ``skipped[reason]`` counts distinct refused samples (shard, key) per reason; a shard-level
    problem (missing, unreadable, or cut where no sample was being read) counts once per shard.
    In resampled mode a reader meets the same bad sample again and again: ``occurrences`` counts
    those. ``keys[reason][shard]`` lists the refused keys (None for a shard-level problem), and
    ``examples[reason]`` a few details. Stats of several readers ``merge``; ``to_json`` /
    ``from_json`` carry a worker's stats to the main process.
    """

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    occurrences: Counter = field(default_factory=Counter)
    keys: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    std_cache_hits: int = 0
    std_cache_misses: int = 0
    on_skip: object = field(default=None, repr=False, compare=False)  # a worker's reporter

    def skip(self, reason: str, shard: str, key: str | None, detail: str) -> None:
        self.occurrences[reason] += 1
        if self.on_skip is not None:
            self.on_skip()
        seen = self.keys.setdefault(reason, {}).setdefault(shard, [])
        if key in seen or len(seen) >= _KEYS_KEPT:
            return
        seen.append(key)
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(f"{shard}" + (f":{key}" if key else "") + f": {detail[:160]}")

    def merge(self, other: "LoaderStats") -> "LoaderStats":
        self.samples += other.samples
        self.std_cache_hits += other.std_cache_hits
        self.std_cache_misses += other.std_cache_misses
        for reason, shards in other.keys.items():
            for shard, keys in shards.items():
                seen = self.keys.setdefault(reason, {}).setdefault(shard, [])
                known = set(seen)
                for k in keys:
                    if k not in known and len(seen) < _KEYS_KEPT:
                        seen.append(k)
                        known.add(k)
                        self.skipped[reason] += 1
        self.occurrences.update(other.occurrences)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(e for e in ex if e not in mine)
            del mine[3:]
        return self

    def to_json(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "occurrences": dict(self.occurrences),
                "keys": self.keys, "examples": self.examples, "std_cache_hits": self.std_cache_hits,
                "std_cache_misses": self.std_cache_misses}

    @classmethod
    def from_json(cls, d: dict) -> "LoaderStats":
        return cls(d["samples"], Counter(d["skipped"]), Counter(d["occurrences"]), d["keys"], d["examples"],
                   d["std_cache_hits"], d["std_cache_misses"])

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: samples read, then per reason the refused samples by shard (a few keys each)."""
        if not self.skipped:
            return f"read {self.samples} samples, skipped none"
        parts = []
        for reason, n in self.skipped.most_common():
            shards = sorted(self.keys.get(reason, {}).items(), key=lambda kv: (-len(kv[1]), kv[0]))
            where = []
            for shard, keys in shards[:4]:
                named = [k for k in keys if k]
                more = f", +{len(named) - 3} more" if len(named) > 3 else ""
                where.append(f"{shard}" + (f": {', '.join(named[:3])}{more}" if named else ""))
            if len(shards) > 4:
                where.append(f"+{len(shards) - 4} more shards")
            again = self.occurrences[reason] - n
            parts.append(f"{n} x {reason} ({'; '.join(where)})" + (f" [met {again} more times]" if again > 0 else ""))
        return f"read {self.samples} samples, skipped {self.total_skipped}: " + ", ".join(parts)


_PASSES = count()  # numbers a worker's passes (its report files)


def _read_shards(src, stats: LoaderStats):
    """The pipeline's tar stage: each shard URL (``{"url": ...}``, from the shard list) opened with
    webdataset's ``gopen`` (files, ``pipe:``) and read by the format layer's :func:`tarset.read_samples`:
    samples as webdataset's ``tarfile_to_samples`` gives them (``__key__``, ``__url__``, one entry
    per member), grouped within one shard only. Refused samples (unsafe names, links, bad keys,
    repeated members or keys, a cut or damaged tar) are counted by reason, shard and key."""
    import webdataset as wds

    for item in src:
        url = item["url"]
        shard = _shard_label(url)
        try:
            stream = wds.gopen(url)
        except FileNotFoundError as exc:
            stats.skip("missing shard", shard, None, str(exc)[:100])
            continue
        except OSError as exc:
            stats.skip(tarset.REJECT_UNREADABLE, shard, None, f"{type(exc).__name__}: {str(exc)[:100]}")
            continue
        try:
            for got in tarset.read_samples(stream):
                if isinstance(got, tarset.Rejected):
                    stats.skip(got.reason, shard, got.key, got.detail)
                    continue
                key, sample = got
                sample["__key__"], sample["__url__"] = key, url
                yield sample
        finally:
            try:
                stream.close()
            except Exception as exc:  # a pipe: command that failed (webdataset raises on its status)
                stats.skip(tarset.REJECT_UNREADABLE, shard, None, f"{type(exc).__name__}: {str(exc)[:100]}")


def _shard_label(url: str) -> str:
    """A shard's name in counts and logs: its split folder and file name (``train/x.tar``)."""
    parts = str(url).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[0]


class _WorkerReports:
    """Carries each DataLoader worker's :class:`LoaderStats` to the main process, which logs ONE
    summary for all of them (``RenderPairDataset.report``).

    The main process makes a private folder; a worker writes its cumulative stats there as one
    small JSON file per pass (atomically, at most every ``every_s`` seconds while it skips samples,
    and when its pass ends). Files, not a queue: a worker never blocks on a main process that is
    busy training, and nothing is lost when a worker ends between two batches. ``collect`` in the
    main process adds finished passes to its totals (and removes their files) and reads running ones.
    """

    def __init__(self, every_s: float = 30.0):
        import tempfile
        import weakref

        self.folder = tempfile.mkdtemp(prefix="serialgen-loader-")
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._finalizer = weakref.finalize(self, _remove_reports, self.folder, os.getpid())

    def __getstate__(self):
        return {"folder": self.folder, "every_s": self.every_s}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._finalizer, self._last = None, {}

    def write_every(self, name: str, stats: LoaderStats) -> None:
        """A running pass's report, at most every ``every_s`` seconds (called on each skip)."""
        now = time.monotonic()
        if now - self._last.get(name, -1e9) >= self.every_s:
            self._last[name] = now
            self.write(name, stats, final=False)

    def write(self, name: str, stats: LoaderStats, final: bool) -> None:
        path = os.path.join(self.folder, name + ".json")
        tmp = path + f".{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"final": final, "stats": stats.to_json()}, f)
            os.replace(tmp, path)
        except OSError:
            pass  # the folder went away (the main process ended): nobody is left to tell

    def collect(self, done: LoaderStats) -> LoaderStats:
        """``done`` plus every finished pass (added to ``done``, files removed) and running one."""
        running = LoaderStats()
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".json"))
        except OSError:
            return LoaderStats().merge(done)
        for n in names:
            path = os.path.join(self.folder, n)
            try:
                with open(path) as f:
                    report = json.load(f)
            except (OSError, ValueError):
                continue
            stats = LoaderStats.from_json(report["stats"])
            if report["final"]:
                done.merge(stats)
                os.unlink(path)
            else:
                running.merge(stats)
        return LoaderStats().merge(done).merge(running)


def _remove_reports(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked worker garbage-collecting its copy must not remove it
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------

def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def resolve_shards(spec, split: str = "train") -> list[str]:
    """Shard paths from SHARDS: a shard-set folder (its ``index.json``, else ``<split>/*.tar``, else
    ``*.tar``), an index file, a ``.tar``, a brace pattern (``shard-{000000..000009}.tar``) or a
    list of these. Remote URLs (``pipe:``, ``s3://``...) pass through unchecked.

    Raises UserInputError (one line, naming the path) when a shard is missing or none is found, and
    ``TarSetError`` for an index that is not a readable ``serialgen.shards`` index.
    """
    return _resolve(spec, split)[0]


def _resolve(spec, split: str) -> tuple[list[str], dict | None, Path | None]:
    """(shard paths, the shard set's index and its folder when SHARDS names one; see ``resolve_shards``)."""
    import braceexpand

    if isinstance(spec, (list, tuple)):
        out = []
        for s in spec:
            out += _resolve(str(s), split)[0]
        return out, None, None
    spec = str(spec)
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec)), None, None
    if "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        for p in paths:
            if not Path(p).is_file():
                raise UserInputError(f"shard not found: {p} (from the pattern {spec})")
        return paths, None, None
    path = Path(spec)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _shards_from_index(path, split)
        sub = path / split
        tars = sorted(sub.glob("*.tar")) if sub.is_dir() else sorted(path.glob("*.tar"))
        if not tars:
            raise UserInputError(f"shards: no .tar files in {sub if sub.is_dir() else path} (and no index.json)")
        return [str(p) for p in tars], None, None
    if path.is_file():
        if path.suffix == ".json":
            return _shards_from_index(path, split)
        return [str(path)], None, None
    raise UserInputError(f"shard not found: {path}")


def _shards_from_index(root: Path, split: str) -> tuple[list[str], dict, Path]:
    """The shards of ``split`` listed in a shard set's index (read and checked by the format layer)."""
    index = read_index(root)
    index_file = index_path(root)
    chosen = [e for e in index["shards"] if e["split"] == split]
    if not chosen:
        splits = sorted({e["split"] for e in index["shards"]})
        raise UserInputError(f"{index_file}: no shards of split {split!r} (splits: {splits})")
    out = []
    for e in chosen:
        full = index_file.parent / e["path"]
        if not full.is_file():
            raise UserInputError(f"shard not found: {full} (listed in {index_file})")
        out.append(str(full))
    return out, index, index_file.parent


def _first_member(url: str, member: str) -> bytes | None:
    with tarfile.open(url, "r|*") as tf:
        for info in tf:
            if info.isreg() and info.name.split("/")[-1].split(".", 1)[-1] == member:
                return tf.extractfile(info).read()
    return None


def _reference_standard_pose(width: int, height: int) -> Pose:
    """The canonical standard pose (the reference figure at the standard camera,
    ``geometry.standard_form.reference_standard_keypoints``) as a Pose at ``width`` x ``height``."""
    uv, vis = reference_standard_keypoints(width, height)
    return Pose(uv, vis, (int(width), int(height)), np.zeros((0, 2), np.float32))


def _canonical_pose(path=None, urls: list[str] | None = None, index: dict | None = None) -> Pose:
    """The canonical standard-pose keypoints, the same for every sample (``std_pose="canonical"``).

    In order: ``path`` (a std_pose.json-format file, e.g. the one saved with a checkpoint); the
    index's ``standard_pose`` (format version 2: what render used, at the render resolution); for
    a version 1 index or shards without an index, the reference figure at the standard camera at
    the size of the first sample's std_pose.json.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"canonical pose not found: {p} (expected a std_pose.json-format file)")
        try:
            return parse_pose(p.read_bytes())
        except ValueError as exc:
            raise UserInputError(f"{p}: not a pose file ({exc})") from None
    if index is not None and index["standard_pose"] is not None:
        return parse_pose(index["standard_pose"])
    for url in urls or []:
        if _is_remote(url):
            continue
        try:
            data = _first_member(url, "std_pose.json")
            if data is not None:
                return _reference_standard_pose(*parse_pose(data).size)
        except (OSError, tarfile.TarError, ValueError):
            continue  # a damaged first shard: try the next one
    raise UserInputError("no canonical standard pose: pass canonical_pose=PATH (a std_pose.json) "
                         "or shards that contain std_pose.json")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

class _StandardMissing(Exception):
    """A format 3 pair whose character's standard cannot be read: (reason, detail)."""


class _ChecksumMismatch(ValueError):
    """A PNG member whose chunk CRCs do not match its bytes: damaged on disk or in transit."""


def _check_png(data: bytes) -> None:
    """The loader's damage check of a PNG member (``shards.png_problem``): ``_ChecksumMismatch``
    for a CRC that fails (the decoder might still return wrong pixels), ValueError for the rest."""
    why = png_problem(data)
    if why is not None:
        raise (_ChecksumMismatch if why.startswith("CRC mismatch") else ValueError)(why)


def _u8_tensor(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # PIL's arrays are read-only; torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


# Per image key: (scale, offset) of the float conversion x * scale + offset, and the float value
# of black (what a pose map's undrawn area becomes).
_RANGES = {"ref": (2.0 / 255.0, -1.0), "std": (2.0 / 255.0, -1.0), "ref_pose": (1.0 / 255.0, 0.0),
           "std_pose": (1.0 / 255.0, 0.0)}


def _convert_into(out: torch.Tensor, src_u8: torch.Tensor, key: str, dtype: str) -> None:
    """Write uint8 ``src_u8`` into ``out`` (same shape, any strides), converted for ``key``."""
    out.copy_(src_u8)
    if dtype == "float32":
        scale, offset = _RANGES[key]
        out.mul_(scale)
        if offset:
            out.add_(offset)


class _Cached:
    """A decoded image reused across samples (standards, canonical pose map), with its tensors."""

    __slots__ = ("array", "hwc", "chw")

    def __init__(self, array: np.ndarray, key: str, dtype: str):
        self.array = array
        torch_dtype = torch.float32 if dtype == "float32" else torch.uint8
        h, w = array.shape[:2]
        src = _u8_tensor(array)
        self.hwc = torch.empty((h, w, 3), dtype=torch_dtype)  # for batches (channels_last)
        _convert_into(self.hwc, src, key, dtype)
        self.chw = self.hwc.permute(2, 0, 1).contiguous()  # for single samples


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker, allocated in shared memory directly
    (what torch's default_collate does), so sending it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class _Composite:
    """A reference composite not written yet: ``collate`` writes it and its mask straight into the
    batch tensors (background window copy + one compiled pass over the character's box), so no
    intermediate canvas is made or copied."""

    __slots__ = ("placed", "background")

    def __init__(self, placed: PlacedReference, background: np.ndarray):
        self.placed, self.background = placed, background

    def write(self, out: np.ndarray, mask: np.ndarray) -> None:
        self.placed.write_into(out, mask, self.background)


def _composites_tensors(items: list[_Composite], dtype: str, batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref, ref_mask) of the composites: batched (B, 3, H, W) channels_last and (B, 1, H, W), or one
    sample's (3, H, W) and (1, H, W) contiguous. uint8 batches are written in place; otherwise each
    composite goes through one canvas-sized uint8 scratch, reused per sample (a batch-sized one would
    be fresh memory, page-faulted on every batch), converted into the output."""
    w, h = items[0].placed.size
    torch_dtype = torch.float32 if dtype == "float32" else torch.uint8
    masks = _empty((len(items), 1, h, w), torch.uint8)
    marr = masks.numpy()
    if batched and dtype == "uint8":  # the fast path: composited in place, nothing else to do
        out = _empty((len(items), h, w, 3), torch.uint8)
        arr = out.numpy()
        for b, it in enumerate(items):
            it.write(arr[b], marr[b, 0])
        return out.movedim(-1, 1), masks
    scratch = np.empty((h, w, 3), np.uint8)
    src = torch.from_numpy(scratch)
    if batched:
        out = _empty((len(items), h, w, 3), torch_dtype)
        for b, it in enumerate(items):
            it.write(scratch, marr[b, 0])
            _convert_into(out[b], src, "ref", dtype)
        ref = out.movedim(-1, 1)
    else:
        ref = _empty((3, h, w), torch_dtype)
        items[0].write(scratch, marr[0, 0])
        _convert_into(ref.permute(1, 2, 0), src, "ref", dtype)
    if dtype == "float32":
        m = _empty(tuple(masks.shape), torch.float32)
        m.copy_(masks)
        masks = m
    return ref, (masks if batched else masks[0])


def _images_tensor(items: list, key: str, dtype: str, batched: bool) -> torch.Tensor:
    """Per-sample images of one key -> tensor.

    batched: (B, 3, H, W) in channels_last memory (the HWC bytes as decoded, no transpose on the
    CPU); else (3, H, W) contiguous (items has one element). items: all ``_Cached`` or all
    ``RegionImage`` (mostly black pose maps: only the drawn box is converted).
    """
    first = items[0]
    torch_dtype = torch.float32 if dtype == "float32" else torch.uint8
    if isinstance(first, _Cached):
        if not batched:
            return first.chw.clone()
        out = _empty((len(items),) + tuple(first.hwc.shape), first.hwc.dtype)
        torch.stack([it.hwc for it in items], out=out)
        return out.movedim(-1, 1)
    if isinstance(first, RegionImage):
        w, h = first.size
    else:
        h, w = first.shape[:2]
    if batched:  # (B, H, W, 3) memory, seen as (B, 3, H, W) channels_last
        out = _empty((len(items), h, w, 3), torch_dtype)
        view = out.movedim(-1, 1)
    else:  # contiguous (1, 3, H, W) memory, written through an (1, H, W, 3) view
        view = _empty((len(items), 3, h, w), torch_dtype)
        out = view.permute(0, 2, 3, 1)
    for b, it in enumerate(items):
        if isinstance(it, RegionImage):
            out[b].fill_(0.0 if dtype != "float32" else _RANGES[key][1])
            rh, rw = it.region.shape[:2]
            if rh and rw:
                _convert_into(out[b, it.y0:it.y0 + rh, it.x0:it.x0 + rw], _u8_tensor(it.region), key, dtype)
        else:
            _convert_into(out[b], _u8_tensor(it), key, dtype)
    return view if batched else view[0]


def to_model_range(batch: dict) -> dict:
    """Convert a ``dtype="uint8"`` sample or batch to the float32 layout (on its own device)."""
    out = dict(batch)
    for k in IMAGE_KEYS:
        if k in out and out[k].dtype == torch.uint8:
            scale, offset = _RANGES[k]
            out[k] = out[k].to(torch.float32).mul_(scale).add_(offset)
    if "ref_mask" in out and out["ref_mask"].dtype == torch.uint8:
        out["ref_mask"] = out["ref_mask"].to(torch.float32)
    return out


def _seeded(*parts) -> random.Random:
    # String seeds hash through SHA-512: identical in every process, unlike hash() of str.
    return random.Random(":".join(str(p) for p in parts))


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

class RenderPairDataset(torch.utils.data.IterableDataset):
    """A torch ``IterableDataset`` of loader samples (see the module doc for what it yields).

    shards: anything ``resolve_shards`` accepts (checked now: a missing shard is an error here).
    backgrounds: list of image paths, a folder or an assets folder (None: procedural backgrounds).
    config: a LoaderConfig (keyword overrides are applied on top).
    Call ``set_epoch(e)`` before each epoch to reshuffle (with non-persistent workers).
    ``stats`` holds the counts of the last iteration in this process (num_workers=0).
    """

    def __init__(self, shards, backgrounds=None, config: LoaderConfig | None = None, **overrides):
        cfg = config or LoaderConfig()
        if overrides:
            cfg = LoaderConfig(**{**asdict(cfg), **overrides})
        self.config = cfg
        self.urls, index, root = _resolve(shards, cfg.split)
        self.annotations = None
        if cfg.estimated_share > 0:  # checked here, in the main process: a missing set is one line
            self.annotations = cfg.annotations or str(Path(root or ".") / ANNOTATION_DIR)
            AnnotationReader(self.annotations)
        if not self.urls:
            raise UserInputError(f"shards: {shards} lists no shard")
        self.background_paths = list_background_images(backgrounds)
        self.epoch = 0
        self.stats = LoaderStats()  # the last in-process pass
        self._done = LoaderStats()  # finished passes of this process and its workers
        self._reported = 0
        self._reports = _WorkerReports()
        # Read here, in the main process, so every rank and worker joins the same standards.
        self.standard_paths = {c: str(p) for c, p in standard_paths(root, index).items()} if index else {}
        characters = (index or {}).get("characters") or {}
        self.character_poses = {c: r["standard_pose"] for c, r in characters.items()}
        need_canonical = cfg.std_pose == "canonical" or cfg.canonical_share > 0
        self.canonical_pose = _canonical_pose(cfg.canonical_pose, self.urls, index) if need_canonical else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if torch.utils.data.get_worker_info() is None:
            self.report()

    def readers(self, num_workers: int) -> int:
        """Readers this process group will run: world_size x max(1, num_workers)."""
        return self._world()[1] * max(1, num_workers)

    def check_readers(self, num_workers: int) -> None:
        """Epoch mode: every reader needs a shard, else DDP ranks wait forever on an empty one."""
        if self.config.resampled:
            return
        n = self.readers(num_workers)
        if len(self.urls) < n:
            rank, world = self._world()
            raise UserInputError(
                f"{len(self.urls)} shards for {world} rank(s) x {max(1, num_workers)} worker(s) = {n} readers: "
                f"each reader needs at least one shard in epoch mode; use fewer workers, more shards, "
                f"or resampled=True")

    def _world(self) -> tuple[int, int]:
        cfg = self.config
        if cfg.rank is not None or cfg.world_size is not None:
            world = int(cfg.world_size or 1)
            rank = int(cfg.rank or 0)
            if not 0 <= rank < world:
                raise UserInputError(f"rank={rank} is outside world_size={world}")
            return rank, world
        import webdataset as wds

        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return rank, world

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    # -- the pipeline ------------------------------------------------------------------------
    def pipeline(self, stats: LoaderStats):
        """The stock webdataset pipeline for this reader (rank and worker), as a DataPipeline."""
        import webdataset as wds

        cfg = self.config
        rank, world = self._world()
        worker, nworkers = self._worker()
        if cfg.resampled:
            reader_id = rank * 1000 + worker
            stages = [wds.ResampledShards(self.urls, seed=_seeded(cfg.seed, self.epoch).getrandbits(31),
                                          worker_seed=lambda: reader_id, deterministic=True)]
        else:
            self.check_readers(nworkers)
            epoch_seed = _seeded(cfg.seed, self.epoch, "shards").getrandbits(63)

            def shuffle_and_split(src):
                # The same permutation on every rank (seed + epoch only), then wds.split_by_node
                # followed by wds.split_by_worker, with explicit rank/worker numbers.
                urls = list(src)
                random.Random(epoch_seed).shuffle(urls)
                yield from islice(islice(urls, rank, None, world), worker, None, nworkers)

            stages = [wds.SimpleShardList(self.urls), shuffle_and_split]
        stages.append(functools.partial(_read_shards, stats=stats))
        if cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial,
                                      rng=_seeded(cfg.seed, self.epoch, rank, worker, "samples")))
        processor = _SampleProcessor(self, stats, _seeded(cfg.seed, self.epoch, rank, worker, "augment"))
        stages.append(wds.map(processor))
        if cfg.batch_size:
            stages.append(wds.batched(cfg.batch_size, collation_fn=processor.collate, partial=cfg.partial_batches))
        else:
            stages.append(wds.map(processor.finish))
        pipe = wds.DataPipeline(*stages)
        if cfg.resampled and cfg.epoch_length:
            pipe = pipe.with_epoch(cfg.epoch_length)
        return pipe

    def __iter__(self):
        stats = self.stats = LoaderStats()
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            try:
                yield from self.pipeline(stats)
            finally:
                self._done.merge(stats)
                self.report()
            return
        rank, _ = self._world()
        name = f"r{rank}-w{worker.id}-{os.getpid()}-{next(_PASSES)}"
        stats.on_skip = functools.partial(self._reports.write_every, name, stats)
        try:
            yield from self.pipeline(stats)
        finally:
            self._reports.write(name, stats, final=True)

    def loader_stats(self) -> LoaderStats:
        """Everything read and refused so far by this dataset in this process and in its DataLoader
        workers (their passes so far, finished or running), merged."""
        return self._reports.collect(self._done)

    def report(self) -> LoaderStats:
        """Log ONE warning summary of the samples refused since the last report, across this process
        and all its DataLoader workers (``serialgen.dataset.loader`` logger), and return the totals.

        Called when an in-process pass ends, by ``set_epoch`` (the previous epoch's workers are done),
        at the end of each pass of ``make_loader``'s loader, and when the dataset goes away; the
        training code may call it at any time (e.g. to log the counts)."""
        total = self.loader_stats()
        new = total.total_skipped - self._reported
        if new > 0:
            rank, _ = self._world()
            log.warning("loader (rank %d, all workers): %s", rank, total.summary())
            self._reported = total.total_skipped
        return total

class _SampleProcessor:
    """Decode, place and draw one raw sample (the ``map`` stage), plus its collation, which writes
    the composite (background window + character) and its mask straight into the batch tensors."""

    def __init__(self, ds: RenderPairDataset, stats: LoaderStats, rng: random.Random):
        cfg = ds.config
        self.cfg, self.stats, self.rng = cfg, stats, rng
        self.composite_cfg = cfg.composite_config()
        self.backgrounds = BackgroundPool(ds.background_paths, cfg.resolution, rng, cfg.background_pool,
                                          cfg.background_refresh, cfg.background_zoom, cfg.background_jitter)
        self.std_cache: OrderedDict = OrderedDict()
        self.std_failures: dict = {}  # character -> (reason, detail): standards that cannot be read
        self.standard_paths, self.character_poses = ds.standard_paths, ds.character_poses
        self.estimates = EstimateMixer(ds.annotations, cfg.estimated_share, cfg.resolution) if ds.annotations else None
        self.canonical_map = None
        if ds.canonical_pose is not None:
            p = ds.canonical_pose
            t = fit_transform(p.size, cfg.resolution)
            self.canonical_map = _Cached(draw_pose_map(p.transformed(*t, cfg.resolution), cfg.resolution), "std_pose", cfg.dtype)

    def _standard(self, sample: dict, meta: dict, url: str) -> tuple[_Cached, _Cached]:
        """(std, the character's own std_pose map), decoded once per character (LRU cache of
        ``cfg.std_cache`` entries). Raises ``_StandardMissing`` (counted by the caller) for a format 3
        pair whose standard tar is missing or damaged, and the decode errors for a damaged standard.

        Format 3: the standard is read from the character's standard tar (the index's
        ``standard_shards``, else ``standard/<character key>.tar`` beside the shard) on a miss; a
        standard that cannot be read is remembered, so its pairs do not read it again. Formats 1 and
        2: each pair carries ``std.png``; a hit is confirmed by comparing the stored bytes (a
        character re-rendered differently still decodes). Shards hold one character's pairs, so the
        hit rate is ~98-100 %. The pose map comes from the index's ``characters[id].standard_pose``,
        else the sample's ``std_pose.json``.
        """
        char = meta.get("character", meta.get("character_id"))
        carried = sample.get("std.png")
        if not isinstance(char, (str, int)):
            if carried is None:
                raise _StandardMissing("missing standard", "meta.json names no character")
            char = zlib.crc32(carried)
        pose_bytes = sample["std_pose.json"]
        hit = self.std_cache.get(char)
        # A hit needs the pair's std_pose.json (and, formats 1-2, its std.png) to be the bytes the entry
        # was made from: a pair whose copy differs (damaged) is checked again, not passed on.
        if hit is not None and hit[1] == pose_bytes and (carried is None or hit[0] == carried):
            self.std_cache.move_to_end(char)
            self.stats.std_cache_hits += 1
            return hit[2], hit[3]
        self.stats.std_cache_misses += 1
        own = parse_pose(pose_bytes)  # the pair's copy is checked even when the index's is drawn
        if carried is None:
            std_bytes = self._standard_tar(char, url)
        else:
            std_bytes = carried
            if self.cfg.integrity_check:
                _check_png(std_bytes)
        std = Image.fromarray(decode_png(std_bytes, "RGB"))
        # Bilinear: the resample the loader's standards have always had (letterbox's default is bicubic).
        canvas, t = letterbox(std, self.cfg.resolution, resample="bilinear")
        listed = self.character_poses.get(char)
        pose = parse_pose(listed) if listed is not None else own
        if pose.size != std.size:
            raise ValueError(f"std_pose.json is for {pose.size}, std.png is {std.size}")
        std_pose = _Cached(draw_pose_map(pose.transformed(*t, self.cfg.resolution), self.cfg.resolution), "std_pose",
                           self.cfg.dtype)
        entry = (carried, pose_bytes, _Cached(np.asarray(canvas), "std", self.cfg.dtype), std_pose)
        self.std_cache[char] = entry
        if len(self.std_cache) > self.cfg.std_cache:
            self.std_cache.popitem(last=False)
        return entry[2], entry[3]

    def _standard_tar(self, char: str, url: str) -> bytes:
        """std.png of a format 3 character, from its standard tar."""
        failed = self.std_failures.get(char)
        if failed is not None:
            raise _StandardMissing(*failed)
        path = self.standard_paths.get(char)
        if path is None and not _is_remote(url):
            path = str(Path(url).parent / STANDARD_DIR / f"{character_key(char)}.tar")
        try:
            if path is None:
                raise _StandardMissing("missing standard", f"no standard known for {char} (a remote shard)")
            if not Path(path).is_file():
                raise _StandardMissing("missing standard", f"{_shard_label(path)} not found")
            try:
                data = read_standard(path, char)["std.png"]
            except TarSetError as exc:
                raise _StandardMissing("corrupt standard", str(exc)) from None
            if self.cfg.integrity_check:
                why = png_problem(data)
                if why is not None:
                    raise _StandardMissing("checksum mismatch in the standard" if why.startswith("CRC mismatch")
                                           else "corrupt standard", f"{_shard_label(path)}: std.png: {why}")
            return data
        except _StandardMissing as exc:
            self.std_failures[char] = exc.args  # every pair of the character: counted, not read again
            raise

    def _std_pose(self, own: _Cached) -> _Cached:
        """The standard pose map of a sample: the character's own (``std_pose="per_character"``,
        the default) or, with probability ``canonical_share`` (or always, ``"canonical"``), the
        canonical map of the reference figure (what inference on real photos has)."""
        if self.canonical_map is None:
            return own
        share = 1.0 if self.cfg.std_pose == "canonical" else self.cfg.canonical_share
        if share >= 1.0 or self.rng.random() < share:
            return self.canonical_map
        return own

    def __call__(self, sample: dict):
        key, url = sample.get("__key__"), sample.get("__url__")
        shard = _shard_label(url)
        missing = [m for m in MEMBERS if m not in sample]
        if missing:
            self.stats.skip("incomplete sample", shard, key, f"lacks {', '.join(missing)}")
            return None
        member = "meta.json"
        try:
            meta = json.loads(sample["meta.json"])
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not an object")
            member = "ref_pose.json"
            pose = parse_pose(sample["ref_pose.json"])
            member = "ref.png"
            if self.cfg.integrity_check:
                _check_png(sample["ref.png"])
            ref = decode_png(sample["ref.png"], "RGBA")
            if pose.size != (ref.shape[1], ref.shape[0]):
                member = "ref_pose.json"
                raise ValueError(f"ref_pose.json is for {pose.size}, ref.png is {ref.shape[1]}x{ref.shape[0]}")
            member = "std.png/std_pose.json"
            std, own_pose = self._standard(sample, meta, url)
            std_pose = self._std_pose(own_pose)
            member = "ref.png"
            background = self.backgrounds.sample_array()
            placed = prepare_reference(ref, pose, self.composite_cfg, self.rng)
        except EmptyReferenceError:
            self.stats.skip("empty ref.png (fully transparent)", shard, key, "no opaque pixel")
            return None
        except _StandardMissing as exc:
            self.stats.skip(exc.args[0], shard, key, exc.args[1])
            return None
        except _ChecksumMismatch as exc:
            self.stats.skip(f"checksum mismatch in {member}", shard, key, str(exc))
            return None
        except _DECODE_ERRORS as exc:
            self.stats.skip(f"corrupt {member}", shard, key, f"{type(exc).__name__}: {str(exc)[:100]}")
            return None
        self.stats.samples += 1
        composite = _Composite(placed, background)
        ref_mask, ref_pose = composite, draw_pose_region(placed.pose, self.cfg.resolution)
        if self.estimates is not None:  # the estimator's mask and pose, placed like the render
            ref_mask, ref_pose = self.estimates.apply(url, key, placed, self.rng) or (ref_mask, ref_pose)
        return {
            "__key__": key, "__url__": url, "meta": meta,
            "ref": composite, "ref_mask": ref_mask, "ref_pose": ref_pose,
            "std": std, "std_pose": std_pose, "ref_keypoints": placed.pose.as_array(),
        }

    def collate(self, samples: list[dict], batched: bool = True) -> dict:
        """A batch: lists for key/url/meta, (B, ...) tensors for the rest (see the module doc)."""
        out = {k: [s[k] for s in samples] for k in ("__key__", "__url__", "meta")}
        out["ref"], out["ref_mask"] = _composites_tensors([s["ref"] for s in samples], self.cfg.dtype, batched)
        for i, s in enumerate(samples):  # the person estimator's mask replaces the exact one (estimated_share)
            if isinstance(s["ref_mask"], np.ndarray):
                (out["ref_mask"][i, 0] if batched else out["ref_mask"][0]).copy_(torch.from_numpy(s["ref_mask"]))
        for k in ("ref_pose", "std", "std_pose"):
            out[k] = _images_tensor([s[k] for s in samples], k, self.cfg.dtype, batched)
        kps = torch.from_numpy(np.stack([s["ref_keypoints"] for s in samples]))
        out["ref_keypoints"] = kps if batched else kps[0]
        return out

    def finish(self, s: dict) -> dict:
        """One sample's tensors, contiguous (C, H, W)."""
        out = self.collate([s], batched=False)
        for k in ("__key__", "__url__", "meta"):
            out[k] = out[k][0]
        return out


def make_loader(shards, backgrounds=None, config: LoaderConfig | None = None, num_workers: int = 2,
                **overrides):
    """A torch DataLoader over a RenderPairDataset: batching happens in the workers (``config.batch_size``),
    the DataLoader itself uses ``batch_size=None``. Checks shards against readers up front. When a
    pass ends, the samples refused by all its workers are logged as one summary."""
    ds = RenderPairDataset(shards, backgrounds, config, **overrides)
    ds.check_readers(num_workers)
    kw = {"prefetch_factor": 2} if num_workers > 0 else {}
    return _ReportingLoader(ds, batch_size=None, num_workers=num_workers, **kw)


class _ReportingLoader(torch.utils.data.DataLoader):
    """A DataLoader that logs its dataset's one summary of refused samples (all workers) when a pass
    over it ends or is abandoned."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        finally:
            self.dataset.report()


def open_dataset(spec, *, resolution: tuple[int, int] = DEFAULT_RESOLUTION, seed: int = 0, split: str = "train",
                 infinite: bool = False, backgrounds=None, **overrides) -> RenderPairDataset:
    """The training code's entry point: a RenderPairDataset yielding single samples (the training loop
    collates). ``infinite`` selects the resampled mode; ``backgrounds`` as in RenderPairDataset (None:
    procedural backgrounds, with a warning: real training wants real backgrounds)."""
    if backgrounds is None:
        log.warning("loader: no backgrounds given; compositing onto procedural colour fields")
    cfg = LoaderConfig(resolution=tuple(resolution), seed=seed, split=split, resampled=infinite, **overrides)
    return RenderPairDataset(spec, backgrounds, cfg)
