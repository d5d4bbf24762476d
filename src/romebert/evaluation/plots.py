"""PNG figures of early-exit results (matplotlib, Agg): a run's per-exit and speed-up plots, and the
figure helpers that ``romebert compare``'s panels (``jobs/compare/figures.py``) draw with.

Figures are built on ``matplotlib.figure.Figure`` rendered by an explicit Agg canvas instead of
``pyplot``: no global figure state and no GUI backend, so it works headless and from any thread
without changing the process-wide backend (no ``matplotlib.use`` needed). Metric values are
fractions and are plotted as percent.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from romebert.core.errors import RomebertError
from romebert.core.files import write_atomic

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _pct(v: float | None) -> float:
    return math.nan if v is None else 100.0 * float(v)


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Save as PNG atomically (rendered in memory, then written by :func:`romebert.core.files.write_atomic`)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    write_atomic(path, buf.getvalue())


def _new_axes(title: str, xlabel: str, metric_name: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_name} (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_per_exit(
    path: str | os.PathLike[str],
    series: Mapping[str, Sequence[float]],
    metric_name: str,
    title: str = "",
) -> None:
    """Metric of every exit (x = exit layer 1..L), one line per series, like the paper's per-layer figure."""
    if not series:
        raise RomebertError(f"plot_per_exit: nothing to plot for {path}")
    fig, ax = _new_axes(title, "exit layer", metric_name)
    for k, (name, values) in enumerate(series.items()):
        ys = [_pct(v) for v in values]
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, ys, marker=_MARKERS[k % len(_MARKERS)], markersize=4, label=str(name))
    num_layers = max(len(v) for v in series.values())
    if num_layers <= 24:
        ax.set_xticks(range(1, num_layers + 1))  # one tick per layer, as in the paper's figure
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)


def plot_speedup(
    path: str | os.PathLike[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    metric_name: str,
    title: str = "",
) -> None:
    """Metric (y) against layer speed-up (x); points are ``(speedup, metric)``, sorted by speed-up."""
    if not series:
        raise RomebertError(f"plot_speedup: nothing to plot for {path}")
    fig, ax = _new_axes(title, "layer speed-up (x)", metric_name)
    for k, (name, points) in enumerate(series.items()):
        pts = sorted((float(s), _pct(m)) for s, m in points)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker=_MARKERS[k % len(_MARKERS)], markersize=4, label=str(name))
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
