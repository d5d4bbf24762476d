"""Every exit's logits of a PyTorch model over a data set, from one pass per batch; per-exit metrics,
sweeps and test predictions at any threshold are computed from that cache (``exits.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.runtime.engine import dataset_exit_logits


def collect_logits(model: Any, dataset: EncodedDataset, collator: Collator | None = None, batch_size: int = 64,
                   precision: str = "fp32"):  # fmt: skip
    """All exits' logits of ``model`` (a ``MultiExitModel``, on its device; on a GPU in ``precision``) for
    ``dataset`` in its own order, [L, N, C] float32, through the engine's one loop (length-sorted batches,
    scattered back). The model's train / eval mode is restored afterwards."""
    was_training = model.training
    pad = collator.pad_token_id if collator is not None else 0
    try:
        return dataset_exit_logits(model.segments(precision), dataset, Collator(pad_token_id=pad, return_tensors="np"),
                                   batch_size)  # fmt: skip
    finally:
        model.train(was_training)


def dataset_labels(dataset: EncodedDataset) -> np.ndarray | None:
    """Labels in dataset order (None for an unlabeled test set)."""
    if not dataset.has_labels:
        return None
    return np.asarray([f["labels"] for f in dataset.features])
