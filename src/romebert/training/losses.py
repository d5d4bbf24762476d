"""Loss terms of the training methods, as pure functions over tensors.

Shapes: ``exit_logits`` [K, B, C] (the K early exits), ``final_logits`` [B, C], ``labels`` [B]
(long, or float for regression, where C = 1). Nothing here touches a model, so every term can be
checked by hand on small tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


# ------------------------------------------------------------------------- COSEE's sample weighting
# He et al., "COSEE: Consistency-Oriented Signal-based Early Exiting via Calibrated Sample Weighting
# Mechanism" (AAAI 2025, arXiv 2412.13236), as its public code trains: docs/cosee.md writes out the
# equations. Signals are 1-D per exit ([K, B] for the K early exits), lower meaning more confident.


def energy_signal(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """COSEE's normalised energy, ``1 / (1 + (sum_c exp(z_c / T))^T) = sigmoid(-T * logsumexp(z / T))``,
    in (0, 1) over the last axis: [..., C] -> [...]; lower means more confident."""
    return torch.sigmoid(-temperature * torch.logsumexp(logits / temperature, dim=-1))


def simulated_exit_layers(signals: Tensor, thresholds: Tensor) -> Tensor:
    """Where each sample would leave at each threshold: signals [K, B] of the K early exits, thresholds
    [M] -> [M, B] 0-based layer indices; a sample leaves at the first exit whose signal < threshold, else
    at the final layer (index K)."""
    fires = signals.detach().unsqueeze(0) < thresholds.view(-1, 1, 1)  # [M, K, B]
    first = fires.to(torch.int8).argmax(dim=1)  # the first firing exit (0 where none fires)
    return torch.where(fires.any(dim=1), first.long(), signals.shape[0])


def cosee_sample_weights(exit_layers: Tensor, num_layers: int, beta: float) -> Tensor:
    """Each sample's loss weight at each layer, averaged over the simulated thresholds: exit_layers [M, B]
    -> [L, B] with ``w[l, b] = mean_m softmax_l(-beta * |l - e[m, b]|)``. Every column sums to 1; beta 0
    weighs all layers alike, a large beta puts a sample's whole loss on the layer where it would exit."""
    layers = torch.arange(num_layers, device=exit_layers.device).view(1, -1, 1)  # [1, L, 1]
    distance = (layers - exit_layers.unsqueeze(1)).abs().to(torch.float32)  # [M, L, B]
    return torch.softmax(-beta * distance, dim=1).mean(dim=0)


def margin_loss(signals: Tensor, exit_logits: Tensor, labels: Tensor, margin: float = 0.3) -> Tensor:
    """COSEE's margin between the signals of right and wrong predictions, averaged over the early exits
    whose batch holds both: ``max(0, mean(s | right) - mean(s | wrong) + margin)`` per exit (signals
    [K, B], exit_logits [K, B, C], labels [B]); 0 when no exit has both."""
    right = exit_logits.argmax(dim=-1) == labels  # [K, B]
    terms = []
    for s, r in zip(signals, right):
        n_right = int(r.sum())
        if 0 < n_right < r.numel():
            terms.append(torch.relu(s[r].mean() - s[~r].mean() + margin))
    return torch.stack(terms).mean() if terms else signals.new_zeros(())


def weighted_stage_losses(
    stage: Stage, logits: Tensor, labels: Tensor, s: LossSettings, weights: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`stage_losses` with a weight per sample and layer, weights [L, B]: each layer's per-sample
    term (CE, or with SD ``(1 - gamma) CE + gamma KD``) is multiplied by its weight, then summed over the
    batch and divided by B. All weights 1 give :func:`stage_losses` (up to float rounding)."""
    b = labels.shape[0]
    final = None
    if stage.final_loss:
        final = (weights[-1] * _per_sample_task_loss(logits[-1], labels)).sum() / b
    exits = None
    if stage.exit_loss:
        exits = logits.new_zeros(())
        teacher = logits[-1].detach() if stage.distill else None
        for i, h in enumerate(logits[:-1]):
            term = _per_sample_task_loss(h, labels)
            if teacher is not None:
                term = (1.0 - s.gamma) * term + s.gamma * _per_sample_kd(h, teacher, s.temperature, s.kd_reduction)
            exits = exits + (weights[i] * term).sum() / b
    return final, exits


def _per_sample_task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """[B]: cross-entropy, or squared error for regression (C == 1)."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels, reduction="none")


def _per_sample_kd(student: Tensor, teacher: Tensor, temperature: float, reduction: str) -> Tensor:
    """[B]: each sample's share of :func:`distillation_loss` times B (its mean over the batch is that loss)."""
    if student.shape[-1] == 1:
        return (student - teacher).pow(2).squeeze(-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    p = F.softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_q, p, reduction="none").sum(-1)  # [B]
    divisor = student.shape[-1] if reduction == "mean" else 1
    return temperature**2 * kl / divisor
