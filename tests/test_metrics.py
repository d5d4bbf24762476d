"""Metrics against scipy / sklearn on random arrays, degenerate inputs and per-task key sets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from romebert.core.errors import RomebertError
from romebert.data.metrics import (
    accuracy,
    compute_metrics,
    compute_metrics_by_names,
    f1,
    main_metric,
    matthews,
    pearson,
    spearman,
)
from romebert.data.tasks import TASKS, get_task


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert f1(p, y) == pytest.approx(skm.f1_score(y, p))
    assert matthews(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, size=300), rng.integers(0, 3, size=300)
    p3[:150] = y3[:150]
    assert matthews(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=100)
    y = x + rng.normal(scale=1.5, size=100)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    # Many ties: ranks must be averaged.
    xt, yt = rng.integers(0, 5, size=100), rng.integers(0, 4, size=100) + (x > 0)
    assert spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0])


def test_degenerate_inputs_give_zero_not_nan() -> None:
    y = np.array([0, 1, 0, 1])
    assert matthews(np.zeros(4, int), y) == 0.0  # a class never predicted
    assert matthews(np.ones(4, int), np.ones(4, int)) == 0.0
    assert f1(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positives anywhere
    assert pearson(np.ones(5), np.arange(5)) == 0.0
    assert spearman(np.arange(5), np.full(5, 2.5)) == 0.0
    assert pearson([1.0], [2.0]) == 0.0
    assert accuracy([], []) == 0.0
    assert f1([1, 1], [1, 1]) == 1.0 and accuracy([1, 0], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])


def test_compute_metrics_keys_for_every_task() -> None:
    rng = np.random.default_rng(0)
    for task in TASKS.values():
        if task.is_regression:
            labels = rng.uniform(0, 5, size=50)
            preds = labels + rng.normal(size=50)
        else:
            labels = rng.integers(0, task.num_labels, size=50)
            preds = rng.integers(0, task.num_labels, size=50)
        result = compute_metrics(task, preds, labels)
        assert tuple(result) == task.metrics
        assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in result.values())
        assert main_metric(task, result) == result[task.metric]


def test_compute_metrics_values() -> None:
    mrpc = get_task("mrpc")
    labels = np.array([1, 1, 0, 0, 1])
    preds = np.array([1, 0, 0, 1, 1])
    result = compute_metrics(mrpc, preds, labels)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["f1"] == pytest.approx(skm.f1_score(labels, preds))
    assert result["acc_and_f1"] == pytest.approx((0.6 + result["f1"]) / 2)
    # Logits are reduced with argmax.
    logits = np.eye(2)[preds] * 3.0 - 1.0
    assert compute_metrics(mrpc, logits, labels) == result
    stsb = compute_metrics(get_task("stsb"), np.array([[0.1], [2.0], [3.5]]), np.array([0.0, 2.5, 5.0]))
    assert stsb["pearson"] == pytest.approx(stats.pearsonr([0.1, 2.0, 3.5], [0.0, 2.5, 5.0])[0])
    assert stsb["spearman"] == pytest.approx(1.0)
    assert stsb["corr"] == pytest.approx((stsb["pearson"] + 1.0) / 2)
    assert compute_metrics(get_task("sst2"), [1, 1, 0, 0], [1, 0, 0, 0]) == {"accuracy": 0.75}


def test_by_names_and_errors() -> None:
    assert compute_metrics_by_names(["mcc", "accuracy"], [0, 1], [0, 1]) == {"mcc": 1.0, "accuracy": 1.0}
    with pytest.raises(RomebertError, match=r"unknown metric\(s\) \['bleu'\]"):
        compute_metrics_by_names(["bleu"], [0], [0])
    with pytest.raises(RomebertError, match="lack its main metric 'mcc'"):
        main_metric(get_task("cola"), {"accuracy": 0.5})
