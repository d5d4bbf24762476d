"""What ``romebert export`` measures on the run's dev split once the graphs are written.

* Every exit's dev metrics, of the fp32 model the user trained (the run's evaluation cache when it holds
  this model's logits, else one PyTorch pass) and of the exported graphs: what the int8 recipe costs,
  exit by exit (``manifest.dev_metrics``; the CLI prints the differences).
* The threshold, chosen with the exported graphs' own logits (a threshold does not carry over unchanged
  between precisions). ``--max-metric-drop`` counts against the fp32 model's final exit by default, so
  "within one point" means within one point of the model the user trained, whatever the export's own
  final exit lost; ``--drop-against exported`` counts against the export's own final exit instead. The
  choice record says which (``evaluation.exits.choice_record``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.runs import RunFolder
from romebert.data.spec import DataSpec
from romebert.deploy.export_options import ExportOptions
from romebert.runtime.artefacts import EarlyExitConfig, ExportManifest
from romebert.runtime.encoding import Collator, encode
from romebert.runtime.engine import dataset_exit_logits


def dev_step(model: Any, run: RunFolder, data: DataSpec, tokenizer: Any, opts: ExportOptions, criterion: str,
             policy_kw: dict[str, Any], temperatures: list[float] | None,
             batch_size: int) -> Callable[[Path, ExportManifest], None] | None:  # fmt: skip
    """The export's dev step (``export_model(on_dev=...)``), or None when there is nothing to measure and
    nothing to choose. Refuses, before any graph is written, a threshold choice without labeled dev data."""
    from romebert.evaluation.logits import dataset_labels

    choose = opts.threshold is None
    split = data.eval_splits()[0] if data.eval_splits() else None
    if split is None:
        if choose:
            raise RomebertError("this run has no dev split to choose a threshold on: give --threshold")
        return None
    task = data.task_spec()
    dataset = encode(data.examples(split), tokenizer, task.labels, data.max_seq_length)
    labels = dataset_labels(dataset)
    if labels is None:
        if choose:
            raise RomebertError(f"split {split} has no labels to choose a threshold on: give --threshold")
        return None
    collator = Collator(tokenizer, return_tensors="np")

    def step(folder: Path, manifest: ExportManifest) -> None:
        from romebert.evaluation.exits import per_exit_metrics
        from romebert.runtime.onnx_runtime import OrtSegments

        exported = dataset_exit_logits(OrtSegments(folder, manifest), dataset, collator, batch_size)
        fp32 = fp32_dev_logits(model, run, split, dataset, labels, collator, batch_size)
        fp32_metrics = per_exit_metrics(fp32, labels, task)
        manifest.dev_metrics = {"split": split, "metric": task.metric, "fp32": fp32_metrics,
                                "exported": per_exit_metrics(exported, labels, task)}  # fmt: skip
        if choose:
            manifest.early_exit = _choose(exported, labels, task, split, float(fp32_metrics[-1][task.metric]), opts,
                                          criterion, policy_kw, temperatures)  # fmt: skip

    return step


def fp32_dev_logits(model: Any, run: RunFolder, split: str, dataset: Any, labels: np.ndarray, collator: Collator,
                    batch_size: int) -> np.ndarray:  # fmt: skip
    """Every exit's dev logits [L, N, C] of the trained fp32 model: the run's evaluation cache when it is
    this split's (same shape, same labels), else one PyTorch pass."""
    from romebert.evaluation.evaluate import load_cached

    cache = run.eval(split)
    if cache.has_cache():
        logits, cached_labels = load_cached(cache)
        shape = (model.num_layers, len(labels), model.config.num_labels)
        if logits.shape == shape and np.array_equal(cached_labels, labels):
            return logits
    return dataset_exit_logits(model, dataset, collator, batch_size)


def _choose(
    logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    split: str,
    fp32_final: float,
    opts: ExportOptions,
    criterion: str,
    policy_kw: dict[str, Any],
    temperatures: list[float] | None,
) -> EarlyExitConfig:
    """The threshold on the exported graphs' dev logits, the drop counted against ``opts.drop_against``."""
    from romebert.evaluation.calibration import apply_temperatures
    from romebert.evaluation.exits import choice_record, choose_threshold

    if temperatures is not None:  # (a temperature never changes an exit's argmax, so the metrics stand)
        logits = apply_temperatures(logits, temperatures)
    # (a guarantee, --confidence, bounds the disagreement with the export's own final exit)
    against = opts.drop_against if opts.risk_confidence is None else "exported"
    threshold, row = choose_threshold(logits, labels, task, criterion, target_speedup=opts.target_speedup,
                                      max_metric_drop=opts.max_metric_drop, confidence=opts.risk_confidence,
                                      reference_metric=fp32_final if against == "fp32" else None,
                                      **policy_kw)  # fmt: skip
    chosen = choice_record(row, split, task, opts.target_speedup, opts.max_metric_drop, against, fp32_final)
    return EarlyExitConfig(criterion=criterion, threshold=threshold, temperatures=temperatures, chosen=chosen,
                           **policy_kw)  # fmt: skip


def dev_delta_lines(manifest: ExportManifest) -> list[str]:
    """The export's per-exit dev metrics against the fp32 model, one line per metric (in points)."""
    dev = manifest.dev_metrics
    if not dev:
        return []
    lines = []
    for key in dev["fp32"][0]:
        deltas = [100 * (e[key] - f[key]) for f, e in zip(dev["fp32"], dev["exported"], strict=True)]
        fp32_final = 100 * dev["fp32"][-1][key]
        lines.append(f"  {manifest.precision} - fp32 on {dev['split']}, {key} (fp32 final exit {fp32_final:.2f}), "
                     f"exits 1..{len(deltas)}: " + " ".join(f"{d:+.2f}" for d in deltas))  # fmt: skip
    return lines
