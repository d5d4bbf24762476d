"""What an evaluation writes, from every exit's cached logits: per-exit metrics, the threshold sweep,
their JSON and CSV files and the two plots; and a re-sweep from a cache without the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.data.tasks import TaskSpec
from romebert.evaluation.exits import per_exit_metrics, sweep
from romebert.evaluation.plots import plot_per_exit, plot_speedup
from romebert.evaluation.reports import write_per_exit_csv, write_sweep_csv


def write_evaluation(
    out: Path, logits: np.ndarray, labels: np.ndarray, task: TaskSpec, thresholds: list[float], title: str = ""
) -> dict:
    """From cached logits: per-exit metrics, the sweep, their JSON/CSV files and the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", logits)
    np.save(out / "labels.npy", labels)
    per_exit = [{"exit": i + 1, **m} for i, m in enumerate(per_exit_metrics(logits, labels, task))]
    rows = sweep(logits, labels, task, thresholds)
    write_json(out / "per_exit.json", per_exit)
    write_per_exit_csv(out / "per_exit.csv", per_exit)
    write_json(out / "sweep.json", rows)
    write_sweep_csv(out / "sweep.csv", rows)
    plot_per_exit(out / "per_exit.png", {"dev": [r[task.metric] for r in per_exit]}, task.metric, title)
    plot_speedup(out / "speedup.png", {"dev": [(r["speedup"], r["metric"]) for r in rows]}, task.metric, title)
    return {"dir": str(out), "per_exit": per_exit, "sweep": rows}


def sweep_cached(split_dir: str | Path, task: TaskSpec, thresholds: list[float]) -> dict:
    """Re-sweep from the logits an earlier evaluation cached (no model needed)."""
    split_dir = Path(split_dir)
    try:
        logits, labels = np.load(split_dir / "logits.npy"), np.load(split_dir / "labels.npy")
    except FileNotFoundError:
        raise RomebertError(f"{split_dir}: no cached logits; run 'romebert evaluate' first") from None
    return write_evaluation(split_dir, logits, labels, task, thresholds, title=f"{task.name} {split_dir.name}")
