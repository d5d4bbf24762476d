"""The exit criteria, one class each: the rule a layer's logits are judged by, and everything the rest of
the package needs to know of it (its one-line rule, default threshold, options, grid and bounds; see
:class:`~romebert.runtime.exit_policy.ExitPolicy`). ``policies.py`` registers them. Numpy only."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.exit_policy import (
    MAXPROB_THRESHOLDS,
    ExitPolicy,
    PolicyState,
    Threshold,
    _agreement_run,
    _small_change_streak,
)
from romebert.runtime.scores import cap, change, energy, entropy, maxprob


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

    @classmethod
    def stricter(cls, **options: Any) -> int:
        return 1

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

    @classmethod
    def stricter(cls, **options: Any) -> int:
        return 1

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

    @classmethod
    def stricter(cls, **options: Any) -> int:
        return 1 if options.get("confidence") == "maxprob" else -1

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


class EnergyPolicy(ExitPolicy):
    """COSEE's exit signal: exit when the normalised energy ``sigmoid(-logsumexp(z))`` < t."""

    name = "energy"
    rule = "exit when the normalised energy 1 / (1 + sum exp(z)) < t (COSEE's signal)"
    default_threshold = 0.1
    supports_regression = False

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        return [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        return 0.0, 1.0

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        return state.score("energy", layer, lambda: energy(logits)) < state.threshold(layer)


def agreement_weight(layer: int, num_layers: int) -> float:
    """BEEM-C's weight of exit ``layer`` (0-based): its cost, the share of the model run to reach it."""
    return (layer + 1) / num_layers


class AgreementPolicy(ExitPolicy):
    """BEEM-style (Bajpai & Hanawal, ICLR 2025): the exits are experts whose weighted confidences add up
    while consecutive exits agree, ``S_i = w_i p_i + S_{i-1}`` if exit i predicts what exit i-1 did, else
    ``w_i p_i`` (p: the largest class probability, w: :func:`agreement_weight`); exit when ``S_i >= t``."""

    name = "agreement"
    rule = "exit when the cost-weighted max-probabilities of consecutive agreeing exits add up to >= t (BEEM)"
    default_threshold = 0.5
    supports_regression = False

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        top = (num_layers + 1) / 2  # every exit agreeing with certainty
        return [round(top * k / 12, 6) for k in range(12, 0, -1)]

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        return 0.0, (num_layers + 1) / 2

    @classmethod
    def stricter(cls, **options: Any) -> int:
        return 1

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        total = agreement_step(layer, logits, state)
        return total >= state.threshold(layer)


def agreement_step(layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
    """The agreement sum S of this layer's rows [b], carrying the previous prediction and sum in the rows."""
    rows = state.rows
    pred = np.argmax(logits, axis=-1)
    weighted = agreement_weight(layer, state.num_layers) * maxprob(logits)
    prev, carried = rows.get("prev"), rows.get("sum")
    total = weighted if prev is None else np.where(pred == prev, carried + weighted, weighted)
    rows["prev"], rows["sum"] = pred, total
    return total


class CapPolicy(ExitPolicy):
    """CAP (He et al., IJCAI 2025, arXiv 2506.17249): the share of the exit's pooled feature outside the span of
    its classifier's weights (NSP) is appended to the logits as one more class; exit when that class's
    softmax probability < t. Needs no retraining; the exits report NSP beside their logits."""

    name = "cap"
    rule = "exit when the softmax probability of the exit feature's null-space share, as an extra class, < t (CAP)"
    default_threshold = 0.1
    supports_regression = False
    needs = ("nsp",)

    @classmethod
    def grid(cls, num_layers: int) -> list[float]:
        return [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5]

    @classmethod
    def bounds(cls, num_labels: int, num_layers: int, **options: Any) -> tuple[float, float]:
        return 0.0, 1.0

    def _step(self, layer: int, logits: np.ndarray, state: PolicyState) -> np.ndarray:
        nsp = state.rows["nsp"]
        return state.score("cap", layer, lambda: cap(logits, nsp)) < state.threshold(layer)
