"""``serialgen report SHARDS_DIR``: the page of a rendered shard set.

What it reads, and what it never reads:

* ``index.json`` (shards, splits, characters, failures, versions, the run's configuration),
  ``run.json`` (settings, code fingerprint, rendering version, the asset folder's rejections when the
  render recorded them) and the render's ``report.json`` (timings, quarantined characters): small files.
* the distributions from ``stats.json`` (merged fixed-bin histograms written at render time,
  :mod:`serialgen.dataset.render_stats`); a set without it is *sampled*: at most ``sample`` samples'
  ``meta.json`` / ``ref_pose.json``, spread over the shards and read by offset from the tar headers,
  never every sample of a large set.
* per shard, its first tar header (which character it holds); per shown character, its standard image
  and the first few references of its first shard.

A damaged shard or an unreadable side file never stops the page: it becomes a note on it (checking
integrity is ``serialgen shards verify``'s job). Only an unreadable ``index.json`` does.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from pathlib import Path

from serialgen.assets_manifest import manifest
from serialgen.dataset import render_stats, shards, tarset
from serialgen.dataset.report import plots
from serialgen.dataset.report.page import Page, esc, human_bytes, kv_table, not_recorded, table

__all__ = ["build_shards_report"]

_KEY_RE = re.compile(r"^(?P<character>[A-Za-z0-9_-]+)_p\d+_v\d+$")
_REF_THUMB_H = 128
_STD_THUMB_H = 160
_MAX_NOTES = 200  # a set with thousands of damaged shards gets a count, not a wall of lines
_STATUS_ORDER = {"quarantined": 0, "failures": 1, "rejected": 2, "ok": 3}


def _read_json(path: Path, notes: list[str]):
    """A side file as JSON, or None (absent: silently; unreadable: with a note)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{path.name}: unreadable ({type(exc).__name__}); left out")
        return None


def _first_key(path: Path) -> str | None:
    """The key of a tar's first member: one 512-byte header, whatever the shard's size."""
    with tarfile.open(path, "r:") as tf:
        member = tf.next()
    return member.name.partition(".")[0] if member is not None else None


def _thumb(data: bytes, height: int):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    w = max(1, round(image.width * height / image.height))
    return image.resize((w, height), Image.LANCZOS)


def _read_sample_members(path: Path, entries, members: tuple[str, ...]) -> list[dict[str, bytes]]:
    out = []
    for _key, offsets in entries:
        out.append({m: tarset.read_member(path, *offsets[m]) for m in members if m in offsets})
    return out


class _ShardSet:
    """Everything the page shows about one shard folder, gathered before any HTML is written."""

    def __init__(self, root: Path, assets: Path | None, sample: int):
        self.root = root
        self.notes: list[str] = []
        self.index = shards.read_index(root)
        run = _read_json(root / "run.json", self.notes) or {}
        # run.json format 2 (serialgen.render-run/2) wraps the render config and adds the rendering
        # version, the code fingerprint and the asset summary; format 1 was the bare config.
        self.run = run if isinstance(run, dict) else {}
        is_v2 = str(self.run.get("format", "")).startswith("serialgen.render-run/")
        self.run_config = (self.run.get("config") or {}) if is_v2 else self.run
        self.render_report = _read_json(root / "report.json", self.notes) or {}
        self.shard_entries = list(self.index.get("shards") or [])
        self.standard_entries = list(self.index.get("standard_shards") or [])
        self.index_characters = self.index.get("characters") or {}
        self.shards_of: dict[str, list[dict]] = {}
        for entry in self.shard_entries:
            try:
                key = _first_key(root / entry["path"])
            except (OSError, tarfile.TarError) as exc:
                self.notes.append(f"{entry['path']}: unreadable ({type(exc).__name__}: {exc}); its character "
                                  "is shown without pictures")
                continue
            m = _KEY_RE.match(key or "")
            if m:
                self.shards_of.setdefault(m["character"], []).append(entry)
        self.assets_records, self.assets_summary, self.assets_source = self._asset_records(assets)
        self.stats, self.stats_source = self._stats(sample)

    # -- the asset folder's view of the characters (file names, rejections) --------------------
    def _asset_records(self, assets: Path | None):
        """(character records, asset summary, where they came from): the asset folder given with
        ``--assets`` (full records: file paths too), else what the render recorded in run.json
        (rejected characters with name, reason and detail), else (None, None, None)."""
        if assets is not None:
            records = manifest.read_jsonl(assets / "characters.jsonl", "character")
            rejected = [r for r in records if r["status"] == "rejected"]
            by_reason: dict[str, int] = {}
            for r in rejected:
                by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
            summary = {"path": str(assets), "characters_accepted": len(records) - len(rejected),
                       "characters_rejected": len(rejected), "rejected_by_reason": by_reason}
            return records, summary, f"asset folder {assets}"
        recorded = self.run.get("assets")
        if isinstance(recorded, dict):
            records = [{"id": r.get("id"), "display_name": r.get("name"), "status": "rejected",
                        "reason": r.get("reason"), "detail": r.get("detail")}
                       for r in recorded.get("rejected") or [] if isinstance(r, dict)]
            return records, recorded, "asset summary recorded in run.json at render time"
        return None, None, None

    # -- distributions ----------------------------------------------------------------------------
    def _stats(self, budget: int):
        path = self.root / render_stats.STATS_NAME
        if path.is_file():
            try:
                hist = render_stats.read_stats(path)
                return hist, f"{render_stats.STATS_NAME}, written at render time: every one of {hist.samples:,} samples"
            except render_stats.StatsError as exc:
                self.notes.append(f"{exc}; the distributions come from a sample instead")
        hist, read, total = self._sample_rows(budget)
        if read == total:
            return hist, f"all {read:,} samples' meta.json ({render_stats.STATS_NAME} not recorded)"
        return hist, (f"a sample of {read:,} of {total:,} samples' meta.json, spread over the shards "
                      f"({render_stats.STATS_NAME} not recorded)")

    def _sample_rows(self, budget: int):
        """Read at most ``budget`` samples, as evenly as possible over shards and within them."""
        hist = render_stats.Histograms()
        total = sum(int(e.get("samples", 0)) for e in self.shard_entries)
        entries = sorted(self.shard_entries, key=lambda e: e["path"])
        if not entries or budget <= 0:
            return hist, 0, total
        if len(entries) > budget:  # more shards than samples wanted: every k-th shard, one sample each
            step = len(entries) / budget
            entries = [entries[int(i * step)] for i in range(budget)]
        read = 0
        for i, entry in enumerate(entries):
            quota = budget // len(entries) + (1 if i < budget % len(entries) else 0)
            path = self.root / entry["path"]
            try:
                table_ = tarset.scan_shard(path)
                if len(table_) > quota:  # evenly spaced through the shard
                    table_ = [table_[int((k + 0.5) * len(table_) / quota)] for k in range(quota)]
                for members in _read_sample_members(path, table_, ("meta.json", "ref_pose.json")):
                    meta = json.loads(members.get("meta.json", b"{}"))
                    pose = json.loads(members.get("ref_pose.json", b"{}"))
                    hist.add(render_stats.sample_row(meta, pose))
                    read += 1
            except (OSError, tarfile.TarError, ValueError) as exc:
                self.notes.append(f"{entry['path']}: not sampled ({type(exc).__name__}: {exc})")
        return hist, read, total

    # -- characters -------------------------------------------------------------------------------
    def characters(self) -> list[dict]:
        failures = self.index.get("failures") or []
        failures_of: dict[str, list[dict]] = {}
        for f in failures:
            failures_of.setdefault(f.get("character"), []).append(f)
        quarantined = self.render_report.get("quarantined") or {}
        records = {r.get("id"): r for r in (self.assets_records or []) if isinstance(r, dict)}
        ids = set(self.index_characters) | set(self.shards_of) | set(failures_of)
        ids |= set(quarantined) | {i for i, r in records.items() if r.get("status") == "rejected"}
        ids.discard(None)
        out = []
        for cid in ids:
            info = self.index_characters.get(cid) or {}
            own = self.shards_of.get(cid, [])
            fails = failures_of.get(cid, [])
            rec = records.get(cid) or {}
            if rec.get("status") == "rejected" and not own:
                status = "rejected"
            elif cid in quarantined or any(f.get("key") is None for f in fails):
                status = "quarantined"
            elif fails:
                status = "failures"
            else:
                status = "ok"
            reason = (quarantined.get(cid) or {}).get("reason") if isinstance(quarantined.get(cid), dict) else None
            out.append({
                "id": cid,
                "name": info.get("name") or rec.get("display_name") or cid,
                "split": info.get("split") or (own[0].get("split") if own else None),
                "shards": own,
                "pairs": sum(int(e.get("samples", 0)) for e in own),
                "bytes": sum(int(e.get("bytes", 0)) for e in own),
                "standard": info.get("standard"),
                "failures": fails,
                "quarantine_reason": reason,
                "record": rec,
                "status": status,
            })
        out.sort(key=lambda c: (_STATUS_ORDER[c["status"]], c["split"] or "", c["name"], c["id"]))
        return out

    def standard_png(self, ch: dict, first_samples: list[dict[str, bytes]]) -> bytes | None:
        """The character's standard image: its standard tar (format 3) or, before, its first sample's std.png."""
        if ch["standard"]:
            return shards.read_standard(self.root / ch["standard"], ch["id"])["std.png"]
        return first_samples[0].get("std.png") if first_samples else None


def _file_name(rec: dict) -> str | None:
    path = rec.get("path")
    return Path(path).name if isinstance(path, str) and path else None


def _settings_rows(s: _ShardSet) -> list[tuple[str, object]]:
    config = s.index.get("config") or {}
    run = s.run_config
    settings = run.get("settings") or config.get("settings") or {}
    rows: list[tuple[str, object]] = [("folder", str(s.root))]
    fingerprint = s.run.get("code_fingerprint")
    if fingerprint:
        # a resumed folder may hold shards of several codes: run.json lists every one that ran on it
        others = sorted(set(s.run.get("code_fingerprints") or []) - {fingerprint})
        text = f"<code>{esc(fingerprint)}</code>"
        if others:
            text += (' <span class="warn">(latest run; shards of earlier runs on this folder come from '
                     + ", ".join(f"<code>{esc(o)}</code>" for o in others) + ")</span>")
        rows.append(("code fingerprint", ("html", text)))
    else:
        rows.append(("code fingerprint", ("html", not_recorded("not recorded (rendered before run.json held it)"))))
    version = s.run.get("rendering_version", config.get("rendering_version"))
    rows.append(("rendering version", version if version is not None else ("html", not_recorded())))
    rows.append(("index format", f"{s.index.get('format')} version {s.index.get('format_version')}"))
    if s.assets_summary:
        a = s.assets_summary
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((a.get("rejected_by_reason") or {}).items()))
        rows.append(("asset folder", f"{a.get('path', '?')}: {a.get('characters_accepted', '?')} characters accepted, "
                                     f"{a.get('characters_rejected', '?')} rejected" + (f" ({reasons})" if reasons else "")))
    if settings:
        size = f"{settings['width']}x{settings['height']}" if "width" in settings and "height" in settings else None
        rest = [f"{k} {v}" for k, v in sorted(settings.items()) if k not in ("engine", "width", "height")]
        rows.append(("render settings", ", ".join(str(x) for x in (settings.get("engine"), size) if x) + (
            "; " + ", ".join(rest) if rest else "")))
    for key in ("per_character", "poses", "poses_per_shard", "seed", "test_fraction", "limit_characters"):
        value = run.get(key, config.get(key))
        if value is not None:
            rows.append((key.replace("_", " "), value))
    versions = s.index.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    rep = s.render_report
    if rep:
        took = rep.get("seconds")
        rate = rep.get("pairs_per_s")
        rows.append(("render run", f"{rep.get('status', '?')}: {rep.get('pairs_rendered', rep.get('pairs', '?'))} pairs "
                                   f"rendered in {took} s ({rate} pairs/s), {rep.get('workers', '?')} workers, "
                                   f"{len(rep.get('retries') or [])} retries"))
    return rows


def _counts_table(s: _ShardSet, characters: list[dict]) -> str:
    splits = s.index.get("splits") or {}
    std_bytes: dict[str, int] = {}
    for e in s.standard_entries:
        std_bytes[e.get("split")] = std_bytes.get(e.get("split"), 0) + int(e.get("bytes", 0))
    rows = []
    tot = {"c": 0, "p": 0, "sh": 0, "b": 0, "sb": 0}
    for split in sorted(set(splits) | set(std_bytes)):
        d = splits.get(split) or {}
        n_chars = sum(1 for c in characters if c["split"] == split and c["pairs"])
        pairs, nbytes, sb = int(d.get("samples", 0)), int(d.get("bytes", 0)), std_bytes.get(split, 0)
        rows.append([split, n_chars, f"{pairs:,}", d.get("shards", 0), human_bytes(nbytes), human_bytes(sb),
                     human_bytes((nbytes + sb) / pairs) if pairs else "–"])
        for k, v in (("c", n_chars), ("p", pairs), ("sh", d.get("shards", 0)), ("b", nbytes), ("sb", sb)):
            tot[k] += v
    rows.append([("html", "<b>all</b>"), tot["c"], f"{tot['p']:,}", tot["sh"], human_bytes(tot["b"]),
                 human_bytes(tot["sb"]), human_bytes((tot["b"] + tot["sb"]) / tot["p"]) if tot["p"] else "–"])
    return table(["split", "characters", "pairs", "pair shards", "pair bytes", "standard tar bytes",
                  "bytes per pair (all included)"], rows, numeric={1, 2, 3, 4, 5, 6})


def _distributions(page: Page, s: _ShardSet) -> str:
    doc = s.stats.to_json()
    figs = []
    for name, b in render_stats.NUMERIC_FIELDS.items():
        h = doc["numeric"][name]
        src = page.image(f"hist-{name}", plots.numeric_histogram(h, b.label, b.unit or "fraction"), "png")
        mean = s.stats.mean(name)
        cap = f"mean {mean:.3g}{(' ' + b.unit) if b.unit else ''}" if mean is not None else "not recorded in any sample"
        if name == "fg_luminance" and h["missing"]:
            cap += f"; {h['missing']:,} samples from renders that did not record it"
        figs.append(f'<figure><img src="{src}" alt="{esc(b.label)}"><figcaption>{esc(cap)}</figcaption></figure>')
    for name, label in render_stats.CATEGORICAL_FIELDS.items():
        h = doc["categorical"][name]
        src = page.image(f"hist-{name}", plots.category_bars(h["counts"], label, h["missing"]), "png")
        n = len(h["counts"])
        figs.append(f'<figure><img src="{src}" alt="{esc(label)}"><figcaption>{n} value{"s" if n != 1 else ""}'
                    f'</figcaption></figure>')
    return f'<p class="note">From {esc(s.stats_source)}.</p><div class="plots">{"".join(figs)}</div>'


def _failures_section(s: _ShardSet, characters: list[dict]) -> str:
    parts = []
    quarantined = [c for c in characters if c["status"] == "quarantined"]
    if quarantined:
        rows = [[c["name"], c["id"], c["quarantine_reason"] or "; ".join(str(f.get("error")) for f in c["failures"]
                                                                         if f.get("key") is None)]
                for c in quarantined]
        parts.append("<h3>Quarantined characters</h3>" + table(["name", "id", "reason"], rows))
    sample_fails = [f for f in (s.index.get("failures") or []) if f.get("key") is not None]
    if sample_fails:
        rows = [[f.get("character"), f.get("key"), f.get("error")] for f in sample_fails[:500]]
        more = f'<p class="note">and {len(sample_fails) - 500:,} more</p>' if len(sample_fails) > 500 else ""
        parts.append("<h3>Failed samples</h3>" + table(["character", "sample", "error"], rows) + more)
    rejected = [r for r in (s.assets_records or []) if r.get("status") == "rejected"]
    if s.assets_source is None:
        parts.append("<h3>Rejected by the asset build</h3>" + not_recorded(
            "not recorded: this set's run.json holds no asset summary; pass --assets DIR to show the asset "
            "folder's rejections"))
    elif rejected:
        rows = [[_file_name(r) or r.get("display_name") or r.get("id"), r.get("id"), r.get("reason"), r.get("detail")]
                for r in rejected]
        parts.append(f"<h3>Rejected by the asset build</h3><p class=\"note\">From the {esc(s.assets_source)}.</p>"
                     + table(["file or name", "id", "reason", "detail"], rows))
    if not parts or (not quarantined and not sample_fails and not rejected):
        parts.insert(0, '<p class="ok">No failed samples, no quarantined characters'
                        + (", no rejected characters." if s.assets_source else ".") + "</p>")
    return "".join(parts)


def _cards(page: Page, s: _ShardSet, characters: list[dict], max_characters: int, per_card: int) -> str:
    shown = characters[:max_characters]
    cards = []
    for n, ch in enumerate(shown):
        rec = ch["record"]
        meta_bits = [f"id {ch['id']}"]
        if ch["split"]:
            meta_bits.append(ch["split"])
        file_name = _file_name(rec)
        if file_name:
            meta_bits.append(f"file {file_name}")
        if rec.get("kind"):
            meta_bits.append(str(rec["kind"]))
        if ch["pairs"]:
            meta_bits.append(f"{ch['pairs']:,} pairs, {human_bytes(ch['bytes'])}")
        strip = []
        if ch["shards"]:
            path = s.root / ch["shards"][0]["path"]
            first: list[dict[str, bytes]] = []
            try:  # the first K samples, read in tar order: no walk over the rest of the shard
                first = [members for _key, members in itertools.islice(tarset.iter_samples(path), per_card)]
            except (OSError, tarfile.TarError, ValueError) as exc:
                s.notes.append(f"{ch['shards'][0]['path']}: pictures left out ({type(exc).__name__}: {exc})")
            try:
                std = s.standard_png(ch, first)
                if std:
                    src = page.pil(f"{n:04d}-std", _thumb(std, _STD_THUMB_H))
                    strip.append(f'<img class="std" src="{src}" alt="standard image" title="standard image">')
            except (OSError, tarfile.TarError, ValueError) as exc:
                s.notes.append(f"{ch['name']}: standard image left out ({exc})")
            for k, members in enumerate(first):
                if "ref.png" in members:
                    try:
                        src = page.pil(f"{n:04d}-ref{k}", _thumb(members["ref.png"], _REF_THUMB_H))
                    except (OSError, ValueError) as exc:
                        s.notes.append(f"{ch['shards'][0]['path']}: reference {k + 1} left out ({exc})")
                        continue
                    strip.append(f'<img src="{src}" alt="reference {k + 1}">')
        reasons = []
        if ch["status"] == "rejected":
            reasons.append(f"rejected by the asset build: {rec.get('reason')}: {rec.get('detail', '')}")
        if ch["quarantine_reason"]:
            reasons.append(f"quarantined: {ch['quarantine_reason']}")
        for f in ch["failures"][:5]:
            reasons.append(f"failed {f.get('key') or 'character'}: {f.get('error')}")
        if len(ch["failures"]) > 5:
            reasons.append(f"and {len(ch['failures']) - 5} more failures")
        reason_html = ("<ul class=\"reasons\">" + "".join(f'<li class="bad">{esc(r)}</li>' for r in reasons)
                       + "</ul>") if reasons else ""
        search = " ".join([ch["name"], ch["id"], file_name or ""]).lower()
        cls = {"ok": "card", "failures": "card failed", "quarantined": "card failed", "rejected": "card rejected"}
        cards.append(f'<div class="{cls[ch["status"]]}" data-search="{esc(search)}" data-status="{esc(ch["status"])}">'
                     f'<h3>{esc(ch["name"])} <span class="note">({esc(ch["status"])})</span></h3>'
                     f'<div class="meta">{esc(" · ".join(meta_bits))}</div>'
                     + (f'<div class="strip">{"".join(strip)}</div>' if strip else "")
                     + reason_html + "</div>")
    omitted = len(characters) - len(shown)
    more = (f'<p class="note">{omitted:,} more characters not shown (--max-characters {max_characters}); '
            "problem characters come first.</p>") if omitted else ""
    statuses = sorted({c["status"] for c in shown}, key=_STATUS_ORDER.get)
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in statuses)
    controls = ('<div class="filter"><input id="card-filter" type="search" placeholder="filter by name, id or file">'
                f' <select id="card-status"><option value="">any status</option>{options}</select>'
                ' <span id="card-count" class="note"></span></div>')
    legend = ('<p class="note">Each card: the standard image (framed), then the first references of the '
              "character's first shard, on a checkerboard where they are transparent.</p>")
    return legend + controls + f'<div class="cards">{"".join(cards)}</div>' + more


def build_shards_report(root: str | Path, out: str | Path, *, assets: str | Path | None = None, sample: int = 2000,
                        max_characters: int = 200, pairs_per_character: int = 6) -> Path:
    """Write the report of the shard set at ``root`` into the folder ``out``; returns its index.html."""
    root = Path(root)
    s = _ShardSet(root, Path(assets) if assets is not None else None, sample)
    characters = s.characters()
    total = sum(int(e.get("samples", 0)) for e in s.shard_entries)
    page = Page(out, f"Shard set report: {root.name or root}",
                f"{total:,} pairs · {sum(1 for c in characters if c['pairs'])} characters · {root}")
    page.section("Run", kv_table(_settings_rows(s)), "run")
    page.section("Counts", _counts_table(s, characters), "counts")
    page.section("Distributions", _distributions(page, s), "distributions")
    page.section("Failures, quarantine, rejections", _failures_section(s, characters), "failures")
    page.section("Characters", _cards(page, s, characters, max_characters, pairs_per_character), "characters")
    if s.notes:
        more = f'<li class="note">and {len(s.notes) - _MAX_NOTES:,} more</li>' if len(s.notes) > _MAX_NOTES else ""
        page.section("Notes", "<ul>" + "".join(f'<li class="warn">{esc(n)}</li>' for n in s.notes[:_MAX_NOTES])
                     + more + "</ul>", "notes")
    return page.write()
