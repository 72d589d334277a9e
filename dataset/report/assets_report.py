"""``serialgen report ASSETS_DIR``: the page of an asset folder (``serialgen assets build`` output).

Accepted and rejected records per manifest and by reason, every character with its file and
verdict, imported motions and their clips, the pose library's coverage (poses per motion set or
clip, and over each motion's phase) with its stick-figure sheet, and thumbnails of the backgrounds.
Reads the manifests, ``report.json`` and ``poses.npz``; renders nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from serialgen.assets_manifest import manifest, poses
from serialgen.assets_manifest.motions import MOTION_NAMES
from serialgen.dataset.report import plots
from serialgen.dataset.report.page import Page, esc, not_recorded, table

__all__ = ["build_assets_report"]

_MANIFESTS = (("characters", "character"), ("motions", "motion"), ("backgrounds", "background"))
_PHASE_BINS = 10
_MAX_BACKGROUNDS = 160  # thumbnails shown; a folder of thousands of photos gets a count, not a wall
_BG_THUMB_H = 72


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _records(root: Path, name: str, kind: str, notes: list[str]) -> list[dict]:
    path = root / f"{name}.jsonl"
    if not path.is_file():
        notes.append(f"{path.name}: absent")
        return []
    return manifest.read_jsonl(path, kind)


def _summary_table(records: dict[str, list[dict]]) -> str:
    rows = []
    for name, recs in records.items():
        acc = sum(1 for r in recs if r["status"] == "accepted")
        kinds: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for r in recs:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
            if r["status"] == "rejected":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        rows.append([name, len(recs), acc, len(recs) - acc, ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                     ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))) or "–"])
    return table(["manifest", "records", "accepted", "rejected", "kinds", "rejected by reason"], rows,
                 numeric={1, 2, 3})


def _file(rec: dict) -> str:
    path = rec.get("path")
    return Path(path).name if isinstance(path, str) and path else "–"


def _characters_table(recs: list[dict]) -> str:
    if not recs:
        return not_recorded("no characters in this folder")
    rows = []
    for r in sorted(recs, key=lambda r: (r["status"] != "rejected", r["id"])):
        stats = r.get("stats") or {}
        height = stats.get("height_m")
        verdict = ("html", f'<span class="bad">rejected: {esc(r["reason"])}</span>') if r["status"] == "rejected" \
            else ("html", '<span class="ok">accepted</span>')
        rows.append([r.get("display_name") or r["id"], r["id"], _file(r), r["kind"], verdict, r.get("detail") or "",
                     f"{height:.2f} m" if isinstance(height, (int, float)) else "–",
                     len(r.get("expressions") or []) or "–"])
    return table(["name", "id", "file", "kind", "verdict", "detail", "height", "expressions"], rows)


def _rejected_table(records: dict[str, list[dict]]) -> str:
    rows = [[name, _file(r), r["id"], r["reason"], r.get("detail") or ""]
            for name, recs in records.items() for r in recs if r["status"] == "rejected"]
    if not rows:
        return '<p class="ok">Nothing rejected.</p>'
    return table(["manifest", "file", "id", "reason", "detail"], rows)


def _motions_table(recs: list[dict]) -> str:
    imported = [r for r in recs if r["kind"] != "builtin"]
    if not imported:
        return f'<p class="note">Built-in motion sets only ({sum(1 for r in recs if r["kind"] == "builtin")}).</p>'
    rows = []
    for r in imported:
        clips = (r.get("stats") or {}).get("clips") or []
        rows.append([_file(r), r["id"], r["kind"], r["status"] if r["status"] == "accepted" else f"rejected: {r['reason']}",
                     ", ".join(f"{c.get('name')} ({c.get('frames')} frames)" for c in clips[:8])
                     + (f" and {len(clips) - 8} more" if len(clips) > 8 else "")])
    return table(["file", "id", "kind", "verdict", "clips"], rows)


def _pose_section(page: Page, root: Path) -> str:
    path = root / "poses.npz"
    if not path.is_file():
        return not_recorded("no pose library (poses.npz) in this folder")
    lib = poses.load_pose_library(path)
    counts = lib.counts()
    names = list(lib.motion_names)
    # the library lists the built-in motion sets first, in MOTION_NAMES order, then imported clips
    # (docs/poses.md): position and name together tell them apart, as in render_stats
    builtin = [i < len(MOTION_NAMES) and n == MOTION_NAMES[i] for i, n in enumerate(names)]
    labels = [n if b else f"{n} (clip)" for n, b in zip(names, builtin)]
    parts = [f'<p class="note">{len(lib.angles):,} poses, at least {float(lib.min_distance):g}° apart '
             f"(seed {int(lib.seed)}), from {_count(sum(builtin), 'motion set')} and "
             f"{_count(len(names) - sum(builtin), 'imported clip')}.</p>"]
    src = page.image("poses-per-motion", plots.bars(labels, [counts[n] for n in names], "poses per motion",
                                                    "poses"), "png")
    cover = np.zeros((len(names), _PHASE_BINS), dtype=int)
    bins = np.minimum((np.asarray(lib.phase) * _PHASE_BINS).astype(int), _PHASE_BINS - 1)
    np.add.at(cover, (np.asarray(lib.motion_index), bins), 1)
    col = [f"{k / _PHASE_BINS:.1f}" for k in range(_PHASE_BINS)]
    src2 = page.image("pose-phase-coverage", plots.heatmap(cover, labels, col, "poses over each motion's phase",
                                                           "phase (bin start)"), "png")
    empty = [labels[i] for i in range(len(names)) if counts[names[i]] and (cover[i] == 0).any()]
    cap = (f"phase bins without a pose: {', '.join(empty)}" if empty else "every motion has poses in every phase bin")
    parts.append(f'<div class="plots"><figure><img src="{src}" alt="poses per motion"></figure>'
                 f'<figure><img src="{src2}" alt="phase coverage"><figcaption>{esc(cap)}</figcaption></figure></div>')
    with tempfile.TemporaryDirectory() as tmp:
        sheet = poses.render_pose_sheet(lib, Path(tmp) / "sheet.png", per_motion=4, cell=90)
        from PIL import Image

        with Image.open(sheet) as im:
            im.load()
            src3 = page.pil("pose-sheet", im.quantize(colors=32))
    parts.append('<h3>Pose sheet</h3><p class="note">4 poses of every motion, evenly spread in phase: front and '
                 'side view, left limbs blue, right limbs red.</p>'
                 f'<img src="{src3}" alt="pose sheet" style="max-width:100%">')
    return "".join(parts)


def _backgrounds_section(page: Page, root: Path, recs: list[dict], notes: list[str]) -> str:
    from PIL import Image

    accepted = [r for r in recs if r["status"] == "accepted"]
    if not accepted:
        return not_recorded("no accepted backgrounds")
    shown = accepted[:_MAX_BACKGROUNDS]
    thumbs = []
    for n, r in enumerate(shown):
        try:
            with Image.open(manifest.resolve_record_path(root, r["path"])) as im:
                im.draft("RGB", (im.width // 4 or 1, im.height // 4 or 1))  # JPEG: decode at a quarter size
                im = im.convert("RGB")
                im.thumbnail((4 * _BG_THUMB_H, _BG_THUMB_H))
                src = page.pil(f"bg-{n:04d}", im, fmt="JPEG")
            thumbs.append(f'<img src="{src}" alt="{esc(r["id"])}" title="{esc(r["id"])} ({esc(r["kind"])})">')
        except (OSError, ValueError) as exc:
            notes.append(f"background {r['id']}: no thumbnail ({type(exc).__name__}: {exc})")
    more = (f'<p class="note">{len(accepted) - len(shown):,} more not shown.</p>'
            if len(accepted) > len(shown) else "")
    return f'<div class="thumbs">{"".join(thumbs)}</div>{more}'


def build_assets_report(root: str | Path, out: str | Path) -> Path:
    """Write the report of the asset folder ``root`` into the folder ``out``; returns its index.html."""
    root = Path(root)
    notes: list[str] = []
    records = {name: _records(root, name, kind, notes) for name, kind in _MANIFESTS}
    report = manifest.read_report(root / "report.json") if (root / "report.json").is_file() else None
    page = Page(out, f"Asset folder report: {root.name or root}",
                " · ".join(f"{len(v):,} {k}" for k, v in records.items()) + f" · {root}")
    body = _summary_table(records)
    if report and report.get("timings_s"):
        body += '<p class="note">Build time: ' + esc(", ".join(f"{k} {v} s" for k, v in report["timings_s"].items())) + "</p>"
    for note in (report or {}).get("notes") or []:
        notes.append(str(note))
    page.section("Counts", body, "counts")
    page.section("Rejected", _rejected_table(records), "rejected")
    page.section("Characters", _characters_table(records["characters"]), "characters")
    page.section("Motions", _motions_table(records["motions"]), "motions")
    page.section("Pose library coverage", _pose_section(page, root), "poses")
    page.section("Backgrounds", _backgrounds_section(page, root, records["backgrounds"], notes), "backgrounds")
    if notes:
        page.section("Notes", "<ul>" + "".join(f'<li class="warn">{esc(n)}</li>' for n in notes) + "</ul>", "notes")
    return page.write()
