"""Checks that need a CUDA device (marked ``gpu``; skipped without one). The CPU paths they mirror are
tested everywhere else; here the same decisions are taken on the GPU."""

import numpy as np
import pytest

from romebert.runtime.engine import EarlyExitEngine
from romebert.runtime.policies import get_policy

from conftest import sharpen_exits, tiny_model

pytestmark = pytest.mark.gpu


def _batch(n=48, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 20, size=n)
    ids = np.zeros((n, lengths.max()), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(lengths):
        ids[i, :t] = rng.integers(5, 100, size=t)
        mask[i, :t] = 1
    return ids, mask


@pytest.mark.parametrize("criterion,threshold", [("entropy", 0.3), ("maxprob", 0.8), ("patience", 2)])
def test_engine_decisions_on_cuda_equal_the_cpu_ones(criterion, threshold):
    model = sharpen_exits(tiny_model(layers=4, pooling="mean", dropout=0.0)).eval()
    ids, mask = _batch()
    policy = get_policy(criterion, threshold)
    cpu = EarlyExitEngine(model, policy).run(ids, mask)
    gpu = EarlyExitEngine(model.to("cuda"), policy).run(ids, mask)
    assert np.allclose(gpu.logits, cpu.logits, atol=1e-4)
    same = gpu.exit_layer == cpu.exit_layer
    assert same.mean() >= 0.95, (gpu.exit_layer, cpu.exit_layer)  # only near-ties may go the other way


def _train_on(device, tmp_path, name, precision, epochs=0.5, **kw):
    import torch
    from test_trainer import _dataset

    from romebert.runtime.encoding import Collator
    from romebert.training.trainer import Trainer
    from romebert.training.training_args import TrainingArguments

    model = tiny_model(layers=3, dropout=kw.pop("dropout", 0.0), seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path / name), method="romebert-sdgr", epochs=epochs, learning_rate=1e-3,
                             batch_size=kw.pop("batch_size", 8), progress=False, device=device, gr_anchor="exits",
                             group_by_length=False, precision=precision, **kw)  # fmt: skip
    summary = Trainer(model, args, _dataset(n=16), Collator(pad_token_id=0)).train(resume=kw.get("resume", False))
    model.to("cpu")
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return model, delta, summary


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_training_step_on_cuda_moves_the_weights_as_fp32_on_the_cpu(tmp_path, precision):
    import torch

    _, full, _ = _train_on("cpu", tmp_path, "cpu", "fp32")
    _, mixed, summary = _train_on("cuda", tmp_path, precision, precision)
    assert summary["precision"] == precision
    assert torch.nn.functional.cosine_similarity(full, mixed, dim=0) > 0.95


def test_a_resumed_fp16_run_on_cuda_ends_where_an_uninterrupted_one_does(tmp_path):
    import torch
    from test_trainer import _dataset

    from romebert.runtime.encoding import Collator
    from romebert.training.trainer import Trainer
    from romebert.training.training_args import TrainingArguments

    whole, _, _ = _train_on("cuda", tmp_path, "whole", "fp16", epochs=2, batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path / "cut"), method="romebert-sdgr", epochs=2, learning_rate=1e-3,
                             batch_size=4, progress=False, device="cuda", gr_anchor="exits", group_by_length=False,
                             precision="fp16", save_steps=3)  # fmt: skip
    first = Trainer(tiny_model(layers=3, dropout=0.0, seed=3), args, _dataset(n=16), Collator(pad_token_id=0))
    real = first._save

    def stop(optimizer, scheduler, state):
        real(optimizer, scheduler, state)
        if state.global_step == 6:
            raise KeyboardInterrupt

    first._save = stop
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = tiny_model(layers=3, dropout=0.0, seed=9)
    Trainer(resumed, args, _dataset(n=16), Collator(pad_token_id=0)).train(resume=True)
    for (name, p), q in zip(whole.named_parameters(), resumed.to("cpu").parameters()):
        assert torch.allclose(p, q, atol=1e-6), name  # GPU kernels may differ in the last bits
