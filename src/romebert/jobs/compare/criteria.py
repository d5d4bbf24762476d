"""The exit criteria of a comparison, from each run's cached dev logits (no model pass): every criterion's
sweep over its own data-driven grid, and, when asked, the threshold each one gets with a guarantee
(``evaluation/risk.py``) together with how often that guarantee broke over random calibration / report
splits of dev."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.evaluation.exits import check_guarantee, choose_threshold, sweep
from romebert.runtime.policies import candidate_thresholds, criterion_class, get_policy

GUARANTEE_SPLITS = 20  # random calibration / report splits the guarantee is checked on, per run and criterion


def criteria_record(
    logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    criteria: Sequence[str],
    epsilon: float | None = None,
    confidence: float | None = None,
    features: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per criterion: its sweep points (speed-up, metric), and with ``confidence`` its guaranteed threshold
    and the check of that guarantee. Criteria that need class probabilities are left out of regression, and
    criteria that read per-exit features the cache lacks (runs evaluated before CAP) are left out."""
    out: dict[str, Any] = {}
    features = features or {}
    for name in criteria:
        cls = criterion_class(name)
        if (task.is_regression and not cls.supports_regression) or any(k not in features for k in cls.needs):
            continue
        grid = candidate_thresholds(name, logits, task.is_regression, num=100, features=features)
        rows = sweep(logits, labels, task, [get_policy(name, t) for t in grid], features=features)
        entry: dict[str, Any] = {"sweep": [[r["speedup"], r["metric"]] for r in rows]}
        if confidence is not None and epsilon is not None and not task.is_regression:
            entry["guarantee"] = _guaranteed(logits, labels, task, name, epsilon, confidence, features)
        out[name] = entry
    return out


def _guaranteed(logits, labels, task, name: str, epsilon: float, confidence: float, features) -> dict[str, Any]:
    try:
        threshold, row = choose_threshold(logits, labels, task, name, max_metric_drop=epsilon, confidence=confidence,
                                          features=features)  # fmt: skip
    except RomebertError as exc:
        return {"certified": False, "why": str(exc)}
    g = row["guarantee"]
    check = check_guarantee(logits, labels, task, name, epsilon, confidence, splits=GUARANTEE_SPLITS, features=features)
    return {"certified": True, "threshold": threshold, "speedup": row["speedup"], "metric": row["metric"],
            "report_disagreement": g["report_disagreement"], "report_metric_drop": g["report_metric_drop"],
            "check": check}  # fmt: skip
