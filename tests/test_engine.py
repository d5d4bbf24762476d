"""The batched early-exit engine against offline decisions from cached logits (collect_logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from romebert.core.errors import RomebertError
from romebert.evaluation.calibration import apply_temperatures
from romebert.evaluation.exits import sweep
from romebert.evaluation.logits import collect_logits, collect_outputs
from romebert.runtime.criteria import AgreementPolicy
from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.runtime.engine import EarlyExitEngine
from romebert.runtime.policies import CRITERIA, exit_scores, get_policy
from romebert.runtime.scores import cap, change, energy, entropy, maxprob

from conftest import sharpen_exits, tiny_model
from fakes import FakeTask, fake_metrics, padded_batches

LAYERS = 4
COLLATE = Collator(pad_token_id=0)


def _model(num_labels: int = 3, pooling: str = "mean", seed: int = 0):
    model = tiny_model(num_labels=num_labels, layers=LAYERS, pooling=pooling, dropout=0.0, seed=seed).eval()
    return sharpen_exits(model)


def _dataset(n: int = 40, seed: int = 0, min_len: int = 2, max_len: int = 40) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    feats = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = [2, *rng.integers(5, 100, size=length - 2).tolist(), 3]
        types = [0] * (length // 2) + [1] * (length - length // 2)
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "token_type_ids": types})
    return EncodedDataset(feats)


def _run(engine: EarlyExitEngine, dataset: EncodedDataset, batch_size: int, collator: Collator = COLLATE):
    """Engine over consecutive (unsorted, mixed-length) batches -> (logits [N, C], layers [N], work)."""
    logits, layers, work = [], [], 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = engine.run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        assert out.layer_work == int(out.exit_layer.sum())  # each row runs exactly its exit layer
        logits.append(out.logits)
        layers.append(out.exit_layer)
        work += out.layer_work
    return np.concatenate(logits), np.concatenate(layers), work


def _safe_threshold(scores: np.ndarray, q: float) -> float:
    """A threshold near quantile ``q`` of ``scores``, midway between two distinct scores (no near-ties)."""
    s = np.unique(scores[np.isfinite(scores)])
    i = int(np.clip(round(q * (s.size - 1)), 0, s.size - 2))
    t = float((s[i] + s[i + 1]) / 2)
    assert s[i + 1] - s[i] > 1e-6, "scores too close for a robust test threshold"
    return t


def _policies(all_logits: np.ndarray, regression: bool = False, features=None) -> dict[str, object]:
    """One policy per criterion, thresholds in the middle of this data's score range."""
    x = all_logits[:-1]
    if regression:
        d = change(all_logits[1:], all_logits[:-1])
        t = _safe_threshold(d[:-1], 0.5)
        return {
            "entropy": get_policy("entropy", t),
            "patience": get_policy("patience", 2, tolerance=t),
            "patience-confidence": get_policy("patience-confidence", t, patience=2),
        }
    return {
        "entropy": get_policy("entropy", _safe_threshold(entropy(x), 0.4)),
        "maxprob": get_policy("maxprob", _safe_threshold(maxprob(x), 0.6)),
        "patience": get_policy("patience", 2),
        "patience-confidence": get_policy("patience-confidence", _safe_threshold(entropy(x), 0.7), patience=2),
        "energy": get_policy("energy", _safe_threshold(energy(x), 0.4)),
        "agreement": get_policy("agreement", _safe_threshold(exit_scores(AgreementPolicy, all_logits)[0], 0.6)),
        **({"cap": get_policy("cap", _safe_threshold(cap(x, features["nsp"][:-1]), 0.4))} if features else {}),
    }


@pytest.fixture(scope="module")
def setup():
    model = _model()
    data = _dataset()
    # [L, N, C] and CAP's null-space share [L, N], length-sorted batches
    cached, features = collect_outputs(model, data, COLLATE, batch_size=16, features=("nsp",))
    return model, data, cached, _policies(cached, features=features), features


@pytest.mark.parametrize("batch_size", [1, 3, 32])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_engine_equals_offline_decisions(setup, criterion, batch_size):
    model, data, cached, policies, features = setup
    policy = policies[criterion]
    if batch_size == 1:  # the same path, one row at a time: half the rows keep the test fast
        data, cached = EncodedDataset(data.features[:20]), cached[:, :20]
        features = {k: v[:, :20] for k, v in features.items()}
    ref_layers, ref_logits = policy.decide(cached, features=features)
    logits, layers, work = _run(EarlyExitEngine(model, policy), data, batch_size)
    assert np.array_equal(layers, ref_layers)
    assert np.array_equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert np.allclose(logits, ref_logits, atol=1e-4)
    assert work == int(ref_layers.sum())
    # a real mix of exits, so the test exercises compaction (not "everyone at one layer")
    assert len(np.unique(layers)) >= 2
    if batch_size == 32:  # and the offline sweep's row for this policy agrees
        labels = ref_logits.argmax(-1)
        row = sweep(cached, labels, FakeTask(labels=("0", "1", "2")), [policy], metric_fn=fake_metrics,
                    features=features)[0]  # fmt: skip
        assert row["counts"] == np.bincount(layers - 1, minlength=LAYERS).tolist()


def _batches(dataset: EncodedDataset, batch_size: int, collator: Collator = COLLATE) -> list:
    return padded_batches(dataset, batch_size, collator)


@pytest.mark.parametrize("input_bs, batch_size", [(1, 1), (3, 3), (32, 32), (8, 5)])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_stream_refill_equals_offline_decisions(setup, criterion, input_bs, batch_size):
    model, data, cached, policies, features = setup
    policy = policies[criterion]
    ref_layers, ref_logits = policy.decide(cached, features=features)
    out = EarlyExitEngine(model, policy).run_stream(_batches(data, input_bs), batch_size=batch_size)
    assert np.array_equal(out.exit_layer, ref_layers)
    assert np.allclose(out.logits, ref_logits, atol=1e-4)
    assert out.layer_work == int(ref_layers.sum())
    # layer calls run full batches, but for at most one smaller call per layer at the end
    assert all(b <= batch_size for b, _ in out.shapes)
    assert len(out.shapes) <= -(-out.layer_work // batch_size) + LAYERS


@pytest.mark.parametrize("batch_size", [1, 7])
def test_run_dataset_returns_results_in_dataset_order(setup, batch_size):
    """Length-sorted batches inside, dataset order outside (the data here is in random length order)."""
    model, data, cached, policies, _ = setup
    policy = policies["entropy"]
    ref_layers, ref_logits = policy.decide(cached)
    out = EarlyExitEngine(model, policy).run_dataset(data, COLLATE, batch_size)
    assert sorted(data.lengths) != list(data.lengths)  # the order really differs from the batching order
    assert np.array_equal(out.exit_layer, ref_layers)
    assert np.allclose(out.logits, ref_logits, atol=1e-4)
    with pytest.raises(RomebertError, match="batch_size"):
        EarlyExitEngine(model, policy).run_dataset(data, COLLATE, 0)


def test_stream_with_per_exit_thresholds_temperatures_and_padding(setup):
    model, data, cached, _, _ = setup
    temps = [0.7, 1.3, 1.0, 2.0]
    scaled = apply_temperatures(cached, temps)
    ent = entropy(scaled[:-1])
    policy = get_policy("entropy", [_safe_threshold(e, 0.5) for e in ent])
    ref_layers, ref_logits = policy.decide(scaled)
    padded = _batches(data, 6, Collator(pad_token_id=0, pad_to_multiple_of=48))
    out = EarlyExitEngine(model, policy, temperatures=temps).run_stream(padded, batch_size=16)
    assert np.array_equal(out.exit_layer, ref_layers)
    assert np.allclose(out.logits, ref_logits, atol=1e-4)
    assert max(t for _, t in out.shapes) <= 40  # trailing padding never reaches a layer
    empty = EarlyExitEngine(model, policy).run_stream([])
    assert empty.logits.shape == (0, 3)


def test_per_exit_thresholds(setup):
    model, data, cached, _, _ = setup
    ent = entropy(cached[:-1])  # [L-1, N]
    thr = [_safe_threshold(ent[i], q) for i, q in enumerate((0.2, 0.6, 0.4))]
    for policy in (get_policy("entropy", thr), get_policy("patience-confidence", thr, patience=2)):
        ref_layers, _ = policy.decide(cached)
        _, layers, _ = _run(EarlyExitEngine(model, policy), data, 32)
        assert np.array_equal(layers, ref_layers)


def test_temperatures_apply_before_the_policy(setup):
    model, data, cached, _, _ = setup
    temps = [0.5, 2.0, 1.5, 3.0]
    scaled = apply_temperatures(cached, temps)
    policy = get_policy("entropy", _safe_threshold(entropy(scaled[:-1]), 0.5))
    ref_layers, ref_logits = policy.decide(scaled)
    logits, layers, _ = _run(EarlyExitEngine(model, policy, temperatures=temps), data, 32)
    assert np.array_equal(layers, ref_layers)
    assert np.allclose(logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_never_changes_a_result(pooling):
    model = _model(pooling=pooling, seed=1)
    data = _dataset(n=24, seed=3)
    cached = collect_logits(model, data, COLLATE, batch_size=8)
    ent = entropy(cached[:-1])  # [L-1, N]
    policy = get_policy("entropy", [_safe_threshold(e, 0.5) for e in ent])  # each layer takes about half
    alone = _run(EarlyExitEngine(model, policy), data, 1)
    padded = _run(EarlyExitEngine(model, policy), data, 1, Collator(pad_token_id=0, pad_to_multiple_of=50))
    batched = _run(EarlyExitEngine(model, policy), data, 24, Collator(pad_token_id=0, pad_to_multiple_of=64))
    for logits, layers, _ in (padded, batched):
        assert np.array_equal(layers, alone[1])
        assert np.allclose(logits, alone[0], atol=1e-4)
    assert len(np.unique(alone[1])) >= 2


def test_batch_that_all_exits_at_layer_one_does_no_more_layer_work(setup):
    model, data, _, _, _ = setup
    calls: list[tuple[int, int]] = []
    original = model.run_layer

    def counting(index, hidden, layer_mask):
        calls.append((index, hidden.shape[0]))
        return original(index, hidden, layer_mask)

    batch = COLLATE([data[i] for i in range(32)])
    model.run_layer = counting  # instance attribute shadows the method
    try:
        for policy in (get_policy("patience", 1), get_policy("maxprob", 0.0), get_policy("entropy", np.inf)):
            calls.clear()
            out = EarlyExitEngine(model, policy).run(batch["input_ids"], batch["attention_mask"])
            assert out.exit_layer.tolist() == [1] * 32
            assert out.layer_work == 32 and out.shapes == [(32, batch["input_ids"].shape[1])]
            assert calls == [(0, 32)]  # exactly one layer run, on the whole batch
        calls.clear()
        out = EarlyExitEngine(model, get_policy("entropy", 0.0)).run(batch["input_ids"], batch["attention_mask"])
        assert out.exit_layer.tolist() == [LAYERS] * 32 and out.layer_work == 32 * LAYERS
        assert calls == [(i, 32) for i in range(LAYERS)]
    finally:
        del model.run_layer


def test_rows_leave_and_columns_are_trimmed(setup):
    model, _, _, _, _ = setup
    rng = np.random.default_rng(0)
    longs = [{"input_ids": [2, *rng.integers(5, 100, 30).tolist(), 3], "attention_mask": [1] * 32} for _ in range(30)]
    shorts = [{"input_ids": [2, t, 3], "attention_mask": [1, 1, 1]} for t in range(5, 100)]
    cached = collect_logits(model, EncodedDataset(longs + shorts), COLLATE)
    ent = entropy(cached[0])  # layer-1 entropies
    # the most confident long row and two less confident short rows: only the long row leaves at layer 1
    best = int(np.argmin(ent[:30]))
    unsure = [i for i in np.argsort(-ent[30:]) if ent[30 + i] > ent[best] + 1e-3][:2]
    assert len(unsure) == 2
    long = longs[best]
    data = EncodedDataset([long, shorts[unsure[0]], shorts[unsure[1]]])
    ent = ent[[best]]
    policy = get_policy("entropy", [ent[0] + 5e-4, 0.0, 0.0])
    batch = COLLATE([data[i] for i in range(3)])
    out = EarlyExitEngine(model, policy).run(batch["input_ids"], batch["attention_mask"])
    assert out.exit_layer.tolist() == [1, LAYERS, LAYERS]
    assert out.shapes == [(3, 32)] + [(2, 3)] * (LAYERS - 1)  # two rows, 3 columns after the long one left
    ref_layers, ref_logits = policy.decide(collect_logits(model, data, COLLATE))
    assert out.exit_layer.tolist() == ref_layers.tolist()
    assert np.allclose(out.logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_regression_engine_equals_offline(batch_size):
    model = _model(num_labels=1, seed=2)
    with torch.no_grad():  # back to the usual scale: outputs change little between layers, some exit
        for head in model.exits:
            head.classifier.weight.mul_(1 / 15.0)
    data = _dataset(n=40, seed=4)
    cached = collect_logits(model, data, COLLATE)
    for name, policy in _policies(cached, regression=True).items():
        ref_layers, ref_logits = policy.decide(cached, regression=True)
        logits, layers, _ = _run(EarlyExitEngine(model, policy), data, batch_size)
        assert np.array_equal(layers, ref_layers), name
        assert np.allclose(logits, ref_logits, atol=1e-5)


def test_engine_errors(setup):
    model, _, _, _, _ = setup
    with pytest.raises(RomebertError, match="one per exit"):
        EarlyExitEngine(model, get_policy("entropy", 0.1), temperatures=[1.0, 2.0])
    with pytest.raises(RomebertError, match="positive"):
        EarlyExitEngine(model, get_policy("entropy", 0.1), temperatures=[1.0, 0.0, 1.0, 1.0])
    with pytest.raises(RomebertError, match="regression"):
        EarlyExitEngine(_model(num_labels=1), get_policy("maxprob", 0.9))
    engine = EarlyExitEngine(model, get_policy("entropy", 0.1))
    with pytest.raises(RomebertError, match="shape"):
        engine.run(torch.ones(3, dtype=torch.long))
    empty = engine.run(torch.zeros(0, 5, dtype=torch.long))
    assert empty.logits.shape == (0, 3) and empty.layer_work == 0


def test_row_extent_handles_right_and_left_padding_and_empty_rows():
    from romebert.runtime.engine import _extent

    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    assert _extent(mask != 0).tolist() == [3, 5, 4, 5]  # last real column + 1; left padding is never trimmed


def test_one_unpadded_row_is_told_from_any_other_mask():
    from romebert.runtime.encoding import unpadded_row

    assert unpadded_row(np.ones((1, 7), np.int64)) and unpadded_row(np.ones((1, 1), np.int64))
    assert not unpadded_row(np.array([[1, 1, 0]]))  # trailing padding
    assert not unpadded_row(np.array([[0, 1, 1]]))  # left padding
    assert not unpadded_row(np.ones((2, 3), np.int64))  # two rows
    assert not unpadded_row(np.array([[1, 2, 1]]))  # not a 0/1 mask: the general path decides
    assert not unpadded_row(np.ones((1, 3), np.int32))  # (the engine's host batches are int64)


def test_engine_follows_the_model_to_another_dtype_and_new_weights(setup):
    # An engine built before the model moves (here to float64) or its weights change runs what the model
    # is now, not a copy taken when the engine was built.
    _, data, _, _, _ = setup
    model = _model(seed=3)
    engine = EarlyExitEngine(model, get_policy("entropy", 0.0))  # never exits early: every row at layer L
    batch = COLLATE([data[i] for i in range(6)])
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    before = engine.run(*args).logits
    model.double()
    after = engine.run(*args)
    with torch.inference_mode():
        expected = model(*args)[-1].float().numpy()  # [B, C] computed in float64
    assert after.logits.dtype == np.float32
    assert np.allclose(after.logits, expected, atol=1e-6)
    assert np.allclose(before, after.logits, atol=1e-4)  # the same model, in another precision
    with torch.no_grad():
        model.exits[-1].classifier.bias.add_(1.0)
    shifted = engine.run(*args).logits
    assert np.allclose(shifted, after.logits + 1.0, atol=1e-6)


def test_host_side_pooling_weights_match_the_model(setup):
    # The segments build mean-pooling weights from the host copy of the mask; they must be exactly what
    # the model itself uses.
    from romebert.model.modeling import pool_weights

    model, data, _, _, _ = setup
    batch = COLLATE([data[i] for i in range(5)])
    ids, mask, types = (batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids"))
    state = model.segments().start(ids, mask, types)
    assert torch.equal(state.weights, pool_weights(state.mask, torch.float32))
