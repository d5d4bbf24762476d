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
