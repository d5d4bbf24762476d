"""The jobs behind the CLI: train a run, evaluate every exit and sweep thresholds, and both in one go.
A run is one folder, laid out by :class:`romebert.core.runs.RunFolder`. A job that follows another in
the same process takes what the first one holds (the model, the tokenizer, the examples it read)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from romebert.core.environment import default_backbone
from romebert.core.errors import RomebertError
from romebert.core.files import write_json
from romebert.core.runs import RunFolder
from romebert.data.examples import Example
from romebert.data.spec import DataSpec
from romebert.data.tasks import TaskSpec
from romebert.evaluation.evaluate import FEATURES, write_evaluation
from romebert.evaluation.logits import collect_outputs, dataset_labels
from romebert.model.loading import load_run, load_tokenizer
from romebert.model.modeling import MultiExitModel
from romebert.runtime.encoding import Collator, encode
from romebert.training.checkpoint import list_checkpoints
from romebert.training.trainer import Trainer, set_seed
from romebert.training.training_args import TrainingArguments


@dataclass
class TrainedRun:
    """A run as training left it in memory: what evaluating or predicting it next needs, without reading
    the run folder back."""

    run: RunFolder
    data: DataSpec
    model: MultiExitModel
    tokenizer: Any
    summary: dict[str, Any]
    examples: dict[str, list[Example]] = field(default_factory=dict)  # the splits read (and checked) so far

    @property
    def is_main_process(self) -> bool:
        return bool(self.summary["is_main_process"])


def train_run(data: DataSpec, args: TrainingArguments, resume: bool = False, then_evaluate: bool = False) -> TrainedRun:
    """Fine-tune a multi-exit model; writes ``<output_dir>/model``, ``run.json`` and the summary, then
    deletes the optimizer checkpoints unless ``args.keep_checkpoints``.

    ``then_evaluate``: the caller evaluates and predicts afterwards, so the dev splits and test files
    are checked now too (a missing dev file fails before training, not after it)."""
    checked = data.check_inputs(["train", *(data.eval_splits() if then_evaluate else [])], with_tests=then_evaluate)
    task = data.task_spec()
    run = RunFolder(args.output_dir)
    if resume and run.is_trained() and not list_checkpoints(run.root):
        raise RomebertError(
            f"{run.root}: already trained, and its checkpoints were deleted when training ended; train again "
            "without --resume (--keep-checkpoints keeps them, to continue a finished run later)"
        )
    run.root.mkdir(parents=True, exist_ok=True)
    backbone = args.backbone or default_backbone()
    tokenizer = load_tokenizer(backbone)
    t0 = time.perf_counter()
    train_set = encode(checked["train"], tokenizer, task.labels, data.max_seq_length)
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
        write_json(run.train_summary, summary)  # the run is finished from here on
        if not args.keep_checkpoints:  # they only serve resuming, and weigh several times the model
            shutil.rmtree(run.checkpoints, ignore_errors=True)
    return TrainedRun(run, data, model, tokenizer, summary, checked)


def run_task(model: MultiExitModel, data: DataSpec) -> TaskSpec:
    """The task of a trained model on ``data`` (``DataSpec.task_for``)."""
    cfg = model.config
    return data.task_for(cfg.task, cfg.labels, cfg.num_labels)


def evaluate_run(
    source: str | Path | TrainedRun,
    thresholds: Sequence[Any] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    data_override: dict | None = None,
    criterion: str = "entropy",
    options: dict[str, Any] | None = None,
) -> dict[str, dict]:
    """Per-exit metrics and a sweep of ``criterion`` (``thresholds``, default: its grid) on every dev split
    of a run folder or of a run just trained, from one pass each (every exit's logits cached)."""
    if isinstance(source, TrainedRun):
        run, model, tokenizer, data, read = source.run, source.model, source.tokenizer, source.data, source.examples
        precision = source.summary.get("precision", "fp32")
    else:
        run = RunFolder(source)
        model, tokenizer, data = load_run(run.root, device)
        read = {}
        precision = json.loads(run.train_summary.read_text()).get("precision", "fp32") if run.is_trained() else "fp32"
    data = data.replaced(data_override)
    task = run_task(model, data)
    results: dict[str, dict] = {}
    splits = data.eval_splits()
    if not splits:
        raise RomebertError("nothing to evaluate: this data has no dev split (give --dev-file)")
    for split in splits:
        examples = read[split] if split in read and not data_override else data.examples(split)
        dataset = encode(examples, tokenizer, task.labels, data.max_seq_length)
        labels = dataset_labels(dataset)
        if labels is None:
            raise RomebertError(f"split {split} has no labels; cannot evaluate")
        t0 = time.perf_counter()
        features = () if task.is_regression else FEATURES  # CAP's null-space share, for sweeps from the cache
        logits, extra = collect_outputs(model, dataset, Collator(tokenizer), batch_size, precision, features)
        seconds = time.perf_counter() - t0
        folder = run.eval(split)
        write_json(folder.timing, {"examples": len(dataset), "full_pass_seconds": seconds, "batch_size": batch_size})
        results[split] = write_evaluation(folder, logits, labels, task, thresholds, criterion, options,
                                          title=f"{task.name} {split}", features=extra)  # fmt: skip
        results[split]["full_pass_seconds"] = seconds
    return results
