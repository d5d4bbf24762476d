"""What a comparison is asked to do (:class:`CompareConfig`), and the command line that asks for it again.

Reports show paths the way they can be shown on any machine: a relative path as typed, an absolute one
relative to the current folder, and the packaged backbone not at all in a command (it is the default)."""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from romebert.core.environment import is_packaged_backbone
from romebert.core.errors import RomebertError
from romebert.core.options import command_args, option
from romebert.data.spec import DataSpec
from romebert.runtime.exit_policy import REFERENCE_THRESHOLDS
from romebert.runtime.policies import criterion_class
from romebert.training.methods import get_method
from romebert.training.training_args import POOLINGS, TrainingArguments

PLAIN = "plain"
DEFAULT_METHODS: tuple[str, ...] = ("deebert", "deebert-sd", "romebert-sd", "romebert-sdgr", "mixed")
DEFAULT_SEEDS: tuple[int, ...] = (42, 43, 44)
DEFAULT_POOLINGS: tuple[str, ...] = ("mean", "cls")
DEFAULT_SPEEDUPS: tuple[float, ...] = (1.5, 2.0, 3.0)
# The reference grid stops at 0.7 and is coarse above 0.2; a 0.025 grid up to 1.2 (> ln 3) makes the
# interpolated curve follow the real one closely and reaches "everyone exits at layer 1" for up to three
# classes. Sweeping is numpy work on cached logits, so extra thresholds cost nothing measurable.
COMPARE_THRESHOLDS: tuple[float, ...] = tuple(
    sorted({*REFERENCE_THRESHOLDS, *(round(0.025 * k, 3) for k in range(1, 49))})
)
# TrainingArguments options a comparison sets per run, or not at all (checkpoints are deleted).
COMPARE_VARIES = ("output_dir", "method", "seed", "pooling", "save_steps", "save_total_limit", "keep_checkpoints")
# DataSpec fields that name files or folders (shown relative in reports)
_DATA_PATHS = ("data_dir", "train_file", "dev_file", "test_file")


@dataclass
class CompareConfig:
    """Everything a comparison needs. ``training`` is the template of every run's TrainingArguments
    (its output_dir, method, seed and pooling are set per run)."""

    data: DataSpec = option(cli=False)
    output_dir: str = option(help="comparison folder (runs/, report.md, ...)", aliases=("-o",))
    training: TrainingArguments = option(cli=False, default_factory=lambda: TrainingArguments(output_dir="."))
    methods: list[str] = option(help="methods to compare", default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = option(help="training seeds", default_factory=lambda: list(DEFAULT_SEEDS))
    poolings: list[str] = option(
        help="exit poolings to compare (with --preset: the preset's)", default_factory=lambda: list(DEFAULT_POOLINGS)
    )
    include_plain: bool = option(True, "also train plain fine-tuning, the training-cost baseline")
    thresholds: list[float] = option(
        help="entropy thresholds to sweep (default: the reference grid plus a 0.025 grid up to 1.2)",
        default_factory=lambda: list(COMPARE_THRESHOLDS),
    )
    speedups: list[float] = option(
        help="layer speed-ups at which to read the metric", default_factory=lambda: list(DEFAULT_SPEEDUPS)
    )
    criteria: list[str] = option(
        help="exit criteria to compare, each swept from the cached dev logits (entropy is also the main sweep)",
        default_factory=lambda: ["entropy"],
    )
    max_metric_drop: float | None = option(
        None, "with --confidence: the share of inputs a guaranteed threshold may disagree with the final exit on"
    )
    risk_confidence: float | None = option(
        None,
        "choose each criterion's threshold with this guarantee (Learn-then-Test, docs/thresholds.md)",
        flag="--confidence",
    )
    notes: str | None = option(None, "Markdown file for the report's 'Reading' section")
    report_only: bool = option(False, "rebuild the report from finished runs; train nothing")
    eval_batch_size: int = 64
    device: str = "auto"
    progress: bool = False
    invocation: str | None = None  # the command line as typed, when known

    @property
    def all_methods(self) -> list[str]:
        """Methods in run order: plain first (the baseline), then the requested ones."""
        return ([PLAIN] if self.include_plain and PLAIN not in self.methods else []) + list(self.methods)

    def validate(self) -> None:
        """One-line errors for settings no comparison can run with."""
        if not self.methods:
            raise RomebertError("--methods: give at least one method")
        for m in self.methods:
            get_method(m)
        if not self.seeds:
            raise RomebertError("--seeds: give at least one seed")
        bad = [p for p in self.poolings if p not in POOLINGS]
        if bad or not self.poolings:
            raise RomebertError(f"--poolings: choose from {list(POOLINGS)}, got {self.poolings}")
        if any(s <= 0 for s in self.speedups):
            raise RomebertError(f"--speedups must be positive, got {self.speedups}")
        if not self.thresholds:
            raise RomebertError("--thresholds: give at least one threshold")
        for c in self.criteria:
            criterion_class(c)
        if (self.risk_confidence is None) != (self.max_metric_drop is None):
            raise RomebertError("--confidence and --max-metric-drop go together (the guarantee and its bound)")
        if self.risk_confidence is not None and not 0 < self.risk_confidence < 1:
            raise RomebertError(f"--confidence must lie in (0, 1), got {self.risk_confidence}")
        if self.notes is not None and not Path(self.notes).is_file():
            raise RomebertError(f"--notes {self.notes}: no such file")
        self.data.validate()
        if not self.data.eval_splits():
            raise RomebertError("compare needs a dev split (give --dev-file)")


def num(x: float) -> str:
    """A number as the shortest text that reads back the same: 2 -> "2", 1.5 -> "1.5", 2e-05."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def shown_path(path: str | None) -> str | None:
    """A path as a report shows it: as typed when relative, relative to the current folder when absolute."""
    return os.path.relpath(path) if path is not None and os.path.isabs(path) else path


def shown_data(data: DataSpec) -> DataSpec:
    """``data`` with its paths as a report shows them."""
    return dataclasses.replace(data, **{k: shown_path(getattr(data, k)) for k in _DATA_PATHS})


def shown_backbone(name_or_path: str | None) -> str | None:
    """``--model``'s value as a command shows it: None for the packaged backbone (the default anyway)."""
    return None if name_or_path is None or is_packaged_backbone(name_or_path) else shown_path(name_or_path)


def full_command(cfg: CompareConfig) -> str:
    """A ``romebert compare`` command line with every setting spelled out (defaults may change later)."""
    training = dataclasses.replace(cfg.training, backbone=shown_backbone(cfg.training.backbone))
    a = ["romebert", "compare", *command_args(shown_data(cfg.data))]
    a += ["--methods", ",".join(cfg.methods), "--seeds", ",".join(map(str, cfg.seeds))]
    a += ["--poolings", ",".join(cfg.poolings)]
    if not cfg.include_plain:
        a += ["--no-include-plain"]
    a += command_args(training, skip=COMPARE_VARIES)
    a += ["--speedups", ",".join(num(s) for s in cfg.speedups)]
    if cfg.criteria != ["entropy"]:
        a += ["--criteria", ",".join(cfg.criteria)]
    if cfg.risk_confidence is not None:
        a += ["--max-metric-drop", num(cfg.max_metric_drop), "--confidence", num(cfg.risk_confidence)]
    if [float(t) for t in cfg.thresholds] != list(COMPARE_THRESHOLDS):
        a += ["--thresholds", ",".join(num(t) for t in cfg.thresholds)]
    a += ["--device", cfg.device, "--eval-batch-size", str(cfg.eval_batch_size)]
    return shlex.join([*a, "-o", shown_path(cfg.output_dir)])


def shown_invocation(line: str | None) -> str | None:
    """The command line as typed, less the machine's paths: ``--model`` with the packaged backbone is
    dropped (it is the default) and absolute paths are made relative to the current folder."""
    if line is None:
        return None
    words = shlex.split(line)
    out: list[str] = []
    for word in words:
        flag, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
        if not eq:  # a lone flag or a value
            flag, value = "", word
        if (flag == "--model" or (not flag and out and out[-1] == "--model")) and is_packaged_backbone(value):
            if not flag:
                out.pop()  # the "--model" before this value
            continue
        out.append(flag + eq + shown_path(value))
    return line if out == words else shlex.join(out)
