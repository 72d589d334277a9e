"""The report's charts: matplotlib figures drawn off-screen (the Agg canvas, no display, no pyplot
state) and returned as PNG bytes. The same numbers give the same bytes (no timestamp in the file)."""

from __future__ import annotations

import io

__all__ = ["numeric_histogram", "category_bars", "bars", "heatmap"]

_BLUE = "#3b6ea8"
_GREY = "#9aa5b1"
_DPI = 100
_OTHER_AFTER = 24  # categories beyond this many are summed into one "other (n)" bar


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    # Margins are set per chart (subplots_adjust), not by tight_layout: that draws every figure
    # twice, half of a report's time.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def numeric_histogram(h: dict, title: str, unit: str = "") -> bytes:
    """A ``Histograms.to_json()['numeric'][field]`` entry as bars over its fixed bins, the x range cut
    to the bins that hold samples (a 10..210 mm focal axis with samples in 35..85 would be mostly empty);
    under/over/missing counts go into the title line below."""
    counts, lo, hi, n = h["counts"], h["lo"], h["hi"], h["bins"]
    width = (hi - lo) / n
    used = [i for i, c in enumerate(counts) if c]
    first, last = (used[0], used[-1]) if used else (0, n - 1)
    first, last = max(0, first - 1), min(n - 1, last + 1)
    fig = _figure(3.8, 2.5)
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.17, top=0.89)
    ax = fig.add_subplot()
    ax.bar([lo + (i + 0.5) * width for i in range(first, last + 1)], counts[first:last + 1], width=width * 0.92,
           color=_BLUE)
    ax.set_xlim(lo + first * width, lo + (last + 1) * width)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(unit or "value", fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    ax.tick_params(labelsize=7)
    extra = [f"{k} {h[k]}" for k in ("under", "over", "missing") if h.get(k)]
    if extra:
        ax.text(0.99, 0.97, ", ".join(extra), transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#a0400b")
    if not used:
        ax.text(0.5, 0.5, "no sample records this", transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color=_GREY)
    return _png(fig)


def category_bars(counts: dict[str, int], title: str, missing: int = 0) -> bytes:
    """Horizontal bars, largest first; past ``_OTHER_AFTER`` categories the rest are one bar."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(items) > _OTHER_AFTER:
        rest = items[_OTHER_AFTER - 1:]
        items = items[:_OTHER_AFTER - 1] + [(f"other ({len(rest)})", sum(v for _, v in rest))]
    if missing:
        items.append(("(not recorded)", missing))
    return bars([k for k, _ in items], [v for _, v in items], title, "samples",
                highlight={"(not recorded)"})


def bars(labels: list[str], values: list[float], title: str, xlabel: str, highlight: set[str] = frozenset()) -> bytes:
    """Horizontal bars in the given order (top to bottom)."""
    height = max(1.6, 0.9 + 0.19 * len(labels))
    fig = _figure(3.8, height)
    longest = max((min(len(lab), 28) for lab in labels), default=4)
    fig.subplots_adjust(left=min(0.5, 0.05 + 0.0135 * longest), right=0.96, bottom=0.5 / height,
                        top=1 - 0.32 / height)
    ax = fig.add_subplot()
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, values, color=[_GREY if lab in highlight else _BLUE for lab in labels], height=0.75)
    ax.set_yticks(ys, [lab if len(lab) <= 28 else lab[:27] + "…" for lab in labels], fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    if not labels:
        ax.text(0.5, 0.5, "nothing recorded", transform=ax.transAxes, ha="center", va="center", fontsize=9, color=_GREY)
    return _png(fig)


def heatmap(matrix, row_labels: list[str], col_labels: list[str], title: str, xlabel: str) -> bytes:
    """Counts as colours, one row per label (a motion), with the count written in each cell."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    width, height = min(9.0, 2.0 + 0.45 * len(col_labels)), max(1.8, 0.9 + 0.22 * len(row_labels))
    fig = _figure(width, height)
    longest = max((min(len(r), 24) for r in row_labels), default=4)
    fig.subplots_adjust(left=(0.15 + 0.052 * longest) / width, right=0.98, bottom=0.55 / height, top=1 - 0.3 / height)
    ax = fig.add_subplot()
    ax.imshow(m, aspect="auto", cmap="Blues", vmin=0, vmax=max(1.0, float(m.max()) if m.size else 1.0))
    ax.set_yticks(range(len(row_labels)), [r if len(r) <= 24 else r[:23] + "…" for r in row_labels], fontsize=7)
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    top = m.max() if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6,
                color="white" if top and v > 0.6 * top else "#1d232a")
    return _png(fig)
