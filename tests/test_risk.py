"""Thresholds chosen with a guarantee (evaluation/risk.py): the binomial tail, Learn-then-Test's fixed
sequence, the calibration / report split, and the guarantee holding over many random splits."""

import numpy as np
import pytest
from scipy.stats import binom

from romebert.core.errors import RomebertError
from romebert.evaluation.exits import check_guarantee, choose_threshold
from romebert.evaluation.risk import binomial_cdf, control_risk, split_indices
from romebert.runtime.policies import get_policy

from fakes import FakeTask, fake_metrics


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 100, 0.05), (10, 204, 0.02), (99, 436, 0.2), (5, 5, 0.5)])
def test_binomial_tail_equals_scipy(k, n, p):
    assert binomial_cdf(k, n, p) == pytest.approx(binom.cdf(k, n, p), rel=1e-9, abs=1e-15)


def _logits(n=2000, seed=0):
    """3 exits, 2 classes: exit 1 is right on confident rows only; the final exit decides the truth."""
    rng = np.random.default_rng(seed)
    final = rng.normal(0, 3, size=(n, 2))
    truth = final.argmax(-1)
    confident = rng.random(n) < 0.6
    first = np.where(confident[:, None], final * 3, rng.normal(0, 0.3, size=(n, 2)))
    middle = final * 0.8 + rng.normal(0, 1.0, size=(n, 2))
    return np.stack([first, middle, final]).astype(np.float32), truth


def test_fixed_sequence_stops_at_the_first_threshold_it_cannot_certify():
    logits, _ = _logits(500)
    grid = [0.0, 0.05, 0.2, 0.4, 0.6, 0.69]  # entropy: stricter to looser
    rc = control_risk(logits, grid, epsilon=0.05, delta=0.1)
    tested = rc.tested
    assert [t["threshold"] for t in tested] == grid[: len(tested)]  # most conservative first
    assert all(t["p_value"] <= 0.1 for t in tested[:-1])
    assert rc.threshold == (tested[-1] if tested[-1]["p_value"] <= 0.1 else tested[-2])["threshold"]
    assert tested[0]["disagreement"] == 0.0  # entropy < 0 lets nothing out early
    with pytest.raises(RomebertError, match="0 < epsilon < 1"):
        control_risk(logits, grid, epsilon=0.0, delta=0.1)


def test_too_few_calibration_examples_certify_nothing():
    logits, _ = _logits(20)
    # zero disagreements out of 20 are not evidence that the risk is below 1 %: (0.99)^20 = 0.82 > 0.1
    assert not control_risk(logits, [0.0, 0.3], epsilon=0.01, delta=0.1).certified


def test_a_guaranteed_choice_is_made_on_one_half_and_reported_on_the_other():
    logits, labels = _logits(1000)
    task = FakeTask()
    threshold, row = choose_threshold(logits, labels, task, max_metric_drop=0.05, confidence=0.9,
                                      metric_fn=fake_metrics)  # fmt: skip
    g = row["guarantee"]
    calib, report = split_indices(1000)
    assert (g["calibration_examples"], g["report_examples"]) == (calib.size, report.size) == (500, 500)
    assert not set(calib) & set(report)
    early, _ = get_policy("entropy", threshold).decide(logits[:, report])
    layers, chosen = get_policy("entropy", threshold).decide(logits[:, report])
    assert g["report_disagreement"] == pytest.approx(float((chosen.argmax(-1) != logits[-1, report].argmax(-1)).mean()))
    assert row["speedup"] == pytest.approx(3 * report.size / layers.sum())
    assert g["calibration_disagreement"] <= 0.05 and row["speedup"] > 1.2
    # a string confidence is patience-confidence's option, not a risk level
    t, r = choose_threshold(logits, labels, task, "patience-confidence", max_metric_drop=0.3, confidence="maxprob",
                            thresholds=[0.9], metric_fn=fake_metrics)  # fmt: skip
    assert r["confidence"] == "maxprob" and "guarantee" not in r
    with pytest.raises(RomebertError, match="needs --max-metric-drop"):
        choose_threshold(logits, labels, task, confidence=0.9, metric_fn=fake_metrics)


def test_the_guarantee_holds_over_random_splits():
    logits, labels = _logits(1200, seed=3)
    check = check_guarantee(logits, labels, FakeTask(), "entropy", epsilon=0.05, confidence=0.9, splits=40,
                            metric_fn=fake_metrics)  # fmt: skip
    assert check["certified_splits"] == 40
    # at most delta = 0.1 of splits may break epsilon, up to sampling error (2 standard errors of 40 draws)
    assert check["share_disagreement_over_epsilon"] <= 0.1 + 2 * (0.1 * 0.9 / 40) ** 0.5
    assert check["share_drop_over_epsilon"] <= check["share_disagreement_over_epsilon"]
    assert check["mean_speedup"] > 1.2
