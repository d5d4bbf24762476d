"""GLUE metrics computed locally with numpy. All values are fractions (accuracy in [0, 1], correlations in
[-1, 1]), never percentages; degenerate inputs (a constant vector, an absent class) give 0.0, not NaN."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from romebert.core.errors import RomebertError
from romebert.data.tasks import TaskSpec


def _pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {p.size} vs {y.size}")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches (0.0 for empty input)."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y)) if p.size else 0.0


def f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of the positive class (index 1); 0.0 when there is no positive prediction or label."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == 1) & (y == 1)))
    wrong = float(np.sum((p == 1) != (y == 1)))  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp > 0 else 0.0


def matthews(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class form, as sklearn); 0.0 when undefined."""
    p, y = _pair(preds, labels)
    if not p.size:
        return 0.0
    classes, encoded = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (encoded[: y.size], encoded[y.size :]), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = float(p.size), float(np.trace(confusion))
    cov_yp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_yy = n * n - t_sum @ t_sum
    if cov_pp == 0 or cov_yy == 0:  # one side predicts / holds a single class
        return 0.0
    return float(np.clip(cov_yp / np.sqrt(cov_yy * cov_pp), -1.0, 1.0))


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    a, b = _pair(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    if denom == 0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip((a @ b) / denom, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (like scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant."""
    a, b = _pair(x, y)
    if a.size < 2:
        return 0.0
    return pearson(_average_ranks(a), _average_ranks(b))


def _acc_and_f1(p: np.ndarray, y: np.ndarray) -> float:
    return (accuracy(p, y) + f1(p, y)) / 2


def _corr(p: np.ndarray, y: np.ndarray) -> float:
    return (pearson(p, y) + spearman(p, y)) / 2


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "acc_and_f1": _acc_and_f1,
    "mcc": matthews,
    "pearson": pearson,
    "spearman": spearman,
    "corr": _corr,
}
_REGRESSION_METRICS = {"pearson", "spearman", "corr"}


def _prepare(preds: ArrayLike, regression: bool) -> np.ndarray:
    """Class indices from indices or logits (argmax); a flat float vector for regression."""
    p = np.asarray(preds)
    if regression:
        return p.reshape(-1).astype(np.float64)
    if p.ndim == 2:
        return p.argmax(axis=-1)
    return p.reshape(-1)


def compute_metrics_by_names(names: Sequence[str], preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Metrics ``names`` (keys of ``METRICS``) of ``preds`` (indices, logits or scores) against ``labels``."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise RomebertError(f"unknown metric(s) {unknown} (known: {', '.join(METRICS)})")
    regression = bool(names) and all(name in _REGRESSION_METRICS for name in names)
    p = _prepare(preds, regression)
    y = np.asarray(labels).reshape(-1)
    if not regression:
        y = y.astype(np.int64)
    return {name: float(METRICS[name](p, y)) for name in names}


def compute_metrics(task: TaskSpec, preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The task's metrics (keys exactly ``task.metrics``) for class indices / logits / regression scores."""
    return compute_metrics_by_names(task.metrics, preds, labels)


def main_metric(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The value of the task's main metric in ``metrics``."""
    if task.metric not in metrics:
        raise RomebertError(f"metrics for task {task.name} lack its main metric '{task.metric}'")
    return float(metrics[task.metric])
