import math

import pytest
import torch

from romebert.training.losses import distillation_loss, exit_loss, stage_losses, task_loss
from romebert.training.methods import METHODS, LossSettings


def ce(logits, label):
    return math.log(sum(math.exp(x) for x in logits)) - logits[label]


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (ce([2.0, 0.0], 0) + ce([0.0, 1.0], 0)) / 2
    assert task_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_regression_task_loss_is_mse():
    logits = torch.tensor([[1.0], [3.0]])
    labels = torch.tensor([2.0, 2.0])
    assert task_loss(logits, labels).item() == pytest.approx(1.0)


@pytest.mark.parametrize("reduction,divisor", [("mean", 2), ("batchmean", 1)])
def test_kd_both_reductions_by_hand(reduction, divisor):
    T = 3.0
    student = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    teacher = torch.tensor([[T * math.log(3.0), 0.0]])  # p = softmax(teacher / T) = (3/4, 1/4)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = T**2 * kl / divisor  # reference: element-wise mean over B*C = 2 entries
    assert distillation_loss(student, teacher, T, reduction).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_student_matches_teacher_and_detaches_teacher():
    teacher = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    loss = distillation_loss(teacher.detach().clone().requires_grad_(), teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert teacher.grad is None


def test_regression_distillation_is_mse_to_teacher():
    student = torch.tensor([[1.0], [2.0]])
    teacher = torch.tensor([[2.0], [4.0]])
    assert distillation_loss(student, teacher).item() == pytest.approx((1 + 4) / 2)


def test_deebert_stage_two_sum_by_hand():
    exits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # K=3 exits, B=1
    labels = torch.tensor([1])
    expected = ce([2.0, 0.0], 1) + ce([0.0, 1.0], 1) + ce([1.0, 1.0], 1)
    assert exit_loss(exits, labels).item() == pytest.approx(expected, rel=1e-6)
    weighted = exit_loss(exits, labels, weights=[1.0, 0.5, 0.0])
    assert weighted.item() == pytest.approx(ce([2.0, 0.0], 1) + 0.5 * ce([0.0, 1.0], 1), rel=1e-6)


def test_self_distillation_exit_loss_by_hand():
    T, g = 3.0, 0.9
    exits = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[T * math.log(3.0), 0.0]])
    labels = torch.tensor([0])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = (1 - g) * math.log(2) + g * T**2 * kl / 2
    assert exit_loss(exits, labels, teacher, g, T, "mean").item() == pytest.approx(expected, rel=1e-5)


def test_romebert_stage_loss_combines_final_and_exits():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    s = LossSettings()
    final, exits = stage_losses(METHODS["romebert-sd"][0], logits, labels, s)
    assert final.item() == pytest.approx(task_loss(logits[-1], labels).item())
    assert exits.item() == pytest.approx(exit_loss(logits[:-1], labels, logits[-1]).item())
    final, exits = stage_losses(METHODS["deebert"][0], logits, labels, s)
    assert exits is None and final is not None
    final, exits = stage_losses(METHODS["deebert"][1], logits, labels, s)
    assert final is None and exits.item() == pytest.approx(exit_loss(logits[:-1], labels).item())


def test_regression_works_in_every_method():
    logits = torch.randn(3, 4, 1, requires_grad=True)
    labels = torch.rand(4) * 5
    for stages in METHODS.values():
        for stage in stages:
            terms = [t for t in stage_losses(stage, logits, labels, LossSettings()) if t is not None]
            total = sum(terms)
            assert torch.isfinite(total)
            total.backward()
