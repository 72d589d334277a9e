"""Scan motion files (BVH, and the actions inside glTF/GLB/FBX/.blend files) into motion records and
retargeted clips on the canonical skeleton. Blender-free: BVH is parsed in numpy; the actions of
files that need Blender are sampled by the probe the caller hands in (``probe.AssetProbe``; the
Blender one, ``render.asset_build.BlenderProbe``, reads each file in its own worker process with a
timeout, so a crashing importer costs one file).

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
from pathlib import Path

import numpy as np

from . import skeleton as sk
from .bone_maps import map_skeleton
from .bvh import BvhError, BvhMotion, read_bvh
from .manifest import file_stats, find_files, incremental_scan, make_record
from .probe import AssetProbe, MotionSamples, ProbeFailure
from .retarget import RetargetedMotion, SourceMotion, retarget

__all__ = ["MOTION_EXTS", "scan_motions", "retarget_bvh", "retarget_samples", "MOTION_CACHE_VERSION"]

MOTION_EXTS = {".bvh": "bvh", ".glb": "gltf", ".gltf": "gltf", ".fbx": "fbx", ".blend": "blend"}
MOTION_CACHE_VERSION = 1
DEFAULT_MAX_FPS = 30.0


def _stride(fps: float, max_fps: float) -> int:
    return max(1, int(round(fps / max_fps))) if fps > max_fps else 1


def _bvh_to_source(m: BvhMotion, name: str, max_fps: float = DEFAULT_MAX_FPS) -> SourceMotion:
    """A parsed BVH as a :class:`SourceMotion`, subsampled to at most ``max_fps``."""
    fps = 1.0 / m.frame_time if m.frame_time > 0 else 30.0
    frames = np.arange(0, m.n_frames, _stride(fps, max_fps))
    wr, wp = m.world(frames)
    bones = m.bones()
    heads = np.array([b["head"] for b in bones])
    tails = np.array([b["tail"] for b in bones])
    rest_rot = np.tile(np.eye(3), (len(bones), 1, 1))
    return SourceMotion(name, list(m.names), np.asarray(m.parents), heads, tails, rest_rot, wr, wp,
                        fps / _stride(fps, max_fps))


def retarget_bvh(path, max_fps: float = DEFAULT_MAX_FPS) -> tuple[RetargetedMotion, str]:
    """Read and retarget one BVH file; tries the Y-up convention, then Z-up. Returns (motion, up)."""
    problems = []
    for up in ("y", "z"):
        m = read_bvh(path, up=up)
        mapping = map_skeleton(m.bones())
        if mapping.accepted:
            src = _bvh_to_source(m, Path(path).stem, max_fps)
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
                 progress=None) -> tuple[list[dict], list[dict]]:
    """Scan motion files under ``paths`` -> (records, extra_motions). Unchanged files (same path and
    size/mtime, or same sha256) reuse their previous record and cached clips. BVH files are read
    here; the others through ``probe.sample_motions``."""
    out_dir = Path(out_dir)
    files = find_files(paths, MOTION_EXTS)

    def process(path: Path, sha: str) -> dict:
        ext = path.suffix.lower()
        kind = MOTION_EXTS.get(ext)
        rec_id = f"motion-{sha[:12]}"
        base = dict(path=str(path), sha256=sha)
        if kind is None:
            return make_record("motion", rec_id, "unknown", status="rejected", reason="unsupported_format",
                               detail=f"{path.name}: not a motion file", **base)
        try:
            if kind == "bvh":
                motion, up = retarget_bvh(path, max_fps)
                motions, extra = [motion], {"mapping": "names", "up_axis": up}
            else:
                samples = probe.sample_motions(path, max_fps)
                if isinstance(samples, ProbeFailure):
                    return make_record("motion", rec_id, kind, status="rejected", reason=samples.reason,
                                       detail=f"{path.name}: {samples.detail}", **base)
                if not samples.clips:
                    return make_record("motion", rec_id, kind, status="rejected", reason="no_motion",
                                       detail=f"{path.name}: no animation clips", **base)
                motions, extra = retarget_samples(samples, path.stem)
        except BvhError as e:
            return make_record("motion", rec_id, kind, status="rejected", reason="import_failed",
                               detail=str(e), **base)
        except ValueError as e:
            return make_record("motion", rec_id, kind, status="rejected", reason="not_humanoid",
                               detail=f"{path.name}: {e}", **base)
        if not motions:
            return make_record("motion", rec_id, kind, status="rejected", reason="no_motion",
                               detail=f"{path.name}: no animation clips", **base)
        _save_cache(_cache_path(out_dir, rec_id), motions)
        clips = [{"name": m.name, "frames": int(m.angles.shape[0]), "fps": round(float(m.fps), 3)} for m in motions]
        return make_record("motion", rec_id, kind, detail=f"{len(clips)} clip(s) retargeted", **base,
                           stats={"clips": clips, "n_frames": sum(c["frames"] for c in clips), **extra},
                           motion_file=f"motions/{rec_id}.npz", skeleton_version=sk.SKELETON_VERSION)

    def on_error(path: Path, sha: str, exc: Exception) -> dict:
        kind = MOTION_EXTS.get(path.suffix.lower(), "unknown")
        return make_record("motion", f"motion-{sha[:12]}", kind, status="rejected", reason="import_failed",
                           detail=f"{path.name}: {type(exc).__name__}: {exc}", path=str(path), sha256=sha)

    records, _counts = incremental_scan(files, previous_records or (), process, on_error=on_error,
                                        progress=progress)
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
