"""Scan users' rigged characters (glTF/GLB, VRM, FBX, .blend) into character records. Blender-free.

Reading a file needs Blender; the caller hands in the probe that does it (``probe.AssetProbe``; the
Blender one, ``render.asset_build.BlenderProbe``, imports each file in its own worker process with a
timeout, so a crashing or hanging importer costs one asset). The probe reports facts; the decisions
are made here:

=================== ==========================================================================
reason              when
=================== ==========================================================================
import_failed       the importer failed, the file is truncated/malformed, or the worker crashed
import_timeout      the worker took longer than its timeout
unsupported_format  an extension we do not import
no_armature         no armature in the file
no_mesh             an armature without any mesh
unskinned_mesh      meshes exist but none is skinned (weights) or parented to a bone
not_humanoid        the bone mapper found no humanoid (``bone_maps.MIN_JOINTS`` + layout checks)
texture_missing     an image texture file does not exist (accepted with ``stats.texture_fallback``
                    true and a flat colour instead when ``allow_texture_fallback``)
texture_unreadable  an image texture exists but cannot be decoded
texture_blank       an image texture is a single flat value or fully transparent
duplicate           same geometry fingerprint (or near-identical occupancy signature) as an
                    earlier accepted character; ``detail`` names it
=================== ==========================================================================

Accepted records follow contract 2: ``id`` ``char-<sha256[:12]>`` (byte-identical copies get
``-2``, ``-3`` ...), ``kind`` gltf | vrm | fbx | blend, ``path``, ``sha256``, ``bone_map``,
``expressions``, ``scale``, and ``stats`` with ``yaw_deg``, ``repairs``, ``height_m``,
``fingerprint``, timings and counts (see ``docs/real_assets.md``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .expressions import map_expressions
from .manifest import file_stats, find_files, incremental_scan, make_record
from .probe import AssetProbe, ProbeFailure

__all__ = ["CHARACTER_EXTS", "geometry_fingerprint", "record_from_facts", "scan_characters"]

CHARACTER_EXTS = {".glb": "gltf", ".gltf": "gltf", ".vrm": "vrm", ".fbx": "fbx", ".blend": "blend"}
NEAR_DUPLICATE_L1 = 0.02
FINGERPRINT_GRID = (8, 8, 16)


def geometry_fingerprint(verts: np.ndarray) -> dict:
    """Format- and vertex-order-independent shape signature of rest vertices (N, 3), metres, Z up.

    ``hash``: sha256 of the sorted unique positions quantised to 1/512 of the height after moving
    the bounds' minimum to the origin and scaling to unit height (split seam vertices collapse, so
    glTF and FBX exports of one model agree). ``grid``: occupancy histogram of the unique positions
    over an 8x8x16 box grid, normalised to sum 1, for near-duplicates. ``n_unique``: unique count.
    """
    if len(verts) == 0:
        return {"hash": None, "grid": [], "n_unique": 0}
    lo = verts.min(axis=0)
    h = float(verts[:, 2].max() - lo[2]) or 1.0
    q = np.round((verts - lo) / h * 512.0).astype(np.int64)
    uq = np.unique(q, axis=0)
    digest = hashlib.sha256(np.ascontiguousarray(uq).tobytes()).hexdigest()
    ext = uq.max(axis=0) + 1
    cells = np.minimum((uq * np.array(FINGERPRINT_GRID)) // ext, np.array(FINGERPRINT_GRID) - 1)
    flat = np.ravel_multi_index(cells.T, FINGERPRINT_GRID)
    grid = np.bincount(flat, minlength=int(np.prod(FINGERPRINT_GRID))).astype(np.float64)
    grid /= grid.sum()
    return {"hash": digest, "grid": [round(float(g), 5) for g in grid], "n_unique": int(len(uq))}


def record_from_facts(path: Path, sha: str, facts: dict | ProbeFailure, *,
                      allow_texture_fallback: bool = False) -> dict:
    """Decide a character record from the probe's facts (see the module table)."""
    kind = CHARACTER_EXTS.get(path.suffix.lower(), "unknown")
    rec_id = f"char-{sha[:12]}"
    base = {"path": str(path), "sha256": sha}
    name = path.name

    def rejected(reason, detail, stats=None, **fields):
        return make_record("character", rec_id, kind, status="rejected", reason=reason, detail=f"{name}: {detail}",
                           stats=stats or {}, **base, **fields)

    if isinstance(facts, ProbeFailure):
        return rejected(facts.reason or "import_failed", facts.detail or "import failed")
    stats = {"format": facts.get("format"), "import_s": facts.get("import_s"), "n_objects": facts.get("n_objects"),
             "armatures": facts.get("armatures"), "actions": len(facts.get("actions") or []),
             "meshopt": facts.get("meshopt", False)}
    if not facts.get("armature"):
        return rejected("no_armature", f"no armature ({len(facts.get('meshes') or [])} meshes)", stats)
    stats["n_bones"] = facts.get("n_bones")
    if not facts.get("meshes"):
        return rejected("no_mesh", "armature without meshes", stats)
    if not facts.get("skinned") and not facts.get("bone_parented"):
        return rejected("unskinned_mesh", f"{len(facts['meshes'])} mesh(es), none skinned to or parented to a bone"
                        f" of the armature", stats)
    mapping = facts.get("mapping") or {}
    norm = facts.get("normalise") or {}
    stats.update(
        n_vertices=facts.get("n_vertices"), meshes=len(facts.get("meshes") or []),
        skinned_meshes=len(facts.get("skinned") or []), bone_parented_meshes=len(facts.get("bone_parented") or {}),
        unskinned_meshes=len(facts.get("unskinned") or []), mapping_method=mapping.get("method"),
        mapped_joints=len(mapping.get("bone_map") or {}), yaw_deg=norm.get("yaw_deg", mapping.get("yaw_deg", 0.0)),
        repairs=mapping.get("repairs") or {}, height_raw=norm.get("height_raw"), height_m=norm.get("height_m"),
        alpha_fixed=facts.get("alpha_fixed", 0), fingerprint=facts.get("fingerprint"),
        shape_keys=facts.get("shape_keys") or {}, bounds=facts.get("bounds"),
    )
    if not mapping.get("accepted"):
        return rejected(mapping.get("reason") or "not_humanoid", mapping.get("detail") or "not a humanoid", stats,
                        bone_map=mapping.get("bone_map") or {})
    textures = facts.get("textures") or []
    stats["textures"] = [{k: t.get(k) for k in ("name", "status", "size")} for t in textures]
    bad = {s: [t["name"] for t in textures if t.get("status") == s] for s in ("missing", "unreadable", "blank")}
    if bad["unreadable"]:
        return rejected("texture_unreadable", "unreadable image texture(s): " + ", ".join(bad["unreadable"]), stats)
    if bad["blank"]:
        return rejected("texture_blank", "blank image texture(s): " + ", ".join(bad["blank"]), stats)
    if bad["missing"]:
        if not allow_texture_fallback:
            return rejected("texture_missing", "missing image texture(s): " + ", ".join(bad["missing"]), stats)
        stats["texture_fallback"] = True
        stats["missing_textures"] = bad["missing"]
    expressions = map_expressions(facts.get("shape_keys") or {}, facts.get("vrm_expressions") or [])
    detail = f"{name}: {mapping.get('detail', '')}" + (" (flat colour for missing textures)" if bad["missing"] else "")
    return make_record("character", rec_id, kind, detail=detail, stats=stats, **base,
                       bone_map=mapping["bone_map"], expressions=expressions, scale=float(norm.get("scale", 1.0)),
                       face_landmarks=None)


def _fp(rec: dict) -> dict | None:
    fp = (rec.get("stats") or {}).get("fingerprint")
    return fp if isinstance(fp, dict) and fp.get("hash") else None


def _mark_duplicates(records: list[dict]) -> int:
    """Reject (in place) accepted characters whose geometry repeats an earlier accepted one; re-accept
    former duplicates whose original is gone. Returns how many are duplicates."""
    kept: list[dict] = []
    n = 0
    for rec in records:
        fp = _fp(rec)
        if rec.get("reason") == "duplicate" and "bone_map" in rec:
            rec["status"], rec["reason"] = "accepted", None
            rec["detail"] = rec.get("stats", {}).get("accepted_detail", rec["detail"])
        if rec.get("status") != "accepted" or fp is None:
            continue
        original = None
        for k in kept:
            kf = _fp(k)
            if kf["hash"] == fp["hash"]:
                original = k
                break
            g1, g2 = np.asarray(kf.get("grid") or []), np.asarray(fp.get("grid") or [])
            nu1, nu2 = kf.get("n_unique", 0), fp.get("n_unique", 0)
            if (g1.shape == g2.shape and g1.size and float(np.abs(g1 - g2).sum()) < NEAR_DUPLICATE_L1
                    and abs(nu1 - nu2) <= 0.01 * max(nu1, nu2)):
                original = k
                break
        if original is None:
            kept.append(rec)
            continue
        rec["stats"]["accepted_detail"] = rec["detail"]
        rec["status"], rec["reason"] = "rejected", "duplicate"
        rec["detail"] = f"{Path(rec['path']).name}: same geometry as {original['id']} ({Path(original['path']).name})"
        n += 1
    return n


def scan_characters(paths, previous_records=(), *, probe: AssetProbe, workers: int | None = None,
                    allow_texture_fallback: bool = False, progress=None) -> list[dict]:
    """Scan character files under ``paths`` -> records (accepted and rejected). Unchanged files reuse
    their previous record; new or changed files are read by ``probe.inspect_character``, ``workers``
    files at a time (default 2, fewer on a 1-core machine)."""
    files = find_files(paths, CHARACTER_EXTS)
    previous_records = list(previous_records or ())
    by_path = {str(r.get("path")): r for r in previous_records if r.get("path")}
    todo = []
    for f in files:
        prev = by_path.get(str(f))
        if f.suffix.lower() in CHARACTER_EXTS and (
                prev is None or any(prev.get("stats", {}).get(k) != v for k, v in file_stats(f).items())):
            todo.append(f)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    # Started before the hashing below so that the probes run while incremental_scan hashes.
    futures = {str(f): pool.submit(probe.inspect_character, f) for f in todo}

    def process(path: Path, sha: str) -> dict:
        if path.suffix.lower() not in CHARACTER_EXTS:
            return make_record("character", f"char-{sha[:12]}", "unknown", status="rejected",
                               reason="unsupported_format", detail=f"{path.name}: not a character file",
                               path=str(path), sha256=sha)
        fut = futures.get(str(path))
        facts = fut.result() if fut is not None else probe.inspect_character(path)
        return record_from_facts(path, sha, facts, allow_texture_fallback=allow_texture_fallback)

    def on_error(path: Path, sha: str, exc: Exception) -> dict:
        return make_record("character", f"char-{sha[:12]}", CHARACTER_EXTS.get(path.suffix.lower(), "unknown"),
                           status="rejected", reason="import_failed", detail=f"{path.name}: {type(exc).__name__}: {exc}",
                           path=str(path), sha256=sha)

    try:
        records, _counts = incremental_scan(files, previous_records, process, on_error=on_error, progress=progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # Byte-identical copies share a sha: keep ids unique and deterministic (scan order is sorted).
    seen: dict[str, int] = {}
    for rec in records:
        base_id = f"char-{rec['sha256'][:12]}" if rec.get("sha256") else rec["id"]
        k = seen.get(base_id, 0) + 1
        seen[base_id] = k
        rec["id"] = base_id if k == 1 else f"{base_id}-{k}"
    _mark_duplicates(records)
    return records
