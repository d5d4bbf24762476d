"""The Python API on a tiny trained run: predict in input order, calibration, choosing a threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from romebert.cli import main
from romebert.core.errors import RomebertError
from romebert.data.examples import Example
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.evaluation.calibration import CALIBRATION_FILE, apply_temperatures
from romebert.evaluation.exits import choice_record, choose_threshold, pick_from_sweep, sweep
from romebert.evaluation.logits import collect_outputs
from romebert.runtime.encoding import Collator, encode
from romebert.runtime.policies import CRITERIA, get_policy
from romebert.runtime.scores import entropy

from fakes import FakeTask, fake_metrics
from glue_fixtures import sentence, write_glue_fixture
from tiny import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_backbone_dir):
    tmp = tmp_path_factory.mktemp("api")
    write_glue_fixture(tmp / "glue", "SST-2", n=12)
    out = tmp / "run"
    args = ["train", "--task", "SST-2", "--data-dir", str(tmp / "glue"), "--model", str(tiny_backbone_dir)]
    assert main([*args, "--method", "romebert-sd", "-o", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def clf(run):
    return EarlyExitClassifier.from_run(run, device="cpu")


TEXTS = [sentence(i, length=1 + (i * 7) % 12) for i in range(24)]  # mixed lengths, unsorted


def _offline(clf: EarlyExitClassifier, texts, policy, temperatures=None):
    """Reference: every exit's logits from one cached pass, then the policy's offline decisions."""
    ds = encode([Example(str(i), t, None, None) for i, t in enumerate(texts)], clf.tokenizer, None, 32)
    logits, features = collect_outputs(clf.model, ds, Collator(clf.tokenizer), features=tuple(policy.needs))
    cached = apply_temperatures(logits, temperatures)
    return cached, *policy.decide(cached, features=features)


def _mid_threshold(cached: np.ndarray) -> float:
    """An entropy threshold between two well-separated scores near the median of exits 1..L-1."""
    s = np.unique(entropy(cached[:-1]))
    gaps = np.diff(s)
    middle = np.arange(s.size // 4, 3 * s.size // 4)
    i = middle[np.argmax(gaps[middle])]
    return float((s[i] + s[i + 1]) / 2)


@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_predict_returns_labels_probabilities_and_exit_layers_in_input_order(clf, batch_size):
    cached = _offline(clf, TEXTS, get_policy("entropy", 0.0))[0]
    policy = get_policy("entropy", _mid_threshold(cached))
    _, ref_layers, ref_logits = _offline(clf, TEXTS, policy)
    out = clf.predict_with_exits(TEXTS, criterion="entropy", threshold=policy.threshold, batch_size=batch_size)
    assert len(out) == len(TEXTS)
    assert out.exit_layers.tolist() == ref_layers.tolist()
    assert len(set(out.exit_layers.tolist())) >= 2  # a real mix, so order matters
    assert out.labels == [clf.label_names[i] for i in ref_logits.argmax(-1)]
    probs = torch.softmax(torch.from_numpy(ref_logits).double(), -1).numpy()
    assert out.probabilities.shape == (len(TEXTS), 2)
    assert np.allclose(out.probabilities, probs, atol=1e-5)
    assert out.layer_work == int(ref_layers.sum())
    assert out.layer_speedup == pytest.approx(len(TEXTS) * clf.num_layers / ref_layers.sum())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_through_predict(clf, criterion):
    threshold = {"entropy": 0.69, "maxprob": 0.51, "patience": 2, "patience-confidence": 0.69, "energy": 0.2,
                 "agreement": 0.4, "cap": 0.69}[criterion]  # fmt: skip
    policy = get_policy(criterion, threshold, patience=2)
    _, ref_layers, _ = _offline(clf, TEXTS, policy)
    out = clf.predict_with_exits(TEXTS, criterion=criterion, threshold=threshold, batch_size=4, patience=2)
    assert out.exit_layers.tolist() == ref_layers.tolist()
    pairs = [(a, b) for a, b in zip(TEXTS[:5], TEXTS[5:10])]
    assert len(clf.predict(pairs, criterion=criterion, threshold=threshold)) == 5
    assert clf.predict(pairs[0], criterion=criterion, threshold=threshold) in clf.label_names  # one pair


def test_predict_input_errors(clf):
    mixed = clf.predict_with_exits(["a movie", ("a", "b"), "b"])  # singles and pairs in one call
    alone = [clf.predict_with_exits([x]) for x in ["a movie", ("a", "b"), "b"]]
    assert mixed.labels == [a.labels[0] for a in alone]
    assert mixed.exit_layers.tolist() == [int(a.exit_layers[0]) for a in alone]
    with pytest.raises(RomebertError, match="input 1"):
        clf.predict(["a movie", 3])
    with pytest.raises(RomebertError, match="batch_size"):
        clf.predict(["a movie"], batch_size=0)
    with pytest.raises(RomebertError, match="unknown exit criterion"):
        clf.predict(["a movie"], criterion="margin")
    empty = clf.predict_with_exits([])
    assert len(empty) == 0 and empty.exit_layers.shape == (0,)


def test_predict_returns_labels_and_predict_proba_probabilities(clf):
    out = clf.predict_with_exits(TEXTS[:6])
    assert clf.predict(TEXTS[:6]) == out.labels
    assert clf.predict(TEXTS[0]) == out.labels[0]  # one string, one label
    assert np.allclose(clf.predict_proba(TEXTS[:6]), out.probabilities)
    assert clf.predict_proba(TEXTS[0]).shape == (2,)


def test_save_pretrained_keeps_model_tokenizer_and_exit_config_together(clf, tmp_path):
    from romebert.runtime.artefacts import EarlyExitConfig

    clf.exit_config = EarlyExitConfig(criterion="maxprob", threshold=0.8, temperatures=[1.5] * clf.num_layers)
    try:
        clf.save_pretrained(tmp_path / "deploy")
    finally:
        clf.exit_config = EarlyExitConfig()
    loaded = EarlyExitClassifier.from_pretrained(tmp_path / "deploy", device="cpu")
    assert loaded.exit_config.criterion == "maxprob" and loaded.exit_config.threshold == 0.8
    assert loaded.temperatures() == [1.5] * clf.num_layers and loaded.max_seq_length == clf.max_seq_length
    out = loaded.predict_with_exits(TEXTS)
    ref = clf.predict_with_exits(TEXTS, criterion="maxprob", threshold=0.8, calibrated=False)
    assert not np.allclose(out.logits, ref.logits)  # the saved temperatures apply by default
    scaled = clf.engine(get_policy("maxprob", 0.8)).run_dataset  # noqa: F841 - the same engine path
    assert loaded.predict(TEXTS) == [clf.label_names[i] for i in out.logits.argmax(-1)]


def test_calibrate_saves_and_predict_uses_it(run, clf):
    with pytest.raises(RomebertError, match="no calibration"):
        EarlyExitClassifier.from_run(run, device="cpu").predict_with_exits(["a movie"], calibrated=True)
    report = clf.calibrate()
    assert (run / CALIBRATION_FILE).is_file() and len(report.temperatures) == clf.num_layers
    saved = json.loads((run / CALIBRATION_FILE).read_text())
    assert saved["temperatures"] == report.temperatures and len(saved["ece_before"]) == clf.num_layers
    fresh = EarlyExitClassifier.from_run(run, device="cpu")  # reads calibration.json
    temps = fresh.temperatures()
    cached = _offline(fresh, TEXTS, get_policy("entropy", 0.0), temps)[0]
    policy = get_policy("entropy", _mid_threshold(cached))
    _, ref_layers, ref_logits = _offline(fresh, TEXTS, policy, temps)
    out = fresh.predict_with_exits(TEXTS, threshold=policy.threshold, calibrated=True, batch_size=8)
    assert out.exit_layers.tolist() == ref_layers.tolist()
    assert np.allclose(out.logits, ref_logits, atol=1e-5)


def test_choose_threshold_on_the_runs_dev_split(run):
    clf = EarlyExitClassifier.from_run(run, device="cpu")  # uncalibrated (calibrate() sets temperatures)
    logits, labels, features = clf.dev_outputs(features=("nsp",))  # (nsp: CAP's)
    assert logits.shape == (clf.num_layers, 12, 2) and labels.shape == (12,)
    assert features["nsp"].shape == (clf.num_layers, 12)
    for criterion in CRITERIA:
        t, row = clf.choose_threshold(criterion, target_speedup=1.0)
        assert row["speedup"] >= 1.0 and row["threshold"] == t
        t, row = clf.choose_threshold(criterion, max_metric_drop=1.0)  # no budget: the fastest
        rows = sweep(logits, labels, clf.task(), [get_policy(criterion, x) for x in [t]], features=features)
        assert rows[0]["speedup"] == pytest.approx(row["speedup"])
    _, row = clf.choose_threshold("entropy", max_metric_drop=1.0)
    assert row["speedup"] == pytest.approx(clf.num_layers)  # a huge threshold: everyone leaves at layer 1
    assert clf.exit_config.criterion == "entropy" and clf.exit_config.threshold == row["threshold"]
    assert clf.exit_config.chosen["max_metric_drop"] == 1.0 and clf.exit_config.chosen["split"] == "dev"


SWEEP = [
    {"threshold": 0.0, "metric": 0.90, "speedup": 1.0},
    {"threshold": 0.1, "metric": 0.90, "speedup": 1.4},
    {"threshold": 0.2, "metric": 0.89, "speedup": 1.9},
    {"threshold": 0.3, "metric": 0.87, "speedup": 2.5},
    {"threshold": 0.4, "metric": 0.80, "speedup": 3.2},
]


@pytest.mark.parametrize(
    "target, drop, expected",
    [
        (1.5, None, 0.2),  # the least aggressive row reaching 1.5x
        (2.5, None, 0.3),
        (1.0, None, 0.0),
        (None, 0.01, 0.2),  # the fastest row within one point
        (None, 0.0, 0.1),
        (None, 0.5, 0.4),
        (1.2, 0.02, 0.1),  # both: within the budget, the least aggressive reaching the target
    ],
)
def test_pick_from_a_hand_built_sweep(target, drop, expected):
    assert pick_from_sweep(SWEEP, 0.90, target, drop)["threshold"] == expected


def test_pick_from_sweep_errors():
    with pytest.raises(RomebertError, match="reaches a layer speed-up of 4"):
        pick_from_sweep(SWEEP, 0.90, target_speedup=4.0)
    with pytest.raises(RomebertError, match="within a metric drop"):
        pick_from_sweep(SWEEP, 0.90, target_speedup=2.0, max_metric_drop=0.02)
    with pytest.raises(RomebertError, match="keeps the metric within"):
        pick_from_sweep(SWEEP, 0.99, max_metric_drop=0.01)
    with pytest.raises(RomebertError, match="give target_speedup"):
        pick_from_sweep(SWEEP, 0.90)


def test_choose_threshold_from_logits_matches_its_sweep():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(4, 300, 2)) * np.array([1.0, 2.0, 3.0, 4.0])[:, None, None]).astype(np.float32)
    labels = logits[-1].argmax(-1)
    grid = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7]
    rows = sweep(logits, labels, FakeTask(), grid, metric_fn=fake_metrics)
    t, row = choose_threshold(logits, labels, FakeTask(), target_speedup=1.5, thresholds=grid, metric_fn=fake_metrics)
    assert t == pick_from_sweep(rows, 1.0, target_speedup=1.5)["threshold"]
    assert row["final_metric"] == 1.0 and row["criterion"] == "entropy"
    t, row = choose_threshold(logits, labels, FakeTask(), "maxprob", max_metric_drop=0.05, metric_fn=fake_metrics)
    assert 1.0 - row["metric"] <= 0.05 + 1e-9 and row["speedup"] > 1.0
    layers, _ = get_policy("maxprob", t).decide(logits)
    assert 4 * 300 / layers.sum() == pytest.approx(row["speedup"])


def test_a_metric_drop_counts_against_the_reference_given():
    """An int8 export whose own final exit lost a point: within one point of the fp32 model's final exit
    is stricter than within one point of its own."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, 400, 2)) * np.array([0.5, 1.0, 2.0, 4.0])[:, None, None]).astype(np.float32)
    labels = logits[-1].argmax(-1)  # the final exit is right on every row: its metric is 1.0
    own_t, own = choose_threshold(logits, labels, FakeTask(), max_metric_drop=0.05, metric_fn=fake_metrics)
    t, row = choose_threshold(logits, labels, FakeTask(), max_metric_drop=0.05, metric_fn=fake_metrics,
                              reference_metric=1.02)  # fmt: skip
    assert own["reference_metric"] == own["final_metric"] == 1.0 and row["reference_metric"] == 1.02
    assert 1.02 - row["metric"] <= 0.05 + 1e-9 < 1.02 - own["metric"]  # the own-final choice breaks the budget
    assert row["speedup"] < own["speedup"] and t < own_t
    record = choice_record(row, "dev", FakeTask(), None, 0.05, "fp32", 1.02)
    assert record["reference"] == "fp32" and record["reference_metric"] == record["fp32_final_metric"] == 1.02
    with pytest.raises(RomebertError, match="within 0.05 of the fp32 model's final exit's 1.1000"):
        choose_threshold(logits, labels, FakeTask(), max_metric_drop=0.05, metric_fn=fake_metrics,
                         reference_metric=1.10)  # fmt: skip


def test_cli_evaluate_sweep_predict_with_a_criterion(run, capsys):
    assert main(["evaluate", str(run), "--criterion", "maxprob", "--thresholds", "0.9,0.6", "--device", "cpu"]) == 0
    rows = json.loads((run / "eval" / "dev" / "sweep.json").read_text())
    assert [(r["criterion"], r["threshold"]) for r in rows] == [("maxprob", 0.9), ("maxprob", 0.6)]
    assert main(["sweep", str(run), "--criterion", "patience"]) == 0  # default grid: k = 1..L
    rows = json.loads((run / "eval" / "dev" / "sweep.json").read_text())
    assert [r["threshold"] for r in rows] == [1.0, 2.0, 3.0] and rows[0]["counts"] == [12, 0, 0]
    assert main(["sweep", str(run), "--criterion", "patience-confidence", "--patience", "3"]) == 0
    rows = json.loads((run / "eval" / "dev" / "sweep.json").read_text())
    assert {r["patience"] for r in rows} == {3}
    assert main(["sweep", str(run), "--thresholds", "0.1"]) == 0  # plain numbers: entropy thresholds
    assert json.loads((run / "eval" / "dev" / "sweep.json").read_text())[0]["criterion"] == "entropy"
    assert main(["predict", str(run), "--criterion", "patience", "--threshold", "2", "--device", "cpu"]) == 0
    assert "criterion patience, threshold 2.0" in capsys.readouterr().out
    assert len((run / "predictions" / "SST-2.tsv").read_text().splitlines()) == 13
