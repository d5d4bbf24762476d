"""The jobs behind the CLI: train a run, evaluate every exit and sweep thresholds, write test files.

A *run* is one folder::

    <run>/run.json            what data and backbone it used (so evaluate / predict need no repeat)
    <run>/training_args.json  the TrainingArguments
    <run>/train_log.jsonl     losses (and GR angle / norms) every few steps
    <run>/model/              the trained MultiExitModel + tokenizer (save_pretrained / from_pretrained)
    <run>/checkpoints/        the newest per-epoch checkpoint (model, optimizer, scheduler)
    <run>/eval/<split>/       per_exit.{json,csv}, sweep.{json,csv}, logits.npy, labels.npy, *.png
    <run>/predictions/        GLUE submission files (SST-2.tsv, MNLI-m.tsv, AX.tsv, ...)
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from romebert.data import Collator, DataSpec, encode
from romebert.environment import default_backbone
from romebert.errors import RomebertError
from romebert.evaluation import collect_logits, dataset_labels
from romebert.exits import per_exit_metrics, sweep
from romebert.modeling import MultiExitModel
from romebert.plots import plot_per_exit, plot_speedup
from romebert.policies import REFERENCE_THRESHOLDS
from romebert.reports import write_json, write_per_exit_csv, write_sweep_csv
from romebert.runs import RunFolder
from romebert.tasks import TaskSpec
from romebert.trainer import Trainer, resolve_device, set_seed
from romebert.training_args import TrainingArguments


def train_run(data: DataSpec, args: TrainingArguments, resume: bool = False, then_evaluate: bool = False) -> dict:
    """Fine-tune a multi-exit model; writes ``<output_dir>/model`` and ``run.json``. Returns a summary.

    ``then_evaluate``: the caller evaluates and predicts afterwards, so the dev splits and test files
    are checked now too (a missing dev file fails before training, not after it)."""
    checked = data.check_inputs(["train", *(data.eval_splits() if then_evaluate else [])], with_tests=then_evaluate)
    task = data.task_spec()
    args = args.resolved(task.gr_anchor)
    run = RunFolder(args.output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    backbone = args.backbone or default_backbone()
    tokenizer = load_tokenizer(backbone)
    t0 = time.perf_counter()
    train_examples = checked["train"]  # read once, by the check
    train_set = encode(train_examples, tokenizer, task.labels, data.max_seq_length)
    set_seed(args.seed)  # the exits' random initialisation is part of the run: seed it too
    model = MultiExitModel.from_backbone(
        backbone,
        num_labels=task.num_labels,
        pooling=args.pooling,
        task=task.name,
        labels=list(task.labels) if task.labels is not None else None,
    )
    run_info = {
        "data": asdict(data),
        "backbone": backbone,
        "pooling": args.pooling,
        "task": task.name,
        "num_train_examples": len(train_set),
    }
    trainer = Trainer(model, args, train_set, Collator(tokenizer))
    if trainer.dist.is_main:  # under a multi-process launcher only rank 0 writes the run's files
        write_json(run.run_file, run_info)
    summary = trainer.train(resume=resume)
    summary.update(
        num_train_examples=len(train_set),
        seconds=time.perf_counter() - t0,
        model_dir=str(run.model),
        is_main_process=trainer.dist.is_main,
    )
    if trainer.dist.is_main:
        model.save_pretrained(run.model)
        tokenizer.save_pretrained(str(run.model))
        write_json(run.train_summary, summary)
    return summary


def run_task(model: MultiExitModel, data: DataSpec) -> TaskSpec:
    """The task of a trained model on ``data`` (``DataSpec.task_for``)."""
    cfg = model.config
    return data.task_for(cfg.task, cfg.labels, cfg.num_labels)


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[MultiExitModel, object, DataSpec]:
    """The trained model, its tokenizer and the data description of a run folder."""
    run = RunFolder(run_dir)
    data = DataSpec.load(run.run_file)
    model = MultiExitModel.from_pretrained(run.model, map_location=resolve_device(device))
    return model, load_tokenizer(str(run.model)), data


def evaluate_run(
    run_dir: str | Path,
    thresholds: list[float] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    data_override: dict | None = None,
) -> dict[str, dict]:
    """Per-exit metrics and a threshold sweep on every dev split, from one pass each (logits cached)."""
    run = RunFolder(run_dir)
    model, tokenizer, data = load_run(run.root, device)
    data = data.replaced(data_override)
    task = run_task(model, data)
    thresholds = list(thresholds) if thresholds is not None else list(REFERENCE_THRESHOLDS)
    results: dict[str, dict] = {}
    splits = data.eval_splits()
    if not splits:
        raise RomebertError("nothing to evaluate: this data has no dev split (give --dev-file)")
    for split in splits:
        dataset = encode(data.examples(split), tokenizer, task.labels, data.max_seq_length)
        labels = dataset_labels(dataset)
        if labels is None:
            raise RomebertError(f"split {split} has no labels; cannot evaluate")
        t0 = time.perf_counter()
        logits = collect_logits(model, dataset, Collator(tokenizer), batch_size)
        seconds = time.perf_counter() - t0
        write_json(run.timing_file(split), {"examples": len(dataset), "full_pass_seconds": seconds,
                                            "batch_size": batch_size})  # fmt: skip
        results[split] = write_evaluation(
            run.eval(split), logits, labels, task, thresholds, title=f"{task.name} {split}"
        )
        results[split]["full_pass_seconds"] = seconds
    return results


def write_evaluation(
    out: Path, logits: np.ndarray, labels: np.ndarray, task: TaskSpec, thresholds: list[float], title: str = ""
) -> dict:
    """From cached logits: per-exit metrics, the sweep, their JSON/CSV files and the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", logits)
    np.save(out / "labels.npy", labels)
    per_exit = [{"exit": i + 1, **m} for i, m in enumerate(per_exit_metrics(logits, labels, task))]
    rows = sweep(logits, labels, task, thresholds)
    write_json(out / "per_exit.json", per_exit)
    write_per_exit_csv(out / "per_exit.csv", per_exit)
    write_json(out / "sweep.json", rows)
    write_sweep_csv(out / "sweep.csv", rows)
    plot_per_exit(out / "per_exit.png", {"dev": [r[task.metric] for r in per_exit]}, task.metric, title)
    plot_speedup(out / "speedup.png", {"dev": [(r["speedup"], r["metric"]) for r in rows]}, task.metric, title)
    return {"dir": str(out), "per_exit": per_exit, "sweep": rows}


def sweep_cached(split_dir: str | Path, task: TaskSpec, thresholds: list[float]) -> dict:
    """Re-sweep from the logits an earlier evaluation cached (no model needed)."""
    split_dir = Path(split_dir)
    try:
        logits, labels = np.load(split_dir / "logits.npy"), np.load(split_dir / "labels.npy")
    except FileNotFoundError:
        raise RomebertError(f"{split_dir}: no cached logits; run 'romebert evaluate' first") from None
    return write_evaluation(split_dir, logits, labels, task, thresholds, title=f"{task.name} {split_dir.name}")


def load_tokenizer(name_or_path: str):
    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise RomebertError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0]}") from None
