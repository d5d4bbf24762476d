"""The jobs behind the CLI: train a run, evaluate every exit and sweep thresholds. A run is one folder,
laid out by :class:`romebert.core.runs.RunFolder`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from romebert.core.environment import default_backbone
from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.core.runs import RunFolder
from romebert.data.spec import DataSpec
from romebert.data.tasks import TaskSpec
from romebert.evaluation.evaluate import write_evaluation
from romebert.evaluation.logits import collect_logits, dataset_labels
from romebert.model.loading import load_run, load_tokenizer
from romebert.model.modeling import MultiExitModel
from romebert.runtime.encoding import Collator, encode
from romebert.runtime.policies import REFERENCE_THRESHOLDS
from romebert.training.trainer import Trainer, set_seed
from romebert.training.training_args import TrainingArguments


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
