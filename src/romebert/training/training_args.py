"""How to train a run: every training option once, with its help text and default (``options.py``
turns them into the flags of ``train``, ``run`` and ``compare``), and the named presets.

Torch-free on purpose: the command line is built from it, also where only the runtime is installed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.core.options import check_choices, option
from romebert.data.tasks import CUSTOM_TASK, get_task
from romebert.training.methods import (
    GR_ANCHORS,
    KD_REDUCTIONS,
    METHODS,
    WEIGHTINGS,
    LossSettings,
    Stage,
    get_method,
)

POOLINGS = ("cls", "mean")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training/precision.py resolves "auto" for a device

# Presets: named sets of option values (fields of TrainingArguments or DataSpec). "reference" trains as
# the reference code does (method.md); what still differs is listed in README.md ("Differences from
# the reference code") with the reason for each.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        # the paper's method (new_scripts/train_high.sh)
        "method": "romebert-sdgr",
        "pooling": "cls",  # the first token's hidden state, as BERT's pooler
        "group_by_length": False,  # uniformly shuffled batches
        "clip_frozen_gradients": True,  # DeeBERT stage 2 clips over the encoder's (unused) gradients too
        "decay_bias_and_norm": False,  # no weight decay on biases and LayerNorm weights
        # the reference's values, which are also the defaults today (pinned so that a preset run stays a
        # reference run if a default changes)
        "epochs": 3.0,
        "learning_rate": 2e-5,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "weight_decay": 0.0,
        "adam_epsilon": 1e-8,
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "seed": 42,
        "gamma": 0.9,
        "temperature": 3.0,
        "kd_reduction": "mean",
        "gr_anchor": "auto",
        "max_seq_length": 128,
    },
}


@dataclass
class TrainingArguments:
    """The method, the model it starts from and the optimisation. Defaults are the reference's
    (``method.md``) except ``method``, ``pooling`` and ``group_by_length`` (see their help), chosen on the
    comparisons' evidence; ``--preset reference`` sets those back as well."""

    output_dir: str = option(help="run folder (created)", aliases=("-o",))
    method: str = option(
        "mixed",
        "training method (why mixed is the default: README.md, Comparison results)",
        choices=tuple(sorted(METHODS)),
    )
    preset: str | None = option(
        None, "start from a named set of option values; flags given as well take precedence", choices=tuple(PRESETS)
    )
    backbone: str | None = option(
        None, "backbone: hub name or local folder (default: the packaged all-MiniLM-L6-v2)", flag="--model"
    )
    pooling: str = option(
        "mean",
        "what each exit pools: cls (the first token, the reference) or mean (masked mean over tokens; the "
        "packaged MiniLM was trained for mean-pooled embeddings)",
        choices=POOLINGS,
    )
    epochs: float = option(3.0, "passes over the training set, per stage")
    learning_rate: float = option(2e-5, "peak learning rate (linear decay)", aliases=("--lr",))
    batch_size: int = option(8, "examples per optimizer step and process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step (GR stays exact)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    decay_bias_and_norm: bool = option(
        False, "apply weight decay to biases and LayerNorm weights too (the reference exempts them)"
    )
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    warmup_ratio: float = option(0.0, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    clip_frozen_gradients: bool = option(
        False,
        "DeeBERT stage 2: also backpropagate the exit losses into the frozen encoder and count those "
        "gradients in the clipping norm, as the reference does (its optimizer then ignores them; slower)",
    )
    seed: int = option(42, "seed of initialisation, dropout and batch order")
    gamma: float = option(0.9, "distillation weight")
    temperature: float = option(3.0, "distillation temperature")
    kd_reduction: str = option(
        "mean", "KL reduction: element-wise mean (the reference) or batch mean (textbook)", choices=KD_REDUCTIONS
    )
    gr_anchor: str = option(
        "auto",
        "GR anchor loss A, kept as is: exits, final, or auto (final for MNLI and QQP, exits otherwise, as the "
        "reference; resolved from the task before training)",
        choices=("auto", *GR_ANCHORS),
    )
    sample_weighting: str = option(
        "none",
        "per-sample loss weights over the layers in every stage that trains exits: cosee (COSEE's, around the "
        "layer each sample would exit at under simulated thresholds, with its signal margin; docs/cosee.md)",
        choices=WEIGHTINGS,
    )
    cosee_thresholds: int = option(5, "COSEE: thresholds simulated per step")
    cosee_beta: float = option(10.0, "COSEE: how sharply weights peak at the exit layer, reached by the stage's end")
    cosee_margin: float = option(0.3, "COSEE: the margin between the signals of right and wrong predictions")
    cosee_margin_weight: float = option(0.1, "COSEE: the weight of that margin loss")
    group_by_length: bool = option(
        True, "batch examples of similar length (less padding); off: uniformly shuffled, the reference"
    )
    log_every: int = option(10, "log the loss terms every N optimizer steps")
    save_steps: int = option(0, "also checkpoint every N optimizer steps (0: only at each epoch end)")
    save_total_limit: int = option(2, "complete checkpoints to keep while training")
    keep_checkpoints: bool = option(
        False, "keep the optimizer checkpoints once training ends (to train on later); by default they are deleted"
    )
    precision: str = option(
        "auto",
        "fp32, bf16 or fp16 (autocast; fp32 master weights and losses; fp16 with a loss scale); auto: fp32 on "
        "the CPU, bf16 on a GPU that has it (docs/gpu.md)",
        choices=PRECISIONS,
    )
    tf32: bool = option(True, "allow TF32 matrix products for fp32 work on GPUs that have them")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...", cli=False)  # a common flag of every command
    progress: bool = option(True, "progress bar", cli=False)

    def __post_init__(self) -> None:
        get_method(self.method)
        self.method = self.method.lower()
        check_choices(self)
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.epochs <= 0:
            raise RomebertError("batch_size, gradient_accumulation_steps and epochs must be positive")
        if self.cosee_thresholds < 1 or self.cosee_beta < 0 or self.cosee_margin_weight < 0:
            raise RomebertError("cosee_thresholds must be >= 1, cosee_beta and cosee_margin_weight >= 0")

    @classmethod
    def from_preset(cls, preset: str | None, **values: Any) -> TrainingArguments:
        """The preset's values (its TrainingArguments fields), then ``values`` on top."""
        return cls(**{**preset_values(preset, cls), **values, "preset": preset})

    def for_task(self, task: str | None) -> TrainingArguments:
        """A copy with ``gr_anchor="auto"`` replaced by the anchor of task ``task`` (``TaskSpec.gr_anchor``:
        "final" for MNLI and QQP, "exits" for the other GLUE tasks and for custom data). With no task,
        "auto" is refused where a stage projects (the anchor would be a guess) and moot elsewhere."""
        if self.gr_anchor != "auto":
            return self
        if task is None:
            if any(stage.project for stage in get_method(self.method)):
                raise RomebertError(
                    "gr_anchor 'auto' means the task's anchor, and the model names no task (MultiExitConfig.task): "
                    "give gr_anchor 'exits' or 'final'"
                )
            return dataclasses.replace(self, gr_anchor="exits")  # nothing projects: the anchor is never used
        anchor = "exits" if task == CUSTOM_TASK else get_task(task).gr_anchor
        return dataclasses.replace(self, gr_anchor=anchor)

    def save(self, path: str | Path) -> None:
        from romebert.core.files import write_json

        write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> TrainingArguments:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise RomebertError(f"{path}: not readable training arguments ({exc})") from None
        except RomebertError as exc:
            raise RomebertError(f"{path}: {exc}") from None

    def weighting(self, stage: Stage) -> str:
        """The sample weighting of ``stage``: its method's own, else ``sample_weighting`` where it trains exits."""
        if stage.weighting != "none":
            return stage.weighting
        return self.sample_weighting if stage.exit_loss else "none"

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings(self.gamma, self.temperature, self.kd_reduction)


def preset_values(preset: str | None, cls: type) -> dict[str, Any]:
    """The values preset ``preset`` gives to the fields of dataclass ``cls`` (empty for None)."""
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise RomebertError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in PRESETS[preset].items() if k in names}
