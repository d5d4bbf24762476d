"""Stand-ins shared by the tests (import as ``from fakes import FakeTask, fake_metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from romebert.data.tasks import SplitSpec, TaskSpec


@dataclass(frozen=True)
class FakeTask(TaskSpec):
    """A :class:`~romebert.data.tasks.TaskSpec` with test defaults: a binary task named SST-2, without
    files, scored by :func:`fake_metrics`. Give fields by keyword."""

    name: str = "SST-2"
    directory: str = "SST-2"
    labels: tuple[str, ...] | None = ("0", "1")
    metric: str = "acc"
    metrics: tuple[str, ...] = ("acc", "err")
    splits: dict[str, SplitSpec] = field(default_factory=dict)
    eval_splits: tuple[str, ...] = ("dev",)
    test_files: tuple[tuple[str, str], ...] = (("test", "SST-2.tsv"),)
    hub_name: str | None = None


def fake_metrics(task: FakeTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and error (classification), or negated and plain MSE (regression)."""
    if task.is_regression:
        mse = float(np.mean((np.asarray(preds) - labels) ** 2))
        return {"neg_mse": -mse, "mse": mse}
    acc = float(np.mean(np.asarray(preds) == np.asarray(labels)))
    return {"acc": acc, "err": 1.0 - acc}


def padded_batches(dataset, batch_size: int, collator) -> list:
    """``dataset`` in file order as (input_ids, attention_mask, token_type_ids) padded batches."""
    out = []
    for start in range(0, len(dataset), batch_size):
        b = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append((b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    return out
