"""The arithmetic of ``romebert.jobs.compare.curves`` against hand-computed values."""

from __future__ import annotations

import pytest

from romebert.jobs.compare import aggregate, mean_std, metric_at_speedup, speedup_curve

from compare_fixtures import hand_comparison, hand_records


def test_metric_at_speedup_follows_a_hand_computed_curve():
    # unsorted, a tie at 1.0 (best kept: 0.82), a missing metric dropped
    points = [(2.5, 0.70), (1.0, 0.80), (3.0, 0.60), (1.5, 0.78), (1.0, 0.82), (1.5, None)]
    assert speedup_curve(points) == [(1.0, 0.82), (1.5, 0.78), (2.5, 0.70), (3.0, 0.60)]
    expected = {1.0: 0.82, 1.25: 0.80, 1.5: 0.78, 2.0: 0.74, 2.75: 0.65, 3.0: 0.60}
    for target, value in expected.items():
        assert metric_at_speedup(points, target) == pytest.approx(value)
    # 1 / (1/3) in floating point is 3.0000000000000004 on some counts: still the end of the curve
    assert metric_at_speedup([(1.0, 0.9), (3.0000000000000004, 0.5)], 3.0) == pytest.approx(0.5)


def test_metric_at_speedup_outside_the_curve_is_none():
    points = [(1.0, 0.8), (2.0, 0.7)]
    assert metric_at_speedup(points, 3.0) is None
    assert metric_at_speedup(points, 0.5) is None
    assert metric_at_speedup([], 1.5) is None
    assert metric_at_speedup([(1.0, 0.8)], 1.0) == pytest.approx(0.8)


def test_mean_std_counts_missing_values():
    ms = mean_std([0.5, None, 0.7])
    assert ms["mean"] == pytest.approx(0.6) and ms["std"] == pytest.approx(0.1414213562)
    assert (ms["n"], ms["of"]) == (2, 3)
    assert mean_std([0.4])["std"] is None and mean_std([None])["mean"] is None


def test_aggregate_matches_hand_computed_tables(tmp_path):
    comp = hand_comparison(tmp_path)
    agg = aggregate(comp.cfg, comp.splits, hand_records())
    per_exit = agg["per_exit"]["dev"]["mean"]
    assert per_exit["plain"][:2] == [None, None] and per_exit["plain"][2]["mean"] == pytest.approx(0.75)
    assert [c["mean"] for c in per_exit["deebert"]] == pytest.approx([0.6, 0.75, 0.85])
    at = agg["speedup"]["dev"]["mean"]["deebert"]["at"]
    # seed 1: 0.8 -> 0.6 over 1x..2x; seed 2: 0.9 -> 0.6 over 1x..3x
    assert at["1.5"]["values"] == pytest.approx([0.7, 0.825]) and at["1.5"]["mean"] == pytest.approx(0.7625)
    assert at["3"]["values"] == [None, pytest.approx(0.6)] and (at["3"]["n"], at["3"]["of"]) == (1, 2)
    assert agg["speedup"]["dev"]["mean"]["deebert"]["max_speedup"]["mean"] == pytest.approx(2.5)
    assert "at" not in agg["speedup"]["dev"]["mean"]["plain"]
    cost = agg["training_cost"]["mean"]
    assert cost["deebert"]["ratio_to_plain"]["values"] == pytest.approx([2.0, 2.0])
    assert cost["deebert"]["seconds_per_epoch"]["mean"] == pytest.approx(5.0)
    assert cost["plain"]["train_seconds"]["mean"] == pytest.approx(3.5)
    assert cost["deebert"]["cpu_ratio_to_plain"]["values"] == [pytest.approx(2.0), None]
    assert cost["deebert"]["cpu_seconds_per_epoch"]["mean"] == pytest.approx(2.0)  # seed 1 only


def test_aggregate_leaves_missing_runs_out(tmp_path):
    comp = hand_comparison(tmp_path)
    agg = aggregate(comp.cfg, comp.splits, hand_records(missing=(("plain", 2),)))
    assert agg["per_exit"]["dev"]["mean"]["plain"][2]["n"] == 1
    assert agg["training_cost"]["mean"]["deebert"]["ratio_to_plain"]["values"] == [pytest.approx(2.0), None]
