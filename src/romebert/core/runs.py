"""The layout of a run folder, owned here (the pipeline, the CLI, ``compare``, the API and the export
read and write it through :class:`RunFolder`)::

    <run>/run.json            what data and backbone it used (so evaluate / predict need no repeat)
    <run>/training_args.json  the TrainingArguments
    <run>/train_log.jsonl     losses (and GR angle / norms) every few steps
    <run>/train_summary.json  written last by training: the run is trained once it exists
    <run>/model/              the trained MultiExitModel + tokenizer (save_pretrained / from_pretrained)
    <run>/checkpoints/        the newest checkpoints (model, optimizer, scheduler, RNG)
    <run>/calibration.json    per-exit temperatures fitted on dev (``romebert.evaluation.calibration``)
    <run>/eval/<split>/       per_exit.{json,csv}, sweep.{json,csv}, timing.json, logits.npy, labels.npy, *.png
    <run>/predictions/        GLUE submission files (SST-2.tsv, MNLI-m.tsv, AX.tsv, ...)

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from romebert.core.errors import RomebertError


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
    def predictions(self) -> Path:
        return self.root / "predictions"

    def eval(self, split: str) -> Path:
        return self.root / "eval" / split

    def per_exit_file(self, split: str) -> Path:
        """Every exit's metrics on ``split`` (written by the evaluation)."""
        return self.eval(split) / "per_exit.json"

    def sweep_file(self, split: str) -> Path:
        """The threshold sweep on ``split`` (``compare`` takes it as the sign that the split is evaluated)."""
        return self.eval(split) / "sweep.json"

    def timing_file(self, split: str) -> Path:
        """How long the evaluation's one full pass over ``split`` took."""
        return self.eval(split) / "timing.json"

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
