"""Early-exit decisions computed from cached logits of every exit.

Everything here works on ``all_logits``, an array of shape ``[L, N, C]`` holding the logits of every
exit (exit ``L`` is the final head) for ``N`` examples, produced by ONE forward pass. A threshold
sweep therefore costs one pass plus cheap numpy work, instead of one model pass per threshold.

Exit rule (method.md, "Inference with early exit"):

* classification: a sample leaves at the first layer ``i < L`` whose softmax entropy (nats) is
  strictly below the threshold, otherwise at the final head ``L``;
* regression (an extension; the reference's entropy is always 0): a sample leaves at the first layer
  ``i >= 2`` where ``|h_i - h_{i-1}| < threshold``, otherwise at ``L``.

Layers are 1-based everywhere in the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from romebert.errors import RomebertError

REFERENCE_THRESHOLDS: tuple[float, ...] = (
    0.0,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
)

# ``metric_fn(task, preds, labels) -> {key: value}``; defaults to romebert.metrics.compute_metrics.
MetricFn = Callable[[Any, np.ndarray, np.ndarray], dict[str, float]]


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in nats of softmax(logits) over the last axis (float64, never negative).

    Computed from log_softmax, so logits of any size (e.g. 1000) give finite results, unlike the
    reference's ``log(sum(exp(x)))`` which overflows above about 88.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 0:
        raise RomebertError("entropy: logits must have at least one axis (the classes)")
    m = np.max(x, axis=-1, keepdims=True)
    # A row of all -inf would make the shift nan; treat it as a shift of 0 (its entropy is nan anyway).
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    p = np.exp(log_p)
    # 0 * log 0 = 0: a class with logit -inf (p == 0) contributes nothing rather than nan.
    terms = p * np.where(p > 0.0, log_p, 0.0)
    return np.maximum(-np.sum(terms, axis=-1), 0.0)


def _as_logits(all_logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(all_logits)
    if arr.ndim != 3:
        raise RomebertError(f"all_logits must have shape [layers, examples, classes], got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise RomebertError(f"all_logits needs at least one layer and one class, got {tuple(arr.shape)}")
    return arr


def _threshold_vector(threshold: float | Sequence[float], num_layers: int) -> np.ndarray:
    """Per-layer thresholds of length L (entry i-1 applies to layer i; the last one is never used)."""
    thr = np.asarray(threshold, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(num_layers, float(thr))
    elif thr.ndim == 1 and thr.shape[0] in (num_layers - 1, num_layers):
        # Layer L always exits, so a length-(L-1) sequence is complete; pad so indexing is uniform.
        thr = np.concatenate([thr, np.full(num_layers - thr.shape[0], np.inf)])
    else:
        raise RomebertError(
            f"threshold must be one number or a sequence of {num_layers - 1} or {num_layers} numbers "
            f"(one per exit), got shape {tuple(thr.shape)}"
        )
    if np.isnan(thr).any():
        raise RomebertError("threshold must not be NaN")
    return thr


def _exit_scores(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Score per (layer, example), shape [L, N]; a sample exits at layer i when score < threshold_i."""
    if not regression:
        return entropy(logits)
    # Regression: change from the previous exit. Layer 1 has no predecessor, so it can never exit.
    x = logits.astype(np.float64)
    diff = np.max(np.abs(x[1:] - x[:-1]), axis=-1)  # max over C only matters if C > 1
    return np.concatenate([np.full((1, x.shape[1]), np.inf), diff], axis=0)


def _first_exit(scores: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """0-based exit index [N]: first layer i < L with scores[i] < thr[i], else L-1."""
    num_layers, n = scores.shape
    fire = scores < thr[:, None]
    fire[num_layers - 1] = True  # the final head always takes whoever is left
    # argmax returns the first True along the layer axis: vectorised "first exit that fires".
    return np.argmax(fire, axis=0) if n else np.zeros(0, dtype=np.int64)


def exit_decisions(
    all_logits: np.ndarray,
    threshold: float | Sequence[float],
    regression: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exit layer (1-based, [N] int64) and the chosen exit's logits ([N, C]) for every example.

    ``threshold`` is one number for all exits or a per-exit sequence of length L-1 or L (entry
    ``i-1`` is the threshold of layer ``i``; layer L always exits). Comparisons are strict, so
    threshold 0 sends every sample to the final head.
    """
    logits = _as_logits(all_logits)
    thr = _threshold_vector(threshold, logits.shape[0])
    idx = _first_exit(_exit_scores(logits, regression), thr)
    chosen = logits[idx, np.arange(logits.shape[1])]
    return idx.astype(np.int64) + 1, chosen


def layer_stats(exit_layers: np.ndarray, num_layers: int) -> dict[str, Any]:
    """Exit counts per layer and the reference's layer ratio / saving / speed-up.

    ``layer_ratio = sum_l l * n_l / (N * L)`` (the reference's "expected saving"; 1.0 = no saving),
    ``saving = 1 - layer_ratio``, ``speedup = 1 / layer_ratio``.
    """
    layers = np.asarray(exit_layers).reshape(-1)
    if num_layers < 1:
        raise RomebertError(f"num_layers must be >= 1, got {num_layers}")
    if layers.size == 0:
        raise RomebertError("layer_stats: no examples (exit_layers is empty)")
    if not np.issubdtype(layers.dtype, np.integer):
        if not np.all(np.equal(np.mod(layers, 1), 0)):
            raise RomebertError("exit layers must be whole numbers")
        layers = layers.astype(np.int64)
    if layers.min() < 1 or layers.max() > num_layers:
        raise RomebertError(f"exit layers must lie in 1..{num_layers}, got {int(layers.min())}..{int(layers.max())}")
    counts = np.bincount(layers - 1, minlength=num_layers)
    ratio = float(np.dot(np.arange(1, num_layers + 1), counts)) / (layers.size * num_layers)
    return {
        "counts": [int(c) for c in counts],
        "layer_ratio": ratio,
        "saving": 1.0 - ratio,
        "speedup": 1.0 / ratio,
    }


def _preds_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Class index (argmax) or the scalar output for regression; works on [..., C]."""
    if regression:
        return logits[..., 0].astype(np.float64)
    return np.argmax(logits, axis=-1)


def _metrics(task: Any, preds: np.ndarray, labels: np.ndarray, metric_fn: MetricFn | None) -> dict:
    if metric_fn is None:
        from romebert.metrics import compute_metrics  # lazy: keeps this module pure numpy to import

        metric_fn = compute_metrics
    return {k: float(v) for k, v in metric_fn(task, preds, labels).items()}


def _main_value(task: Any, d: dict[str, float], metric_fn: MetricFn | None) -> float:
    if metric_fn is None:
        from romebert.metrics import main_metric

        return float(main_metric(task, d))
    # A stand-in metric function comes without main_metric; use the task's main key.
    return float(d[task.metric])


def _check_labels(logits: np.ndarray, labels: Any) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != logits.shape[1]:
        raise RomebertError(f"labels must be one value per example ({logits.shape[1]}), got shape {tuple(lab.shape)}")
    return lab


def per_exit_metrics(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    *,
    metric_fn: MetricFn | None = None,
) -> list[dict[str, float]]:
    """The task's metric dict for every exit l = 1..L, as if every sample left there."""
    logits = _as_logits(all_logits)
    lab = _check_labels(logits, labels)
    preds = _preds_from_logits(logits, task.is_regression)
    return [_metrics(task, preds[i], lab, metric_fn) for i in range(logits.shape[0])]


def _is_policy(obj: Any) -> bool:
    """An exit policy (``romebert.policies.ExitPolicy``), recognised by its interface."""
    return hasattr(obj, "decide") and hasattr(obj, "step")


def sweep(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    thresholds: Sequence[Any] = REFERENCE_THRESHOLDS,
    *,
    metric_fn: MetricFn | None = None,
    criterion: str = "entropy",
    policy_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per threshold: threshold, all task metrics, "metric" (main), counts, ratio, saving, speedup.

    Exit scores are computed once and reused for every threshold. Wall time is not included: it is a
    property of a real early-exit run, not of the cache; callers that measure it add their own key.

    Every criterion of ``romebert.policies`` works: an entry of ``thresholds`` may be a policy object,
    and ``criterion`` (+ ``policy_kwargs``) turns plain numbers into policies of that criterion. Such
    rows also carry "criterion" and the policy's other parameters.
    """
    logits = _as_logits(all_logits)
    lab = _check_labels(logits, labels)
    num_layers, n = logits.shape[0], logits.shape[1]
    if criterion != "entropy" or policy_kwargs:
        from romebert.policies import get_policy  # lazy: policies imports this module

        kw = policy_kwargs or {}
        thresholds = [t if _is_policy(t) else get_policy(criterion, t, **kw) for t in thresholds]
    scores = _exit_scores(logits, task.is_regression)
    preds_all = _preds_from_logits(logits, task.is_regression)  # [L, N]
    rows: list[dict[str, Any]] = []
    for t in thresholds:
        if _is_policy(t):
            head: dict[str, Any] = t.params()
            idx = t.decide(logits, regression=task.is_regression)[0] - 1
        else:
            if np.ndim(t) == 0:
                t_out: Any = float(t)  # type: ignore[arg-type]
            else:
                t_out = [float(v) for v in np.asarray(t, dtype=np.float64).reshape(-1)]
            head = {"threshold": t_out}
            idx = _first_exit(scores, _threshold_vector(t, num_layers))
        preds = preds_all[idx, np.arange(n)]
        d = _metrics(task, preds, lab, metric_fn)
        row: dict[str, Any] = {**head, **d, "metric": _main_value(task, d, metric_fn)}
        row.update(layer_stats(idx + 1, num_layers))
        rows.append(row)
    return rows


def predictions(all_logits: np.ndarray, threshold: Any, task: Any) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class indices, or floats for regression, [N]; exit layers, 1-based, [N]).

    ``threshold``: an entropy threshold (one number or per exit), or any ``romebert.policies`` policy.
    """
    if _is_policy(threshold):
        layers, chosen = threshold.decide(_as_logits(all_logits), regression=task.is_regression)
    else:
        layers, chosen = exit_decisions(all_logits, threshold, regression=task.is_regression)
    return _preds_from_logits(chosen, task.is_regression), layers
