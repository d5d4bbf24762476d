"""The training methods (the four compared in the paper, plus plain fine-tuning) as data: each is a
sequence of stages, each stage says what it trains and which loss terms it uses. The training loop
(``trainer.py``) has no per-method branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from romebert.errors import RomebertError
from romebert.losses import exit_loss, task_loss

GR_ANCHORS = ("exits", "final")


@dataclass(frozen=True)
class Stage:
    name: str
    trains: str  # "all" | "backbone+final" | "exits" (early exits 1..L-1 only)
    final_loss: bool  # task loss on the final head
    exit_loss: bool  # loss on the early exits
    distill: bool = False  # exits also distil from the final head's logits
    project: bool = False  # one-sided gradient projection between final and exit losses
    frozen_backbone: bool = False  # encoder runs without a graph (nothing in it is trained)


_FINETUNE = Stage("finetune", trains="backbone+final", final_loss=True, exit_loss=False)

METHODS: dict[str, tuple[Stage, ...]] = {
    # DeeBERT: fine-tune backbone + final head, then train the exits on a frozen model.
    "deebert": (_FINETUNE, Stage("exits", trains="exits", final_loss=False, exit_loss=True, frozen_backbone=True)),
    # DeeBERT + SD: the stage-two exits also distil from the frozen final head (train mode, dropout on).
    "deebert-sd": (
        _FINETUNE,
        Stage("exits", trains="exits", final_loss=False, exit_loss=True, distill=True, frozen_backbone=True),
    ),
    # RomeBERT: one joint stage, every exit distils from sg(final logits) of the same pass.
    "romebert-sd": (Stage("joint", trains="all", final_loss=True, exit_loss=True, distill=True),),
    "romebert-sdgr": (Stage("joint", trains="all", final_loss=True, exit_loss=True, distill=True, project=True),),
    # Plain fine-tuning (DeeBERT's stage one alone): one classifier on the last layer. The cost baseline
    # of `romebert compare`; its early exits stay untrained, so only the last exit's metric means anything.
    "plain": (_FINETUNE,),
}


def get_method(name: str) -> tuple[Stage, ...]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise RomebertError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


@dataclass(frozen=True)
class LossSettings:
    gamma: float = 0.9
    temperature: float = 3.0
    kd_reduction: str = "mean"  # reference: element-wise mean; "batchmean" is textbook KL


def stage_losses(stage: Stage, logits: Tensor, labels: Tensor, s: LossSettings) -> tuple[Tensor | None, Tensor | None]:
    """(final-head loss, summed early-exit loss) for one batch; ``logits`` is [L, B, C]."""
    final = task_loss(logits[-1], labels) if stage.final_loss else None
    exits = None
    if stage.exit_loss:
        teacher = logits[-1] if stage.distill else None
        exits = exit_loss(logits[:-1], labels, teacher, s.gamma, s.temperature, s.kd_reduction)
    return final, exits
