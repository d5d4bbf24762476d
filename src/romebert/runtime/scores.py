"""Exit scores computed from one exit's logits, in numpy (float64): the one softmax of the package, the
entropy, the largest probability and, for regression, the change from the previous exit. Online (the
engines) and offline (sweeps) call these same functions, so equal logits always give equal scores."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, float64 (a row of all -inf gives NaN rather than an error)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    # A row of all -inf would make the shift nan; shift it by 0 instead (its scores are nan anyway).
    shifted = x - np.where(np.isfinite(m), m, 0.0)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities over the last axis, float64."""
    return np.exp(log_softmax(logits))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy in nats over the last axis, float64, never negative.

    From log-softmax, so logits of any size work (the reference's ``log(sum(exp(x)))`` overflows above
    about 88); a class of probability 0 contributes 0, and NaN logits give NaN (which never exits).
    """
    # H = log(s) - sum(p * z) with z = x - max(x), e = exp(z), s = sum(e), p = e / s. Few numpy calls on
    # purpose: an engine runs this after every layer, where each call costs microseconds.
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        z = x - x.max(axis=-1, keepdims=True)  # a row of all -inf (or any NaN) gives NaN: never exits
        e = np.exp(z)
        s = e.sum(axis=-1, keepdims=True)
        pz = np.where(e > 0.0, e * z, 0.0)  # a class of probability 0 (logit -inf) adds 0, not NaN
        return np.maximum(np.log(s[..., 0]) - pz.sum(axis=-1) / s[..., 0], 0.0)


def maxprob(logits: np.ndarray) -> np.ndarray:
    """Largest softmax probability over the last axis, float64."""
    return np.exp(log_softmax(logits).max(axis=-1))


def change(x: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Regression: the largest absolute change from the previous exit, [b] float64."""
    return np.abs(np.asarray(x, dtype=np.float64) - prev).max(axis=-1)


def energy(logits: np.ndarray) -> np.ndarray:
    """COSEE's normalised energy ``1 / (1 + sum_c exp(z_c)) = sigmoid(-logsumexp(z))`` over the last axis,
    float64 in (0, 1); lower means more confident."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[..., None]).sum(axis=-1))
    return np.exp(-np.logaddexp(0.0, lse))  # sigmoid(-lse) without overflow


def cap(logits: np.ndarray, nsp: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """CAP (arXiv 2506.17249): the softmax probability of a class appended to the logits [..., C] with logit
    ``alpha * nsp`` ([...], the exit's null-space share, ``model.modeling.ExitHead.null_space_share``),
    float64; lower means more confident."""
    x = np.asarray(logits, dtype=np.float64)
    extra = alpha * np.asarray(nsp, dtype=np.float64)[..., None]
    return np.exp(log_softmax(np.concatenate([x, extra], axis=-1))[..., -1])
