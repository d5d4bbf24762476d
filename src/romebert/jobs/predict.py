"""``romebert predict``: GLUE submission files (or, for custom data, its test file) by real early exit,
and any user's file with ``--input`` (:func:`predict_input`), from a run, a classifier folder or an ONNX
export. Torch-free: an export is served by ONNX Runtime alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.data.glue import load_hub_glue, read_split
from romebert.data.spec import DataSpec
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.predict_file import FileOptions, FileSummary
from romebert.evaluation.exits import _preds_from_logits
from romebert.evaluation.reports import write_submission
from romebert.runtime.encoding import encode
from romebert.runtime.policies import as_policy


def predict_run(
    source: str | Path | EarlyExitClassifier,
    threshold: Any = None,
    batch_size: int = 64,
    device: str = "auto",
    data_override: dict | None = None,
    output_dir: str | Path | None = None,
    **runtime: Any,
) -> list[dict]:
    """GLUE submission files for every test split, by real early exit; returns per-file info.

    ``source``: a run, a classifier folder or an ONNX export (``runtime``: its ONNX Runtime options), or
    a classifier already loaded.
    ``threshold``: a policy or an entropy threshold; None uses the classifier's exit config (an
    export's is the one chosen on dev; a run's is the reference's entropy 0.15). Files go to
    ``output_dir`` (default: ``<run>/predictions``, or ``predictions/`` here for other folders).
    """
    clf = (
        source
        if isinstance(source, EarlyExitClassifier)
        else EarlyExitClassifier.from_pretrained(source, device, **runtime)
    )
    if clf.data is None and not data_override:
        raise RomebertError(f"{source}: no data description; give --task and --data-dir, or --test-file "
                            "(or score any file: --input FILE)")  # fmt: skip
    _refuse_custom_flags_on_glue(source, clf.data, data_override)
    data = (clf.data or DataSpec()).replaced(data_override)
    clf.data = data
    model_task = clf.task()  # refuses a model trained for another task or label set
    out_dir = Path(output_dir) if output_dir else (clf.run.predictions if clf.run is not None else Path("predictions"))
    policy = as_policy(threshold) if threshold is not None else None
    engine = clf.engine(policy)
    written = []
    files = data.test_files()
    if not files:
        raise RomebertError("nothing to predict: this data has no test split (give --test-file)")
    for task, split, name in files:
        if task is None:
            task = model_task
            examples = data.examples(split)
        elif data.hub:
            examples = load_hub_glue(task, split)
        else:
            examples = read_split(task, data.data_dir, split)
        dataset = encode(examples, clf.tokenizer, None, data.max_seq_length)
        out = engine.run_dataset(dataset, clf.collator, batch_size)
        preds, layers = _preds_from_logits(out.logits, task.is_regression), out.exit_layer
        write_submission(out_dir / name, preds, task)
        np.save(out_dir / (Path(name).stem + ".exit_layers.npy"), layers)
        written.append({"file": str(out_dir / name), "rows": len(preds), "mean_exit_layer": float(layers.mean()),
                        "policy": engine.policy.params()})  # fmt: skip
    return written


# Data flags that describe the user's own files: on a GLUE model's submission files they would be ignored.
CUSTOM_FLAGS = {"train_file": "--train-file", "dev_file": "--dev-file", "test_file": "--test-file",
                "text_a": "--text-column", "text_b": "--text-pair-column", "label_column": "--label-column",
                "labels": "--labels", "regression": "--regression", "metric": "--metric"}  # fmt: skip


def _refuse_custom_flags_on_glue(source: Any, data: DataSpec | None, override: dict | None) -> None:
    """A GLUE model's submission files come from its task's folder: custom-data flags would be merged
    into that spec and silently ignored (the task wins), so they are refused, pointing to --input."""
    given = [flag for key, flag in CUSTOM_FLAGS.items() if (override or {}).get(key) not in (None, False)]
    task = (override or {}).get("task") or (data.task if data is not None else None)
    if given and task:
        raise RomebertError(f"{', '.join(given)}: {source} predicts GLUE {task} submission files, which these "
                            "flags do not change; to score your own file: romebert predict MODEL --input FILE "
                            "--text-column COLUMN")  # fmt: skip


def predict_input(
    source: str | Path | EarlyExitClassifier,
    options: FileOptions,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    threshold: Any = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    **runtime: Any,
) -> FileSummary:
    """``romebert predict MODEL --input FILE``: every row of the user's file, whatever the model was trained
    on, into one file in the input's format (:meth:`EarlyExitClassifier.predict_file`).

    ``threshold``: a policy or an entropy threshold; None uses the classifier's exit config.
    """
    if not options.input:
        raise RomebertError("no --input file given")
    clf = (
        source
        if isinstance(source, EarlyExitClassifier)
        else EarlyExitClassifier.from_pretrained(source, device, **runtime)
    )
    policy = as_policy(threshold) if threshold is not None else None
    return clf.predict_file(options.input, options.output, text_column, text_pair_column, criterion=policy,
                            id_column=options.id_column, keep_columns=options.keep_columns,
                            chunk_rows=options.chunk_rows, batch_size=batch_size, resume=options.resume,
                            shard=options.shard, progress=progress)  # fmt: skip
