"""Stand-ins shared by the tests (import as ``from fakes import FakeTask, fake_metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FakeTask:
    """Stand-in for romebert.tasks.TaskSpec with the attributes exits, sweeps and writers use."""

    name: str = "SST-2"
    labels: tuple[str, ...] | None = ("0", "1")
    metric: str = "acc"
    metrics: tuple[str, ...] = ("acc", "err")
    test_files: tuple[tuple[str, str], ...] = (("test", "SST-2.tsv"),)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def fake_metrics(task: FakeTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and error (classification), or negated and plain MSE (regression)."""
    if task.is_regression:
        mse = float(np.mean((np.asarray(preds) - labels) ** 2))
        return {"neg_mse": -mse, "mse": mse}
    acc = float(np.mean(np.asarray(preds) == np.asarray(labels)))
    return {"acc": acc, "err": 1.0 - acc}
