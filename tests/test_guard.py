"""The accuracy guard: its decisions on synthetic streams (pure), the batcher's watched inputs and
low-priority re-runs, batch prediction with a guard, and the service's guard metrics."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict

import httpx
import numpy as np
import pytest

from romebert.core.errors import RomebertError
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.guard import AccuracyGuard, GuardOptions, wilson
from romebert.deploy.service import ServeConfig, Service
from romebert.runtime.policies import get_policy
from romebert.runtime.scores import entropy

from glue_fixtures import sentence
from serve_fixtures import Server, export_for_serving, metric, post

LN2 = math.log(2) + 1e-9


def stream(n: int, seed: int, wrong_share: float, layers: int = 4) -> np.ndarray:
    """Synthetic all-exit logits [L, n, 2]. Every exit predicts the final answer except exit 1 on a share
    ``wrong_share`` of the inputs; those are unsure at exit 1 (margin 2: entropy 0.36 nats), the rest
    sure (margin 6: 0.017); exit 2 is sure of the final answer for everyone (margin 4: 0.087)."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, n)
    sign = np.where(final == 1, 1.0, -1.0)
    x = np.zeros((layers, n, 2), dtype=np.float32)
    wrong = rng.random(n) < wrong_share
    margin1 = np.where(wrong, -2.0, 6.0)
    x[0, :, 1] = sign * margin1
    for k in range(1, layers):
        x[k, :, 1] = sign * (4.0 if k == 1 else 8.0)
    return x


def h(margin: float) -> float:
    """The entropy (nats) of two classes whose logits differ by ``margin``."""
    return float(entropy(np.array([[0.0, margin]]))[0])


def true_rate(guard: AccuracyGuard, x: np.ndarray) -> tuple[float, float]:
    """The disagreement and layer speed-up of the guard's thresholds on a fresh sample."""
    exits, logits = guard.policy().decide(x)
    return float((logits.argmax(-1) != x[-1].argmax(-1)).mean()), x.shape[0] / float(exits.mean())


def feed(guard: AccuracyGuard, x: np.ndarray, chunk: int = 10) -> None:
    """Serve ``x`` in chunks under the guard's thresholds, as a runtime does."""
    for s in range(0, x.shape[1], chunk):
        part = x[:, s : s + chunk]
        exits, _ = guard.policy().decide(part)
        watched = guard.watch(part.shape[1])
        if watched.any() and guard.add(part[:, watched], exits[watched]):
            guard.update()


def test_wilson_bounds():
    z = 1.6448536269514722  # 95 % one-sided
    low, high = wilson(0, 100, z)
    assert low == 0.0 and high == pytest.approx(z * z / (100 + z * z))
    assert wilson(100, 100, z)[1] == 1.0 and wilson(0, 0, z) == (0.0, 1.0)
    lows, highs = zip(*(wilson(k, 200, z) for k in range(0, 201, 20)))
    assert list(lows) == sorted(lows) and list(highs) == sorted(highs)  # monotone in the count
    assert all(lo <= k / 200 <= hi for k, lo, hi in zip(range(0, 201, 20), lows, highs))
    assert wilson(10, 1000, z)[1] - wilson(10, 1000, z)[0] < wilson(1, 100, z)[1] - wilson(1, 100, z)[0]


def test_the_guard_tightens_only_the_exit_that_disagrees():
    """Exit 1 answers wrongly for 20 % of the inputs, and those are unsure there: at the starting
    threshold (0.6 nats, every exit) they all leave at exit 1. The guard tightens exit 1 to between the
    sure and the unsure entropies, keeps exit 2 loose enough for the unsure ones to leave there, and the
    disagreement falls within the target while most of the speed-up stays."""
    guard = AccuracyGuard(get_policy("entropy", 0.6), 4, (0.0, LN2), GuardOptions(1.0, 0.05, 300, 25))
    before, _ = true_rate(guard, stream(4000, 1, 0.2))
    assert before > 0.15  # the fixed threshold is far over the target
    feed(guard, stream(600, 0, 0.2))
    first, second = guard.thresholds[0], guard.thresholds[1]
    assert h(6) < first < h(2) and second > h(4)  # exit 1 between the sure and the unsure; exit 2 above all
    after, speedup = true_rate(guard, stream(4000, 1, 0.2))
    assert after <= 0.05 and speedup > 2.5  # 80 % leave at exit 1, the rest at exit 2: 4 / 1.2 layers
    snap = guard.snapshot()
    assert snap["upper"] <= 0.05 and snap["estimate"] <= snap["upper"] and snap["updates"] >= 1
    assert snap["exit_disagreement"][0] == 0.0 and snap["watched"] == 600
    assert 0 < snap["disagreed"] < snap["checked"] < 600  # answers served early, checked; some differed


def test_the_guard_loosens_a_strict_start_on_clean_traffic_and_stays_in_bounds():
    guard = AccuracyGuard(get_policy("entropy", 0.0), 4, (0.0, LN2), GuardOptions(1.0, 0.05, 300, 25))
    assert true_rate(guard, stream(500, 3, 0.0))[1] == pytest.approx(1.0)  # threshold 0: nobody leaves early
    feed(guard, stream(400, 2, 0.0))
    assert all(0.0 <= t <= LN2 for t in guard.thresholds) and max(guard.thresholds) > 0.0
    assert true_rate(guard, stream(500, 3, 0.0))[1] > 3.0 and guard.snapshot()["estimate"] == 0.0


def test_the_guard_follows_a_drift_and_waits_for_evidence_before_it():
    """Clean traffic first (the starting thresholds stay: too few samples to certify looser ones and no
    evidence against them), then a shift: the guard tightens once the window shows it."""
    guard = AccuracyGuard(get_policy("entropy", 0.6), 4, (0.0, LN2), GuardOptions(0.5, 0.05, 200, 20))
    feed(guard, stream(60, 4, 0.0))  # 30 watched: under the fewest that can certify 5 % (52)
    assert guard.thresholds == (0.6, 0.6, 0.6) and guard.updates == 0
    feed(guard, stream(2000, 5, 0.3))
    assert guard.thresholds[0] < 0.36 and true_rate(guard, stream(4000, 6, 0.3))[0] <= 0.05


def test_maxprob_tightens_upwards():
    """maxprob exits when the top probability >= t: tighter means higher, within [1 / C, 1]."""
    guard = AccuracyGuard(get_policy("maxprob", 0.8), 4, (0.5, 1.0), GuardOptions(1.0, 0.05, 300, 25))
    feed(guard, stream(600, 7, 0.2))
    # unsure at exit 1: top probability sigmoid(2) = 0.88; sure: sigmoid(6) = 0.9975
    assert 0.8808 < guard.thresholds[0] <= 0.99753 and all(0.5 <= t <= 1.0 for t in guard.thresholds)
    assert true_rate(guard, stream(4000, 8, 0.2))[0] <= 0.05


def test_guard_settings_and_inputs_are_checked():
    with pytest.raises(RomebertError, match="--guard-rate must lie in \\[0, 1\\], got 1.5"):
        GuardOptions(guard_rate=1.5)
    with pytest.raises(RomebertError, match="--max-disagreement must lie in \\(0, 1\\), got 0"):
        GuardOptions(max_disagreement=0)
    with pytest.raises(RomebertError, match="--guard-window must be at least 1"):
        GuardOptions(guard_window=0)
    with pytest.raises(RomebertError, match="--guard-confidence must lie in \\[0.5, 1\\)"):
        GuardOptions(guard_confidence=1.0)
    with pytest.raises(RomebertError, match="a regression model has none"):
        AccuracyGuard(get_policy("entropy", 0.1), 4, (0.0, 1e6), GuardOptions(0.1), regression=True)
    guard = AccuracyGuard(get_policy("entropy", 0.1), 4, (0.0, LN2), GuardOptions(0.1))
    with pytest.raises(RomebertError, match="every exit's logits \\[4, m, C\\]"):
        guard.add(np.zeros((3, 2, 2)), np.array([1, 1]))
    assert guard.watch(10000).mean() == pytest.approx(0.1, abs=0.02)


# ------------------------------------------------------------------------------------------ runtimes
@pytest.fixture(scope="module")
def export_dir(tiny_sst2_run, tmp_path_factory):
    return export_for_serving(tiny_sst2_run, tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def clf(export_dir):
    """The export, with a threshold that lets about half of the test sentences leave at exit 1 (a model
    trained this briefly is unsure everywhere)."""
    from dataclasses import replace

    clf = EarlyExitClassifier.from_pretrained(export_dir, intra_op_threads=1)
    first = clf.predict_with_exits([sentence(i, 2 + i % 9) for i in range(120)], criterion="entropy", threshold=LN2)
    clf.exit_config = replace(clf.exit_config, threshold=float(np.median(entropy(first.logits))))
    return clf


def test_batch_prediction_with_a_guard_watches_reruns_and_moves_thresholds(clf):
    texts = [sentence(i, 2 + i % 9) for i in range(120)]
    plain = clf.predict_with_exits(texts)
    # a guard that watches everything and never moves (its update is not due): the same answers
    still = clf.accuracy_guard(guard_rate=1.0, max_disagreement=0.5, guard_every=10_000)
    out = clf.predict_with_exits(texts, guard=still)
    assert out.labels == plain.labels and out.exit_layers.tolist() == plain.exit_layers.tolist()
    snap, early = still.snapshot(), int((plain.exit_layers < clf.num_layers).sum())
    assert snap["watched"] == 120 and snap["rerun_rows"] == early > 0
    assert snap["rerun_layers"] == early * clf.num_layers and len(still._window) == 120
    # every watched input's window entry is its every-exit logits, as a full pass computes them
    reference = clf.predict_with_exits(texts, threshold=0.0)  # never leaves early: the final exit's logits
    window = np.stack(still._window, axis=1)  # [L, 120, C], input order
    assert np.allclose(window[-1], reference.logits, atol=1e-5)
    # a strict target: the guard tightens, and later inputs go deeper
    strict = clf.accuracy_guard(guard_rate=1.0, max_disagreement=0.01, guard_every=20)
    clf.predict_with_exits(texts, guard=strict)
    start = clf.exit_config.threshold
    assert strict.updates >= 1 and all(0.0 <= t <= start for t in strict.thresholds)
    deeper = clf.predict_with_exits(texts, guard=strict)
    assert deeper.exit_layers.mean() > plain.exit_layers.mean()
    with pytest.raises(RomebertError, match="give no criterion or threshold"):
        clf.predict_with_exits(texts, guard=strict, threshold=0.2)


def _features(clf, texts):
    from romebert.deploy.classifier import _examples
    from romebert.runtime.encoding import encode

    return encode(_examples(texts), clf.tokenizer, None, clf.max_seq_length).features


def _everyone_leaves_at_exit_1(clf):
    guard = clf.accuracy_guard(guard_rate=1.0, max_disagreement=0.5, guard_every=10_000)
    guard.thresholds = (LN2,) * (clf.num_layers - 1)
    return guard


def _wait(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_reruns_wait_for_request_work(clf):
    """Watched inputs that leave early are answered at once; their re-runs (fewer than a batch) go only
    when no request's work can: a request submitted meanwhile runs first."""
    from romebert.deploy.serving import ContinuousBatcher

    events: list[tuple[str, float]] = []
    guard = _everyone_leaves_at_exit_1(clf)
    batcher = ContinuousBatcher(clf.segments, clf.policy(), clf.collator, max_batch=16,
                                observe=lambda e, v: events.append((e, v)), guard=guard)  # fmt: skip
    done = threading.Event()
    second = _features(clf, [sentence(50), sentence(51)])

    def first_done(job):
        events.append(("first done", 0))
        batcher.submit(second, lambda job: (events.append(("second done", 0)), done.set()), thresholds=[0.0] * 2)

    first = batcher.submit(_features(clf, [sentence(i) for i in range(10)]), first_done)
    assert done.wait(30)
    _wait(lambda: guard.rerun_rows == 10)
    batcher.close()
    assert first.exit_layer == [1] * 10 and guard.dropped == 0
    reruns = [i for i, (e, _) in enumerate(events) if e == "rerun"]
    assert reruns and min(reruns) > events.index(("second done", 0))  # the request's work went first
    assert guard.snapshot()["checked"] == 10 and guard.snapshot()["window"] == 10


def test_reruns_past_their_backlog_are_dropped(clf):
    from romebert.deploy.serving import ContinuousBatcher

    rows: list[float] = []
    guard = _everyone_leaves_at_exit_1(clf)
    batcher = ContinuousBatcher(clf.segments, clf.policy(), clf.collator, max_batch=8, guard=guard, rerun_backlog=3,
                                observe=lambda e, v: e == "rerun" and rows.append(v))  # fmt: skip
    done = threading.Event()
    batcher.submit(_features(clf, [sentence(i) for i in range(10)]), lambda job: done.set())
    assert done.wait(30)
    _wait(lambda: guard.rerun_rows + guard.dropped == 10)
    batcher.close()
    # 8 leave in the first call: 3 fill the backlog, 5 are dropped; the backlog runs, then the last 2 join it
    assert (guard.rerun_rows, guard.dropped) == (5, 5) and max(rows) <= 3


def test_the_service_watches_reruns_and_exports_the_guard(export_dir, clf):
    guard = GuardOptions(guard_rate=1.0, max_disagreement=0.01, guard_every=10)
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_batch=8, guard=guard), clf)
    srv = Server(service)
    try:
        texts = [sentence(i, 2 + i % 9) for i in range(40)]
        first = post(srv, {"inputs": texts[:8]}).json()
        assert first["threshold"] == [clf.exit_config.threshold] * (clf.num_layers - 1)  # the guard's, per exit
        for k in range(8, 40, 8):
            assert post(srv, {"inputs": texts[k : k + 8]}).status_code == 200
        _wait(lambda: service.guard.snapshot()["window"] + service.guard.dropped == 40)
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "romebert_guard_watched_total") == 40
        reruns = metric(text, "romebert_guard_rerun_rows_total")
        assert reruns > 0 and metric(text, "romebert_guard_rerun_layers_total") == clf.num_layers * reruns
        assert metric(text, 'romebert_guard_threshold{exit="1"}') == service.guard.thresholds[0]
        assert 0 <= metric(text, "romebert_guard_disagreement_upper") <= 1
        assert metric(text, "romebert_guard_max_disagreement") == 0.01
        # request work only in the exit histogram: re-runs are the guard's, counted apart
        assert metric(text, "romebert_exit_layer_count") == 40
        ready = httpx.get(srv.url + "/ready").json()
        assert ready["threshold"] == list(service.guard.thresholds)
    finally:
        srv.stop()


def test_guard_flags_reach_the_service_and_bad_ones_fail():
    from romebert.cli.parser import build_parser

    with pytest.raises(RomebertError, match="a --full-depth or --full-graph service has none"):
        ServeConfig("x", full_depth=True, guard=GuardOptions(guard_rate=0.1))
    ns = build_parser().parse_args(["serve", "x", "--guard-rate", "0.02", "--max-disagreement", "0.03"])
    assert (ns.guard_rate, ns.max_disagreement) == (0.02, 0.03)
    cfg = ServeConfig("x", guard=GuardOptions(0.02, 0.03))
    again = ServeConfig(**json.loads(json.dumps(asdict(cfg))))  # as a worker process rebuilds it
    assert again.guard == cfg.guard and again.max_pending_requests == cfg.max_queue
