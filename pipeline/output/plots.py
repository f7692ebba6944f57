"""PNG figures for the dataset card, drawn with matplotlib's Agg backend (no display needed).

Each figure embeds the exact series it draws as JSON in a PNG text chunk (`longloom:data`), so a
reader, or a test, can check the picture against the rows without reading pixels. Output bytes
depend only on the data: a re-run with the same data writes identical files, and a re-publish
uploads nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.parquet_io import atomic_path

PNG_DATA_KEY = "longloom:data"
FIGSIZE = (9.0, 4.8)  # inches; at DPI this is 900 x 480 pixels
DPI = 100
_COLORS = [
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
]
_GREYS = {"separators": "#8C8C8C", "padding": "#D0D0D0"}


@dataclass(frozen=True)
class Plot:
    """A figure written under the output folder: where it is, what it shows, and the numbers drawn."""

    path: str  # relative to the output folder, e.g. "images/doc_tokens_by_source.png"
    title: str
    alt: str
    data: dict[str, Any] = field(default_factory=dict)


def _figure(figsize: tuple[float, float]) -> Any:
    """A Figure on its own Agg canvas: matplotlib's object API without `pyplot` (whose import, backend
    selection and figure registry cost about a third more start-up than the figure alone, measured in
    finalize; and nothing here needs a figure manager or a window)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out: Path, plot: Plot) -> Plot:
    target = out / plot.path
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "Title": plot.title,
        "Description": plot.alt,
        "Software": None,  # drop the matplotlib version so the bytes depend on the data alone
        PNG_DATA_KEY: json.dumps(plot.data, sort_keys=True, separators=(",", ":")),
    }
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=meta)
    return plot


def _si(v: float, _pos: Any = None) -> str:
    """Axis labels like 600K and 1.2M instead of matplotlib's 1e6 offset."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:g}"


def _bin_label(lo: int, hi: int) -> str:
    def short(v: int) -> str:
        if v >= 1 << 20 and v % (1 << 20) == 0:
            return f"{v >> 20}M"
        if v >= 1 << 10 and v % (1 << 10) == 0:
            return f"{v >> 10}K"
        return f"{v:,}"

    return f"{short(lo)}–{short(hi)}"


def histogram(
    out: Path,
    rel_path: str,
    title: str,
    xlabel: str,
    edges: list[int],
    series: dict[str, list[int]],
    ylabel: str = "count",
) -> Plot:
    """Counts per bin, one panel per series (each with its own y scale); bin i covers [edges[i], edges[i+1])."""
    labels = [_bin_label(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    return binned(out, rel_path, title, xlabel, labels, series, ylabel, extra={"edges": edges})


def binned(
    out: Path,
    rel_path: str,
    title: str,
    xlabel: str,
    labels: list[str],
    series: dict[str, list[int]],
    ylabel: str = "count",
    extra: dict[str, Any] | None = None,
) -> Plot:
    """Counts per labelled bin, one panel per series (each with its own y scale)."""
    from matplotlib.ticker import MaxNLocator

    names = list(series) or ["(none)"]
    n_bins = len(labels)
    fig = _figure((FIGSIZE[0], 1.0 + 1.5 * len(names)))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    for k, name in enumerate(names):
        ax = axes[k][0]
        ax.bar(range(n_bins), series.get(name, [0] * n_bins), width=0.85, color=_COLORS[k % len(_COLORS)])
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(_si)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.text(
            0.995,
            0.9,
            f"{name}: {sum(series.get(name, [])):,}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
        )
        ax.grid(axis="y", alpha=0.3)
    step = max(1, n_bins // 14)
    last = axes[-1][0]
    last.set_xticks(range(0, n_bins, step))
    last.set_xticklabels([labels[i] for i in range(0, n_bins, step)], rotation=30, ha="right")
    last.set_xlabel(xlabel)
    axes[0][0].set_title(title)
    fig.tight_layout()
    totals = {name: sum(v) for name, v in series.items()}
    alt = f"{title}: " + ", ".join(f"{n} {totals[n]:,}" for n in series)
    data = {**(extra or {}), "labels": labels, "series": series, "totals": totals}
    plot = Plot(rel_path, title, alt, data)
    return _save(fig, out, plot)


def stacked_bars(
    out: Path,
    rel_path: str,
    title: str,
    xlabel: str,
    categories: list[str],
    series: dict[str, list[int]],
) -> Plot:
    """Horizontal bars, one per category, stacked by series (e.g. tokens per source per config)."""
    fig = _figure(FIGSIZE)
    ax = fig.subplots()
    left = [0] * len(categories)
    for k, (name, values) in enumerate(series.items()):
        color = _GREYS.get(name, _COLORS[k % len(_COLORS)])
        ax.barh(categories, values, left=left, label=name, color=color)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_formatter(_si)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    totals = dict(zip(categories, left, strict=True))
    alt = f"{title}: " + ", ".join(f"{c} {t:,}" for c, t in totals.items())
    plot = Plot(rel_path, title, alt, {"categories": categories, "series": series, "totals": totals})
    return _save(fig, out, plot)


def grouped_bars(
    out: Path,
    rel_path: str,
    title: str,
    ylabel: str,
    categories: list[str],
    series: dict[str, list[int]],
) -> Plot:
    """Vertical bars grouped by category, one bar per series (e.g. tokens per source before/after)."""
    fig = _figure(FIGSIZE)
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(categories))]
        ax.bar(xs, values, width=width, label=name, color=_COLORS[k % len(_COLORS)])
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(_si)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    totals = {name: sum(v) for name, v in series.items()}
    alt = f"{title}: " + ", ".join(f"{n} {t:,}" for n, t in totals.items())
    plot = Plot(rel_path, title, alt, {"categories": categories, "series": series, "totals": totals})
    return _save(fig, out, plot)
