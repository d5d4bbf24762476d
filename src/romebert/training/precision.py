"""Mixed precision: which precision a run trains in, the autocast context of its forward passes, and the
dynamic loss scale fp16 needs.

Master weights and optimizer state stay fp32 whatever the precision; autocast runs the forward pass's
matrix products in bf16 or fp16, and every loss term is computed in fp32 from fp32 logits (the trainer
casts them), so distillation and entropy terms keep fp32's range. fp16's small range needs the loss scaled
up before backward and the gradients scaled back down before anything reads them (gradient projection,
clipping, the optimizer); :class:`LossScaler` does that, and its state goes into checkpoints so a resumed
run stays exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def allow_tf32(device: torch.device, allowed: bool) -> None:
    """TF32 matrix products for fp32 work on GPUs that have them (Ampere and later)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


@dataclass
class LossScaler:
    """fp16's dynamic loss scale: the loss is multiplied by ``scale`` before backward; a step whose gradients
    overflow is skipped and the scale halved; after ``growth_interval`` clean steps it doubles."""

    scale: float = 2.0**16
    growth_interval: int = 2000
    clean_steps: int = 0

    def unscale(self, grads: list[torch.Tensor]) -> bool:
        """Divide ``grads`` by the scale in place; True when every value is finite (the step may go on)."""
        grads = [g for g in grads if g is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        norms = torch.stack(torch._foreach_norm(grads))
        return bool(torch.isfinite(norms).all())  # one host sync per optimizer step, which the logic needs

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.clean_steps = max(self.scale / 2.0, 1.0), 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval and math.isfinite(self.scale * 2.0):
            self.scale, self.clean_steps = self.scale * 2.0, 0

    def state(self) -> dict:
        return asdict(self)
