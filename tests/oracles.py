"""Independent numpy reference implementations, for tests only (the library decides through policies)."""

from __future__ import annotations

import numpy as np


def entropy_oracle(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy in nats, written out plainly from log-softmax (0 log 0 = 0)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    log_p = (x - m) - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = p * np.where(p > 0.0, log_p, 0.0)
    return np.maximum(-np.sum(terms, axis=-1), 0.0)


def entropy_rule_oracle(logits: np.ndarray, threshold, regression: bool = False) -> np.ndarray:
    """The reference's exit layer (1-based): first layer i < L with score < threshold_i, else L; the score is
    the entropy, or for regression the change from the previous exit (layer 1 never exits)."""
    x = np.asarray(logits, dtype=np.float64)
    num_layers = x.shape[0]
    thr = np.asarray(threshold, dtype=np.float64)
    thr = (
        np.full(num_layers, float(thr)) if thr.ndim == 0 else np.concatenate([thr, [np.inf] * (num_layers - thr.size)])
    )
    if regression:
        scores = np.concatenate([np.full((1, x.shape[1]), np.inf), np.abs(x[1:] - x[:-1]).max(-1)])
    else:
        scores = entropy_oracle(x)
    fire = scores < thr[:, None]
    fire[-1] = True
    return np.argmax(fire, axis=0) + 1
