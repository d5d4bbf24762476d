"""The ``romebert`` command line's flags. Every flag comes from a dataclass field declared with
``core.options.option`` (its help and default live there): data (``DataSpec``), training
(``TrainingArguments``), the exit criteria (``PolicyOptions`` and the criterion registry), export
(``ExportOptions``), a file to score (``FileOptions``), serving (``ServeConfig``), comparison
(``CompareConfig``) and :class:`CommonOptions`.
Building the parser imports no torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from romebert import __version__
from romebert.core import options
from romebert.core.options import option
from romebert.data.spec import DataSpec
from romebert.runtime.criteria import EntropyPolicy
from romebert.runtime.exit_policy import PolicyOptions
from romebert.runtime.policies import CRITERIA, POLICIES
from romebert.training.training_args import TrainingArguments


@dataclass
class CommonOptions:
    """Flags that every command running a model shares."""

    device: str = option("auto", "auto (this process's GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...")
    eval_batch_size: int = option(64, "rows per batch when evaluating or predicting")
    quiet: bool = option(False, "no progress bar")


# Data options that only training uses (evaluate and predict read them from the run).
TRAINING_DATA = ("max_seq_length", "max_train_examples", "subset_seed")


def add_data(p: argparse.ArgumentParser, for_training: bool) -> None:
    g = p.add_argument_group("data (a GLUE task, or your own CSV / TSV / JSON Lines files)")
    options.add_arguments(g, DataSpec, exclude=() if for_training else TRAINING_DATA)


def add_training(p: argparse.ArgumentParser, exclude: tuple[str, ...] = (), resume: bool = True) -> None:
    g = p.add_argument_group("training (defaults are the reference's, except method, pooling and grouping)")
    options.add_arguments(g, TrainingArguments, exclude=exclude)
    if resume:
        g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")


def add_criterion(p: argparse.ArgumentParser, sweep: bool = False, threshold: str | None = None) -> None:
    """--criterion (from the registry), the criteria's options, and --thresholds (a sweep's grid) or
    --threshold (one decision rule) with ``threshold`` as its help."""
    g = p.add_argument_group("exit criterion")
    rules = "; ".join(f"{name}: {cls.rule}" for name, cls in POLICIES.items())
    g.add_argument("--criterion", choices=CRITERIA, help=f"{rules} (default: entropy)")
    options.add_arguments(g, PolicyOptions)
    if sweep:
        g.add_argument(
            "--thresholds",
            type=options.csv(float, "--thresholds"),
            help="thresholds to sweep (default: the criterion's grid, for entropy the reference's)",
        )
    if threshold is not None:
        g.add_argument("--threshold", type=float, help=threshold)


def add_common(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p.add_argument_group("running"), CommonOptions)


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX Runtime (exports only)")
    g.add_argument("--intra-op-threads", type=int, help="threads per graph call (default: the usable cores)")
    g.add_argument("--inter-op-threads", type=int, help="threads across graph nodes (default: 1)")


def defaults_text() -> str:
    """How a rule is chosen when --threshold is not given."""
    per = ", ".join(f"{name} {cls.default_threshold:g}" for name, cls in POLICIES.items())
    return f"with --criterion and no --threshold: {per}"


def build_parser() -> argparse.ArgumentParser:
    from romebert.deploy.export_options import ExportOptions
    from romebert.deploy.guard import GuardOptions
    from romebert.deploy.predict_file import FileOptions
    from romebert.deploy.service import ServeConfig
    from romebert.jobs.compare.config import COMPARE_VARIES, CompareConfig

    parser = argparse.ArgumentParser(prog="romebert", description="Train, evaluate, export and serve multi-exit "
                                     "(early-exit) transformer classifiers.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"romebert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    entropy = EntropyPolicy.default_threshold

    p = sub.add_parser("train", help="fine-tune a multi-exit model with one of the training methods")
    add_data(p, for_training=True)
    add_training(p)
    add_common(p)

    p = sub.add_parser("evaluate", help="per-exit metrics and a threshold sweep on dev (one pass)")
    p.add_argument("run", help="run folder written by 'romebert train'")
    add_criterion(p, sweep=True)
    add_data(p, for_training=False)
    add_common(p)

    p = sub.add_parser("sweep", help="re-sweep thresholds from the logits 'evaluate' cached (no model pass)")
    p.add_argument("run", help="run folder written by 'romebert train' and evaluated")
    add_criterion(p, sweep=True)

    p = sub.add_parser("predict", help="score a CSV / TSV / JSON Lines file (--input), or write GLUE test-submission "
                       "files, by real early exit (a run, a classifier folder or an export)")  # fmt: skip
    p.add_argument("run", help="run folder, classifier folder or ONNX export")
    options.add_arguments(p.add_argument_group("your file (--input; the text columns: --text-column, "
                                               "--text-pair-column)"), FileOptions)  # fmt: skip
    add_criterion(p, threshold=f"default: the export's own (chosen on dev); for a run, entropy {entropy:g}; "
                  f"{defaults_text()}")  # fmt: skip
    p.add_argument("--predictions-dir", help="where the files go (default: <run>/predictions, else ./predictions)")
    add_runtime(p)
    add_data(p, for_training=False)
    add_common(p)

    p = sub.add_parser("serve", help="HTTP service with continuous early-exit batching (an export, or a run)")
    p.add_argument("source", help="ONNX export (ONNX Runtime, no torch), classifier folder or run folder (PyTorch)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    options.add_arguments(p.add_argument_group("service"), ServeConfig)
    options.add_arguments(p.add_argument_group("accuracy guard (docs/serving.md)"), GuardOptions)

    p = sub.add_parser("export", help="ONNX export: one graph per layer with its exit, for the torch-free runtime")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--output", "-o", required=True, help="export folder (written atomically)")
    options.add_arguments(p.add_argument_group("export"), ExportOptions)
    add_criterion(p)
    add_common(p)

    p = sub.add_parser("run", help="train, evaluate every exit, sweep, plot and write test files")
    add_data(p, for_training=True)
    add_training(p)
    add_criterion(p, sweep=True, threshold=f"threshold for the test files (default: entropy {entropy:g}; "
                  f"{defaults_text()})")  # fmt: skip
    add_common(p)

    p = sub.add_parser("compare", help="train methods x poolings x seeds on one task and write one report")
    add_data(p, for_training=True)
    options.add_arguments(p.add_argument_group("comparison"), CompareConfig, defaults={"thresholds": None})
    add_training(p, exclude=COMPARE_VARIES, resume=False)
    add_common(p)
    return parser
