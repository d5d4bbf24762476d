import math

import pytest
import torch

from romebert.training.projection import project_conflicting
from romebert.training.trainer import GradientAccumulator

from conftest import tiny_model


def test_removes_exactly_the_conflicting_component():
    g_a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    g_b = [torch.tensor([-1.0, 1.0]), torch.tensor([[2.0]])]
    out, stats = project_conflicting(g_a, g_b)
    assert torch.equal(out[0], torch.tensor([0.0, 1.0]))
    assert torch.equal(out[1], torch.tensor([[2.0]]))
    assert stats.projected
    assert stats.angle_deg > 90
    # the result is orthogonal to g_A
    dot = sum(float((a * b).sum()) for a, b in zip(g_a, out))
    assert dot == pytest.approx(0.0, abs=1e-7)


def test_leaves_g_b_unchanged_when_not_conflicting():
    g_a = [torch.tensor([1.0, 1.0])]
    g_b = [torch.tensor([0.5, -0.2])]
    out, stats = project_conflicting(g_a, g_b)
    assert torch.equal(out[0], g_b[0]) and not stats.projected
    assert stats.cosine == pytest.approx(0.3 / (math.sqrt(2) * math.sqrt(0.29)), rel=1e-5)


def test_random_vectors_match_formula():
    torch.manual_seed(1)
    g_a = [torch.randn(5, 3), torch.randn(7)]
    g_b = [-a + 0.1 * torch.randn_like(a) for a in g_a]
    out, _ = project_conflicting(g_a, g_b)
    fa, fb = torch.cat([t.flatten() for t in g_a]), torch.cat([t.flatten() for t in g_b])
    c = (fa @ fb) / (fa @ fa)
    expected = fb - min(c.item(), 0.0) * fa
    assert torch.allclose(torch.cat([t.flatten() for t in out]), expected, atol=1e-6)


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 100, (n, 9), generator=g), torch.randint(0, 2, (n,), generator=g)


def _losses(model, ids, labels):
    from romebert.training.losses import exit_loss, task_loss

    logits = model(ids)
    return exit_loss(logits[:-1], labels, logits[-1]), task_loss(logits[-1], labels)


def test_touches_only_the_selected_parameters():
    model = tiny_model(layers=3, dropout=0.0)
    params = list(model.parameters())
    ids, labels = _batch(6, 0)
    acc = GradientAccumulator(params, model.projection_parameters())
    loss_a, loss_b = _losses(model, ids, labels)
    ga = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
    gb = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
    acc.add(loss_a, loss_b, 1.0)
    stats = acc.apply()
    selected = {id(p) for p in model.projection_parameters()}
    assert len(selected) == 2 * 6  # layers 1..L-1, six matrices each
    changed = 0
    for p, a, b in zip(params, ga, gb):
        plain = (a if a is not None else 0) + (b if b is not None else 0)
        if id(p) in selected:
            changed += not torch.allclose(p.grad, plain)
        else:
            assert torch.allclose(p.grad, plain, atol=1e-7), "a parameter outside S was modified"
    assert stats["gr_projected"] == (changed > 0)
    assert changed > 0 or stats["gr_dot"] >= 0


def test_accumulation_two_equals_one_double_batch():
    ids, labels = _batch(8, 3)
    grads = []
    for chunks in (1, 2):
        model = tiny_model(layers=3, dropout=0.0, seed=5)
        params = list(model.parameters())
        acc = GradientAccumulator(params, model.projection_parameters())
        for part_ids, part_labels in zip(ids.chunk(chunks), labels.chunk(chunks)):
            acc.add(*_losses(model, part_ids, part_labels), 1.0 / chunks)
        acc.apply()
        grads.append([p.grad.clone() for p in params])
    for one, two in zip(*grads):
        assert torch.allclose(one, two, atol=1e-6)
