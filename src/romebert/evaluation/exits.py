"""Early-exit decisions computed from cached logits of every exit.

Everything here works on ``all_logits``, an array of shape ``[L, N, C]`` holding the logits of every
exit (exit ``L`` is the final head) for ``N`` examples, produced by ONE forward pass. A threshold
sweep therefore costs one pass plus cheap numpy work, instead of one model pass per threshold.

Every exit decision is taken by the policies of ``policies.py`` (plain numbers are entropy thresholds,
the reference's rule), the same code the engines run. Layers are 1-based everywhere in the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.exit_policy import REFERENCE_THRESHOLDS, Threshold
from romebert.runtime.policies import as_policy, candidate_thresholds, get_policy

# ``metric_fn(task, preds, labels) -> {key: value}``; defaults to romebert.data.metrics.compute_metrics.
MetricFn = Callable[[Any, np.ndarray, np.ndarray], dict[str, float]]


def _as_logits(all_logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(all_logits)
    if arr.ndim != 3:
        raise RomebertError(f"all_logits must have shape [layers, examples, classes], got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise RomebertError(f"all_logits needs at least one layer and one class, got {tuple(arr.shape)}")
    return arr


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
        from romebert.data.metrics import compute_metrics  # lazy: keeps this module pure numpy to import

        metric_fn = compute_metrics
    return {k: float(v) for k, v in metric_fn(task, preds, labels).items()}


def _main_value(task: Any, d: dict[str, float], metric_fn: MetricFn | None) -> float:
    if metric_fn is None:
        from romebert.data.metrics import main_metric

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


def sweep(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    thresholds: Sequence[Any] = REFERENCE_THRESHOLDS,
    *,
    metric_fn: MetricFn | None = None,
    criterion: str = "entropy",
    policy_kwargs: dict[str, Any] | None = None,
    features: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One row per threshold: the policy's parameters (criterion, threshold, ...), all task metrics,
    "metric" (main), counts, ratio, saving, speedup.

    An entry of ``thresholds`` is a policy, or a threshold of ``criterion`` (+ ``policy_kwargs``).
    Wall time is not included: it is a property of a real early-exit run, not of the cache.
    """
    logits = _as_logits(all_logits)
    lab = _check_labels(logits, labels)
    num_layers, n = logits.shape[0], logits.shape[1]
    preds_all = _preds_from_logits(logits, task.is_regression)  # [L, N]
    rows: list[dict[str, Any]] = []
    scores: dict = {}  # each exit's scores, computed once for all thresholds
    for t in thresholds:
        policy = as_policy(t, criterion, **(policy_kwargs or {}))
        layers, _ = policy.decide(logits, regression=task.is_regression, scores=scores, features=features)
        d = _metrics(task, preds_all[layers - 1, np.arange(n)], lab, metric_fn)
        row: dict[str, Any] = {**policy.params(), **d, "metric": _main_value(task, d, metric_fn)}
        row.update(layer_stats(layers, num_layers))
        rows.append(row)
    return rows


def predictions(
    all_logits: np.ndarray, threshold: Any, task: Any, features: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class indices, or floats for regression, [N]; exit layers, 1-based, [N]).

    ``threshold``: an entropy threshold (one number or per exit), or any ``romebert.runtime.policies`` policy.
    """
    layers, chosen = as_policy(threshold).decide(_as_logits(all_logits), regression=task.is_regression,
                                                 features=features)  # fmt: skip
    return _preds_from_logits(chosen, task.is_regression), layers


# ------------------------------------------------------------------------------- choosing a threshold


def pick_from_sweep(
    rows: Sequence[dict[str, Any]],
    final_metric: float,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    reference: str = "the final exit's",
) -> dict[str, Any]:
    """The sweep row to use (rows need "metric" and "speedup").

    ``max_metric_drop`` (same units as the metric, e.g. 0.01 = one accuracy point) keeps rows with
    ``final_metric - metric <= max_metric_drop``; ``final_metric`` is the reference the drop counts
    against (``reference`` names it in errors). Then ``target_speedup`` picks the least aggressive
    row reaching it (smallest speed-up >= target, best metric on ties); without a target, the fastest
    row left (best metric on ties).
    """
    if target_speedup is None and max_metric_drop is None:
        raise RomebertError("give target_speedup and/or max_metric_drop")
    if not rows:
        raise RomebertError("no sweep rows to choose from")
    ok = list(rows)
    if max_metric_drop is not None:
        ok = [r for r in ok if final_metric - r["metric"] <= max_metric_drop + 1e-12]
        if not ok:
            best = max(r["metric"] for r in rows)
            raise RomebertError(
                f"no threshold keeps the metric within {max_metric_drop} of {reference} {final_metric:.4f} "
                f"(best {best:.4f})"
            )
    if target_speedup is not None:
        reach = [r for r in ok if r["speedup"] >= target_speedup - 1e-12]
        if not reach:
            fastest = max(r["speedup"] for r in ok)
            budget = "" if max_metric_drop is None else f" within a metric drop of {max_metric_drop}"
            raise RomebertError(
                f"no threshold reaches a layer speed-up of {target_speedup}{budget} (at most {fastest:.3f}x)"
            )
        return min(reach, key=lambda r: (r["speedup"], -r["metric"]))
    return max(ok, key=lambda r: (r["speedup"], r["metric"]))


def choose_threshold(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    criterion: str = "entropy",
    *,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    thresholds: Sequence[Threshold] | None = None,
    metric_fn: MetricFn | None = None,
    confidence: float | str | None = None,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    features: dict[str, np.ndarray] | None = None,
    reference_metric: float | None = None,
    **policy_kwargs: Any,
) -> tuple[Threshold, dict[str, Any]]:
    """Pick a threshold of ``criterion`` on dev logits [L, N, C] -> (threshold, its sweep row, with
    "final_metric" and "reference_metric").

    Candidates default to a fine data-driven grid (score quantiles; k = 1..L for patience). See
    :func:`pick_from_sweep` for the rule. With ``confidence`` (a number, 1 - delta) and
    ``max_metric_drop`` (epsilon), the threshold comes with a guarantee instead (:mod:`romebert.evaluation.risk`):
    it is chosen on a seeded random ``calibration_fraction`` of the rows and reported on the rest, and the
    row's ``guarantee`` says what holds. (A string ``confidence`` is patience-confidence's option.)
    Without ``confidence``, ``max_metric_drop`` counts against ``reference_metric`` when given (an export's:
    the fp32 model's final exit), else against these logits' own final exit.
    """
    logits = np.asarray(all_logits)
    if isinstance(confidence, str):
        policy_kwargs["confidence"] = confidence
    elif confidence is not None:
        return _choose_with_guarantee(logits, np.asarray(labels), task, criterion, target_speedup, max_metric_drop,
                                      float(confidence), thresholds, metric_fn, calibration_fraction, seed,
                                      policy_kwargs, features)  # fmt: skip
    if thresholds is None:
        thresholds = candidate_thresholds(
            criterion,
            logits,
            task.is_regression,
            features=features,
            **{k: v for k, v in policy_kwargs.items() if k == "confidence"},
        )
    policies = [get_policy(criterion, t, **policy_kwargs) for t in thresholds]
    rows = sweep(logits, labels, task, policies, metric_fn=metric_fn, features=features)
    per_exit = per_exit_metrics(logits, labels, task, metric_fn=metric_fn)
    if metric_fn is None:
        from romebert.data.metrics import main_metric

        final = float(main_metric(task, per_exit[-1]))
    else:
        final = float(per_exit[-1][task.metric])
    ref = final if reference_metric is None else float(reference_metric)
    name = "the final exit's" if reference_metric is None else "the fp32 model's final exit's"
    row = pick_from_sweep(rows, ref, target_speedup, max_metric_drop, reference=name)
    return row["threshold"], {**row, "final_metric": final, "reference_metric": ref}


def _final_metric(logits: np.ndarray, labels: np.ndarray, task: Any, metric_fn: MetricFn | None) -> float:
    return _main_value(task, per_exit_metrics(logits[-1:], labels, task, metric_fn=metric_fn)[0], metric_fn)


def _choose_with_guarantee(logits, labels, task, criterion, target_speedup, epsilon, confidence, thresholds,
                           metric_fn, calibration_fraction, seed, policy_kwargs, features=None):  # fmt: skip
    """:func:`choose_threshold` with a risk guarantee: Learn-then-Test on the calibration rows, the sweep row
    (and the realised disagreement and drop) on the report rows."""
    from romebert.evaluation.risk import control_risk, disagreement, split_indices

    if epsilon is None:
        raise RomebertError("a confidence needs --max-metric-drop: the share of disagreements it guarantees")
    calib, report = split_indices(logits.shape[1], calibration_fraction, seed)
    part = {"calib": calib, "report": report}
    feats = {name: {k: np.asarray(v)[:, rows] for k, v in (features or {}).items()} for name, rows in part.items()}
    grid = thresholds
    if grid is None:
        grid = candidate_thresholds(criterion, logits[:, calib], task.is_regression, features=feats["calib"],
                                    **{k: v for k, v in policy_kwargs.items() if k == "confidence"})  # fmt: skip
    control = control_risk(logits[:, calib], grid, epsilon, 1.0 - confidence, criterion, features=feats["calib"],
                           **policy_kwargs)  # fmt: skip
    if not control.certified:
        raise RomebertError(
            f"no {criterion} threshold is certified to disagree with the final exit on at most {epsilon} of inputs "
            f"with confidence {confidence} from {control.examples} calibration examples: allow a larger drop, "
            "a lower confidence, or more dev data"
        )
    chosen = control.threshold
    if target_speedup is not None:  # the least aggressive certified threshold that reaches the target
        certified = [t for t in control.tested if t["p_value"] <= 1.0 - confidence]
        layers = logits.shape[0]
        reach = [t for t in certified if layers / t["mean_exit_layer"] >= target_speedup - 1e-12]
        if not reach:
            raise RomebertError(f"no certified threshold reaches a layer speed-up of {target_speedup}")
        chosen = reach[0]["threshold"]
    policy = get_policy(criterion, chosen, **policy_kwargs)
    rep_logits, rep_labels = logits[:, report], labels[report]
    row = sweep(rep_logits, rep_labels, task, [policy], metric_fn=metric_fn, features=feats["report"])[0]
    final = _final_metric(rep_logits, rep_labels, task, metric_fn)
    tested = next(t for t in control.tested if t["threshold"] == chosen)
    guarantee = {
        "risk": "share of inputs whose early-exit prediction differs from the final exit's",
        "epsilon": epsilon,
        "confidence": confidence,
        "method": "Learn-then-Test, fixed-sequence, exact binomial p-values",
        "calibration_examples": int(calib.size),
        "report_examples": int(report.size),
        "calibration_disagreement": tested["disagreement"],
        "report_disagreement": float(disagreement(rep_logits, policy, features=feats["report"])[0].mean()),
        "report_metric_drop": final - row["metric"],
    }
    return chosen, {**row, "final_metric": final, "guarantee": guarantee}


def check_guarantee(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    criterion: str,
    epsilon: float,
    confidence: float,
    splits: int = 100,
    calibration_fraction: float = 0.5,
    metric_fn: MetricFn | None = None,
    features: dict[str, np.ndarray] | None = None,
    **policy_kwargs: Any,
) -> dict[str, Any]:
    """The guarantee checked over ``splits`` random calibration / report splits of dev: how often the chosen
    threshold's disagreement with the final exit, and its metric drop, exceed ``epsilon`` on the report
    rows (both should happen in at most a share 1 - ``confidence`` of splits, up to sampling error)."""
    logits, lab = np.asarray(all_logits), np.asarray(labels)
    over_disagree = over_drop = uncertified = 0
    speedups = []
    for s in range(splits):
        try:
            _, row = choose_threshold(logits, lab, task, criterion, max_metric_drop=epsilon, confidence=confidence,
                                      calibration_fraction=calibration_fraction, seed=s, metric_fn=metric_fn,
                                      features=features, **policy_kwargs)  # fmt: skip
        except RomebertError:
            uncertified += 1
            continue
        g = row["guarantee"]
        over_disagree += g["report_disagreement"] > epsilon
        over_drop += g["report_metric_drop"] > epsilon + 1e-12
        speedups.append(row["speedup"])
    done = splits - uncertified
    return {
        "splits": splits,
        "certified_splits": done,
        "epsilon": epsilon,
        "confidence": confidence,
        "share_disagreement_over_epsilon": over_disagree / done if done else None,
        "share_drop_over_epsilon": over_drop / done if done else None,
        "allowed_share": 1.0 - confidence,
        "mean_speedup": float(np.mean(speedups)) if speedups else None,
    }


def choice_record(
    row: dict[str, Any],
    split: str,
    task: Any,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    reference: str = "exported",
    fp32_final_metric: float | None = None,
) -> dict[str, Any]:
    """How a threshold was chosen (``EarlyExitConfig.chosen``): on which split, by which rule, and what it
    gave there against the final exit. The one place this record is built.

    ``reference``: what ``max_metric_drop`` counted against: "fp32" (the fp32 model's final exit, the
    model the user trained) or "exported" (the final exit of the logits the threshold was chosen on);
    ``fp32_final_metric``: the fp32 model's final exit, when known."""
    how = {k: v for k, v in (("target_speedup", target_speedup), ("max_metric_drop", max_metric_drop)) if v is not None}
    record = {"split": split, **how, "metric": row["metric"], "speedup": row["speedup"],
              "final_metric": row["final_metric"], "metric_name": task.metric, "reference": reference,
              "reference_metric": row.get("reference_metric", row["final_metric"])}  # fmt: skip
    if fp32_final_metric is not None:
        record["fp32_final_metric"] = float(fp32_final_metric)
    if "guarantee" in row:  # chosen with risk control: what is guaranteed, and on how many rows
        record["guarantee"] = row["guarantee"]
    return record
