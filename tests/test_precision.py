"""Mixed precision on the CPU (bf16 and fp16 autocast both run there on a tiny model): a bf16 step moves the
weights as fp32 does, gradient projection under autocast equals fp32's, fp16's loss scale skips overflowing
steps and resumes exactly from a checkpoint, and "auto" picks what each device should run."""

import json

import pytest
import torch
from test_trainer import _dataset

from romebert.core.devices import autocast, resolve_precision
from romebert.runtime.encoding import Collator
from romebert.training.checkpoint import list_checkpoints
from romebert.training.precision import LossScaler
from romebert.training.trainer import GradientAccumulator, Trainer
from romebert.training.training_args import TrainingArguments

from conftest import tiny_model


def _args(tmp_path, name, **kw):
    return TrainingArguments(output_dir=str(tmp_path / name), method=kw.pop("method", "romebert-sdgr"),
                             epochs=kw.pop("epochs", 1), learning_rate=1e-3, batch_size=kw.pop("batch_size", 8),
                             progress=False,
                             log_every=1, device="cpu", gr_anchor="exits", group_by_length=False, **kw)  # fmt: skip


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_loss_scaler_unscales_skips_overflows_and_grows():
    s = LossScaler(scale=8.0, growth_interval=2)
    g = [torch.tensor([8.0, 16.0])]
    assert s.unscale(g) and g[0].tolist() == [1.0, 2.0]
    assert not s.unscale([torch.tensor([float("inf")])])
    s.update(False)
    assert (s.scale, s.clean_steps) == (4.0, 0)
    s.update(True)
    s.update(True)
    assert (s.scale, s.clean_steps) == (8.0, 0)
    assert LossScaler(**s.state()) == s


def _one_step(tmp_path, name, precision, seed=3):
    model = tiny_model(layers=3, dropout=0.0, seed=seed)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(
        model, _args(tmp_path, name, precision=precision, epochs=0.5), _dataset(n=16), Collator(pad_token_id=0)
    ).train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_moves_the_weights_as_fp32_does(tmp_path, precision):
    full = _one_step(tmp_path, "fp32", "fp32")
    mixed = _one_step(tmp_path, precision, precision)
    assert full.abs().max() > 0
    # AdamW's first step is about lr * sign(gradient): the two agree wherever the gradient is not tiny
    assert torch.nn.functional.cosine_similarity(full, mixed, dim=0) > 0.95
    assert (mixed - full).norm() / full.norm() < 0.3


def test_gradient_projection_under_autocast_equals_fp32():
    model = tiny_model(layers=3, dropout=0.0, seed=5)
    batch = Collator(pad_token_id=0)([_dataset(n=8)[i] for i in range(8)])
    labels = batch.pop("labels")
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        acc = GradientAccumulator(list(model.parameters()), model.projection_parameters())
        with autocast(torch.device("cpu"), precision):
            logits = model(**batch)
        logits = logits.float()
        final = torch.nn.functional.cross_entropy(logits[-1], labels)
        exits = sum(torch.nn.functional.cross_entropy(h, labels) for h in logits[:-1])
        acc.add(exits, final, 1.0)
        acc.apply()
        grads[precision] = torch.cat([p.grad.flatten() for p in acc.projected])
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0) > 0.99


def test_fp16_checkpoints_hold_the_loss_scale_and_resume_exactly(tmp_path):
    whole = tiny_model(layers=3, dropout=0.1, seed=2)
    Trainer(whole, _args(tmp_path, "whole", precision="fp16", epochs=2, batch_size=4), _dataset(n=16),
            Collator(pad_token_id=0)).train()  # fmt: skip
    cut = _args(tmp_path, "cut", precision="fp16", epochs=2, batch_size=4, save_steps=3, save_total_limit=10)
    first = Trainer(tiny_model(layers=3, dropout=0.1, seed=2), cut, _dataset(n=16), Collator(pad_token_id=0))
    real = first._save

    def stop_at_6(optimizer, scheduler, state):
        real(optimizer, scheduler, state)
        if state.global_step == 6:
            raise KeyboardInterrupt

    first._save = stop_at_6
    with pytest.raises(KeyboardInterrupt):
        first.train()
    state = json.loads((list_checkpoints(tmp_path / "cut")[-1] / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 2.0**16 and state["loss_scale"]["clean_steps"] == 6
    resumed = tiny_model(layers=3, dropout=0.1, seed=77)
    summary = Trainer(resumed, cut, _dataset(n=16), Collator(pad_token_id=0)).train(resume=True)
    assert summary["precision"] == "fp16"
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, monkeypatch):
    from romebert.training import trainer

    monkeypatch.setattr(trainer, "LossScaler", lambda **state: LossScaler(scale=1e38))  # the gradients overflow
    model = tiny_model(layers=3, dropout=0.0, seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    args = _args(tmp_path, "o", precision="fp16", method="romebert-sd", epochs=0.5)
    Trainer(model, args, _dataset(n=16), Collator(pad_token_id=0)).train()
    rows = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert rows[0].get("skipped_step") is True
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # one step, skipped
    state = json.loads((list_checkpoints(tmp_path / "o")[-1] / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == 1e38 / 2
