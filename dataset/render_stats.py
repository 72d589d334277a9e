"""Per-sample statistics of a render set, and fixed-bin histograms of them that merge.

The dataset report (``serialgen report``) shows the distributions of what was rendered: framing,
camera azimuth / elevation / focal length, expression, exposure, pose source and keypoint
visibility. At paper scale (millions of pairs) nobody can re-read every ``meta.json`` to draw them,
so the render job counts its own samples while it writes them (:func:`sample_row` per sample, one
:class:`Histograms` per shard), the farm merges the shards' histograms into ``stats.json`` beside
``index.json``, and the report reads that one small file. Older sets without ``stats.json`` are
sampled instead (the report reads some ``meta.json`` / ``ref_pose.json`` and feeds the same rows).

Bins are fixed by this module, not by the data, so histograms of any two shards merge by adding
counts, in any order, with the same result (merging is associative and commutative). Numbers outside
a field's range are counted as ``under`` / ``over`` rather than dropped, and a sample without the
field (``fg_luminance`` of a set rendered before it was recorded) counts as ``missing``.

``stats.json`` (``to_json()``)::

    {"format": "serialgen.render-stats", "version": 1, "samples": 48,
     "numeric": {"azimuth": {"lo": 0.0, "hi": 360.0, "bins": 24, "counts": [...],
                             "under": 0, "over": 0, "missing": 0, "sum": ..., "min": ..., "max": ...}, ...},
     "categorical": {"framing": {"counts": {"full_body": 25, ...}, "missing": 0}, ...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from serialgen.assets_manifest.motions import MOTION_NAMES
from serialgen.errors import SerialgenError

__all__ = [
    "STATS_FORMAT",
    "STATS_VERSION",
    "STATS_NAME",
    "NUMERIC_FIELDS",
    "CATEGORICAL_FIELDS",
    "StatsError",
    "sample_row",
    "Histograms",
    "read_stats",
]

STATS_FORMAT = "serialgen.render-stats"
STATS_VERSION = 1
STATS_NAME = "stats.json"  # beside index.json


@dataclass(frozen=True)
class _Bins:
    lo: float
    hi: float
    bins: int
    unit: str
    label: str


# Ranges cover what any render settings can produce, not only today's defaults (elevation is drawn
# from -10..35 deg and focal length from 35..85 mm now), so a changed view range still lands in bins
# and old and new sets stay comparable.
NUMERIC_FIELDS: dict[str, _Bins] = {
    "azimuth": _Bins(0.0, 360.0, 24, "deg", "camera azimuth"),
    "elevation": _Bins(-90.0, 90.0, 36, "deg", "camera elevation"),
    "focal_mm": _Bins(10.0, 210.0, 40, "mm", "focal length (36 mm sensor)"),
    # The render's exposure measure: median luminance of the foreground in [0, 1] (0 black, 1 white).
    "fg_luminance": _Bins(0.0, 1.0, 20, "", "exposure: foreground median luminance"),
    # Share of the defined keypoints that are visible (in frame and not occluded).
    "keypoint_visibility": _Bins(0.0, 1.0, 20, "", "keypoint visibility fraction"),
}
CATEGORICAL_FIELDS: dict[str, str] = {
    "framing": "framing",
    "expression": "expression",
    "pose_source": "pose source",
    "motion": "motion (set or imported clip)",
}


class StatsError(SerialgenError, ValueError):
    """A stats document this code cannot read (wrong format, newer version, other bins, malformed)."""


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _pose_source(meta: dict) -> str | None:
    """``motion_set`` or ``imported_clip``. The pose library lists the built-in motion sets first,
    in ``MOTION_NAMES`` order, then the imported clips (docs/poses.md), so a sample's motion index
    and name together say which it is; a clip that happens to share a set's name sits at another index."""
    name, index = meta.get("motion"), meta.get("motion_index")
    if not isinstance(name, str):
        return None
    if isinstance(index, int) and not isinstance(index, bool):
        builtin = index < len(MOTION_NAMES) and MOTION_NAMES[index] == name
    else:  # a meta without the index: the name alone (imported clips are named file/clip)
        builtin = name in MOTION_NAMES
    return "motion_set" if builtin else "imported_clip"


def _visibility(ref_pose: dict) -> float | None:
    """Visible share of the defined keypoints of a ``ref_pose.json`` record (None: none defined)."""
    kps, defined = ref_pose.get("keypoints"), ref_pose.get("defined")
    if not isinstance(kps, list) or not isinstance(defined, list) or len(kps) != len(defined):
        return None
    n = seen = 0
    for kp, d in zip(kps, defined):
        if d:
            n += 1
            seen += 1 if (isinstance(kp, list) and len(kp) == 3 and kp[2]) else 0
    return seen / n if n else None


def sample_row(meta: dict, ref_pose: dict) -> dict:
    """The statistics of one rendered sample, from its ``meta.json`` and ``ref_pose.json`` records.

    Keys: ``NUMERIC_FIELDS`` (floats) and ``CATEGORICAL_FIELDS`` (strings), plus ``character`` and
    ``split``; a value the records do not hold is None. The camera's focal length is the one the
    image was rendered with (``camera.focal_mm``), falling back to the drawn view's.
    """
    view = meta.get("view") if isinstance(meta.get("view"), dict) else {}
    camera = meta.get("camera") if isinstance(meta.get("camera"), dict) else {}
    azimuth = _number(view.get("azimuth"))
    focal = _number(camera.get("focal_mm"))
    framing = meta.get("framing", view.get("framing"))
    expression = meta.get("expression")
    return {
        "character": meta.get("character"),
        "split": meta.get("split"),
        "framing": framing if isinstance(framing, str) else None,
        "azimuth": azimuth % 360.0 if azimuth is not None else None,
        "elevation": _number(view.get("elevation")),
        "focal_mm": focal if focal is not None else _number(view.get("focal_mm")),
        "expression": expression if isinstance(expression, str) else None,
        "fg_luminance": _number(meta.get("fg_luminance")),
        "pose_source": _pose_source(meta),
        "motion": meta.get("motion") if isinstance(meta.get("motion"), str) else None,
        "keypoint_visibility": _visibility(ref_pose) if isinstance(ref_pose, dict) else None,
    }


class Histograms:
    """Fixed-bin histograms of :func:`sample_row` rows: ``add`` rows, ``merge`` other histograms,
    ``to_json`` / ``from_json`` for ``stats.json`` and the render job result."""

    def __init__(self) -> None:
        self.samples = 0
        self.numeric = {name: {"counts": [0] * b.bins, "under": 0, "over": 0, "missing": 0,
                               "sum_micro": 0, "min": None, "max": None}
                        for name, b in NUMERIC_FIELDS.items()}
        self.categorical = {name: {"counts": {}, "missing": 0} for name in CATEGORICAL_FIELDS}

    def add(self, row: dict) -> None:
        self.samples += 1
        for name, b in NUMERIC_FIELDS.items():
            h, value = self.numeric[name], _number(row.get(name))
            if value is None:
                h["missing"] += 1
                continue
            # summed in integer millionths: exact, so any merge order gives the same bytes
            h["sum_micro"] += round(value * 1e6)
            h["min"] = value if h["min"] is None else min(h["min"], value)
            h["max"] = value if h["max"] is None else max(h["max"], value)
            if value < b.lo:
                h["under"] += 1
            elif value > b.hi:
                h["over"] += 1
            else:  # the top edge belongs to the last bin: a fully visible pose (1.0) is counted
                h["counts"][min(int((value - b.lo) / (b.hi - b.lo) * b.bins), b.bins - 1)] += 1
        for name in CATEGORICAL_FIELDS:
            h, value = self.categorical[name], row.get(name)
            if isinstance(value, str):
                h["counts"][value] = h["counts"].get(value, 0) + 1
            else:
                h["missing"] += 1

    def merge(self, other: "Histograms") -> "Histograms":
        """Add ``other``'s counts to these; returns self."""
        self.samples += other.samples
        for name in NUMERIC_FIELDS:
            h, o = self.numeric[name], other.numeric[name]
            h["counts"] = [a + b for a, b in zip(h["counts"], o["counts"])]
            for k in ("under", "over", "missing", "sum_micro"):
                h[k] += o[k]
            h["min"] = o["min"] if h["min"] is None else (h["min"] if o["min"] is None else min(h["min"], o["min"]))
            h["max"] = o["max"] if h["max"] is None else (h["max"] if o["max"] is None else max(h["max"], o["max"]))
        for name in CATEGORICAL_FIELDS:
            h, o = self.categorical[name], other.categorical[name]
            for k, n in o["counts"].items():
                h["counts"][k] = h["counts"].get(k, 0) + n
            h["missing"] += o["missing"]
        return self

    def mean(self, name: str) -> float | None:
        """Mean of a numeric field over the samples that have it (None: none has)."""
        h = self.numeric[name]
        n = sum(h["counts"]) + h["under"] + h["over"]
        return h["sum_micro"] / 1e6 / n if n else None

    def to_json(self) -> dict:
        """A JSON-ready dict, canonical (categories sorted) so equal histograms give equal bytes."""
        numeric = {}
        for name, b in NUMERIC_FIELDS.items():
            h = self.numeric[name]
            numeric[name] = {"lo": b.lo, "hi": b.hi, "bins": b.bins, "counts": list(h["counts"]),
                             "under": h["under"], "over": h["over"], "missing": h["missing"],
                             "sum": h["sum_micro"] / 1e6, "min": h["min"], "max": h["max"]}
        categorical = {name: {"counts": dict(sorted(h["counts"].items())), "missing": h["missing"]}
                       for name, h in self.categorical.items()}
        return {"format": STATS_FORMAT, "version": STATS_VERSION, "samples": self.samples,
                "numeric": numeric, "categorical": categorical}

    @classmethod
    def from_json(cls, doc, source: str = "stats") -> "Histograms":
        """Read a :meth:`to_json` dict; anything else is one :class:`StatsError` line naming ``source``."""
        if not isinstance(doc, dict) or doc.get("format") != STATS_FORMAT:
            raise StatsError(f"{source}: not a {STATS_FORMAT} document")
        if doc.get("version") != STATS_VERSION:
            raise StatsError(f"{source}: {STATS_FORMAT} version {doc.get('version')!r}; "
                             f"this code reads version {STATS_VERSION}")
        out = cls()
        try:
            out.samples = _count(doc["samples"])
            for name, b in NUMERIC_FIELDS.items():
                d = doc["numeric"][name]
                if (d["lo"], d["hi"], d["bins"]) != (b.lo, b.hi, b.bins) or len(d["counts"]) != b.bins:
                    raise StatsError(f"{source}: {name} has bins {d['lo']}..{d['hi']} x {d['bins']}; "
                                     f"this code uses {b.lo}..{b.hi} x {b.bins}")
                h = out.numeric[name]
                h["counts"] = [_count(c) for c in d["counts"]]
                for k in ("under", "over", "missing"):
                    h[k] = _count(d[k])
                h["sum_micro"] = round(float(d["sum"]) * 1e6)
                h["min"] = None if d["min"] is None else float(d["min"])
                h["max"] = None if d["max"] is None else float(d["max"])
            for name in CATEGORICAL_FIELDS:
                d = doc["categorical"][name]
                counts = d["counts"]
                if not isinstance(counts, dict) or not all(isinstance(k, str) for k in counts):
                    raise StatsError(f"{source}: {name} counts are not a name -> count object")
                out.categorical[name] = {"counts": {k: _count(v) for k, v in counts.items()},
                                         "missing": _count(d["missing"])}
        except StatsError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StatsError(f"{source}: malformed {STATS_FORMAT} document ({type(exc).__name__}: {exc})") from None
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, Histograms) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Histograms(samples={self.samples})"


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def read_stats(path) -> Histograms:
    """Read a ``stats.json`` file (one :class:`StatsError` line naming it when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatsError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    return Histograms.from_json(doc, source=str(path))
