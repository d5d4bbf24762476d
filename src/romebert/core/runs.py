"""The layout of a run folder, owned here: every module that reads or writes a run asks
:class:`RunFolder` (and, for one dev split's evaluation, :class:`EvalFolder`) for the paths::

    <run>/run.json            what data and backbone it used (so evaluate / predict need no repeat)
    <run>/training_args.json  the TrainingArguments
    <run>/train_log.jsonl     losses (and GR angle / norms) every few steps
    <run>/train_summary.json  written last by training: the run is trained once it exists
    <run>/model/              the trained MultiExitModel + tokenizer (save_pretrained / from_pretrained)
    <run>/checkpoints/        optimizer checkpoints while training (deleted at the end unless kept)
    <run>/calibration.json    per-exit temperatures fitted on dev
    <run>/compare_run.json    what ``romebert compare`` recorded of the run (evaluation time, machine)
    <run>/eval/<split>/       an EvalFolder: every exit's logits, metrics, the sweep, plots
    <run>/predictions/        GLUE submission files (SST-2.tsv, MNLI-m.tsv, AX.tsv, ...)

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from romebert.core.errors import RomebertError


@dataclass(frozen=True)
class EvalFolder:
    """One dev split's evaluation: ``<run>/eval/<split>/``."""

    root: Path

    @property
    def logits(self) -> Path:
        """Every exit's logits [L, N, C] (float32 ``.npy``), the cache every sweep reads."""
        return self.root / "logits.npy"

    @property
    def labels(self) -> Path:
        return self.root / "labels.npy"

    def feature(self, name: str) -> Path:
        """A per-exit output cached beside the logits, [L, N] (e.g. "nsp": CAP's null-space share)."""
        return self.root / f"{name}.npy"

    @property
    def per_exit(self) -> Path:
        """Every exit's metrics (JSON; ``per_exit_csv`` holds the same table)."""
        return self.root / "per_exit.json"

    @property
    def per_exit_csv(self) -> Path:
        return self.root / "per_exit.csv"

    @property
    def sweep(self) -> Path:
        """The threshold sweep (``compare`` takes it as the sign that the split is evaluated)."""
        return self.root / "sweep.json"

    @property
    def sweep_csv(self) -> Path:
        return self.root / "sweep.csv"

    @property
    def per_exit_plot(self) -> Path:
        return self.root / "per_exit.png"

    @property
    def speedup_plot(self) -> Path:
        return self.root / "speedup.png"

    @property
    def timing(self) -> Path:
        """How long the evaluation's one full pass over the split took."""
        return self.root / "timing.json"

    def has_cache(self) -> bool:
        return self.logits.is_file() and self.labels.is_file()


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def training_args(self) -> Path:
        return self.root / "training_args.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def compare_record(self) -> Path:
        return self.root / "compare_run.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def eval(self, split: str) -> EvalFolder:
        return EvalFolder(self.root / "eval" / split)

    def is_trained(self) -> bool:
        return self.train_summary.is_file() and self.model.is_dir()

    def require_trained(self) -> RunFolder:
        """This folder, or a one-line error saying why it is not a finished run."""
        if not self.root.is_dir():
            raise RomebertError(f"{self.root}: no such run folder")
        for need in (self.run_file, self.model, self.train_summary):
            if not need.exists():
                raise RomebertError(
                    f"{self.root}: not a finished run ({need.name} is missing; train it with 'romebert train')"
                )
        return self
