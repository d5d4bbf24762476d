"""What an evaluation writes, from every exit's cached logits: per-exit metrics, the threshold sweep,
their JSON and CSV files and the two plots; and a re-sweep from that cache without the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.core.runs import EvalFolder
from romebert.data.tasks import TaskSpec
from romebert.evaluation.exits import per_exit_metrics, sweep
from romebert.evaluation.plots import plot_per_exit, plot_speedup
from romebert.evaluation.reports import write_per_exit_csv, write_sweep_csv
from romebert.runtime.policies import default_thresholds

FEATURES = ("nsp",)  # the per-exit outputs an evaluation caches for the criteria that read them (CAP)


def write_evaluation(
    out: EvalFolder,
    logits: np.ndarray,
    labels: np.ndarray,
    task: TaskSpec,
    thresholds: Sequence[Any] | None = None,
    criterion: str = "entropy",
    options: dict[str, Any] | None = None,
    title: str = "",
    features: dict[str, np.ndarray] | None = None,
) -> dict:
    """From every exit's logits [L, N, C] (and the per-exit ``features`` some criteria read): per-exit
    metrics, the sweep of ``criterion`` over ``thresholds`` (default: its grid for L layers; entries may be
    policies), their JSON / CSV files and the two plots."""
    out.root.mkdir(parents=True, exist_ok=True)
    np.save(out.logits, logits)
    np.save(out.labels, labels)
    for name, values in (features or {}).items():
        np.save(out.feature(name), values)
    grid = list(thresholds) if thresholds is not None else default_thresholds(criterion, logits.shape[0])
    per_exit = [{"exit": i + 1, **m} for i, m in enumerate(per_exit_metrics(logits, labels, task))]
    rows = sweep(logits, labels, task, grid, criterion=criterion, policy_kwargs=options, features=features)
    write_json(out.per_exit, per_exit)
    write_per_exit_csv(out.per_exit_csv, per_exit)
    write_json(out.sweep, rows)
    write_sweep_csv(out.sweep_csv, rows)
    plot_per_exit(out.per_exit_plot, {"dev": [r[task.metric] for r in per_exit]}, task.metric, title)
    plot_speedup(out.speedup_plot, {"dev": [(r["speedup"], r["metric"]) for r in rows]}, task.metric, title)
    return {"dir": str(out.root), "files": out, "per_exit": per_exit, "sweep": rows}


def load_cached(out: EvalFolder) -> tuple[np.ndarray, np.ndarray]:
    """The logits [L, N, C] and labels [N] an evaluation cached (one line if there are none)."""
    if not out.has_cache():
        raise RomebertError(f"{out.root}: no cached logits; run 'romebert evaluate' first")
    return np.load(out.logits), np.load(out.labels)


def load_features(out: EvalFolder, names: tuple[str, ...] = FEATURES) -> dict[str, np.ndarray]:
    """The per-exit features an evaluation cached beside its logits (those it has of ``names``)."""
    return {k: np.load(out.feature(k)) for k in names if out.feature(k).is_file()}


def sweep_cached(
    out: EvalFolder,
    task: TaskSpec,
    thresholds: Sequence[Any] | None = None,
    criterion: str = "entropy",
    options: dict[str, Any] | None = None,
) -> dict:
    """Re-sweep from the logits an earlier evaluation cached (no model needed)."""
    logits, labels = load_cached(out)
    return write_evaluation(out, logits, labels, task, thresholds, criterion, options, f"{task.name} {out.root.name}",
                            load_features(out))  # fmt: skip
