"""The figures of a comparison report: one panel per pooling, one colour per method (the same in both
figures), drawn with the helpers of ``evaluation/plots.py``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from romebert.evaluation.plots import _MARKERS, _save
from romebert.jobs.compare.config import PLAIN
from romebert.jobs.compare.curves import speedup_curve


# ``romebert compare``'s figures: one panel per pooling, one colour per method (the same in both figures)
def comparison_figures(out_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Both figures of every dev split of a comparison, drawn from its report.json content and named as
    ``report["figures"]`` says."""
    out = Path(out_dir)
    for split, names in report["figures"].items():
        plot_per_exit_panels(out / names["per_exit"], report, split)
        plot_speedup_panels(out / names["speedup"], report, split)


def plot_per_exit_panels(path: str | os.PathLike[str], report: Mapping[str, Any], split: str) -> None:
    """Metric of every exit, mean ± std over seeds, one line per method, one panel per pooling."""
    st = report["settings"]
    metric = st["metric"]
    styles = _styles(st["methods"])
    fig, axes = _panels(len(st["poolings"]), f"{st['task']} {split}: {metric} of every exit")
    for ax, pooling in zip(axes, st["poolings"]):
        table = report["per_exit"][split].get(pooling, {})
        n_layers = max((len(v) for v in table.values()), default=1)
        for m, col in table.items():
            s = styles[m]
            if m == PLAIN:
                last = col[-1]
                if last and last["mean"] is not None:
                    _plain_star(ax, n_layers, last["mean"])
                continue
            xs = np.arange(1, len(col) + 1)
            ys = np.array([100 * c["mean"] if c and c["mean"] is not None else np.nan for c in col])
            es = np.array([100 * c["std"] if c and c["std"] is not None else 0.0 for c in col])
            ax.plot(xs, ys, marker=s["marker"], markersize=4, color=s["color"], label=m)
            # a band rather than error bars: four methods' bars on the same exits are unreadable
            ax.fill_between(xs, ys - es, ys + es, color=s["color"], alpha=0.12, linewidth=0)
        ax.set_title(f"{pooling} pooling")
        ax.set_xlabel("exit layer")
        ax.set_xticks(range(1, n_layers + 1) if n_layers <= 24 else ax.get_xticks())
        ax.grid(True, alpha=0.3)
    _finish_panels(fig, axes, metric, path)


def plot_speedup_panels(path: str | os.PathLike[str], report: Mapping[str, Any], split: str) -> None:
    """Metric against layer speed-up: each seed's curve interpolated on a common grid, mean ± std band."""
    st = report["settings"]
    metric, speedups = st["metric"], st["speedups"]
    styles = _styles(st["methods"])
    fig, axes = _panels(len(st["poolings"]), f"{st['task']} {split}: {metric} against layer speed-up")
    for ax, pooling in zip(axes, st["poolings"]):
        for t in speedups:
            ax.axvline(t, color="0.8", linewidth=0.8, linestyle=":", zorder=0)
        for m in st["methods"]:
            s = styles[m]
            if m == PLAIN:
                e = report["speedup"][split].get(pooling, {}).get(PLAIN)
                if e and e["final"]["mean"] is not None:
                    _plain_star(ax, 1.0, e["final"]["mean"])
                continue
            curves = [
                speedup_curve([(p["speedup"], p["metric"]) for p in r["splits"][split]["sweep"]])
                for r in report["runs"]
                if r["status"] != "missing" and r["pooling"] == pooling and r["method"] == m
            ]
            curves = [c for c in curves if c]
            if not curves:
                continue
            lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
            # every seed is defined on [lo, hi]: the mean there averages the same number of seeds everywhere
            grid = np.unique(np.concatenate([np.linspace(lo, hi, 80), [t for t in speedups if lo <= t <= hi]]))
            ys = np.array([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves]) * 100
            mean = ys.mean(axis=0)
            at = [t for t in speedups if lo <= t <= hi]
            marks = [int(np.searchsorted(grid, t)) for t in at]  # markers at the target speed-ups only
            ax.plot(grid, mean, color=s["color"], marker=s["marker"], markersize=5, markevery=marks, label=m)
            if len(curves) > 1:
                std = ys.std(axis=0, ddof=1)
                ax.fill_between(grid, mean - std, mean + std, color=s["color"], alpha=0.15, linewidth=0)
        ax.set_title(f"{pooling} pooling")
        ax.set_xlabel("layer speed-up (x)")
        ax.grid(True, alpha=0.3)
    _finish_panels(fig, axes, metric, path)


def _styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour and marker per method, plain a black star."""
    styles = {}
    for k, m in enumerate(x for x in methods if x != PLAIN):
        styles[m] = {"color": f"C{k % 10}", "marker": _MARKERS[k % len(_MARKERS)]}
    styles[PLAIN] = {"color": "black", "marker": "*"}
    return styles


def _panels(n: int, title: str) -> tuple[Figure, Sequence[Axes]]:
    """A figure of ``n`` side-by-side panels sharing the y axis."""
    fig = Figure(figsize=(0.8 + 5.0 * n, 4.6), dpi=120)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    fig.suptitle(title)
    return fig, axes


def _finish_panels(fig: Figure, axes: Sequence[Axes], metric: str, path: str | os.PathLike[str]) -> None:
    """The shared y label and the legend on the first panel, then save."""
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plain_star(ax: Axes, x: float, value: float) -> None:
    """The plain classifier (last layer only) as one black star at ``x``; ``value`` a fraction."""
    ax.plot(
        [x],
        [100 * value],
        linestyle="none",
        marker="*",
        markersize=12,
        color="black",
        label="plain (last layer)",
        zorder=5,
    )
