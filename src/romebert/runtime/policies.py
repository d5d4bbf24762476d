"""Exit criteria as small policy objects: the one place where exit decisions are made.

A policy decides, layer by layer, which samples of a batch leave. Its per-sample state (previous
prediction, agreement counter, ...) lives in a :class:`PolicyState` whose row arrays all have the
batch as axis 0, so an engine can drop exited rows with one fancy index::

    state = policy.init_state(n, num_layers, regression)
    for i in range(num_layers):
        exit_mask, state = policy.step(i, logits_i, state)   # logits_i [b, C] -> exit_mask [b] bool
        ...                                                  # emit exited rows, then
        state = state.select(keep)                           # compact to the rows still running

:meth:`ExitPolicy.decide` runs exactly these ``step`` calls over cached logits ``[L, N, C]`` (a row's
state depends only on its own logits), so the offline sweep, the PyTorch engine and the ONNX Runtime
engine all take their decisions from this code. Everything is numpy (no torch): the runtime extra
uses it as it is.

Criteria (``threshold`` is one number, or a per-exit sequence of L-1 or L numbers; layer L always
exits; layers are 0-based in ``step`` and 1-based in every result):

* ``entropy`` (the reference): exit when the softmax entropy (nats) < t. Regression: exit at layer
  i >= 2 when ``|h_i - h_{i-1}| < t``.
* ``maxprob``: exit when the largest softmax probability >= t (classification only).
* ``patience`` (PABEE): ``threshold`` is k; exit when the argmax has been the same for k consecutive
  exits, counting the current one (PABEE's "patience" p is k - 1). Regression: exit after k
  consecutive changes ``|h_i - h_{i-1}| < tolerance``.
* ``patience-confidence``: ``threshold`` is a confidence threshold t (entropy < t, or maxprob >= t
  with ``confidence="maxprob"``) and ``patience`` is k; only consecutive agreeing exits that are also
  confident count. Regression: k consecutive changes < t (the same rule as ``patience`` with
  ``tolerance=t``).

Scores are float64, computed from the logits by the same functions online and offline, so equal
logits always give equal decisions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.criteria import (
    AgreementPolicy,
    CapPolicy,
    EnergyPolicy,
    EntropyPolicy,
    MaxProbPolicy,
    PatienceConfidencePolicy,
    PatiencePolicy,
    agreement_step,
)
from romebert.runtime.exit_policy import ExitPolicy, PolicyState, Threshold
from romebert.runtime.scores import cap, change, energy, entropy, maxprob

# The registry: the one place a criterion is registered. The CLI, the service, exit configs and sweeps
# read everything they know of a criterion from its class.
POLICIES: dict[str, type[ExitPolicy]] = {
    cls.name: cls
    for cls in (
        EntropyPolicy,
        MaxProbPolicy,
        PatiencePolicy,
        PatienceConfidencePolicy,
        EnergyPolicy,
        AgreementPolicy,
        CapPolicy,
    )
}
CRITERIA: tuple[str, ...] = tuple(POLICIES)
_ALIASES = {"pabee": "patience", "max-prob": "maxprob"}


def criterion_class(name: str) -> type[ExitPolicy]:
    """The registered class of a criterion (case, ``_`` and the aliases pabee / max-prob tolerated)."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in POLICIES:
        raise RomebertError(f"unknown exit criterion {name!r}; choose one of {list(CRITERIA)}")
    return POLICIES[key]


def get_policy(name: str, threshold: Threshold, **options: Any) -> ExitPolicy:
    """A policy by criterion name. ``options`` (``PolicyOptions`` fields) a criterion does not take are
    ignored, so one set of options can feed every criterion."""
    cls = criterion_class(name)
    return cls(threshold, **{k: v for k, v in options.items() if k in cls.options and v is not None})


def as_policy(threshold: Any, criterion: str = "entropy", **options: Any) -> ExitPolicy:
    """``threshold`` itself when it is a policy, else a ``criterion`` policy at that threshold."""
    return threshold if isinstance(threshold, ExitPolicy) else get_policy(criterion, threshold, **options)


def default_thresholds(criterion: str, num_layers: int | None = None) -> list[float]:
    """The default sweep grid of a criterion (``patience`` needs ``num_layers``: k = 1..L)."""
    cls = criterion_class(criterion)
    if num_layers is None and cls is PatiencePolicy:
        raise RomebertError("the patience grid needs the number of layers")
    return cls.grid(num_layers or 0)


def candidate_thresholds(
    criterion: str,
    all_logits: np.ndarray,
    regression: bool = False,
    num: int = 200,
    confidence: str = "entropy",
    features: dict[str, np.ndarray] | None = None,
) -> list[float]:
    """A data-driven, fine grid for choosing a threshold: score quantiles of exits 1..L-1.

    Each quantile is nudged past its score so that the sample holding it is on the exit side
    (``<`` rules) -> every distinct operating point of the grid is reachable.
    """
    logits = np.asarray(all_logits)
    cls = criterion_class(criterion)
    if cls is PatiencePolicy:
        return default_thresholds(cls.name, logits.shape[0])
    if regression and not cls.supports_regression:
        raise RomebertError(f"criterion {cls.name!r} does not apply to regression")
    scores, above = exit_scores(cls, logits, regression, confidence, features)
    values = scores.reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return default_thresholds(cls.name, logits.shape[0])
    grid = np.unique(np.quantile(values, np.linspace(0.0, 1.0, num)))
    if above:  # ">=" rule: the quantile itself is reachable; scan strictest first
        return [float(v) for v in grid[::-1]]
    return [0.0] + [float(v) for v in np.nextafter(grid, np.inf)]


def exit_scores(
    cls: type[ExitPolicy],
    logits: np.ndarray,
    regression: bool = False,
    confidence: str = "entropy",
    features: dict[str, np.ndarray] | None = None,
):
    """(the scores [L-1, N] a criterion's threshold is compared with at exits 1..L-1 of cached logits
    [L, N, C] (and the exits' ``features`` [L, N] it needs), whether exiting means score >= threshold)."""
    early = logits[:-1] if logits.shape[0] > 1 else logits
    missing = [k for k in cls.needs if k not in (features or {})]
    if missing:
        raise RomebertError(f"criterion {cls.name!r} needs each exit's {missing[0]}, which these logits come without")
    if regression:
        x = logits.astype(np.float64)
        return (change(x[1:], x[:-1])[:-1] if logits.shape[0] > 2 else change(x[1:], x[:-1])), False
    above = cls.stricter(confidence=confidence) > 0  # the class says which side of t exits
    if cls is MaxProbPolicy or (cls is PatienceConfidencePolicy and confidence == "maxprob"):
        return maxprob(early), above
    if cls is EnergyPolicy:
        return energy(early), above
    if cls is CapPolicy:
        nsp = np.asarray(features["nsp"])
        return cap(early, nsp[:-1] if nsp.shape[0] > 1 else nsp), above
    if cls is AgreementPolicy:
        state = PolicyState(logits.shape[0], False, [0.0] * logits.shape[0])
        return np.stack([agreement_step(i, x, state) for i, x in enumerate(early)]), above
    return entropy(early), above
