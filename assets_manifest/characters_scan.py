"""Scan users' rigged characters (glTF/GLB, VRM, FBX, .blend) into character records. Blender-free.

Reading a file needs Blender; the caller hands in the probe that does it (``probe.AssetProbe``; the
Blender one, ``render.asset_build.BlenderProbe``, imports each file in its own worker process with a
timeout, so a crashing or hanging importer costs one asset). The probe reports facts; the decisions
are made here:

====================== =======================================================================
reason                 when
====================== =======================================================================
import_failed          the importer failed, the file is truncated/malformed, or the worker crashed
import_timeout         the worker took longer than its timeout
unsupported_format     a file of a format we do not import (every file under a folder gets a record)
broken_link            a dangling symbolic link or a link loop
not_a_file             a FIFO, socket or device
resource_outside_asset a glTF image/buffer URI, an FBX/.blend image or library path, or a symbolic
                       link that leads outside the asset's own folder (the text says nothing about
                       whether the outside file exists)
too_large              the file, with its external resources, weighs more than ``max_bytes``
no_armature            no armature in the file
no_mesh                an armature without any mesh
unskinned_mesh         meshes exist but none is skinned (weights) or parented to a bone
not_humanoid           the bone mapper found no humanoid (``bone_maps.MIN_JOINTS`` + layout checks)
texture_missing        an image texture file does not exist (accepted with ``texture_fallback``,
                       a flat colour per missing image, when ``allow_texture_fallback``)
texture_unreadable     an image texture exists but cannot be decoded
texture_blank          an image texture is a single flat value or fully transparent
texture_uniform        every visible material is the same untextured colour (a grey statue);
                       accepted with ``stats.texture_uniform`` when ``allow_untextured``
duplicate              same geometry fingerprint (or near-identical occupancy signature) as an
                       earlier accepted character; ``detail`` names it
====================== =======================================================================

Accepted records follow contract 2: ``id`` ``char-<sha256[:12]>`` (byte-identical copies get
``-2``, ``-3`` ...), ``kind`` gltf | vrm | fbx | blend, ``path``, ``sha256``, ``display_name``,
``bone_map``, ``expressions``, ``scale``, ``texture_fallback``, and ``stats`` with ``yaw_deg``, ``repairs``, ``height_m``,
``fingerprint``, timings and counts (see ``docs/real_assets.md``).
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .expressions import map_expressions
from .manifest import DEFAULT_MAX_BYTES, entry_record, file_stats, incremental_scan, make_record, walk_inputs
from .probe import AssetProbe, ProbeFailure

__all__ = ["CHARACTER_EXTS", "SCAN_VERSION", "display_name", "geometry_fingerprint", "record_from_facts",
           "scan_characters"]

CHARACTER_EXTS = {".glb": "gltf", ".gltf": "gltf", ".vrm": "vrm", ".fbx": "fbx", ".blend": "blend"}
# Records decided by older rules are decided again (2: texture_uniform, resource_outside_asset,
# too_large, display_name, texture fallback colours, the expression families).
SCAN_VERSION = 2
NEAR_DUPLICATE_L1 = 0.02
FINGERPRINT_GRID = (8, 8, 16)
# Two linear RGB colours closer than this per channel are "the same colour" (texture_uniform).
UNIFORM_TOLERANCE = 0.01


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


def display_name(path, sha: str) -> str:
    """What previews, logs and the report show for an imported character: the file's stem and the
    first 6 hex digits of its sha256 (``Knight-e48437`` for Knight.glb, id ``char-e48437073382``).
    Characters outside letters, digits, ``.+-`` become ``_`` (a name from a stranger's file goes
    into HTML and terminals); at most 48 of them."""
    stem = re.sub(r"[^\w.+-]+", "_", Path(path).stem, flags=re.UNICODE).strip("_")[:48] or "character"
    return f"{stem}-{sha[:6]}"


def _same_colour(a, b) -> bool:
    return all(abs(float(x) - float(y)) <= UNIFORM_TOLERANCE for x, y in zip(a[:3], b[:3]))


def _uniform_colour(materials: list[dict], missing: set[str]) -> list[float] | None:
    """The one colour every visible material shows when none is textured (a material whose only
    images are missing counts as its flat fallback colour); None when textured or varied."""
    colours = []
    for m in materials:
        images = m.get("images") or []
        if m.get("linked") and (not images or any(i not in missing for i in images)):
            return None  # an image that loads, vertex colours or a procedural texture
        colours.append(m.get("colour") or [0.8, 0.8, 0.8, 1.0])
    if colours and all(_same_colour(c, colours[0]) for c in colours):
        return [round(float(v), 4) for v in colours[0]]
    return None


def _resources_changed(rec: dict) -> bool:
    """Whether an external file the record's character read (``stats.resources``) changed since."""
    for r in (rec.get("stats") or {}).get("resources") or []:
        try:
            now = file_stats(r["path"])
        except (OSError, KeyError, TypeError):
            now = {"file_size": None, "mtime_ns": None}
        if now != {"file_size": r.get("file_size"), "mtime_ns": r.get("mtime_ns")}:
            return True
    return False


def record_from_facts(path: Path, sha: str, facts: dict | ProbeFailure, *,
                      allow_texture_fallback: bool = False, allow_untextured: bool = False,
                      previous: dict | None = None) -> dict:
    """Decide a character record from the probe's facts (see the module table). ``previous``: the
    file's record of an earlier scan; its texture means give a missing image's fallback colour."""
    kind = CHARACTER_EXTS.get(path.suffix.lower(), "unknown")
    rec_id = f"char-{sha[:12]}"
    base = {"path": str(path), "sha256": sha, "display_name": display_name(path, sha)}
    name = path.name

    def rejected(reason, detail, stats=None, **fields):
        return make_record("character", rec_id, kind, status="rejected", reason=reason, detail=f"{name}: {detail}",
                           stats=stats or {}, **base, **fields)

    if isinstance(facts, ProbeFailure):
        detail = facts.detail or "import failed"
        # Workers name the file themselves; do not say it twice.
        return rejected(facts.reason or "import_failed", detail[len(name) + 2:] if detail.startswith(f"{name}: ")
                        else detail)
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
    stats["resources"] = facts.get("resources") or []
    textures = facts.get("textures") or []
    stats["textures"] = [{k: t[k] for k in ("name", "status", "size", "mean_linear") if k in t} for t in textures]
    bad = {s: [t["name"] for t in textures if t.get("status") == s] for s in ("missing", "unreadable", "blank")}
    if bad["unreadable"]:
        return rejected("texture_unreadable", "unreadable image texture(s): " + ", ".join(bad["unreadable"]), stats)
    if bad["blank"]:
        return rejected("texture_blank", "blank image texture(s): " + ", ".join(bad["blank"]), stats)
    fallback = None
    if bad["missing"]:
        if not allow_texture_fallback:
            return rejected("texture_missing", "missing image texture(s): " + ", ".join(bad["missing"]) +
                            " (--allow-texture-fallback renders them in a flat colour)", stats)
        stats["texture_fallback"] = True
        stats["missing_textures"] = bad["missing"]
        # The mean of a missing image is known when an earlier scan read it.
        known = {t["name"]: t["mean_linear"] for t in ((previous or {}).get("stats") or {}).get("textures") or []
                 if isinstance(t, dict) and t.get("status") == "ok" and t.get("mean_linear")}
        fallback = []
        for t in textures:
            if t.get("status") != "missing":
                continue
            mean = known.get(t["name"])
            colour = mean if mean is not None else (t.get("fallback_colour") or [0.8, 0.8, 0.8, 1.0])
            fallback.append({"image": t["name"], "material": t.get("material"),
                             "colour": [round(float(v), 4) for v in colour],
                             "source": "image_mean" if mean is not None else t.get("fallback_source") or "base_colour"})
    materials = facts.get("materials") or []
    stats["materials"] = len(materials)
    uniform = _uniform_colour(materials, set(bad["missing"]))
    if uniform is not None:
        if not allow_untextured:
            lost = " (its missing textures drawn flat)" if fallback else ""
            return rejected("texture_uniform", f"every visible material ({len(materials)}) is the same untextured "
                            f"colour {uniform[:3]}{lost} (--allow-untextured accepts it)", stats)
        stats["texture_uniform"] = uniform
    expressions, families = map_expressions(facts.get("shape_keys") or {}, facts.get("vrm_expressions") or [],
                                            with_families=True)
    stats["expression_families"] = families
    detail = f"{name}: {mapping.get('detail', '')}" + (" (flat colour for missing textures)" if fallback else "")
    return make_record("character", rec_id, kind, detail=detail, stats=stats, **base,
                       bone_map=mapping["bone_map"], expressions=expressions, scale=float(norm.get("scale", 1.0)),
                       face_landmarks=None, texture_fallback=fallback)


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
                    allow_texture_fallback: bool = False, allow_untextured: bool = False,
                    max_bytes: int | None = DEFAULT_MAX_BYTES, progress=None) -> list[dict]:
    """Scan everything under ``paths`` -> records (accepted and rejected): every file gets one
    (``manifest.walk_inputs``: other formats ``unsupported_format``, links leading out
    ``resource_outside_asset``, broken links, FIFOs, files over ``max_bytes`` ``too_large``).
    Unchanged files reuse their previous record when it was decided with the same rules and
    options (``stats.scan``) and the external files it read are unchanged (``stats.resources``); new or changed files are read by ``probe.inspect_character``,
    ``workers`` files at a time (default 2, fewer on a 1-core machine)."""
    entries = walk_inputs(paths, CHARACTER_EXTS, max_bytes, what="character")
    files = [e.path for e in entries if e.reason is None]
    key = {"version": SCAN_VERSION, "allow_texture_fallback": bool(allow_texture_fallback),
           "allow_untextured": bool(allow_untextured)}
    earlier = {str(r.get("path")): r for r in previous_records or () if r.get("path")}
    # Reused only when decided by the same rules and options, and when no external file it read
    # (textures, buffers) changed since: a texture deleted or swapped for a link is judged again.
    previous_records = [r for r in earlier.values() if (r.get("stats") or {}).get("scan") == key
                        and r.get("reason") != "too_large" and not _resources_changed(r)]
    by_path = {str(r.get("path")): r for r in previous_records}
    todo = []
    for f in files:
        prev = by_path.get(str(f))
        if prev is None or any(prev.get("stats", {}).get(k) != v for k, v in file_stats(f).items()):
            todo.append(f)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    # Started before the hashing below so that the probes run while incremental_scan hashes.
    futures = {str(f): pool.submit(probe.inspect_character, f, max_bytes=max_bytes) for f in todo}

    def process(path: Path, sha: str) -> dict:
        fut = futures.get(str(path))
        facts = fut.result() if fut is not None else probe.inspect_character(path, max_bytes=max_bytes)
        rec = record_from_facts(path, sha, facts, allow_texture_fallback=allow_texture_fallback,
                                allow_untextured=allow_untextured, previous=earlier.get(str(path)))
        rec["stats"]["scan"] = key
        return rec

    def on_error(path: Path, sha: str, exc: Exception) -> dict:
        return make_record("character", f"char-{sha[:12]}", CHARACTER_EXTS.get(path.suffix.lower(), "unknown"),
                           status="rejected", reason="import_failed", detail=f"{path.name}: {type(exc).__name__}: {exc}",
                           path=str(path), sha256=sha, display_name=display_name(path, sha), stats={"scan": key})

    try:
        read, _counts = incremental_scan(files, previous_records, process, on_error=on_error, progress=progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    by_file = {rec["path"]: rec for rec in read}
    records = []
    for e in entries:
        if e.reason is None:
            records.append(by_file[str(e.path)])
        else:
            rec = entry_record("character", "char", "unknown", e)
            rec["display_name"] = display_name(e.path, rec["id"][5:])
            records.append(rec)
    # Byte-identical copies share a sha: keep ids unique and deterministic (scan order is sorted).
    seen: dict[str, int] = {}
    for rec in records:
        base_id = f"char-{rec['sha256'][:12]}" if rec.get("sha256") else rec["id"]
        k = seen.get(base_id, 0) + 1
        seen[base_id] = k
        rec["id"] = base_id if k == 1 else f"{base_id}-{k}"
    _mark_duplicates(records)
    return records
