"""Exit policies: offline decisions, their agreement with exits.py, and step/select compaction."""

from __future__ import annotations

import numpy as np
import pytest

from romebert.core.errors import RomebertError
from romebert.evaluation.exits import predictions, sweep
from romebert.runtime.criteria import EntropyPolicy, MaxProbPolicy, PatienceConfidencePolicy, PatiencePolicy
from romebert.runtime.policies import CRITERIA, candidate_thresholds, default_thresholds, get_policy
from romebert.runtime.scores import entropy

from fakes import FakeTask, fake_metrics
from oracles import entropy_oracle, entropy_rule_oracle


def _random_logits(seed: int, layers: int = 5, n: int = 200, c: int = 3, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(layers, n, c)) * scale).astype(np.float32)


def _from_preds(preds: list[list[int]], c: int = 2, sharp: float = 10.0) -> np.ndarray:
    """Logits [L, N, C] whose argmax follows ``preds[n][l]``, every exit very confident."""
    p = np.asarray(preds).T  # [L, N]
    return (np.eye(c)[p] * sharp).astype(np.float32)


def test_entropy_matches_the_oracle():
    x = _random_logits(0, scale=30.0)
    x[0, 0] = [1000.0, -1000.0, 0.0]  # far beyond exp's range
    x[0, 1] = [-np.inf, 0.0, 1.0]
    assert np.allclose(entropy(x), entropy_oracle(x), rtol=1e-12, atol=1e-14)
    assert np.isnan(entropy(np.array([[np.nan, 0.0, 1.0], [-np.inf, -np.inf, -np.inf]]))).all()  # never exits


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.7, 1.0, 10.0, (0.2, 0.9, 0.1, 0.5), (0.2, 0.9, 0.1, 0.5, 0.0)])
@pytest.mark.parametrize("scale", [0.5, 3.0, 50.0])
def test_entropy_policy_reproduces_exit_decisions(threshold, scale):
    logits = _random_logits(1, scale=scale)
    layers, chosen = EntropyPolicy(threshold).decide(logits)
    assert np.array_equal(layers, entropy_rule_oracle(logits, threshold))
    assert np.array_equal(chosen, logits[layers - 1, np.arange(logits.shape[1])])


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 2.0, (0.3, 0.0, 1.0, 0.2)])
def test_entropy_policy_regression_rule_matches(threshold):
    h = _random_logits(2, c=1, scale=0.4)
    layers, _ = EntropyPolicy(threshold).decide(h, regression=True)
    ref = entropy_rule_oracle(h, threshold, regression=True)
    assert np.array_equal(layers, ref)
    assert layers.min() >= 2  # layer 1 has no predecessor


def test_maxprob_is_inclusive_and_last_layer_always_exits():
    logits = np.log(np.array([[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.5, 0.5]]], dtype=np.float64))
    layers, _ = MaxProbPolicy(0.9 - 1e-12).decide(logits)
    assert layers.tolist() == [1, 2]
    layers, _ = MaxProbPolicy(0.6 - 1e-12).decide(logits)
    assert layers.tolist() == [1, 1]
    layers, _ = MaxProbPolicy(2.0).decide(logits)  # unreachable: everyone at the final head
    assert layers.tolist() == [2, 2]


def test_maxprob_equals_an_equivalent_entropy_rule_for_two_classes():
    # For two classes both scores are monotone in |p - 1/2|: a maxprob threshold has an entropy twin.
    logits = _random_logits(3, c=2)
    p = 0.8
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    a, _ = MaxProbPolicy(p).decide(logits)
    b, _ = EntropyPolicy(h + 1e-12).decide(logits)
    assert np.array_equal(a, b)


def test_patience_counts_consecutive_agreeing_exits():
    preds = [
        [0, 0, 1, 1, 1, 0],  # agree at 1-2 -> k=2 exits at 2; k=3 waits for 3-4-5
        [0, 1, 0, 1, 0, 1],  # never agrees -> final head
        [1, 1, 1, 1, 1, 1],
    ]
    logits = _from_preds(preds)
    assert PatiencePolicy(1).decide(logits)[0].tolist() == [1, 1, 1]
    assert PatiencePolicy(2).decide(logits)[0].tolist() == [2, 6, 2]
    assert PatiencePolicy(3).decide(logits)[0].tolist() == [5, 6, 3]
    assert PatiencePolicy(6).decide(logits)[0].tolist() == [6, 6, 6]
    # per-exit k: a stricter k early, a looser one later
    assert PatiencePolicy([9, 9, 9, 2, 2]).decide(logits)[0].tolist() == [4, 6, 4]


def test_patience_regression_uses_tolerance():
    h = np.array([[0.0], [0.5], [0.55], [0.57], [2.0], [2.0]], dtype=np.float32)[:, None, :]  # [6, 1, 1]
    assert PatiencePolicy(1, tolerance=0.1).decide(h, regression=True)[0].tolist() == [3]
    assert PatiencePolicy(2, tolerance=0.1).decide(h, regression=True)[0].tolist() == [4]
    assert PatiencePolicy(3, tolerance=0.1).decide(h, regression=True)[0].tolist() == [6]


def test_patience_confidence_counts_only_confident_agreement():
    logits = _from_preds([[0, 0, 0, 0, 0, 0]] * 2)
    logits[1, 0] = [0.1, 0.0]  # row 0, exit 2: same argmax, but unconfident -> breaks the run
    pol = PatienceConfidencePolicy(0.3, patience=2)
    assert pol.decide(logits)[0].tolist() == [4, 2]
    assert PatienceConfidencePolicy(0.3, patience=1).decide(logits)[0].tolist() == [1, 1]
    # with an unreachable confidence threshold nothing ever counts
    assert PatienceConfidencePolicy(0.0, patience=1).decide(logits)[0].tolist() == [6, 6]
    mp = PatienceConfidencePolicy(0.9, patience=2, confidence="maxprob")
    assert mp.decide(logits)[0].tolist() == [4, 2]


def test_patience_confidence_regression_equals_patience_with_tolerance():
    h = _random_logits(4, c=1, scale=0.2)
    a, _ = PatienceConfidencePolicy(0.15, patience=2).decide(h, regression=True)
    b, _ = PatiencePolicy(2, tolerance=0.15).decide(h, regression=True)
    assert np.array_equal(a, b)


def _online(policy, logits: np.ndarray, regression: bool = False, seed: int = 0) -> np.ndarray:
    """Drive step/select like the engine does, dropping exited rows AND shuffling the survivors."""
    num_layers, n = logits.shape[:2]
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    out = np.full(n, num_layers)
    state = policy.init_state(n, num_layers, regression)
    for i in range(num_layers):
        leave, state = policy.step(i, logits[i, rows], state)
        out[rows[leave]] = i + 1
        keep = np.flatnonzero(~leave)
        keep = keep[rng.permutation(keep.size)]  # order must not matter either
        rows = rows[keep]
        state = state.select(keep)
        if rows.size == 0:
            break
    return out


@pytest.mark.parametrize(
    "policy",
    [
        EntropyPolicy(0.6),
        EntropyPolicy([0.2, 0.9, 0.5, 0.7]),
        MaxProbPolicy(0.7),
        PatiencePolicy(2),
        PatiencePolicy(3),
        PatienceConfidencePolicy(0.8, patience=2),
        PatienceConfidencePolicy(0.6, patience=2, confidence="maxprob"),
    ],
    ids=repr,
)
def test_step_and_select_reproduce_offline_decisions(policy):
    logits = _random_logits(5, scale=1.5)
    assert np.array_equal(_online(policy, logits), policy.decide(logits)[0])


@pytest.mark.parametrize("policy", [EntropyPolicy(0.1), PatiencePolicy(2, tolerance=0.2)], ids=repr)
def test_step_and_select_regression(policy):
    h = _random_logits(6, c=1, scale=0.2)
    assert np.array_equal(_online(policy, h, regression=True), policy.decide(h, regression=True)[0])


def test_get_policy_and_errors():
    assert isinstance(get_policy("Entropy", 0.1), EntropyPolicy)
    assert isinstance(get_policy("pabee", 2), PatiencePolicy)
    pc = get_policy("patience_confidence", 0.2, patience=3, tolerance=0.5)  # tolerance ignored
    assert isinstance(pc, PatienceConfidencePolicy) and pc.patience == 3
    assert get_policy("patience", 2, tolerance=0.5, patience=9).tolerance == 0.5
    assert set(CRITERIA) == {"entropy", "maxprob", "patience", "patience-confidence", "energy", "agreement", "cap"}
    with pytest.raises(RomebertError, match="unknown exit criterion"):
        get_policy("margin", 0.1)
    with pytest.raises(RomebertError, match="NaN"):
        get_policy("entropy", float("nan"))
    with pytest.raises(RomebertError, match="k must be >= 1"):
        get_policy("patience", 0)
    with pytest.raises(RomebertError, match="regression"):
        MaxProbPolicy(0.9).decide(np.zeros((3, 2, 1)), regression=True)
    with pytest.raises(RomebertError, match="one per exit"):
        EntropyPolicy([0.1, 0.2]).decide(np.zeros((5, 2, 2)))
    with pytest.raises(RomebertError, match="shape"):
        EntropyPolicy(0.1).decide(np.zeros((5, 2)))


def _nsp(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Stand-in null-space shares [L, N] in [0, 1] for CAP (the other criteria ignore them)."""
    return {"nsp": np.random.default_rng(1).uniform(0, 1, size=logits.shape[:2])}


def test_sweep_and_predictions_accept_every_criterion():
    logits = _random_logits(7, layers=4)
    labels = np.argmax(logits[-1], axis=-1)
    task = FakeTask(labels=("0", "1", "2"))
    feats = _nsp(logits)
    for criterion in CRITERIA:
        grid = default_thresholds(criterion, num_layers=4)
        policies = [get_policy(criterion, t) for t in grid]
        rows = sweep(logits, labels, task, policies, metric_fn=fake_metrics, features=feats)
        assert [r["criterion"] for r in rows] == [criterion] * len(grid)
        if criterion != "entropy":  # numbers + criterion= give the same rows
            assert (
                sweep(logits, labels, task, grid, metric_fn=fake_metrics, criterion=criterion, features=feats) == rows
            )
        for row, t in zip(rows, grid):
            layers, _ = get_policy(criterion, t).decide(logits, features=feats)
            assert row["counts"] == np.bincount(layers - 1, minlength=4).tolist()
        policy = get_policy(criterion, grid[len(grid) // 2])
        preds, layers = predictions(logits, policy, task, features=feats)
        assert np.array_equal(layers, policy.decide(logits, features=feats)[0])
    # plain numbers are entropy thresholds
    assert sweep(logits, labels, task, [0.1], metric_fn=fake_metrics)[0]["criterion"] == "entropy"


@pytest.mark.parametrize("criterion", CRITERIA)
def test_candidate_thresholds_span_every_operating_point(criterion):
    logits = _random_logits(8, layers=4, scale=2.0)
    feats = _nsp(logits)
    grid = candidate_thresholds(criterion, logits, features=feats)

    def speedup(t):
        return 4 * logits.shape[1] / get_policy(criterion, t).decide(logits, features=feats)[0].sum()

    loosest = {"entropy": np.inf, "maxprob": 0.0, "patience": 1, "patience-confidence": np.inf, "energy": 1.0,
               "agreement": 0.0, "cap": 1.0}[criterion]  # fmt: skip
    strictest = {"entropy": 0.0, "maxprob": 2.0, "patience": 4, "patience-confidence": 0.0, "energy": 0.0,
                 "agreement": 100.0, "cap": 0.0}[criterion]  # fmt: skip
    speedups = [speedup(t) for t in grid]
    assert min(speedups) == pytest.approx(speedup(strictest), abs=0.02)
    assert max(speedups) == pytest.approx(speedup(loosest), abs=0.02)
    assert max(speedups) > 1.2


def test_energy_and_agreement_scores_by_hand():
    import math

    from romebert.runtime.criteria import AgreementPolicy
    from romebert.runtime.policies import exit_scores
    from romebert.runtime.scores import energy

    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert energy(z).tolist() == pytest.approx([1 / (1 + math.exp(2) + 1), 1 / 3])
    # 3 exits, 2 rows: row 0 agrees at exits 1 and 2 (class 0), row 1 changes its mind
    logits = np.array([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]])
    p = lambda a, b: math.exp(max(a, b)) / (math.exp(a) + math.exp(b))  # noqa: E731
    scores, above = exit_scores(AgreementPolicy, logits)
    w1, w2 = 1 / 3, 2 / 3  # BEEM-C: each exit's share of the model
    assert above and scores.shape == (2, 2)
    assert scores[0].tolist() == pytest.approx([w1 * p(2, 0), w1 * p(0, 1)])
    assert scores[1].tolist() == pytest.approx([w1 * p(2, 0) + w2 * p(1, 0), w2 * p(1, 0)])  # row 1 restarts
    layers, _ = get_policy("agreement", 0.5).decide(logits)
    assert layers.tolist() == [2, 3]  # row 0: 0.29 + 0.49 >= 0.5 at exit 2; row 1 never reaches 0.5 early


def test_cap_score_and_the_null_space_share_by_hand():
    import math

    import torch

    from romebert.model.modeling import ExitHead
    from romebert.runtime.scores import cap

    head = ExitHead(hidden_size=3, num_labels=2, dropout=0.0, pooling="cls")
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        head.classifier.bias.copy_(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[3.0, 4.0, 12.0]])
    # the bias folds in as the offset b (W^T)^+ = (1, 2, 0): x + offset = (4, 6, 12), 12 of it outside W's rows
    assert head.null_space_share(x).item() == pytest.approx(12 / math.sqrt(16 + 36 + 144), rel=1e-6)
    z, nsp = np.array([[2.0, 0.0]]), np.array([0.5])
    assert cap(z, nsp)[0] == pytest.approx(math.exp(0.5) / (math.exp(2) + 1 + math.exp(0.5)))
    layers, _ = get_policy("cap", 0.3).decide(np.stack([z, z]), features={"nsp": np.array([[0.5], [0.5]])})
    assert layers.tolist() == [1]  # 0.14 < 0.3: out at exit 1
    with pytest.raises(RomebertError, match="needs each exit's nsp"):
        get_policy("cap", 0.3).decide(np.stack([z, z]))
