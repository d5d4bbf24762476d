import json

import numpy as np
import pytest
import torch

from romebert.core.errors import RomebertError
from romebert.evaluation.logits import collect_logits
from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.training.methods import METHODS
from romebert.training.trainer import Trainer, find_latest_checkpoint
from romebert.training.training_args import TrainingArguments

from conftest import tiny_model


def _dataset(n=16, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = [2] + torch.randint(5, 100, (length - 2,), generator=g).tolist() + [3]
        label = float(i % 5) if regression else i % 2
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return EncodedDataset(feats)


def _train(tmp_path, name, method="romebert-sdgr", dataset=None, **kw):
    model = tiny_model(layers=3, dropout=0.0, seed=7, num_labels=kw.pop("num_labels", 2))
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        method=method,
        epochs=kw.pop("epochs", 1),
        learning_rate=1e-3,
        progress=False,
        group_by_length=False,
        log_every=1,
        device="cpu",
        **{"gr_anchor": "exits", **kw},
    )
    summary = Trainer(model, args, dataset or _dataset(), Collator(pad_token_id=0)).train()
    return model, summary


def test_gradient_accumulation_equals_double_batch_for_gr(tmp_path):
    one, _ = _train(tmp_path, "a", batch_size=8, gradient_accumulation_steps=1)
    two, _ = _train(tmp_path, "b", batch_size=4, gradient_accumulation_steps=2)
    for (name, p), q in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(p, q, atol=2e-5), name


@pytest.mark.parametrize("method", ["deebert", "deebert-sd"])
def test_deebert_stage_two_trains_only_the_exits(tmp_path, method):
    model, summary = _train(tmp_path, "s1", method=method)
    assert [s["stage"] for s in summary["stages"]] == ["finetune", "exits"]
    assert all(s["cpu_seconds"] > 0 for s in summary["stages"])
    # replay stage one alone from the same seed: backbone and final head must equal the two-stage result
    from romebert.training import methods

    stage_one = (methods.METHODS[method][0],)
    original = methods.METHODS["deebert"]
    methods.METHODS["deebert"] = stage_one
    try:
        ref, _ = _train(tmp_path, "s1-only", method="deebert")
    finally:
        methods.METHODS["deebert"] = original
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name.startswith("backbone.") or name.startswith(f"exits.{model.num_layers - 1}."):
            assert torch.equal(p, q), f"{name} changed in stage two"
    assert not torch.equal(model.exits[0].classifier.weight, ref.exits[0].classifier.weight)


def test_log_has_losses_and_gr_statistics(tmp_path):
    _train(tmp_path, "log")
    rows = [json.loads(line) for line in (tmp_path / "log" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # 16 examples / batch 8, logged every step
    for r in rows:
        assert {"final_loss", "exit_loss", "loss", "lr", "gr_angle_deg", "gr_norm_a", "gr_norm_b"} <= set(r)
        assert 0.0 <= r["gr_angle_deg"] <= 180.0


def _regression_dataset(n, seed, offset=3.0):
    """A learnable regression task: y = offset + 4 * (share of token 7 in the input), so mean pooling
    can read it off; labels average about offset + 1.5, far from where the heads start (0)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        share = float(torch.rand((), generator=g))
        body = [7 if float(torch.rand((), generator=g)) < share else int(torch.randint(10, 100, (1,), generator=g))
                for _ in range(length - 2)]  # fmt: skip
        ids = [2, *body, 3]
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": offset + 4.0 * ids.count(7) / length})
    return EncodedDataset(feats)


# COSEE's weighting needs class predictions: it refuses regression (tests/test_cosee.py)
REGRESSION_METHODS = sorted(m for m, stages in METHODS.items() if all(s.weighting == "none" for s in stages))


@pytest.mark.parametrize("method", REGRESSION_METHODS)
def test_regression_learns_with_every_method(tmp_path, method):
    # Before the heads predicted standardised targets this reached Pearson 0.34-0.35 (the heads spend
    # the run climbing from 0 to the labels' mean); a constant prediction has none.
    train, dev = _regression_dataset(256, 0), _regression_dataset(128, 1)
    model = tiny_model(num_labels=1, layers=2, pooling="mean", dropout=0.0, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path / method), method=method, epochs=3, learning_rate=1e-4, batch_size=16,
        progress=False, save_total_limit=0, gr_anchor="exits", device="cpu",
    )  # fmt: skip
    Trainer(model, args, train, Collator(pad_token_id=0)).train()
    labels = np.array([f["labels"] for f in dev.features])
    final = collect_logits(model, dev, Collator(pad_token_id=0))[-1, :, 0]
    assert np.corrcoef(final, labels)[0, 1] > 0.9
    assert abs(final.mean() - labels.mean()) < 0.3  # in label units, not standardised


def test_regression_heads_start_at_the_training_labels_mean(tmp_path):
    train = _regression_dataset(64, 0, offset=50.0)
    labels = np.array([f["labels"] for f in train.features])
    model = tiny_model(num_labels=1, layers=2, pooling="mean", dropout=0.0, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "r"), method="romebert-sd", epochs=1, learning_rate=0.0,
                             progress=False, save_total_limit=0, device="cpu")  # fmt: skip
    Trainer(model, args, train, Collator(pad_token_id=0)).train()
    assert model.config.target_mean == pytest.approx(labels.mean())
    assert model.config.target_std == pytest.approx(labels.std())
    out = collect_logits(model, train, Collator(pad_token_id=0))  # [L, N, 1]; lr 0: the initial heads
    assert np.abs(out - labels.mean()).max() < 0.1 * labels.std()


def test_non_finite_loss_stops_with_the_step(tmp_path):
    data = _dataset(regression=True)
    data.features[3]["labels"] = 1e30  # finite, but its squared error overflows float32
    with pytest.raises(RomebertError, match=r"non-finite loss .* step \d+"):
        _train(tmp_path, "nan", method="romebert-sd", dataset=data, num_labels=1, batch_size=4)


def test_a_non_finite_regression_label_is_refused_before_training(tmp_path):
    data = _dataset(regression=True)
    data.features[3]["labels"] = float("inf")
    with pytest.raises(RomebertError, match="training example 3 has label inf"):
        _train(tmp_path, "inf", method="romebert-sd", dataset=data, num_labels=1)
    assert not (tmp_path / "inf" / "train_log.jsonl").exists()


def test_epoch_checkpoints_are_complete_and_resumable(tmp_path):
    model, _ = _train(tmp_path, "ck", epochs=2)
    latest = find_latest_checkpoint(tmp_path / "ck")
    assert latest["epoch"] == 2 and latest["stage_index"] == 0
    assert not list((tmp_path / "ck" / "checkpoints").glob("*.tmp"))
    # a half-written checkpoint (no state file) is ignored
    (tmp_path / "ck" / "checkpoints" / "stage0-epoch003").mkdir()
    assert find_latest_checkpoint(tmp_path / "ck")["epoch"] == 2


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    from romebert.training.checkpoint import list_checkpoints

    reference, _ = _train(tmp_path, "c", epochs=2)
    ckpts = list_checkpoints(tmp_path / "c")
    assert [c.name for c in ckpts] == ["stage0-step0000002", "stage0-step0000004"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    model = tiny_model(layers=3, dropout=0.0, seed=99)
    args = TrainingArguments(
        output_dir=str(tmp_path / "c"),
        method="romebert-sdgr",  # as _train's runs
        epochs=2,
        learning_rate=1e-3,
        progress=False,
        group_by_length=False,
        gr_anchor="exits",
        device="cpu",
    )
    with pytest.warns(UserWarning, match="skipping checkpoint .*step0000004"):
        summary = Trainer(model, args, _dataset(), Collator(pad_token_id=0)).train(resume=True)
    assert summary["resumed_from_step"] == {"stage": "joint", "step": 2}
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # epoch 2 replayed from the epoch-1 checkpoint gives the same weights


def _replay_stage_one(tmp_path, method, name):
    """The model after ``method``'s first stage alone, from the same seed."""
    from romebert.training import methods

    original = methods.METHODS[method]
    methods.METHODS[method] = original[:1]
    try:
        return _train(tmp_path, name, method=method)[0]
    finally:
        methods.METHODS[method] = original


def test_the_mixed_method_fine_tunes_then_trains_everything_jointly(tmp_path):
    model, summary = _train(tmp_path, "mixed", method="mixed")
    assert [s["stage"] for s in summary["stages"]] == ["finetune", "joint"]
    after_one = _replay_stage_one(tmp_path, "mixed", "mixed-1")
    start = tiny_model(layers=3, dropout=0.0, seed=7)  # what _train starts from
    last = f"exits.{model.num_layers - 1}."
    for (name, p1), p0 in zip(after_one.named_parameters(), start.parameters()):
        trained_in_one = name.startswith("backbone.") or name.startswith(last)
        if not trained_in_one:
            assert torch.equal(p1, p0), f"stage one changed {name}"
        elif p1.ndim == 2 and "embeddings" not in name:
            assert not torch.equal(p1, p0), f"stage one left {name} unchanged"
    for (name, p2), p1 in zip(model.named_parameters(), after_one.parameters()):
        if p2.ndim == 2 and "embeddings" not in name:  # embeddings: only the rows of seen tokens move
            assert not torch.equal(p2, p1), f"the joint stage left {name} unchanged"


def _stage_two_grad_norms(tmp_path, name, clip_frozen):
    _train(tmp_path, name, method="deebert", clip_frozen_gradients=clip_frozen, max_grad_norm=1e-3)
    rows = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if r["stage"] == "exits"]


def test_deebert_stage_two_clips_over_the_encoder_gradients_only_with_the_preset_option(tmp_path):
    exits_only = _stage_two_grad_norms(tmp_path, "a", clip_frozen=False)
    with_encoder = _stage_two_grad_norms(tmp_path, "b", clip_frozen=True)
    # the first stage-two step starts from the same weights: the encoder's gradients add to the norm
    assert with_encoder[0] > exits_only[0] * 1.01
    # and the encoder still does not move in stage two
    model, _ = _train(tmp_path, "c", method="deebert", clip_frozen_gradients=True)
    ref = _replay_stage_one(tmp_path, "deebert", "c-1")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name.startswith("backbone."):
            assert torch.equal(p, q), name


def test_weight_decay_spares_biases_and_norms_unless_asked():
    from romebert.training.trainer import make_optimizer

    model = tiny_model()
    params = list(model.parameters())
    groups = make_optimizer(params, TrainingArguments(output_dir="x", weight_decay=0.01)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in params if p.ndim == 2}  # every weight matrix, no bias, no LayerNorm
    everything = make_optimizer(params, TrainingArguments(output_dir="x", weight_decay=0.01, decay_bias_and_norm=True))
    assert [len(g["params"]) for g in everything.param_groups] == [len(params)]


def test_gr_anchor_auto_is_resolved_from_the_models_task_or_refused(tmp_path):
    model = tiny_model(layers=2)
    args = TrainingArguments(output_dir=str(tmp_path / "a"), method="romebert-sdgr", progress=False, device="cpu")
    with pytest.raises(RomebertError, match="gr_anchor 'auto' .* names no task"):
        Trainer(model, args, _dataset(), Collator(pad_token_id=0))
    model.config.task = "QQP"
    assert Trainer(model, args, _dataset(), Collator(pad_token_id=0)).args.gr_anchor == "final"
    model.config.task = "RTE"
    assert Trainer(model, args, _dataset(), Collator(pad_token_id=0)).args.gr_anchor == "exits"
