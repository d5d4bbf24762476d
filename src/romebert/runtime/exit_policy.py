"""What every exit criterion is made of: the per-row state it carries across layers (:class:`PolicyState`),
its options (:class:`PolicyOptions`) and the base class (:class:`ExitPolicy`) whose ``step`` engines call
after each layer and whose ``decide`` runs the same steps over cached logits. The criteria themselves are
in ``criteria.py``; ``policies.py`` registers them. Numpy only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.options import option, option_fields
from romebert.runtime.scores import change

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
        "entropy",
        "patience-confidence: confident means entropy < t, or maxprob >= t",
        choices=("entropy", "maxprob"),
        flag="--confidence-score",
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
    # per-exit outputs besides the logits that it reads (from the segments online, from the evaluation's
    # cache offline), each [b] per layer, e.g. "nsp": the null-space share of the exit's pooled feature
    needs: ClassVar[tuple[str, ...]] = ()
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

    @classmethod
    def stricter(cls, **options: Any) -> int:
        """The sign of a threshold change that lets fewer inputs exit: -1 for "score < t" rules (a smaller
        t is stricter), +1 for "score >= t" rules and counts (a larger t is)."""
        return -1

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
        self,
        all_logits: np.ndarray,
        regression: bool = False,
        scores: dict | None = None,
        features: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Offline: exit layer (1-based, [N] int64) and the chosen exit's logits ([N, C]) from [L, N, C].

        Runs the same ``step`` calls as the engines, on every row at once. ``scores``: a dict shared by
        several decisions over the same ``all_logits`` (a sweep), where exit scores are kept.
        ``features``: the per-exit outputs [L, N] the criterion ``needs`` (see :attr:`needs`).
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
        missing = [k for k in self.needs if k not in (features or {})]
        if missing:
            raise RomebertError(
                f"criterion {self.name!r} needs each exit's {missing[0]}, which these logits come without"
            )
        for i in range(num_layers - 1):
            for k in self.needs:
                state.rows[k] = np.asarray(features[k][i])
            exit_mask, state = self.step(i, logits[i], state)
            fire = exit_mask & undecided
            first[fire] = i
            undecided &= ~fire
        return first + 1, logits[first, np.arange(n)]

    # ------------------------------------------------------------------------------------- subclass
    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        raise NotImplementedError
