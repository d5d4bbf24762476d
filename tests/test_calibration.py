"""Per-exit temperature scaling and the expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from romebert.core.errors import RomebertError
from romebert.evaluation.calibration import (
    CalibrationReport,
    apply_temperatures,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def _synthetic(scales=(4.0, 1.0, 0.4), n=3000, c=3, seed=0):
    """Labels drawn from softmax(z); exit i reports z * scales[i] (>1 over-, <1 under-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return np.stack([z * s for s in scales]).astype(np.float32), labels


def test_ece_by_hand():
    logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]]))
    labels = np.array([0, 1, 1, 1])
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> 0.4 * 2/4; bin of 0.6: accuracy 1 -> 0.4 * 2/4
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(0.4)
    assert expected_calibration_error(logits[:0], labels[:0]) == 0.0
    with pytest.raises(RomebertError):
        expected_calibration_error(logits, labels, bins=0)


def test_fit_temperature_recovers_the_scale():
    logits, labels = _synthetic()
    for layer, scale in zip(logits, (4.0, 1.0, 0.4)):
        assert fit_temperature(layer, labels) == pytest.approx(scale, rel=0.15)


def test_calibration_lowers_nll_and_ece_on_a_miscalibrated_case():
    logits, labels = _synthetic()
    report = calibrate(logits, labels)
    assert len(report.temperatures) == 3 and report.num_examples == 3000
    for i in (0, 2):  # the miscalibrated exits improve clearly
        assert report.nll_after[i] < report.nll_before[i] - 0.05
        assert report.ece_after[i] < 0.5 * report.ece_before[i]
    assert report.nll_after[1] <= report.nll_before[1] + 1e-12  # never worse than T = 1
    assert nll(logits[0], labels, report.temperatures[0]) == pytest.approx(report.nll_after[0])
    # argmax, hence every exit's accuracy, is unchanged
    scaled = apply_temperatures(logits, report.temperatures)
    assert np.array_equal(scaled.argmax(-1), logits.argmax(-1))
    assert "ECE before" in report.table()


def test_report_roundtrip_and_errors(tmp_path):
    logits, labels = _synthetic(n=300)
    report = calibrate(logits, labels, bins=10)
    report.save(tmp_path / "calibration.json")
    assert CalibrationReport.load(tmp_path / "calibration.json") == report
    with pytest.raises(RomebertError, match="no calibration"):
        CalibrationReport.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RomebertError, match="not a valid"):
        CalibrationReport.load(tmp_path / "bad.json")
    with pytest.raises(RomebertError, match="regression"):
        calibrate(np.zeros((3, 5, 1)), np.zeros(5))
    with pytest.raises(RomebertError, match="one class id per example"):
        calibrate(logits, labels[:-1])
    with pytest.raises(RomebertError, match="one per exit"):
        apply_temperatures(logits, [1.0, 2.0])
    assert apply_temperatures(logits, None) is logits
