"""Thresholds chosen with a guarantee (risk control): the early-exit predictions differ from the final
exit's on at most a share ``epsilon`` of new inputs, with probability at least ``1 - delta`` over the
calibration sample. Learn-then-Test with fixed-sequence testing (Angelopoulos et al. 2021; applied to
early-exit networks by Jazbec et al., NeurIPS 2024, arXiv 2405.20915):

- candidate thresholds are ordered from the most conservative (fewest early exits) to the most
  aggressive; each one's risk is the share of calibration inputs whose early prediction differs from
  the final exit's (a 0-1 loss, so its count is binomial);
- the null hypothesis "risk > epsilon" is rejected with the exact binomial p-value
  ``P(Binomial(n, epsilon) <= k)`` when that is <= delta; candidates are tested in order and testing
  stops at the first one not rejected; the most aggressive rejected one is chosen.

Because the accuracy lost against the final exit is at most that disagreement, the guarantee bounds
the accuracy drop too. It needs no labels; it holds for inputs drawn like the calibration ones. Numpy
only (no scipy): the runtime can choose thresholds too."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.policies import as_policy


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, summed in log space (exact for the n of a dev set)."""
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k + 1)]  # fmt: skip
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass
class RiskControl:
    """The outcome of :func:`control_risk`: the chosen threshold (None when no candidate could be certified),
    and for each tested candidate its disagreement count and p-value."""

    threshold: Any
    epsilon: float
    delta: float
    examples: int
    tested: list[dict[str, Any]]

    @property
    def certified(self) -> bool:
        return self.threshold is not None


def disagreement(
    all_logits: np.ndarray, policy: Any, regression: bool = False, features: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(per input: whether the early-exit prediction differs from the final exit's, the exit layers)."""
    layers, chosen = policy.decide(all_logits, regression=regression, features=features)
    if regression:
        raise RomebertError("risk-controlled thresholds need class predictions; they do not apply to regression")
    return chosen.argmax(-1) != np.asarray(all_logits)[-1].argmax(-1), layers


def control_risk(
    all_logits: np.ndarray,
    candidates: Sequence[Any],
    epsilon: float,
    delta: float,
    criterion: str = "entropy",
    features: dict[str, np.ndarray] | None = None,
    **options: Any,
) -> RiskControl:
    """Learn-then-Test over ``candidates`` (thresholds of ``criterion``, or policies) on calibration logits
    [L, N, C]: the most aggressive threshold certified to disagree with the final exit on at most
    ``epsilon`` of inputs with probability >= 1 - ``delta``."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise RomebertError(f"the risk bound needs 0 < epsilon < 1 and 0 < confidence < 1, got {epsilon}, {1 - delta}")
    logits = np.asarray(all_logits)
    n = logits.shape[1]
    if n == 0:
        raise RomebertError("no calibration examples to control the risk on")
    rows = []
    for t in candidates:
        policy = as_policy(t, criterion, **options)
        wrong, layers = disagreement(logits, policy, features=features)
        rows.append({"threshold": policy.threshold, "policy": policy, "disagree": int(wrong.sum()),
                     "mean_exit": float(layers.mean())})  # fmt: skip
    rows.sort(key=lambda r: -r["mean_exit"])  # most conservative first
    chosen, tested = None, []
    for r in rows:
        p = binomial_cdf(r["disagree"], n, epsilon)
        tested.append({"threshold": r["threshold"], "disagreement": r["disagree"] / n, "p_value": p,
                       "mean_exit_layer": r["mean_exit"]})  # fmt: skip
        if p > delta:
            break  # fixed-sequence testing: the first hypothesis not rejected ends the sequence
        chosen = r["threshold"]
    return RiskControl(chosen, epsilon, delta, n, tested)


def split_indices(n: int, calibration_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (calibration, report) split of ``n`` dev rows."""
    if not 0 < calibration_fraction < 1:
        raise RomebertError(f"the calibration share must lie in (0, 1), got {calibration_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(calibration_fraction * n))
    if cut == 0 or cut == n:
        raise RomebertError(f"{n} dev examples are too few to split into calibration and report halves")
    return np.sort(order[:cut]), np.sort(order[cut:])
