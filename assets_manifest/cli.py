"""``serialgen assets build`` and ``serialgen assets poses-preview``.

``assets build --out DIR`` writes the asset folder of contract 1: ``characters.jsonl`` (procedural
and imported characters), ``motions.jsonl`` (built-in motion sets and imported clips),
``poses.npz``, ``backgrounds.jsonl`` (+ ``backgrounds/`` files), ``meshes/`` and ``report.json``,
then prints a summary table. Re-running on the same folder is incremental: unchanged characters,
backgrounds and imported files are reused, not rebuilt.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from serialgen.errors import UserInputError

__all__ = ["register", "build_assets", "cmd_build", "cmd_poses_preview"]


def _nonneg_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 0, got {v}")
        return v
    return parse


def register(sub, groups) -> None:
    assets = groups["assets"]
    p = assets.add_parser(
        "build", help="scan/generate inputs into manifests under DIR",
        description="Build the asset folder: procedural and imported characters, the pose library "
                    "(18 built-in motion sets + imported motions), backgrounds (bundled photos, HDRI "
                    "views, procedural images + your folders) and report.json. Incremental on re-runs.")
    p.add_argument("--out", required=True, metavar="DIR", help="asset folder to create or update")
    p.add_argument("--procedural", type=_nonneg_int("--procedural"), default=0, metavar="N",
                   help="number of procedural characters proc-000000 ... (default 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed for characters, poses and backgrounds")
    p.add_argument("--characters", nargs="+", default=[], metavar="PATH",
                   help="character files or folders (glTF/GLB/VRM/FBX/.blend)")
    p.add_argument("--motions", nargs="+", default=[], metavar="PATH",
                   help="motion files or folders (BVH, glTF/FBX actions), merged into the pose library")
    p.add_argument("--backgrounds", nargs="+", default=[], metavar="PATH",
                   help="your background images or folders (jpg/jpeg/png/webp, recursive)")
    p.add_argument("--poses", type=_nonneg_int("--poses"), default=None, metavar="N",
                   help="pose library size (default 3817, as in the paper)")
    p.add_argument("--min-pose-distance", type=float, default=None, metavar="DEG",
                   help="de-duplication threshold in degrees of pose distance (default 4)")
    p.add_argument("--procedural-backgrounds", type=_nonneg_int("--procedural-backgrounds"), default=None,
                   metavar="N", help="procedural background images (default 64)")
    p.add_argument("--no-hdri", action="store_true", help="skip the HDRI views (no bpy subprocess)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_build)

    q = assets.add_parser(
        "poses-preview", help="draw a stick-figure contact sheet of a pose library",
        description="Front and side stick figures of a few poses of every motion (one row per motion), "
                    "to check by eye that poses look like their motion names.")
    q.add_argument("assets", metavar="DIR", help="asset folder (or a poses.npz file)")
    q.add_argument("--out", required=True, metavar="PNG", help="output image")
    q.add_argument("--per-motion", type=int, default=6, metavar="K", help="poses per motion (default 6)")
    q.set_defaults(handler=cmd_poses_preview)


# ---------------------------------------------------------------------------------------------


class _Bar:
    """A tqdm bar on stderr, or nothing when quiet / tqdm missing."""

    def __init__(self, total, desc, quiet):
        self.bar = None
        if not quiet and total:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def step(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def to(self, value):
        if self.bar is not None:
            self.bar.update(value - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _optional(module: str, what: str):
    """Import a part written by another engineer; a missing module is one clear line."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise UserInputError(f"{what} not available: module {module} is missing ({exc})") from None
        raise


def _check_paths(flag: str, paths) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserInputError(f"{flag} {p}: no such file or folder")
        out.append(path.resolve())
    return out


def _procedural_characters(out: Path, n: int, seed: int, previous: list[dict], quiet: bool) -> list[dict]:
    """Records of proc-000000 ... proc-(n-1); unchanged ones (same description, intact mesh file)
    are reused. A character that fails to build is a rejected record, not a stopped build."""
    from serialgen.assets_manifest import manifest as mf

    if n == 0:
        return []
    proc = _optional("serialgen.assets_manifest.procedural", "procedural characters")
    prev = {r["id"]: r for r in previous if r.get("kind") == "procedural"}
    (out / "meshes").mkdir(parents=True, exist_ok=True)
    records, hashes = [], {}
    bar = _Bar(n, "characters", quiet)
    for i in range(n):
        cid = f"proc-{i:06d}"
        rel = f"meshes/{cid}.npz"
        try:
            desc = proc.describe_character(cid, seed)
            old = prev.get(cid)
            f = out / rel
            if (old and old["status"] == "accepted" and old.get("generator") == desc and f.is_file()
                    and mf.file_stats(f) == {k: old["stats"].get(k) for k in ("file_size", "mtime_ns")}):
                rec = old
            else:
                mesh = proc.build_mesh_data(desc)
                proc.save_mesh_data(mesh, f)
                stats = proc.mesh_stats(mesh) if hasattr(proc, "mesh_stats") else {}
                rec = mf.make_record(
                    "character", cid, "procedural", detail="", path=rel, sha256=mf.sha256_file(f),
                    stats={**stats, **mf.file_stats(f)}, generator=desc, mesh_file=rel,
                    mesh_hash=proc.mesh_hash(mesh), expressions=list(desc.get("expressions", ["neutral"])),
                    face_landmarks=getattr(mesh, "face_landmarks", None))
        except Exception as exc:  # noqa: BLE001 - one bad character never stops the build
            rec = mf.make_record("character", cid, "procedural", status="rejected", reason="generation_failed",
                                 detail=f"{cid}: {type(exc).__name__}: {exc}")
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
    from serialgen.assets_manifest import manifest as mf
    from serialgen.assets_manifest.motions import MOTION_SETS

    return [mf.make_record("motion", f"builtin-{m.name}", "builtin", detail=m.doc,
                           stats={"poses": counts.get(m.name, 0), "n_params": m.n_params,
                                  "asymmetric": m.asymmetric},
                           generator={"motion_set": m.name})
            for m in MOTION_SETS]


def build_assets(args) -> dict:
    """Run the build; returns the summary dict (also written into report.json)."""
    from serialgen.assets_manifest import backgrounds as bgm
    from serialgen.assets_manifest import manifest as mf
    from serialgen.assets_manifest import poses as pm

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: exists and is not a folder")
    char_paths = _check_paths("--characters", args.characters)
    motion_paths = _check_paths("--motions", args.motions)
    bg_paths = _check_paths("--backgrounds", args.backgrounds)
    n_poses = pm.DEFAULT_POSES if args.poses is None else args.poses
    if n_poses < 1:
        raise UserInputError(f"--poses: must be >= 1, got {n_poses}")
    min_dist = pm.DEFAULT_MIN_DISTANCE if args.min_pose_distance is None else args.min_pose_distance
    if not (0.0 <= min_dist < 90.0):
        raise UserInputError(f"--min-pose-distance: expected degrees in [0, 90), got {min_dist}")
    n_bg = bgm.DEFAULT_PROCEDURAL_BACKGROUNDS if args.procedural_backgrounds is None else args.procedural_backgrounds
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    out = out.resolve()
    timings, notes = {}, []

    # 1. Characters.
    t0 = time.perf_counter()
    prev_chars = mf.read_previous(out / mf.MANIFEST_FILES["character"], "character")
    characters = _procedural_characters(out, args.procedural, args.seed, prev_chars, args.quiet)
    if char_paths:
        scan = _optional("serialgen.assets_manifest.characters_scan", "real character import")
        characters += scan.scan_characters(char_paths, out, [r for r in prev_chars if r.get("kind") != "procedural"])
    mf.write_jsonl(out / mf.MANIFEST_FILES["character"], characters)
    timings["characters"] = time.perf_counter() - t0

    # 2. Imported motions, then the pose library with them merged in.
    t0 = time.perf_counter()
    motion_records, extra = [], []
    if motion_paths:
        scan = _optional("serialgen.assets_manifest.motions_scan", "motion import")
        prev_motions = [r for r in mf.read_previous(out / mf.MANIFEST_FILES["motion"], "motion")
                        if r.get("kind") != "builtin"]
        motion_records, extra = scan.scan_motions(motion_paths, out, prev_motions)
    timings["motion_import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = _Bar(n_poses, "poses", args.quiet)
    lib = pm.build_pose_library(n_poses, seed=args.seed, extra_motions=extra, min_distance=min_dist,
                                progress=bar.to)
    bar.close()
    pm.save_pose_library(lib, out / "poses.npz")
    timings["poses"] = time.perf_counter() - t0
    pose_counts = lib.counts()
    mf.write_jsonl(out / mf.MANIFEST_FILES["motion"], _builtin_motion_records(pose_counts) + motion_records)
    motions = _builtin_motion_records(pose_counts) + motion_records

    # 3. Backgrounds.
    t0 = time.perf_counter()
    hdri_dir = None if args.no_hdri else bgm.bpy_hdri_dir()
    n_default_steps = n_bg + (len(list(hdri_dir.glob("*.exr"))) * len(bgm.HDRI_YAWS) if hdri_dir else 0)
    bar = _Bar(n_default_steps, "backgrounds", args.quiet)
    backgrounds, bg_counts = bgm.build_backgrounds(out, bg_paths, n_procedural=n_bg, seed=args.seed,
                                                   hdri=not args.no_hdri, progress=bar.step, notes=notes)
    bar.close()
    timings["backgrounds"] = time.perf_counter() - t0

    summary = {
        "poses": {"n": len(lib), "min_distance_deg": lib.min_distance, "seed": lib.seed, "per_motion": pose_counts,
                  "file": "poses.npz"},
        "user_backgrounds": bg_counts,
        "notes": notes,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    mf.write_report(out, {"characters": characters, "motions": motions, "backgrounds": backgrounds}, **summary)
    summary["manifests"] = {"characters": characters, "motions": motions, "backgrounds": backgrounds}
    summary["out"] = str(out)
    return summary


def _print_summary(summary: dict) -> None:
    from serialgen.assets_manifest import manifest as mf

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


def cmd_build(args) -> int:
    summary = build_assets(args)
    _print_summary(summary)
    return 0


def cmd_poses_preview(args) -> int:
    from serialgen.assets_manifest.poses import load_pose_library, render_pose_sheet

    if args.per_motion < 1:
        raise UserInputError(f"--per-motion: must be >= 1, got {args.per_motion}")
    lib = load_pose_library(args.assets)
    out = render_pose_sheet(lib, args.out, per_motion=args.per_motion)
    print(f"wrote {out} ({len(lib)} poses, {len(set(lib.motion_index.tolist()))} motions)")
    return 0
