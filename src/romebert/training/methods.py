"""The training methods as data, registered in one place: each is a sequence of stages, each stage
says what it trains and which loss terms it uses. The training loop (``trainer.py``) has no
per-method branches, and this module needs no torch (the CLI builds its choices from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from romebert.core.errors import RomebertError

GR_ANCHORS = ("exits", "final")
WEIGHTINGS = ("none", "cosee")  # per-sample loss weights over the layers (training/losses.py)
KD_REDUCTIONS = ("mean", "batchmean")  # reference: element-wise mean (batch-mean KL / C); textbook KL


@dataclass(frozen=True)
class Stage:
    name: str
    trains: str  # "all" | "backbone+final" | "exits" (early exits 1..L-1 only)
    final_loss: bool  # task loss on the final head
    exit_loss: bool  # loss on the early exits
    distill: bool = False  # exits also distil from the final head's logits
    project: bool = False  # one-sided gradient projection between final and exit losses
    frozen_backbone: bool = False  # encoder runs without a graph (nothing in it is trained)
    weighting: str = "none"  # "cosee": each sample's loss weighted around the layer where it would exit


_FINETUNE = Stage("finetune", trains="backbone+final", final_loss=True, exit_loss=False)
_JOINT_SD = Stage("joint", trains="all", final_loss=True, exit_loss=True, distill=True)

METHODS: dict[str, tuple[Stage, ...]] = {
    # DeeBERT: fine-tune backbone + final head, then train the exits on a frozen model.
    "deebert": (_FINETUNE, Stage("exits", trains="exits", final_loss=False, exit_loss=True, frozen_backbone=True)),
    # DeeBERT + SD: the stage-two exits also distil from the frozen final head (train mode, dropout on).
    "deebert-sd": (
        _FINETUNE,
        Stage("exits", trains="exits", final_loss=False, exit_loss=True, distill=True, frozen_backbone=True),
    ),
    # RomeBERT: one joint stage, every exit distils from sg(final logits) of the same pass.
    "romebert-sd": (_JOINT_SD,),
    "romebert-sdgr": (Stage("joint", trains="all", final_loss=True, exit_loss=True, distill=True, project=True),),
    # COSEE (arXiv 2412.13236): one joint stage, every layer's cross-entropy weighted per sample around the
    # layer it would exit at under randomly simulated thresholds, plus a margin between the exit signals of
    # right and wrong predictions. ``--sample-weighting cosee`` adds the same to another method's stages.
    "cosee": (Stage("joint", trains="all", final_loss=True, exit_loss=True, weighting="cosee"),),
    # COSEE's weighting on RomeBERT SD's joint stage: the exits also distil from sg(final logits).
    "cosee-sd": (Stage("joint", trains="all", final_loss=True, exit_loss=True, distill=True, weighting="cosee"),),
    # Mixed (after arXiv 2407.14320): DeeBERT's stage one, then RomeBERT SD's joint stage from there, so
    # the exits start from a fine-tuned encoder and may still shape it.
    "mixed": (_FINETUNE, _JOINT_SD),
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
