"""Scan motion files (BVH, and the actions inside glTF/GLB/FBX/.blend files) into motion records and
retargeted clips on the canonical skeleton. Blender-free: BVH is parsed in numpy; files that need
Blender are read by a worker subprocess (``python -m serialgen.render.inspect_asset FILE --motions``)
with a timeout, so a crashing importer costs one file.

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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from . import skeleton as sk
from .bone_maps import map_skeleton
from .bvh import BvhError, BvhMotion, read_bvh
from .manifest import file_stats, find_files, incremental_scan, make_record
from .retarget import RetargetedMotion, SourceMotion, retarget

__all__ = ["MOTION_EXTS", "find_motion_files", "scan_motions", "bvh_to_source", "retarget_bvh",
           "motions_from_worker_npz", "MOTION_CACHE_VERSION"]

MOTION_EXTS = {".bvh": "bvh", ".glb": "gltf", ".gltf": "gltf", ".fbx": "fbx", ".blend": "blend"}
MOTION_CACHE_VERSION = 1
DEFAULT_MAX_FPS = 30.0
WORKER_TIMEOUT_S = float(os.environ.get("SERIALGEN_IMPORT_TIMEOUT", "120"))


def find_motion_files(paths: Iterable) -> list[Path]:
    """MOTION_EXTS files under ``paths``; see ``manifest.find_files``."""
    return find_files(paths, MOTION_EXTS)


def _stride(fps: float, max_fps: float) -> int:
    return max(1, int(round(fps / max_fps))) if fps > max_fps else 1


def bvh_to_source(m: BvhMotion, name: str, max_fps: float = DEFAULT_MAX_FPS) -> SourceMotion:
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
            src = bvh_to_source(m, Path(path).stem, max_fps)
            return retarget(src, mapping), up
        problems.append(f"{up}-up: {mapping.detail}")
    raise ValueError("skeleton not humanoid (" + "; ".join(problems) + ")")


def motions_from_worker_npz(npz_path, file_stem: str, max_fps: float = DEFAULT_MAX_FPS) -> tuple[list, dict]:
    """Retarget the clips a worker sampled from a Blender file (``inspect_asset --motions``).

    The npz holds ``bones`` (JSON), ``rest_rot`` (B, 3, 3), and per clip k ``rot_k`` (F, B, 3, 3),
    ``pos_k`` (F, B, 3) plus ``clips`` (JSON list of {"name", "fps"}).
    """
    data = np.load(npz_path, allow_pickle=False)
    bones = json.loads(str(data["bones"]))
    clips = json.loads(str(data["clips"]))
    mapping = map_skeleton(bones)
    if not mapping.accepted:
        raise ValueError(f"skeleton not humanoid ({mapping.detail})")
    names = [b["name"] for b in bones]
    parents = np.array([names.index(b["parent"]) if b.get("parent") in names else -1 for b in bones])
    heads = np.array([b["head"] for b in bones], dtype=np.float64)
    tails = np.array([b["tail"] for b in bones], dtype=np.float64)
    out = []
    for k, clip in enumerate(clips):
        rot, pos = data[f"rot_{k}"].astype(np.float64), data[f"pos_{k}"].astype(np.float64)
        if rot.shape[0] == 0:
            continue
        src = SourceMotion(f"{file_stem}/{clip['name']}", names, parents, heads, tails,
                           data["rest_rot"].astype(np.float64), rot, pos, float(clip.get("fps", 30.0)))
        out.append(retarget(src, mapping))
    return out, {"mapping": mapping.method, "mapped_joints": len(mapping.bone_map)}


def _run_worker(path: Path, out_npz: Path, max_fps: float, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "serialgen.render.inspect_asset", str(path), "--motions", str(out_npz),
           "--max-fps", str(max_fps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": "import_timeout", "detail": f"import took longer than {timeout:.0f} s"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"ok": False, "reason": "import_failed", "detail": f"importer crashed: {tail[0][:300]}"}


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


def scan_motions(paths, out_dir, previous_records=(), *, max_fps: float = DEFAULT_MAX_FPS,
                 timeout: float = WORKER_TIMEOUT_S, progress=None) -> tuple[list[dict], list[dict]]:
    """Scan motion files under ``paths`` -> (records, extra_motions). Unchanged files (same path and
    size/mtime, or same sha256) reuse their previous record and cached clips."""
    out_dir = Path(out_dir)
    files = find_motion_files(paths)

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
                with tempfile.TemporaryDirectory() as td:
                    npz = Path(td) / "motion.npz"
                    res = _run_worker(path, npz, max_fps, timeout)
                    if not res.get("ok"):
                        return make_record("motion", rec_id, kind, status="rejected",
                                           reason=res.get("reason", "import_failed"),
                                           detail=f"{path.name}: {res.get('detail', '')}", **base)
                    if not res.get("clips"):
                        return make_record("motion", rec_id, kind, status="rejected", reason="no_motion",
                                           detail=f"{path.name}: no animation clips", **base)
                    motions, extra = motions_from_worker_npz(npz, path.stem, max_fps)
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
