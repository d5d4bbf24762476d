"""COSEE's sample weighting (training/losses.py), checked against hand computations on small tensors, and
the trainer running it as a method of its own and as a flag of the other methods."""

import json
import math

import numpy as np
import pytest
import torch

from romebert.core.errors import RomebertError
from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.training.losses import (
    cosee_sample_weights,
    energy_signal,
    margin_loss,
    simulated_exit_layers,
    stage_losses,
    weighted_stage_losses,
)
from romebert.training.methods import METHODS, LossSettings
from romebert.training.trainer import Trainer
from romebert.training.training_args import TrainingArguments

from conftest import tiny_model


def test_energy_signal_by_hand():
    z = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    expected = [1 / (1 + math.exp(2) + 1), 1 / (1 + 2 * math.exp(-1))]
    assert energy_signal(z).tolist() == pytest.approx(expected, rel=1e-6)
    t = 2.0  # 1 / (1 + (sum exp(z / T))^T)
    assert energy_signal(z, t)[0].item() == pytest.approx(1 / (1 + (math.exp(1) + 1) ** t), rel=1e-6)


def test_simulated_exit_layers_by_hand():
    signals = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.6, 0.8]])  # 2 early exits, 3 samples
    layers = simulated_exit_layers(signals, torch.tensor([0.3, 0.05, 1.0]))
    # t = 0.3: sample 0 leaves at exit 2 (0.2 < 0.3), sample 1 at exit 1, sample 2 never (final, index 2)
    assert layers.tolist() == [[1, 0, 2], [2, 2, 2], [0, 0, 0]]


def test_sample_weights_by_hand():
    exits = torch.tensor([[0, 2], [2, 2]])  # two thresholds, two samples, three layers
    beta = math.log(2.0)  # softmax(-beta |l - e|) = 2^-|l - e| / sum
    w = cosee_sample_weights(exits, 3, beta)
    at0 = np.array([1, 0.5, 0.25]) / 1.75  # a sample leaving at layer 0
    at2 = at0[::-1]
    assert w[:, 0].tolist() == pytest.approx(((at0 + at2) / 2).tolist(), rel=1e-6)
    assert w[:, 1].tolist() == pytest.approx(at2.tolist(), rel=1e-6)
    assert w.sum(0).tolist() == pytest.approx([1.0, 1.0])
    assert cosee_sample_weights(exits, 3, 0.0).flatten().tolist() == pytest.approx([1 / 3] * 6)


def test_margin_loss_by_hand():
    signals = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.2]])
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], [[2.0, 0.0]] * 3])
    labels = torch.tensor([0, 0, 1])  # exit 1: right, wrong, wrong; exit 2: right, right, wrong
    exit1 = max(0.0, 0.1 - (0.5 + 0.3) / 2 + 0.3)  # 0.0
    exit2 = max(0.0, 0.2 - 0.2 + 0.3)  # 0.3
    assert margin_loss(signals, logits, labels, 0.3).item() == pytest.approx((exit1 + exit2) / 2, rel=1e-6)
    all_right = torch.tensor([[[2.0, 0.0]] * 3] * 2)
    assert margin_loss(signals, all_right, torch.zeros(3, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("method", ["romebert-sd", "deebert", "plain"])
def test_unit_weights_give_the_unweighted_losses_and_one_hot_weights_pick_layers(method):
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 6, 3), torch.randint(0, 3, (6,))
    s = LossSettings()
    for stage in METHODS[method]:
        a = stage_losses(stage, logits, labels, s)
        b = weighted_stage_losses(stage, logits, labels, s, torch.ones(4, 6))
        for x, y in zip(a, b):
            assert (x is None and y is None) or x.item() == pytest.approx(y.item(), rel=1e-6)
    joint = METHODS["cosee"][0]
    only_second = torch.zeros(4, 6)
    only_second[1] = 1.0  # every sample's whole weight on exit 2
    final, exits = weighted_stage_losses(joint, logits, labels, s, only_second)
    assert final.item() == 0.0
    assert exits.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[1], labels).item(), rel=1e-6)


def _separable(n=48, seed=0):
    """Token 5 means class 0, token 6 class 1, padded with noise tokens: every exit can learn it."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        noise = torch.randint(10, 100, (6,), generator=g).tolist()
        feats.append({"input_ids": [2, 5 + i % 2, *noise, 3], "attention_mask": [1] * 9, "labels": i % 2})
    return EncodedDataset(feats)


def _args(tmp_path, name, **kw):
    return TrainingArguments(output_dir=str(tmp_path / name), epochs=kw.pop("epochs", 3), learning_rate=3e-3,
                             batch_size=8, progress=False, log_every=1, device="cpu", gr_anchor="exits",
                             group_by_length=False, **kw)  # fmt: skip


@pytest.mark.parametrize("method,weighting", [("cosee", "none"), ("mixed", "cosee"), ("romebert-sdgr", "cosee")])
def test_cosee_training_learns_every_exit(tmp_path, method, weighting):
    from romebert.evaluation.logits import collect_logits

    model = tiny_model(layers=3, dropout=0.0, seed=1, pooling="mean")
    data = _separable()
    before = collect_logits(model, data, Collator(pad_token_id=0)).argmax(-1)
    Trainer(model, _args(tmp_path, method, method=method, sample_weighting=weighting, epochs=6), data,
            Collator(pad_token_id=0)).train()  # fmt: skip
    labels = np.array([f["labels"] for f in data.features])
    after = collect_logits(model, data, Collator(pad_token_id=0)).argmax(-1)  # [L, N]
    assert (after == labels).mean(1).min() >= 0.9, (after == labels).mean(1)
    assert (before == labels).mean(1).max() < 0.9
    rows = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_cosee_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    data = _separable(40)
    whole = tiny_model(layers=3, dropout=0.1, seed=2)
    Trainer(whole, _args(tmp_path, "whole", method="cosee", epochs=2), data, Collator(pad_token_id=0)).train()
    # the same run stopped after step 7 (mid epoch 2, signal range carried from epoch 1), then resumed
    cut = _args(tmp_path, "cut", method="cosee", epochs=2, save_steps=7)
    first = tiny_model(layers=3, dropout=0.1, seed=2)
    trainer = Trainer(first, cut, data, Collator(pad_token_id=0))
    real = trainer._save

    def stop_at_7(optimizer, scheduler, state):
        real(optimizer, scheduler, state)
        if state.global_step == 7:
            raise KeyboardInterrupt

    trainer._save = stop_at_7
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state = json.loads(next((tmp_path / "cut" / "checkpoints").glob("*step0000007/trainer_state.json")).read_text())
    assert state["signal_range"] is not None and state["epoch_signal_range"] is not None
    resumed = tiny_model(layers=3, dropout=0.1, seed=99)
    Trainer(resumed, cut, data, Collator(pad_token_id=0)).train(resume=True)
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_cosee_refuses_regression(tmp_path):
    model = tiny_model(num_labels=1, layers=2)
    data = EncodedDataset([{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "labels": 1.0}] * 4)
    with pytest.raises(RomebertError, match="'cosee' needs class predictions"):
        Trainer(model, _args(tmp_path, "r", method="romebert-sd", sample_weighting="cosee"), data,
                Collator(pad_token_id=0))  # fmt: skip
