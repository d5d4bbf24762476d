"""Exit criteria as small policy objects, shared by the online engine and the offline sweep.

A policy decides, layer by layer, which samples of a batch leave. Its per-sample state (previous
prediction, agreement counter, ...) lives in a :class:`PolicyState` whose row tensors all have the
batch as dimension 0, so the engine can drop exited rows with one ``index_select``::

    state = policy.init_state(n, num_layers, regression)
    for i in range(num_layers):
        exit_mask, state = policy.step(i, logits_i, state)   # logits_i [b, C] -> exit_mask [b] bool
        ...                                                  # emit exited rows, then
        state = policy.select(state, keep_idx)               # compact to the rows still running

:meth:`ExitPolicy.decide` runs exactly these ``step`` calls over cached logits ``[L, N, C]`` (no
compaction: a row's state depends only on its own logits), so offline sweeps and the online engine
take their decisions from one code path.

Criteria (``threshold`` is one number, or a per-exit sequence of L-1 or L numbers; layer L always
exits; layers are 0-based in ``step`` and 1-based in every result):

* ``entropy`` (the reference): exit when the softmax entropy (nats) < t. Regression: exit at layer
  i >= 2 when ``|h_i - h_{i-1}| < t``. Reproduces :func:`romebert.exits.exit_decisions`.
* ``maxprob``: exit when the largest softmax probability >= t (classification only).
* ``patience`` (PABEE): ``threshold`` is k; exit when the argmax has been the same for k consecutive
  exits, counting the current one (PABEE's "patience" p is k - 1). Regression: exit after k
  consecutive changes ``|h_i - h_{i-1}| < tolerance``.
* ``patience-confidence``: ``threshold`` is a confidence threshold t (entropy < t, or maxprob >= t
  with ``confidence="maxprob"``) and ``patience`` is k; only consecutive agreeing exits that are also
  confident count. Regression: k consecutive changes < t (the same rule as ``patience`` with
  ``tolerance=t``).

Scores are computed in float64 by the same ops online and offline, so equal logits always give equal
decisions (live and cached logits of one input agree to float32 rounding; a decision can only differ
when a score lies within that rounding of its threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from romebert.errors import RomebertError
from romebert.exits import REFERENCE_THRESHOLDS, _threshold_vector

Threshold = float | Sequence[float]

CRITERIA: tuple[str, ...] = ("entropy", "maxprob", "patience", "patience-confidence")

# Default sweep grids (entropy: the reference grid; patience: every k up to the depth).
MAXPROB_THRESHOLDS: tuple[float, ...] = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


@dataclass
class PolicyState:
    """What a policy carries across layers. ``rows`` tensors are [b, ...]; the rest is per batch."""

    num_layers: int
    regression: bool
    thresholds: list[float]  # one per layer, Python floats: comparing against them needs no host sync
    rows: dict[str, Tensor] = field(default_factory=dict)

    def select(self, keep: Tensor) -> PolicyState:
        """The state of rows ``keep`` ([b'] int64 on the rows' device), in that order."""
        rows = {k: v.index_select(0, keep) for k, v in self.rows.items()}
        return PolicyState(self.num_layers, self.regression, self.thresholds, rows)

    @staticmethod
    def cat(states: Sequence[PolicyState]) -> PolicyState:
        """The rows of several states of one policy at the same layer, stacked in order."""
        first = states[0]
        if len(states) == 1:
            return first
        rows = {k: torch.cat([s.rows[k] for s in states]) for k in first.rows}
        return PolicyState(first.num_layers, first.regression, first.thresholds, rows)


def entropy_t(logits: Tensor) -> Tensor:
    """Softmax entropy in nats over the last axis, float64 (the torch twin of ``exits.entropy``).

    softmax is computed stably (shifted by the max), so logits of any size work; ``xlogy`` makes a
    class of probability 0 contribute 0 (not nan), while NaN logits still give NaN (never an exit).
    Few ops on purpose: this runs after every layer of the engine.
    """
    p = torch.softmax(logits, dim=-1, dtype=torch.float64)  # cast, then softmax: one op
    return torch.special.xlogy(p, p).sum(-1).neg_().clamp_min_(0.0)


def maxprob_t(logits: Tensor) -> Tensor:
    """Largest softmax probability over the last axis, float64."""
    return torch.softmax(logits, dim=-1, dtype=torch.float64).amax(-1)


def _change(x: Tensor, prev: Tensor) -> Tensor:
    """Regression: the largest absolute change from the previous exit, [b] float64."""
    return (x - prev).abs().amax(-1)


def _small_change_streak(logits: Tensor, rows: dict[str, Tensor], tolerance: float) -> Tensor:
    """Regression patience: consecutive exits (up to this one) whose change from the previous exit is
    below ``tolerance``, [b] int64; updates ``rows["prev"]`` (the caller stores the count)."""
    x = logits.double()
    prev = rows.get("prev")
    rows["prev"] = x
    if prev is None:
        return torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return torch.where(_change(x, prev) < tolerance, rows["count"] + 1, 0)


class ExitPolicy:
    """Base class: subclasses set ``name`` and implement ``_step``."""

    name: ClassVar[str] = ""
    supports_regression: ClassVar[bool] = True

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

    # ------------------------------------------------------------------------------------------ API
    def params(self) -> dict[str, Any]:
        """Everything that identifies the rule (goes into sweep rows and reports)."""
        return {"criterion": self.name, "threshold": self.threshold}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "criterion")
        return f"{type(self).__name__}({extra})"

    def init_state(
        self, n: int, num_layers: int, regression: bool = False, device: torch.device | str | None = None
    ) -> PolicyState:
        """Fresh state for ``n`` samples of a model with ``num_layers`` exits."""
        if regression and not self.supports_regression:
            raise RomebertError(f"criterion {self.name!r} needs class probabilities; it does not apply to regression")
        return PolicyState(num_layers, regression, self._thresholds(num_layers), self._init_rows(n, device))

    def _thresholds(self, num_layers: int) -> list[float]:
        # Cached: the engine starts a state per batch, and batch size 1 should not pay numpy work each time.
        key = (num_layers, self.threshold if isinstance(self.threshold, float) else tuple(self.threshold))
        cache = self.__dict__.setdefault("_thr_cache", {})
        if key not in cache:
            cache[key] = [float(t) for t in _threshold_vector(self.threshold, num_layers)]
        return cache[key]

    def step(self, layer: int, logits: Tensor, state: PolicyState) -> tuple[Tensor, PolicyState]:
        """Exit decisions at ``layer`` (0-based) for logits [b, C] -> (exit mask [b] bool, new state)."""
        exit_mask = self._step(layer, logits, state)
        if layer >= state.num_layers - 1:
            # The final head takes whoever is left.
            exit_mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return exit_mask, state

    def select(self, state: PolicyState, keep: Tensor) -> PolicyState:
        """Compact the state to rows ``keep`` (int64 indices on the state's device)."""
        return state.select(keep)

    def decide(self, all_logits: np.ndarray | Tensor, regression: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Offline: exit layer (1-based, [N] int64) and the chosen exit's logits ([N, C]) from [L, N, C].

        Runs the same ``step`` calls as the engine, on every row at once.
        """
        logits = torch.as_tensor(np.asarray(all_logits) if not isinstance(all_logits, Tensor) else all_logits)
        if logits.ndim != 3 or logits.shape[0] < 1 or logits.shape[2] < 1:
            raise RomebertError(
                f"all_logits must have shape [layers, examples, classes], got shape {tuple(logits.shape)}"
            )
        num_layers, n = logits.shape[0], logits.shape[1]
        state = self.init_state(n, num_layers, regression, logits.device)
        first = torch.full((n,), num_layers - 1, dtype=torch.int64)
        undecided = torch.ones(n, dtype=torch.bool)
        for i in range(num_layers):
            exit_mask, state = self.step(i, logits[i], state)
            fire = exit_mask.cpu() & undecided
            first[fire] = i
            undecided &= ~fire
        chosen = logits[first.to(logits.device), torch.arange(n, device=logits.device)]  # [N, C]
        return first.numpy() + 1, chosen.cpu().numpy()

    # ------------------------------------------------------------------------------------- subclass
    def _init_rows(self, n: int, device: torch.device | str | None) -> dict[str, Tensor]:
        return {}

    def _step(self, layer: int, logits: Tensor, state: PolicyState) -> Tensor:
        raise NotImplementedError


class EntropyPolicy(ExitPolicy):
    """Exit when softmax entropy < t (regression: |h_i - h_{i-1}| < t from layer 2)."""

    name = "entropy"

    def _init_rows(self, n: int, device: torch.device | str | None) -> dict[str, Tensor]:
        return {}

    def _step(self, layer: int, logits: Tensor, state: PolicyState) -> Tensor:
        t = state.thresholds[layer]
        if not state.regression:
            # entropy < t, as -sum(p log p) < t <=> sum(p log p) > -t (negation is exact): two ops fewer
            # on the engine's per-layer path; NaN still never exits.
            p = torch.softmax(logits, dim=-1, dtype=torch.float64)
            return torch.special.xlogy(p, p).sum(-1) > -t
        x = logits.double()
        prev = state.rows.get("prev")
        state.rows["prev"] = x
        if prev is None:  # layer 1 has no predecessor, so it never exits
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return _change(x, prev) < t


class MaxProbPolicy(ExitPolicy):
    """Exit when the largest softmax probability >= t."""

    name = "maxprob"
    supports_regression = False

    def _step(self, layer: int, logits: Tensor, state: PolicyState) -> Tensor:
        return maxprob_t(logits) >= state.thresholds[layer]


class PatiencePolicy(ExitPolicy):
    """PABEE: exit once the prediction has been the same for k consecutive exits (k = threshold)."""

    name = "patience"

    def __init__(self, threshold: Threshold = 2, tolerance: float = 0.1) -> None:
        super().__init__(threshold)
        if np.min(np.asarray(self.threshold, dtype=np.float64)) < 1:
            raise RomebertError(f"patience: k must be >= 1 (consecutive agreeing exits), got {self.threshold}")
        if not math.isfinite(tolerance) or tolerance < 0:
            raise RomebertError(f"patience: tolerance must be a finite number >= 0, got {tolerance}")
        self.tolerance = float(tolerance)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tolerance": self.tolerance}

    def _step(self, layer: int, logits: Tensor, state: PolicyState) -> Tensor:
        rows = state.rows
        if state.regression:
            count = _small_change_streak(logits, rows, self.tolerance)
        else:
            pred = logits.argmax(-1)
            prev = rows.get("prev")
            rows["prev"] = pred
            if prev is None:
                count = torch.ones_like(pred)
            else:
                count = torch.where(pred == prev, rows["count"] + 1, 1)
        rows["count"] = count
        return count >= state.thresholds[layer]


class PatienceConfidencePolicy(ExitPolicy):
    """Patience counting only exits that agree with the previous one and are confident."""

    name = "patience-confidence"

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

    def _step(self, layer: int, logits: Tensor, state: PolicyState) -> Tensor:
        rows = state.rows
        t = state.thresholds[layer]
        if state.regression:
            count = _small_change_streak(logits, rows, t)
        else:
            confident = entropy_t(logits) < t if self.confidence == "entropy" else maxprob_t(logits) >= t
            pred = logits.argmax(-1)
            prev = rows.get("prev")
            rows["prev"] = pred
            # Confident: extend the run if it agrees with the previous exit (a run broken by an
            # unconfident exit has count 0, so it restarts at 1); unconfident: the run is broken.
            run = torch.ones_like(pred) if prev is None else torch.where(pred == prev, rows["count"] + 1, 1)
            count = torch.where(confident, run, 0)
        rows["count"] = count
        return count >= self.patience


POLICIES: dict[str, type[ExitPolicy]] = {
    "entropy": EntropyPolicy,
    "maxprob": MaxProbPolicy,
    "patience": PatiencePolicy,
    "patience-confidence": PatienceConfidencePolicy,
}


def get_policy(name: str, threshold: Threshold, **kwargs: Any) -> ExitPolicy:
    """A policy by criterion name; ``kwargs``: ``tolerance`` (patience), ``patience``/``confidence``
    (patience-confidence). Keywords a criterion does not take are ignored, so one set of CLI options
    can feed every criterion."""
    key = name.strip().lower().replace("_", "-")
    key = {"pabee": "patience", "max-prob": "maxprob"}.get(key, key)
    if key not in POLICIES:
        raise RomebertError(f"unknown exit criterion {name!r}; choose one of {list(CRITERIA)}")
    cls = POLICIES[key]
    accepted = {"patience": ("tolerance",), "patience-confidence": ("patience", "confidence")}.get(key, ())
    return cls(threshold, **{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def default_thresholds(criterion: str, num_layers: int | None = None) -> list[float]:
    """The default sweep grid of a criterion (``patience`` needs ``num_layers``: k = 1..L)."""
    key = get_policy(criterion, 1.0).name
    if key == "maxprob":
        return list(MAXPROB_THRESHOLDS)
    if key == "patience":
        if num_layers is None:
            raise RomebertError("the patience grid needs the number of layers")
        return [float(k) for k in range(1, num_layers + 1)]
    return list(REFERENCE_THRESHOLDS)


def candidate_thresholds(
    criterion: str, all_logits: np.ndarray, regression: bool = False, num: int = 200, confidence: str = "entropy"
) -> list[float]:
    """A data-driven, fine grid for choosing a threshold: score quantiles of exits 1..L-1.

    Each quantile is nudged past its score so that the sample holding it is on the exit side
    (``<`` rules) -> every distinct operating point of the grid is reachable.
    """
    logits = np.asarray(all_logits)
    key = get_policy(criterion, 1.0).name
    if key == "patience":
        return default_thresholds(key, logits.shape[0])
    early = torch.as_tensor(logits[:-1]) if logits.shape[0] > 1 else torch.as_tensor(logits)
    if regression:
        if key == "maxprob":
            raise RomebertError("criterion 'maxprob' does not apply to regression")
        x = torch.as_tensor(logits).double()
        scores = _change(x[1:], x[:-1])[:-1] if logits.shape[0] > 2 else _change(x[1:], x[:-1])
    elif key == "maxprob" or (key == "patience-confidence" and confidence == "maxprob"):
        key = "maxprob"
        scores = maxprob_t(early)
    else:
        scores = entropy_t(early)
    values = scores.reshape(-1).numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return default_thresholds(key, logits.shape[0])
    grid = np.unique(np.quantile(values, np.linspace(0.0, 1.0, num)))
    if key == "maxprob":  # ">=" rule: the quantile itself is reachable; scan strictest first
        return [float(v) for v in grid[::-1]]
    return [0.0] + [float(v) for v in np.nextafter(grid, np.inf)]
