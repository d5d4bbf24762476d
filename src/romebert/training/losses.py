"""Loss terms of the training methods, as pure functions over tensors.

Shapes: ``exit_logits`` [K, B, C] (the K early exits), ``final_logits`` [B, C], ``labels`` [B]
(long, or float for regression, where C = 1). Nothing here touches a model, so every term can be
checked by hand on small tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from romebert.training.methods import KD_REDUCTIONS, LossSettings, Stage


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy for classification; MSE for regression (C == 1)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 3.0, reduction: str = "mean") -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)); MSE to the teacher for regression.

    ``reduction="mean"`` is the reference: element-wise mean over B*C entries, i.e. batch-mean KL / C.
    ``"batchmean"`` is the textbook KL. The teacher is detached here so no caller can forget it.
    """
    teacher = teacher.detach()
    if student.shape[-1] == 1:
        return F.mse_loss(student, teacher)
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    log_q = F.log_softmax(student / temperature, dim=-1)
    p = F.softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, p, reduction="sum")
    divisor = student.numel() if reduction == "mean" else student.shape[0]
    return temperature**2 * kl / divisor


def exit_loss(
    exit_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    gamma: float = 0.9,
    temperature: float = 3.0,
    kd_reduction: str = "mean",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Sum over early exits of ``w_i * [(1 - gamma) * task_loss(h_i) + gamma * KD(h_i, teacher)]``.

    Without a teacher this is DeeBERT's stage-two loss, ``sum_i w_i * task_loss(h_i)``. ``weights``
    (default all 1) is the pluggable per-exit weighting, e.g. gradient equilibrium's 1/(L - i).
    """
    if weights is not None and len(weights) != exit_logits.shape[0]:
        raise ValueError(f"{len(weights)} weights for {exit_logits.shape[0]} exits")
    total = exit_logits.new_zeros(())
    for i, h in enumerate(exit_logits):
        term = task_loss(h, labels)
        if teacher_logits is not None:
            term = (1.0 - gamma) * term + gamma * distillation_loss(h, teacher_logits, temperature, kd_reduction)
        total = total + (weights[i] if weights is not None else 1.0) * term
    return total


def stage_losses(stage: Stage, logits: Tensor, labels: Tensor, s: LossSettings) -> tuple[Tensor | None, Tensor | None]:
    """(final-head loss, summed early-exit loss) of one batch for ``stage``; ``logits`` is [L, B, C]."""
    final = task_loss(logits[-1], labels) if stage.final_loss else None
    exits = None
    if stage.exit_loss:
        teacher = logits[-1] if stage.distill else None
        exits = exit_loss(logits[:-1], labels, teacher, s.gamma, s.temperature, s.kd_reduction)
    return final, exits
