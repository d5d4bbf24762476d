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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.options import option, option_fields
from romebert.runtime.scores import change, entropy, maxprob

Threshold = float | Sequence[float]

# The reference's entropy grid (method.md); its test predictions use 0.15.
REFERENCE_THRESHOLDS: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAXPROB_THRESHOLDS: tuple[float, ...] = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


def threshold_vector(threshold: Threshold, num_layers: int) -> np.ndarray:
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


@dataclass
class PolicyOptions:
    """Options that some criteria take besides their threshold, declared once: they become the CLI's
    flags and the fields of an exit config (``artefacts.EarlyExitConfig``); a criterion takes the ones
    its class lists in ``options`` and ignores the rest."""

    patience: int = option(2, "patience-confidence: consecutive agreeing, confident exits needed")
    tolerance: float = option(0.1, "patience on regression: a change below this counts as agreement")
    confidence: str = option(
        "entropy", "patience-confidence: confident means entropy < t, or maxprob >= t", choices=("entropy", "maxprob")
    )


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in option_fields(PolicyOptions))


# -------------------------------------------------------------------------------------------- state
@dataclass
class PolicyState:
    """What a policy carries across layers. ``rows`` arrays are [b, ...]; the rest is per batch."""

    num_layers: int
    regression: bool
    thresholds: list[float]  # one per layer, Python floats
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # rows["threshold"] [b, L]: per-row thresholds
    # (score name, layer) -> [b] scores, shared by the policies of one offline sweep over the same logits
    # (every row, every threshold), so a sweep computes each exit's entropy once, not once per threshold.
    # Never carried through select/cat: an engine's rows change, and its scores with them.
    scores: dict[tuple[str, int], np.ndarray] | None = None

    def score(self, name: str, layer: int, fn: Callable[[], np.ndarray]) -> np.ndarray:
        """``fn()`` (this layer's exit score), computed once per sweep when a score cache is shared."""
        if self.scores is None:
            return fn()
        key = (name, layer)
        if key not in self.scores:
            self.scores[key] = fn()
        return self.scores[key]

    def threshold(self, layer: int) -> float | np.ndarray:
        """Layer ``layer``'s threshold: one number, or one per row when rows carry their own."""
        per_row = self.rows.get("threshold")
        return self.thresholds[layer] if per_row is None else per_row[:, layer]

    def select(self, keep: np.ndarray) -> PolicyState:
        """The state of rows ``keep`` (int64 indices), in that order."""
        rows = {k: v[keep] for k, v in self.rows.items()}
        return PolicyState(self.num_layers, self.regression, self.thresholds, rows)

    @staticmethod
    def cat(states: Sequence[PolicyState]) -> PolicyState:
        """The rows of several states of one policy at the same layer, stacked in order."""
        first = states[0]
        if len(states) == 1:
            return first
        rows = {k: np.concatenate([s.rows[k] for s in states]) for k in first.rows}
        return PolicyState(first.num_layers, first.regression, first.thresholds, rows)


def _small_change_streak(logits: np.ndarray, rows: dict[str, np.ndarray], tolerance: float) -> np.ndarray:
    """Regression patience: consecutive exits (up to this one) whose change from the previous exit is
    below ``tolerance``, [b] int64; updates ``rows["prev"]`` (the caller stores the count)."""
    x = np.asarray(logits, dtype=np.float64)
    prev = rows.get("prev")
    rows["prev"] = x
    if prev is None:
        return np.zeros(x.shape[0], dtype=np.int64)
    return np.where(change(x, prev) < tolerance, rows["count"] + 1, 0)


def _agreement_run(pred: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Classification patience: how many consecutive exits (this one included) predicted ``pred``."""
    prev = rows.get("prev")
    rows["prev"] = pred
    return np.ones_like(pred) if prev is None else np.where(pred == prev, rows["count"] + 1, 1)


# ------------------------------------------------------------------------------------------ policies
class ExitPolicy:
    """Base class. A criterion is a subclass that implements ``_step`` and says, once, what everything
    else needs to know of it: its name, a one-line rule (the CLI's help, the service's schema), the
    threshold used when none is given, the options it takes, its default sweep grid and the range in
    which a threshold can change a decision (the service's bounds)."""

    name: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.0
    options: ClassVar[tuple[str, ...]] = ()  # PolicyOptions fields it takes
    supports_regression: ClassVar[bool] = True

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        """The default thresholds of a sweep, loosest last."""
        return list(REFERENCE_THRESHOLDS)

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        """The thresholds worth asking for: beyond them no decision changes. Entropy-like by default:
        [0, ln C] in nats, or a change in label units for regression."""
        if num_labels == 1:
            return 0.0, 1e6
        return 0.0, math.log(num_labels) + 1e-9

    def __init__(self, threshold: Threshold) -> None:
        if isinstance(threshold, str):
            raise RomebertError(f"{self.name}: threshold must be a number or a sequence of numbers, got {threshold!r}")
        try:
            arr = np.asarray(threshold, dtype=np.float64)
        except (TypeError, ValueError):
            raise RomebertError(
                f"{self.name}: threshold must be a number or a sequence of numbers, got {threshold!r}"
            ) from None
        if arr.ndim > 1:
            raise RomebertError(f"{self.name}: threshold must be one number or one per exit, got shape {arr.shape}")
        if np.isnan(arr).any():
            raise RomebertError(f"{self.name}: threshold must not be NaN")
        self.threshold: float | list[float] = float(arr) if arr.ndim == 0 else [float(v) for v in arr]
        self._thr_cache: dict[int, list[float]] = {}

    # ------------------------------------------------------------------------------------------ API
    def params(self) -> dict[str, Any]:
        """Everything that identifies the rule (goes into sweep rows, reports and exported configs)."""
        return {"criterion": self.name, "threshold": self.threshold}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "criterion")
        return f"{type(self).__name__}({extra})"

    def init_state(
        self, n: int, num_layers: int, regression: bool = False, row_thresholds: Sequence[Threshold] | None = None
    ) -> PolicyState:
        """Fresh state for ``n`` samples of a model with ``num_layers`` exits; ``row_thresholds`` (one
        threshold per sample, each a number or one per exit) replace the policy's own for those rows."""
        if regression and not self.supports_regression:
            raise RomebertError(f"criterion {self.name!r} needs class probabilities; it does not apply to regression")
        if num_layers not in self._thr_cache:  # an engine starts a state per batch: no numpy work each time
            self._thr_cache[num_layers] = [float(t) for t in threshold_vector(self.threshold, num_layers)]
        state = PolicyState(num_layers, regression, self._thr_cache[num_layers])
        if row_thresholds is not None:
            if len(row_thresholds) != n:
                raise RomebertError(f"row_thresholds: one per row ({n}), got {len(row_thresholds)}")
            state.rows["threshold"] = np.stack([threshold_vector(t, num_layers) for t in row_thresholds])
        return state

    def step(self, layer: int, logits: np.ndarray, state: PolicyState) -> tuple[np.ndarray, PolicyState]:
        """Exit decisions at ``layer`` (0-based) for logits [b, C] -> (exit mask [b] bool, new state)."""
        if layer >= state.num_layers - 1:  # the final head takes whoever is left
            return np.ones(logits.shape[0], dtype=bool), state
        return self._step(layer, logits, state), state

    def decide(
        self, all_logits: np.ndarray, regression: bool = False, scores: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Offline: exit layer (1-based, [N] int64) and the chosen exit's logits ([N, C]) from [L, N, C].

        Runs the same ``step`` calls as the engines, on every row at once. ``scores``: a dict shared by
        several decisions over the same ``all_logits`` (a sweep), where exit scores are kept.
        """
        logits = np.asarray(all_logits)
        if logits.ndim != 3 or logits.shape[0] < 1 or logits.shape[2] < 1:
            raise RomebertError(
                f"all_logits must have shape [layers, examples, classes], got shape {tuple(logits.shape)}"
            )
        num_layers, n = logits.shape[0], logits.shape[1]
        state = self.init_state(n, num_layers, regression)
        state.scores = scores
        first = np.full(n, num_layers - 1, dtype=np.int64)
        undecided = np.ones(n, dtype=bool)
        for i in range(num_layers - 1):
            exit_mask, state = self.step(i, logits[i], state)
            fire = exit_mask & undecided
            first[fire] = i
            undecided &= ~fire
        return first + 1, logits[first, np.arange(n)]

    # ------------------------------------------------------------------------------------- subclass
    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        raise NotImplementedError


class EntropyPolicy(ExitPolicy):
    """Exit when softmax entropy < t (regression: |h_i - h_{i-1}| < t from layer 2)."""

    name = "entropy"
    rule = "exit when the softmax entropy (nats) < t, the reference's rule (regression: the change < t)"
    default_threshold = 0.15  # the reference's test threshold

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        t = state.threshold(layer)
        if not state.regression:
            return state.score("entropy", layer, lambda: entropy(logits)) < t
        x = np.asarray(logits, dtype=np.float64)
        prev = state.rows.get("prev")
        state.rows["prev"] = x
        if prev is None:  # layer 1 has no predecessor, so it never exits
            return np.zeros(x.shape[0], dtype=bool)
        return change(x, prev) < t


class MaxProbPolicy(ExitPolicy):
    """Exit when the largest softmax probability >= t."""

    name = "maxprob"
    rule = "exit when the largest class probability >= t"
    default_threshold = 0.9
    supports_regression = False

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        return list(MAXPROB_THRESHOLDS)

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        return 1.0 / max(num_labels, 1), 1.0

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        return state.score("maxprob", layer, lambda: maxprob(logits)) >= state.threshold(layer)


class PatiencePolicy(ExitPolicy):
    """PABEE: exit once the prediction has been the same for k consecutive exits (k = threshold)."""

    name = "patience"
    rule = "exit when t consecutive exits agree (PABEE's patience + 1; regression: changes < --tolerance)"
    default_threshold = 2.0
    options = ("tolerance",)

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        return [float(k) for k in range(1, num_layers + 1)]

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        return 1.0, float(num_layers)

    def __init__(self, threshold: Threshold = 2, tolerance: float = 0.1) -> None:
        super().__init__(threshold)
        if np.min(np.asarray(self.threshold, dtype=np.float64)) < 1:
            raise RomebertError(f"patience: k must be >= 1 (consecutive agreeing exits), got {self.threshold}")
        if not math.isfinite(tolerance) or tolerance < 0:
            raise RomebertError(f"patience: tolerance must be a finite number >= 0, got {tolerance}")
        self.tolerance = float(tolerance)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tolerance": self.tolerance}

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        rows = state.rows
        if state.regression:
            count = _small_change_streak(logits, rows, self.tolerance)
        else:
            count = _agreement_run(np.argmax(logits, axis=-1), rows)
        rows["count"] = count
        return count >= state.threshold(layer)


class PatienceConfidencePolicy(ExitPolicy):
    """Patience counting only exits that agree with the previous one and are confident."""

    name = "patience-confidence"
    rule = "exit when --patience consecutive exits agree and are confident (entropy < t, or maxprob >= t)"
    default_threshold = 0.3
    options = ("patience", "confidence")

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        if options.get("confidence") == "maxprob" and num_labels > 1:
            return MaxProbPolicy.bounds(num_labels, num_layers)
        return super().bounds(num_labels, num_layers)

    def __init__(self, threshold: Threshold, patience: int = 2, confidence: str = "entropy") -> None:
        super().__init__(threshold)
        if int(patience) != patience or patience < 1:
            raise RomebertError(f"patience-confidence: patience must be a whole number >= 1, got {patience}")
        if confidence not in ("entropy", "maxprob"):
            raise RomebertError(f"patience-confidence: confidence must be 'entropy' or 'maxprob', got {confidence!r}")
        self.patience = int(patience)
        self.confidence = confidence

    def params(self) -> dict[str, Any]:
        return {**super().params(), "patience": self.patience, "confidence": self.confidence}

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        rows = state.rows
        t = state.threshold(layer)
        if state.regression:
            count = _small_change_streak(logits, rows, t)
        else:
            confident = entropy(logits) < t if self.confidence == "entropy" else maxprob(logits) >= t
            # Confident: extend the run if it agrees with the previous exit (a run broken by an
            # unconfident exit has count 0, so it restarts at 1); unconfident: the run is broken.
            count = np.where(confident, _agreement_run(np.argmax(logits, axis=-1), rows), 0)
        rows["count"] = count
        return count >= self.patience


# The registry: the one place a criterion is registered. The CLI, the service, exit configs and sweeps
# read everything they know of a criterion from its class.
POLICIES: dict[str, type[ExitPolicy]] = {
    cls.name: cls for cls in (EntropyPolicy, MaxProbPolicy, PatiencePolicy, PatienceConfidencePolicy)
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
    criterion: str, all_logits: np.ndarray, regression: bool = False, num: int = 200, confidence: str = "entropy"
) -> list[float]:
    """A data-driven, fine grid for choosing a threshold: score quantiles of exits 1..L-1.

    Each quantile is nudged past its score so that the sample holding it is on the exit side
    (``<`` rules) -> every distinct operating point of the grid is reachable.
    """
    logits = np.asarray(all_logits)
    key = criterion_class(criterion).name
    if key == "patience":
        return default_thresholds(key, logits.shape[0])
    early = logits[:-1] if logits.shape[0] > 1 else logits
    if regression:
        if key == "maxprob":
            raise RomebertError("criterion 'maxprob' does not apply to regression")
        x = logits.astype(np.float64)
        scores = change(x[1:], x[:-1])[:-1] if logits.shape[0] > 2 else change(x[1:], x[:-1])
    elif key == "maxprob" or (key == "patience-confidence" and confidence == "maxprob"):
        key = "maxprob"
        scores = maxprob(early)
    else:
        scores = entropy(early)
    values = scores.reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return default_thresholds(key, logits.shape[0])
    grid = np.unique(np.quantile(values, np.linspace(0.0, 1.0, num)))
    if key == "maxprob":  # ">=" rule: the quantile itself is reachable; scan strictest first
        return [float(v) for v in grid[::-1]]
    return [0.0] + [float(v) for v in np.nextafter(grid, np.inf)]
