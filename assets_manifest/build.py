"""The asset build: everything ``serialgen assets build`` writes into one folder (contract 1).

``characters.jsonl`` (procedural and imported characters), ``motions.jsonl`` (built-in motion sets and
imported clips), ``poses.npz``, ``backgrounds.jsonl`` (+ ``backgrounds/`` files), ``meshes/`` and
``report.json``. Re-running on the same folder is incremental: unchanged characters, backgrounds and
imported files are reused, not rebuilt.

Blender-free: reading character and motion files and decoding the HDRIs goes through the ``probe``
the caller hands in (``probe.AssetProbe``). The command (``render/cli_assets.py``) hands in the
Blender one, ``render.asset_build.BlenderProbe``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from serialgen.assets_manifest import backgrounds as bgm
from serialgen.assets_manifest import manifest as mf
from serialgen.assets_manifest import poses as pm
from serialgen.assets_manifest import procedural as proc
from serialgen.assets_manifest.characters_scan import scan_characters
from serialgen.assets_manifest.motions import MOTION_SETS
from serialgen.assets_manifest.motions_scan import scan_motions
from serialgen.assets_manifest.probe import AssetProbe
from serialgen.errors import UserInputError

__all__ = ["build_assets", "print_summary"]


class _Bar:
    """A tqdm bar on stderr, or nothing without progress."""

    def __init__(self, total, desc, progress):
        self.bar = None
        if progress and total != 0:  # None: a count without a known total
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr, dynamic_ncols=True)

    def step(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def to(self, value):
        if self.bar is not None:
            self.bar.update(value - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _check_paths(flag: str, paths) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserInputError(f"{flag} {p}: no such file or folder")
        out.append(path.resolve())
    return out


def _reusable(old: dict | None, desc: dict, f: Path) -> bool:
    """An earlier record of the same description whose mesh file is still as written."""
    return bool(old and old["status"] == "accepted" and old.get("generator") == desc and f.is_file()
                and mf.file_stats(f) == {k: old["stats"].get(k) for k in ("file_size", "mtime_ns")})


def _procedural_characters(out: Path, n: int, seed: int, previous: list[dict], progress: bool) -> list[dict]:
    """Records of proc-000000 ... proc-(n-1); unchanged ones (same description, intact mesh file)
    are reused. A character that fails to build is a rejected record, not a stopped build."""
    if n == 0:
        return []
    prev = {r["id"]: r for r in previous if r.get("kind") == "procedural"}
    (out / "meshes").mkdir(parents=True, exist_ok=True)
    ids = [f"proc-{i:06d}" for i in range(n)]
    try:
        stale = any(not _reusable(prev.get(cid), proc.describe_character(cid, seed), out / f"meshes/{cid}.npz")
                    for cid in ids)
    except Exception:  # noqa: BLE001 - the loop below records the failure per character
        stale = True
    if stale:
        # Before the characters' bar: a first run on a machine builds anny's cache (announced, own bar).
        try:
            proc.anny_model(progress=progress)
        except Exception:  # noqa: BLE001 - each character below reports it
            pass
    records, hashes = [], {}
    bar = _Bar(n, "characters", progress)
    for cid in ids:
        rel = f"meshes/{cid}.npz"
        try:
            desc = proc.describe_character(cid, seed)
            old = prev.get(cid)
            f = out / rel
            if _reusable(old, desc, f):
                rec = dict(old, display_name=cid)
            else:
                mesh = proc.build_mesh_data(desc)
                proc.save_mesh_data(mesh, f)
                rec = mf.make_record(
                    "character", cid, "procedural", detail="", path=rel, sha256=mf.sha256_file(f),
                    stats={**proc.mesh_stats(mesh), **mf.file_stats(f)}, generator=desc, mesh_file=rel,
                    mesh_hash=proc.mesh_hash(mesh), expressions=list(desc.get("expressions", ["neutral"])),
                    face_landmarks=mesh.face_landmarks, display_name=cid)
        except Exception as exc:  # noqa: BLE001 - one bad character never stops the build
            rec = mf.make_record("character", cid, "procedural", status="rejected", reason="generation_failed",
                                 detail=f"{cid}: {type(exc).__name__}: {exc}", display_name=cid)
        if rec["status"] == "accepted":
            h = rec.get("mesh_hash")
            if h in hashes:
                mf.reject(rec, "duplicate", f"same mesh as {hashes[h]}")
            else:
                hashes[h] = cid
        records.append(rec)
        bar.step()
    bar.close()
    return records


def _builtin_motion_records(counts: dict[str, int]) -> list[dict]:
    return [mf.make_record("motion", f"builtin-{m.name}", "builtin", detail=m.doc,
                           stats={"poses": counts.get(m.name, 0), "n_params": m.n_params,
                                  "asymmetric": m.asymmetric},
                           generator={"motion_set": m.name})
            for m in MOTION_SETS]


def build_assets(out: str | Path, *, probe: AssetProbe, procedural: int = 0, seed: int = 0,
                 characters: Sequence[str | Path] = (), motions: Sequence[str | Path] = (),
                 backgrounds: Sequence[str | Path] = (), poses: int = pm.DEFAULT_POSES,
                 min_pose_distance: float = pm.DEFAULT_MIN_DISTANCE,
                 procedural_backgrounds: int = bgm.DEFAULT_PROCEDURAL_BACKGROUNDS, hdri: bool = True,
                 allow_texture_fallback: bool = False, allow_untextured: bool = False,
                 max_asset_bytes: int | None = mf.DEFAULT_MAX_BYTES, progress: bool = True) -> dict:
    """Build (or update) the asset folder ``out``; returns the summary (also written into report.json,
    plus ``manifests``: the records, and ``out``). ``probe`` reads the character and motion files
    (each in a worker process with a timeout) and, unless ``hdri`` is false, decodes the HDRIs.
    ``allow_texture_fallback``: characters with missing image files are accepted, drawn in a flat
    colour; ``allow_untextured``: characters whose visible materials are all one untextured colour
    are accepted; ``max_asset_bytes``: the most a character, motion or background file may weigh
    with its resources (None: no limit). Bad input (a missing path, a bad number, ``out`` naming a
    file) is a UserInputError naming the command's flag."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: exists and is not a folder")
    char_paths = _check_paths("--characters", characters)
    motion_paths = _check_paths("--motions", motions)
    bg_paths = _check_paths("--backgrounds", backgrounds)
    if poses < 1:
        raise UserInputError(f"--poses: must be >= 1, got {poses}")
    if not (0.0 <= min_pose_distance < 90.0):
        raise UserInputError(f"--min-pose-distance: expected degrees in [0, 90), got {min_pose_distance}")
    if max_asset_bytes is not None and max_asset_bytes < 1:
        raise UserInputError(f"--max-asset-size: must be at least 1 byte, got {max_asset_bytes}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    out = out.resolve()
    timings, notes = {}, []

    # 1. Characters.
    t0 = time.perf_counter()
    prev_chars = mf.read_previous(out / mf.MANIFEST_FILES["character"], "character")
    character_records = _procedural_characters(out, procedural, seed, prev_chars, progress)
    if char_paths:
        bar = _Bar(None, "character files", progress)
        character_records += scan_characters(char_paths, [r for r in prev_chars if r.get("kind") != "procedural"],
                                             probe=probe, allow_texture_fallback=allow_texture_fallback,
                                             allow_untextured=allow_untextured, max_bytes=max_asset_bytes,
                                             progress=bar.step)
        bar.close()
    mf.write_jsonl(out / mf.MANIFEST_FILES["character"], character_records)
    timings["characters"] = time.perf_counter() - t0

    # 2. Imported motions, then the pose library with them merged in.
    t0 = time.perf_counter()
    motion_records, extra = [], []
    if motion_paths:
        prev_motions = [r for r in mf.read_previous(out / mf.MANIFEST_FILES["motion"], "motion")
                        if r.get("kind") != "builtin"]
        bar = _Bar(None, "motion files", progress)
        motion_records, extra = scan_motions(motion_paths, out, prev_motions, probe=probe, max_bytes=max_asset_bytes,
                                             progress=bar.step)
        bar.close()
    timings["motion_import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = _Bar(poses, "poses", progress)
    lib = pm.build_pose_library(poses, seed=seed, extra_motions=extra, min_distance=min_pose_distance,
                                progress=bar.to)
    bar.close()
    pm.save_pose_library(lib, out / "poses.npz")
    timings["poses"] = time.perf_counter() - t0
    pose_counts = lib.counts()
    all_motions = _builtin_motion_records(pose_counts) + motion_records
    mf.write_jsonl(out / mf.MANIFEST_FILES["motion"], all_motions)

    # 3. Backgrounds.
    t0 = time.perf_counter()
    hdri_dir = bgm.bpy_hdri_dir() if hdri else None
    n_default_steps = procedural_backgrounds + (len(list(hdri_dir.glob("*.exr"))) * len(bgm.HDRI_YAWS)
                                                if hdri_dir else 0)
    bar = _Bar(n_default_steps, "backgrounds", progress)
    background_records, bg_counts = bgm.build_backgrounds(
        out, bg_paths, n_procedural=procedural_backgrounds, seed=seed, probe=probe if hdri else None,
        progress=bar.step, notes=notes, max_bytes=max_asset_bytes)
    bar.close()
    timings["backgrounds"] = time.perf_counter() - t0

    summary = {
        "poses": {"n": len(lib), "min_distance_deg": lib.min_distance, "seed": lib.seed, "per_motion": pose_counts,
                  "file": "poses.npz"},
        "user_backgrounds": bg_counts,
        "notes": notes,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    manifests = {"characters": character_records, "motions": all_motions, "backgrounds": background_records}
    mf.write_report(out, manifests, **summary)
    summary["manifests"] = manifests
    summary["out"] = str(out)
    return summary


def print_summary(summary: dict) -> None:
    """The table ``serialgen assets build`` prints: accepted/rejected per manifest, kinds, reasons,
    timings and notes."""
    rows = []
    for name, recs in summary["manifests"].items():
        c = mf.count_records(recs)
        kinds = ", ".join(f"{k} {sum(v.values())}" for k, v in c["by_kind"].items()) or "-"
        reasons = ", ".join(f"{k} {v}" for k, v in c["by_reason"].items()) or "-"
        rows.append((name, str(c["by_status"]["accepted"]), str(c["by_status"]["rejected"]), kinds, reasons))
    p = summary["poses"]
    rows.append(("poses", str(p["n"]), "-", f"{sum(1 for v in p['per_motion'].values() if v)} motions",
                 f"min distance {p['min_distance_deg']:g} deg"))
    head = ("manifest", "accepted", "rejected", "kinds", "rejections / notes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    t = summary["timings_s"]
    print(f"\nwrote {summary['out']} (report.json); time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    for note in summary["notes"]:
        print(f"note: {note}")
