"""Scan motion files (BVH, and the actions inside glTF/GLB/FBX/.blend files) into motion records and
retargeted clips on the canonical skeleton. Blender-free. Every file is read through the probe the
caller hands in (``probe.AssetProbe``; the one the command uses, ``render.asset_build.BlenderProbe``,
reads each file in its own worker process with a timeout, so a crashing, hanging or exhausting file
costs one file): BVH files are parsed in numpy and retargeted by ``retarget_bvh`` in the
``motion_worker`` process, the actions of files that need Blender are sampled by Blender workers.

Records (``motions.jsonl``, schema ``serialgen.motion/1``): id ``motion-<sha256[:12]>``, kind
``bvh`` | ``gltf`` | ``fbx`` | ``blend``, stats ``{"clips": [{"name", "frames", "fps"}], "mapping":
method, "mapped_joints": n, "up_axis"}``. Retargeted clips are cached in ``OUT/motions/<id>.npz`` so a
re-scan of an unchanged file costs nothing. ``extra_motions`` entries are dicts
``{"name", "angles" (F, J, 3) float32 degrees, "root_translation" (F, 3) float32, "fps"}`` for
``poses.build_pose_library``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import skeleton as sk
from .bone_maps import map_skeleton
from .bvh import BvhMotion, read_bvh
from .manifest import DEFAULT_MAX_BYTES, entry_record, file_stats, incremental_scan, make_record, walk_inputs
from .probe import AssetProbe, MotionSamples, ProbeFailure
from .retarget import RetargetedMotion, SourceMotion, retarget

__all__ = ["MOTION_EXTS", "SCAN_VERSION", "scan_motions", "retarget_bvh", "retarget_samples", "MOTION_CACHE_VERSION"]

MOTION_EXTS = {".bvh": "bvh", ".glb": "gltf", ".gltf": "gltf", ".fbx": "fbx", ".blend": "blend"}
MOTION_CACHE_VERSION = 1
DEFAULT_MAX_FPS = 30.0
# Records decided by older rules are decided again (2: BVH read in a worker, too_large, every file a record).
SCAN_VERSION = 2


def _bvh_to_source(m: BvhMotion, name: str) -> SourceMotion:
    """A parsed BVH (already subsampled by the parser: ``m.frame_step``) as a :class:`SourceMotion`."""
    fps = 1.0 / m.frame_time
    wr, wp = m.world()
    bones = m.bones()
    heads = np.array([b["head"] for b in bones])
    tails = np.array([b["tail"] for b in bones])
    rest_rot = np.tile(np.eye(3), (len(bones), 1, 1))
    return SourceMotion(name, list(m.names), np.asarray(m.parents), heads, tails, rest_rot, wr, wp,
                        fps / m.frame_step)


def retarget_bvh(path, max_fps: float = DEFAULT_MAX_FPS) -> tuple[RetargetedMotion, str]:
    """Read and retarget one BVH file; tries the Y-up convention, then Z-up. Returns (motion, up).
    Runs in the process that calls it: the asset build calls it through its probe, in a worker
    process with a timeout (``motion_worker``). Raises BvhError (a bad file) or ValueError (not a
    humanoid)."""
    problems = []
    for up in ("y", "z"):
        m = read_bvh(path, up=up, max_fps=max_fps)
        mapping = map_skeleton(m.bones())
        if mapping.accepted:
            src = _bvh_to_source(m, Path(path).stem)
            return retarget(src, mapping), up
        problems.append(f"{up}-up: {mapping.detail}")
    raise ValueError("skeleton not humanoid (" + "; ".join(problems) + ")")


def retarget_samples(samples: MotionSamples, file_stem: str) -> tuple[list[RetargetedMotion], dict]:
    """Retarget the clips a probe sampled from a Blender file; clips without frames are skipped.
    -> (motions named ``<file_stem>/<clip>``, {"mapping": method, "mapped_joints": n})."""
    bones = samples.bones
    mapping = map_skeleton(bones)
    if not mapping.accepted:
        raise ValueError(f"skeleton not humanoid ({mapping.detail})")
    names = [b["name"] for b in bones]
    parents = np.array([names.index(b["parent"]) if b.get("parent") in names else -1 for b in bones])
    heads = np.array([b["head"] for b in bones], dtype=np.float64)
    tails = np.array([b["tail"] for b in bones], dtype=np.float64)
    out = []
    for clip, rot, pos in zip(samples.clips, samples.rot, samples.pos):
        rot, pos = np.asarray(rot, dtype=np.float64), np.asarray(pos, dtype=np.float64)
        if rot.shape[0] == 0:
            continue
        src = SourceMotion(f"{file_stem}/{clip['name']}", names, parents, heads, tails,
                           np.asarray(samples.rest_rot, dtype=np.float64), rot, pos, float(clip.get("fps", 30.0)))
        out.append(retarget(src, mapping))
    return out, {"mapping": mapping.method, "mapped_joints": len(mapping.bone_map)}


def _cache_path(out_dir: Path, rec_id: str) -> Path:
    return out_dir / "motions" / f"{rec_id}.npz"


def _save_cache(path: Path, motions: list[RetargetedMotion]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"version": np.array(MOTION_CACHE_VERSION),
              "names": np.array(json.dumps([m.name for m in motions])),
              "fps": np.array([m.fps for m in motions], dtype=np.float64)}
    for k, m in enumerate(motions):
        arrays[f"angles_{k}"] = m.angles.astype(np.float32)
        arrays[f"trans_{k}"] = m.root_translation.astype(np.float32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _load_cache(path: Path) -> list[dict] | None:
    try:
        d = np.load(path, allow_pickle=False)
        if int(d["version"]) != MOTION_CACHE_VERSION:
            return None
        names = json.loads(str(d["names"]))
        return [{"name": n, "angles": d[f"angles_{k}"], "root_translation": d[f"trans_{k}"],
                 "fps": float(d["fps"][k])} for k, n in enumerate(names)]
    except (OSError, KeyError, ValueError):
        return None


def scan_motions(paths, out_dir, previous_records=(), *, probe: AssetProbe, max_fps: float = DEFAULT_MAX_FPS,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, workers: int | None = None,
                 progress=None) -> tuple[list[dict], list[dict]]:
    """Scan everything under ``paths`` -> (records, extra_motions); every file gets a record
    (``manifest.walk_inputs``). Unchanged files (same path and size/mtime, or same sha256, decided
    by the same rules: ``stats.scan``) reuse their previous record and cached clips. Every motion
    file is read through the probe, in a worker process with a timeout: BVH files by
    ``probe.retarget_bvh``, the others by ``probe.sample_motions``; ``workers`` at a time (default 2)."""
    out_dir = Path(out_dir)
    entries = walk_inputs(paths, MOTION_EXTS, max_bytes, what="motion")
    files = [e.path for e in entries if e.reason is None]
    key = {"version": SCAN_VERSION}
    previous_records = [r for r in previous_records or () if (r.get("stats") or {}).get("scan") == key
                        and r.get("reason") != "too_large"]
    by_path = {str(r.get("path")): r for r in previous_records if r.get("path")}

    def read(path: Path):
        if MOTION_EXTS[path.suffix.lower()] == "bvh":
            return probe.retarget_bvh(path, max_fps, max_bytes=max_bytes)
        return probe.sample_motions(path, max_fps, max_bytes=max_bytes)

    todo = [f for f in files if by_path.get(str(f)) is None
            or any(by_path[str(f)].get("stats", {}).get(k) != v for k, v in file_stats(f).items())]
    pool = ThreadPoolExecutor(max_workers=workers or max(1, min(2, os.cpu_count() or 1)))
    futures = {str(f): pool.submit(read, f) for f in todo}

    def process(path: Path, sha: str) -> dict:
        kind = MOTION_EXTS[path.suffix.lower()]
        rec_id = f"motion-{sha[:12]}"
        base = dict(path=str(path), sha256=sha)

        def rejected(reason, detail):
            detail = detail[len(path.name) + 2:] if detail.startswith(f"{path.name}: ") else detail
            return make_record("motion", rec_id, kind, status="rejected", reason=reason,
                               detail=f"{path.name}: {detail}", stats={"scan": key}, **base)

        fut = futures.get(str(path))
        res = fut.result() if fut is not None else read(path)
        if isinstance(res, ProbeFailure):
            return rejected(res.reason or "import_failed", res.detail or "import failed")
        if kind == "bvh":
            motion, up = res
            motions, extra = [motion], {"mapping": "names", "up_axis": up}
        else:
            if not res.clips:
                return rejected("no_motion", "no animation clips")
            try:
                motions, extra = retarget_samples(res, path.stem)
            except ValueError as e:
                return rejected("not_humanoid", str(e))
        if not motions:
            return rejected("no_motion", "no animation clips")
        _save_cache(_cache_path(out_dir, rec_id), motions)
        clips = [{"name": m.name, "frames": int(m.angles.shape[0]), "fps": round(float(m.fps), 3)} for m in motions]
        return make_record("motion", rec_id, kind, detail=f"{len(clips)} clip(s) retargeted", **base,
                           stats={"clips": clips, "n_frames": sum(c["frames"] for c in clips), **extra, "scan": key},
                           motion_file=f"motions/{rec_id}.npz", skeleton_version=sk.SKELETON_VERSION)

    def on_error(path: Path, sha: str, exc: Exception) -> dict:
        kind = MOTION_EXTS.get(path.suffix.lower(), "unknown")
        return make_record("motion", f"motion-{sha[:12]}", kind, status="rejected", reason="import_failed",
                           detail=f"{path.name}: {type(exc).__name__}: {exc}", path=str(path), sha256=sha,
                           stats={"scan": key})

    try:
        read_records, _counts = incremental_scan(files, previous_records, process, on_error=on_error,
                                                 progress=progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    by_file = {rec["path"]: rec for rec in read_records}
    records = [by_file[str(e.path)] if e.reason is None else entry_record("motion", "motion", "unknown", e)
               for e in entries]
    extra_motions: list[dict] = []
    for rec in records:
        if rec.get("status") != "accepted":
            continue
        cached = _load_cache(_cache_path(out_dir, rec["id"]))
        if cached is None:  # cache lost: redo this one file
            fresh = process(Path(rec["path"]), rec["sha256"])
            fresh["stats"] = {**fresh.get("stats", {}), **file_stats(rec["path"])}
            rec.clear()
            rec.update(fresh)
            cached = _load_cache(_cache_path(out_dir, rec["id"])) or []
        extra_motions.extend(cached)
    return records, extra_motions
