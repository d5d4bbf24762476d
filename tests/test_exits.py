"""Exit decisions, layer statistics and threshold sweeps from cached logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from romebert.core.errors import RomebertError
from romebert.evaluation.exits import layer_stats, per_exit_metrics, predictions, sweep
from romebert.runtime.criteria import EntropyPolicy
from romebert.runtime.exit_policy import REFERENCE_THRESHOLDS
from romebert.runtime.scores import entropy

from fakes import FakeTask, fake_metrics


def exit_decisions(logits, threshold, regression=False):
    """The reference's rule (entropy < threshold; regression: change < threshold), as the policy runs it."""
    return EntropyPolicy(threshold).decide(logits, regression=regression)


def binary_logits(p: float) -> list[float]:
    """Two-class logits whose softmax is (p, 1 - p)."""
    return [math.log(p / (1.0 - p)), 0.0]


def h2(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


# Entropies (nats): H(.5)=.6931, H(.9)=.3251, H(.99)=.0560, H(.999)=.0079.
P = np.array(
    [
        [0.99, 0.5, 0.9, 0.5],  # layer 1
        [0.5, 0.99, 0.999, 0.9],  # layer 2
        [0.9, 0.9, 0.9, 0.9],  # layer 3 = final head
    ]
)
LOGITS = np.array([[binary_logits(p) for p in row] for row in P])  # [3, 4, 2]


def test_entropy_hand_value_and_scipy() -> None:
    assert entropy(np.array(binary_logits(0.9))) == pytest.approx(h2(0.9), abs=1e-12)
    assert entropy(np.zeros(4)) == pytest.approx(math.log(4), abs=1e-12)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 7)) * 3
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    np.testing.assert_allclose(entropy(x), scipy.stats.entropy(p, axis=-1), atol=1e-12)
    assert entropy(x).shape == (3, 5)


def test_entropy_stable_for_huge_logits() -> None:
    h = entropy(np.array([[1000.0, 0.0], [1000.0, 1000.0], [-1000.0, 1000.0]]))
    assert np.isfinite(h).all()
    assert h[0] == pytest.approx(0.0, abs=1e-12)
    assert h[1] == pytest.approx(math.log(2), abs=1e-12)
    assert h[2] == pytest.approx(0.0, abs=1e-12)
    assert entropy(np.array([[-np.inf, 0.0, 0.0]])) == pytest.approx(math.log(2))


def test_hand_built_entropies() -> None:
    np.testing.assert_allclose(entropy(LOGITS), np.vectorize(h2)(P), atol=1e-12)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.01, [3, 3, 2, 3]),
        (0.1, [1, 2, 2, 3]),
        (0.4, [1, 2, 1, 2]),
        (0.7, [1, 1, 1, 1]),
        (0.0, [3, 3, 3, 3]),
        (1e9, [1, 1, 1, 1]),
    ],
)
def test_exit_decisions_hand_built(threshold: float, expected: list[int]) -> None:
    layers, chosen = exit_decisions(LOGITS, threshold)
    assert layers.tolist() == expected
    np.testing.assert_array_equal(chosen, LOGITS[layers - 1, np.arange(4)])


def test_exit_threshold_is_strict() -> None:
    t = float(entropy(np.zeros(2)))  # exactly H of a 50/50 exit
    layers, _ = exit_decisions(LOGITS, t)
    # examples 1 and 3 have H = ln 2 at layer 1: not below t, so they go on to layer 2
    assert layers.tolist() == [1, 2, 1, 2]


def test_per_exit_thresholds() -> None:
    assert exit_decisions(LOGITS, [0.01, 0.4])[0].tolist() == [3, 2, 2, 2]
    # length L: the final head's entry is accepted and ignored
    assert exit_decisions(LOGITS, (0.01, 0.4, 0.0))[0].tolist() == [3, 2, 2, 2]
    assert exit_decisions(LOGITS, np.array([0.1, 0.1]))[0].tolist() == [1, 2, 2, 3]
    with pytest.raises(RomebertError):
        exit_decisions(LOGITS, [0.1])
    with pytest.raises(RomebertError):
        exit_decisions(LOGITS, float("nan"))
    with pytest.raises(RomebertError):
        exit_decisions(LOGITS[0], 0.1)


def test_regression_rule() -> None:
    h = np.array(
        [
            [1.0, 2.0, 3.0, 0.0],
            [1.05, 2.5, 3.0, 1.0],  # change from layer 1: .05, .5, 0, 1
            [9.0, 2.6, 9.0, 1.2],
        ]
    )[..., None]
    assert exit_decisions(h, 0.1, regression=True)[0].tolist() == [2, 3, 2, 3]
    assert exit_decisions(h, 0.6, regression=True)[0].tolist() == [2, 2, 2, 3]
    assert exit_decisions(h, 0.0, regression=True)[0].tolist() == [3, 3, 3, 3]
    # layer 1 has nothing to compare with, so it never fires
    assert exit_decisions(h, 1e9, regression=True)[0].tolist() == [2, 2, 2, 2]
    preds, layers = predictions(h, 0.1, FakeTask(name="STS-B", labels=None, metric="neg_mse"))
    assert layers.tolist() == [2, 3, 2, 3]
    np.testing.assert_allclose(preds, [1.05, 2.6, 3.0, 1.2])
    assert preds.dtype == np.float64


def test_single_layer_and_empty() -> None:
    one = np.zeros((1, 3, 2))
    assert exit_decisions(one, 1e9)[0].tolist() == [1, 1, 1]
    layers, chosen = exit_decisions(np.zeros((3, 0, 2)), 0.5)
    assert layers.shape == (0,) and chosen.shape == (0, 2)


def test_layer_stats_by_hand() -> None:
    s = layer_stats(np.array([1, 1, 2, 3]), 3)
    assert s["counts"] == [2, 1, 1]
    assert s["layer_ratio"] == pytest.approx((2 * 1 + 1 * 2 + 1 * 3) / (4 * 3))
    assert s["saving"] == pytest.approx(5 / 12)
    assert s["speedup"] == pytest.approx(12 / 7)
    full = layer_stats(np.full(5, 12), 12)
    assert full["counts"] == [0] * 11 + [5]
    assert (full["layer_ratio"], full["saving"], full["speedup"]) == (1.0, 0.0, 1.0)
    with pytest.raises(RomebertError):
        layer_stats(np.array([0, 1]), 3)
    with pytest.raises(RomebertError):
        layer_stats(np.array([4]), 3)
    with pytest.raises(RomebertError):
        layer_stats(np.array([], dtype=int), 3)


def test_predictions_classification() -> None:
    preds, layers = predictions(LOGITS, 0.1, FakeTask())
    assert layers.tolist() == [1, 2, 2, 3]
    assert preds.tolist() == [0, 0, 0, 0]  # every p above is the probability of class 0


def _random_case(seed: int = 1) -> tuple[np.ndarray, np.ndarray, FakeTask]:
    rng = np.random.default_rng(seed)
    num_layers, n, c = 4, 60, 3
    labels = rng.integers(0, c, size=n)
    # later layers are sharper and more often right, like a trained multi-exit model
    base = rng.normal(size=(num_layers, n, c))
    base[np.arange(num_layers)[:, None], np.arange(n)[None, :], labels[None, :]] += np.arange(1, 5)[:, None]
    logits = base * np.linspace(0.5, 3.0, num_layers)[:, None, None]
    return logits, labels, FakeTask(name="MNLI", labels=("contradiction", "entailment", "neutral"))


def test_per_exit_metrics() -> None:
    logits, labels, task = _random_case()
    rows = per_exit_metrics(logits, labels, task, metric_fn=fake_metrics)
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert row == fake_metrics(task, logits[i].argmax(-1), labels)
    with pytest.raises(RomebertError):
        per_exit_metrics(logits, labels[:-1], task, metric_fn=fake_metrics)


def test_sweep_matches_recomputation() -> None:
    logits, labels, task = _random_case()
    rows = sweep(logits, labels, task, metric_fn=fake_metrics)
    assert [r["threshold"] for r in rows] == list(REFERENCE_THRESHOLDS)
    for row in rows:
        layers, chosen = exit_decisions(logits, row["threshold"])
        d = fake_metrics(task, chosen.argmax(-1), labels)
        expected = {"criterion": "entropy", "threshold": row["threshold"], **d, "metric": d["acc"]}
        expected.update(layer_stats(layers, 4))
        assert row == expected
    final = per_exit_metrics(logits, labels, task, metric_fn=fake_metrics)[-1]
    assert rows[0]["metric"] == final["acc"]
    assert rows[0]["counts"] == [0, 0, 0, 60] and rows[0]["speedup"] == 1.0
    # larger thresholds only ever exit earlier
    ratios = [r["layer_ratio"] for r in rows]
    assert ratios == sorted(ratios, reverse=True)


def test_sweep_regression_and_per_exit_thresholds() -> None:
    rng = np.random.default_rng(3)
    labels = rng.uniform(0, 5, size=20)
    logits = (labels[None, :] + rng.normal(scale=[[1.0], [0.3], [0.1]], size=(3, 20)))[..., None]
    task = FakeTask(name="STS-B", labels=None, metric="neg_mse", metrics=("neg_mse", "mse"))
    rows = sweep(logits, labels, task, thresholds=[0.0, 0.2, (0.5, 0.5)], metric_fn=fake_metrics)
    assert rows[0]["mse"] == pytest.approx(float(np.mean((logits[-1, :, 0] - labels) ** 2)))
    assert rows[2]["threshold"] == [0.5, 0.5]
    layers, chosen = exit_decisions(logits, 0.2, regression=True)
    assert rows[1]["counts"] == layer_stats(layers, 3)["counts"]
    assert rows[1]["mse"] == pytest.approx(float(np.mean((chosen[:, 0] - labels) ** 2)))


def test_sweep_with_real_metrics_module() -> None:
    """The default metric path: romebert.data.metrics on a real task spec."""
    from romebert.data import metrics, tasks

    task = tasks.get_task("SST-2")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=30)
    logits = rng.normal(size=(3, 30, 2))
    rows = sweep(logits, labels, task, thresholds=(0.0, 0.5))
    final = metrics.compute_metrics(task, logits[-1].argmax(-1), labels)
    assert rows[0]["metric"] == pytest.approx(metrics.main_metric(task, final))
