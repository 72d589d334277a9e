"""Estimated masks and keypoints beside the exact ones: train Stage I on the inputs it gets at inference.

On a real picture Stage I's reference mask and pose come from the person estimator
(:mod:`serialgen.dataset.person_estimate`); on renders they are exact. The annotation pass runs the
estimator once per rendered sample, on the render composited over a fixed background, and stores
what it found in a tar set of its own (format ``serialgen.annotations``), joined to the render shards
by key:

    SHARDS/annotations/index.json
    SHARDS/annotations/<split>/<shard>.tar     <key>.est_mask.png   (L: 255 = person, 0 = background)
                                               <key>.est_pose.json  (the *_pose.json format + scores,
                                                                     person, confidence, people, box)
    SHARDS/annotations/<split>/<shard>.json    the shard's quality against the exact ground truth

Both are in the render's own pixels, so the loader places them with the same transform as the
render (``RenderPairDataset`` with ``LoaderConfig.estimated_share``). A sample where no person was
found has an all-zero mask and ``"person": false``: the loader then gives Stage I the "no estimate"
inputs (zero mask, black pose), which Stage I's mask/pose dropout also trains on.

The fixed background: a person-free picture chosen by the sample key from ``backgrounds`` (pictures
on which the estimator itself finds a person are left out), else a procedural colour field seeded by
the key. The loader composites onto other backgrounds; the estimate's errors come mostly from the
character (its style, its pose, the framing) and little from the background (docs/estimator.md has
the measurement), and an estimate per loaded sample would cost ~10x the loader's time.

Quality (``quality.json``, also the command's report): per character, framing and in total: mask
IoU against the render's alpha (>= 128), PCK@0.05 and @0.1 of the frame height over the keypoints
visible in the exact annotation (an unreported keypoint counts as wrong), and the rate of samples
with no person found.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serialgen.dataset import tarset
from serialgen.dataset.posemap import Pose, parse_pose
from serialgen.errors import UserInputError

__all__ = [
    "SCHEMA",
    "ANNOTATION_DIR",
    "annotate_shard",
    "annotate_shards",
    "format_quality",
    "AnnotationReader",
    "EstimateMixer",
    "warp_mask",
]

ANNOTATION_DIR = "annotations"
SCHEMA = tarset.TarSetSchema(
    format="serialgen.annotations", version=1, readable=(1,), members=("est_mask.png", "est_pose.json"),
    shard_globs=("train/*.tar", "test/*.tar"), what="an annotation set written by `serialgen shards annotate`",
)
_QUALITY_KEYS = ("samples", "no_person", "iou_sum", "pck05", "pck10", "counted")  # sums: mergeable in any order


# ----------------------------------------------------------------------------------------- backgrounds

def _procedural(seed: str, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour field seeded by ``seed`` (the loader's procedural kind, deterministic)."""
    w, h = size
    r = random.Random(hashlib.sha256(seed.encode()).digest())
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 128 + 100 * np.sin(xx * r.uniform(0.003, 0.03) + yy * r.uniform(0.003, 0.03) + r.uniform(0, 6.3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _cover(path: str, size: tuple[int, int]) -> np.ndarray:
    """The picture resized to cover ``size`` and centre-cropped to it."""
    w, h = size
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    s = max(w / rgb.width, h / rgb.height)
    rw, rh = max(w, round(rgb.width * s)), max(h, round(rgb.height * s))
    rgb = rgb.resize((rw, rh), Image.Resampling.BILINEAR)
    x0, y0 = (rw - w) // 2, (rh - h) // 2
    return np.asarray(rgb.crop((x0, y0, x0 + w, y0 + h)))


def _background(key: str, size: tuple[int, int], paths: list[str]) -> np.ndarray:
    if not paths:
        return _procedural(key, size)
    pick = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % len(paths)
    return _cover(paths[pick], size)


def person_free(paths: list[str], estimator) -> tuple[list[str], list[str]]:
    """(kept, left out): the background pictures on which ``estimator`` finds no person."""
    kept, out = [], []
    for p in paths:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        (out if estimator(rgb).person else kept).append(p)
    return kept, out


# ----------------------------------------------------------------------------------------- one shard

def _encode_mask(foreground: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(foreground.astype(np.uint8) * 255, "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _empty_quality() -> dict[str, float]:
    return {k: 0 for k in _QUALITY_KEYS}


def annotate_shard(shard: str | Path, out_tar: str | Path, estimator, backgrounds: list[str],
                   limit: int | None = None) -> dict[str, Any]:
    """Annotate one render shard into ``out_tar`` (temp name + rename); returns its summary and quality
    ``{"tar": TarSummary fields, "quality": {character: {framing: counts}}}``, also written beside it
    as ``<shard>.json``."""
    from serialgen.dataset.person_estimate import mask_iou, pck

    out_tar = Path(out_tar)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    quality: dict[str, dict[str, dict[str, float]]] = {}
    with tarset.TarWriter(out_tar, SCHEMA) as writer:
        for n, (key, members) in enumerate(tarset.iter_samples(shard)):
            if limit is not None and n >= limit:
                break
            meta = json.loads(members["meta.json"])
            ref = np.asarray(Image.open(io.BytesIO(members["ref.png"])).convert("RGBA"))
            truth = parse_pose(members["ref_pose.json"])
            h, w = ref.shape[:2]
            alpha = ref[..., 3:4].astype(np.float32) / 255.0
            composite = (ref[..., :3] * alpha + _background(key, (w, h), backgrounds) * (1.0 - alpha) + 0.5).astype(np.uint8)
            found = estimator(composite)
            writer.write(key, {"est_mask.png": _encode_mask(found.foreground()),
                               "est_pose.json": tarset_json(found.pose_record(getattr(estimator, "name", "estimator")))})
            character = str(meta.get("character") or meta.get("character_id") or "?")
            framing = str((meta.get("view") or {}).get("framing") or meta.get("framing") or "?")
            q = quality.setdefault(character, {}).setdefault(framing, _empty_quality())
            q["samples"] += 1
            q["no_person"] += int(not found.person)
            q["iou_sum"] += mask_iou(found.foreground(), ref[..., 3] >= 128)
            c05, counted, _ = pck(found.pose, truth, 0.05 * h)
            c10, _, _ = pck(found.pose, truth, 0.1 * h)
            q["pck05"] += c05
            q["pck10"] += c10
            q["counted"] += counted
        summary = writer.close()
    record = {"tar": {"bytes": summary.bytes, "sha256": summary.sha256, "samples": summary.samples},
              "quality": quality}
    tmp = out_tar.with_name(f".{out_tar.stem}.json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, out_tar.with_suffix(".json"))
    return record


def tarset_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------------------------------- the pass

class _ShardAnnotator:
    """Ray Data actor: one estimator per actor, whole shards per call."""

    def __init__(self, root: str, out: str, backgrounds: list[str], limit: int | None):
        from serialgen.dataset.person_estimate import MediaPipeEstimator

        self.root, self.out, self.backgrounds, self.limit = Path(root), Path(out), backgrounds, limit
        self.estimator = MediaPipeEstimator()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for rel in batch["path"]:
            annotate_shard(self.root / rel, self.out / rel, self.estimator, self.backgrounds, self.limit)
        return {"path": list(batch["path"])}


def _completed(out: Path, rel: str) -> bool:
    return (out / rel).is_file() and (out / rel).with_suffix(".json").is_file()


def annotate_shards(shards: str | Path, out: str | Path | None = None, *, backgrounds: str | Path | None = None,
                    workers: int = 0, address: str | None = None, limit_per_shard: int | None = None,
                    progress: bool = True, estimator=None) -> dict[str, Any]:
    """Annotate every shard of a render set not yet annotated; write the index and ``quality.json``;
    return the report (shards annotated now / kept, seconds per sample, quality, left-out backgrounds).

    ``workers`` 0: in this process (``estimator``, default a :class:`MediaPipeEstimator`); N: N Ray
    actors (``init_ray``: a local cluster on loopback, or ``address``)."""
    from tqdm import tqdm

    from serialgen.dataset.compositing import list_background_images
    from serialgen.dataset.person_estimate import MediaPipeEstimator
    from serialgen.dataset.shards import read_index

    root = Path(shards)
    index = read_index(root)
    out = Path(out) if out is not None else root / ANNOTATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    rels = [s["path"] for s in index["shards"] if "/standard/" not in s["path"]]
    todo = [r for r in rels if not _completed(out, r)]
    own = estimator is None
    estimator = estimator or MediaPipeEstimator()
    t0 = time.perf_counter()
    try:
        paths, left_out = person_free(list_background_images(backgrounds), estimator) if backgrounds else ([], [])
        if backgrounds and not paths:
            raise UserInputError(f"--backgrounds {backgrounds}: the estimator finds a person on every picture")
        if todo and workers <= 0:
            for rel in tqdm(todo, desc="annotate", unit="shard", disable=not progress):
                annotate_shard(root / rel, out / rel, estimator, paths, limit_per_shard)
        elif todo:
            import ray

            from serialgen.ray_local import init_ray

            started = init_ray(address, log_to_driver=False, **({} if address else {"num_cpus": os.cpu_count() or 1}))
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                ds = ray.data.from_items([{"path": r} for r in todo], override_num_blocks=len(todo)).map_batches(
                    _ShardAnnotator, fn_constructor_kwargs={"root": str(root.resolve()), "out": str(out.resolve()),
                                                            "backgrounds": paths, "limit": limit_per_shard},
                    batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(todo))), num_cpus=1)
                with tqdm(total=len(todo), desc="annotate", unit="shard", disable=not progress) as bar:
                    for _ in ds.iter_rows():
                        bar.update(1)
            finally:
                if started:
                    ray.shutdown()
    finally:
        if own:
            estimator.close()
    seconds = time.perf_counter() - t0
    entries, quality, annotated = [], {}, 0
    for rel in rels:
        record = json.loads((out / rel).with_suffix(".json").read_text())
        split = rel.split("/", 1)[0]
        entries.append({"path": rel, "split": split, **record["tar"]})
        for character, framings in record["quality"].items():
            for framing, q in framings.items():
                acc = quality.setdefault(character, {}).setdefault(framing, _empty_quality())
                for k in _QUALITY_KEYS:
                    acc[k] += q[k]
        annotated += record["tar"]["samples"] if rel in todo else 0
    names = {cid: (c or {}).get("name") or cid for cid, c in (index.get("characters") or {}).items()}
    report = {"shards": len(rels), "shards_annotated_now": len(todo), "shards_kept": len(rels) - len(todo),
              "samples_annotated_now": annotated, "seconds": round(seconds, 2),
              "seconds_per_sample": round(seconds / annotated, 4) if annotated else None,
              "estimator": getattr(estimator, "name", None), "backgrounds": len(paths) or "procedural",
              "backgrounds_with_a_person": left_out, "quality": _summarize(quality, names)}
    tarset.write_index(out, SCHEMA, {"shards": entries, "render_set": str(root.resolve()),
                                     "estimator": report["estimator"], "backgrounds": report["backgrounds"]})
    (out / "quality.json").write_text(json.dumps(report["quality"], indent=1, sort_keys=True))
    return report


def _rates(q: dict[str, float]) -> dict[str, float | int]:
    n, counted = q["samples"], q["counted"]
    found = n - q["no_person"]
    return {"samples": int(n), "no_person_rate": round(q["no_person"] / n, 4) if n else None,
            "mask_iou": round(q["iou_sum"] / n, 4) if n else None,
            # a sample without a person has an empty mask (IoU 0): the IoU where one was found apart
            "mask_iou_found": round(q["iou_sum"] / found, 4) if found else None,
            "pck@0.05": round(q["pck05"] / counted, 4) if counted else None,
            "pck@0.1": round(q["pck10"] / counted, 4) if counted else None}


def _summarize(quality: dict[str, dict[str, dict[str, float]]], names: dict[str, str]) -> dict[str, Any]:
    total, per_framing, per_character = _empty_quality(), {}, {}
    for character, framings in sorted(quality.items()):
        acc = _empty_quality()
        for framing, q in framings.items():
            f = per_framing.setdefault(framing, _empty_quality())
            for k in _QUALITY_KEYS:
                acc[k] += q[k]
                f[k] += q[k]
                total[k] += q[k]
        per_character[character] = {"name": names.get(character, character)} | _rates(acc)
    return {"total": _rates(total), "per_framing": {k: _rates(v) for k, v in sorted(per_framing.items())},
            "per_character": per_character}


def format_quality(report: dict[str, Any]) -> str:
    """The report as a table: one row per character, per framing, and the total."""
    q = report["quality"]
    rows = [("character", "samples", "no person", "mask IoU", "IoU found", "PCK@0.05", "PCK@0.1")]

    def row(name, r):
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        return (name, str(r["samples"]), fmt(r["no_person_rate"]), fmt(r["mask_iou"]), fmt(r["mask_iou_found"]),
                fmt(r["pck@0.05"]), fmt(r["pck@0.1"]))

    rows += [row(c["name"], c) for c in q["per_character"].values()]
    rows += [row(f"[{f}]", r) for f, r in q["per_framing"].items()]
    rows.append(row("total", q["total"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    per = report["seconds_per_sample"]
    lines.append(f"{report['shards_annotated_now']} shards annotated now, {report['shards_kept']} kept"
                 + (f"; {per:.3f} s per sample" if per else "") + f"; estimator {report['estimator']}; backgrounds: "
                 f"{report['backgrounds']}" + (f" ({len(report['backgrounds_with_a_person'])} left out: a person on them)"
                                               if report["backgrounds_with_a_person"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the loader side

def warp_mask(foreground: np.ndarray, transform: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The render-frame person mask placed on the canvas like the render (x' = sx x + tx, y' = sy y + ty):
    (H, W) uint8 background mask, 1 = background (outside the render: background). Nearest sampling."""
    sx, sy, tx, ty = transform
    w, h = size
    image = Image.fromarray(foreground.astype(np.uint8) * 255, "L")
    # PIL's AFFINE maps output pixel centres to input: x = (x' - tx) / sx.
    placed = image.transform((w, h), Image.Transform.AFFINE, (1 / sx, 0, -tx / sx, 0, 1 / sy, -ty / sy),
                             resample=Image.Resampling.NEAREST, fillcolor=0)
    return (np.asarray(placed) < 128).astype(np.uint8)


class AnnotationReader:
    """Random access to an annotation set by (render shard URL, key), for the loader.

    ``root``: the annotation folder (its index is read once). A render shard ``.../<split>/<name>.tar``
    maps to ``root/<split>/<name>.tar``; member offsets are scanned once per tar (an LRU of ``cache``
    tars). ``lookup`` returns (person foreground (H, W) bool, `Pose`, person found) or None when the
    sample has no annotation (a shard annotated with ``--limit-per-shard``, or not at all).
    """

    def __init__(self, root: str | Path, cache: int = 16):
        self.root = Path(root)
        tarset.read_index(self.root, SCHEMA)
        self.cache = cache
        self._tables: OrderedDict[str, dict | None] = OrderedDict()

    def _table(self, url: str) -> tuple[Path, dict] | None:
        parts = Path(url).parts
        path = self.root / parts[-2] / parts[-1] if len(parts) >= 2 else self.root / parts[-1]
        key = str(path)
        if key not in self._tables:
            table = {k: v for k, v in tarset.scan_shard(path)} if path.is_file() else None
            self._tables[key] = table
            if len(self._tables) > self.cache:
                self._tables.popitem(last=False)
        table = self._tables[key]
        return None if table is None else (path, table)

    def lookup(self, url: str, key: str) -> tuple[np.ndarray, Pose, bool] | None:
        found = self._table(url)
        if found is None or key not in found[1]:
            return None
        path, table = found
        members = table[key]
        mask = np.asarray(Image.open(io.BytesIO(tarset.read_member(path, *members["est_mask.png"]))).convert("L")) >= 128
        record = json.loads(tarset.read_member(path, *members["est_pose.json"]))
        return mask, parse_pose(record), bool(record.get("person"))


class EstimateMixer:
    """The loader's side of train-as-you-infer: with probability ``share`` a sample's reference mask and
    pose map are the estimator's (from the annotation set at ``root``), placed like the render.

    ``apply(url, key, placed, rng)`` -> (mask (H, W) uint8 1 = background, pose map (H, W, 3) uint8),
    or None to keep the exact ones (not drawn, or no annotation for this sample). No person found:
    a zero mask and a black map, Stage I's "no estimate" inputs. One ``rng.random()`` draw per sample,
    only when ``share`` > 0, so a loader without estimates yields the same samples as before.
    """

    def __init__(self, root: str | Path, share: float, resolution: tuple[int, int]):
        if not 0.0 <= share <= 1.0:
            raise UserInputError(f"estimated_share={share}: expected a probability in [0, 1]")
        self.reader = AnnotationReader(root)
        self.share, self.resolution = float(share), tuple(resolution)
        self.used = self.missing = 0

    def apply(self, url: str, key: str, placed, rng: random.Random) -> tuple[np.ndarray, np.ndarray] | None:
        from serialgen.dataset.posemap import draw_pose_map

        if self.share <= 0 or rng.random() >= self.share:
            return None
        found = self.reader.lookup(url, key)
        if found is None:
            self.missing += 1
            return None
        self.used += 1
        foreground, pose, person = found
        w, h = self.resolution
        if not person:
            return np.zeros((h, w), np.uint8), np.zeros((h, w, 3), np.uint8)
        mask = warp_mask(foreground, placed.transform, self.resolution)
        return mask, draw_pose_map(pose.transformed(*placed.transform, self.resolution), self.resolution)
