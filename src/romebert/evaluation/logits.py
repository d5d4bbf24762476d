"""Every exit's logits of a PyTorch model over a data set, from one pass per batch; per-exit metrics,
sweeps and test predictions at any threshold are computed from that cache (``exits.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.runtime.engine import dataset_exit_outputs


def collect_logits(model: Any, dataset: EncodedDataset, collator: Collator | None = None, batch_size: int = 64,
                   precision: str = "fp32"):  # fmt: skip
    """All exits' logits [L, N, C] float32 of ``model`` over ``dataset``, in its order (:func:`collect_outputs`)."""
    return collect_outputs(model, dataset, collator, batch_size, precision)[0]


def collect_outputs(model: Any, dataset: EncodedDataset, collator: Collator | None = None, batch_size: int = 64,
                    precision: str = "fp32", features: tuple[str, ...] = ()):  # fmt: skip
    """(logits, features): all exits' logits of ``model`` (a ``MultiExitModel``, on its device; on a GPU in
    ``precision``) for ``dataset`` in its own order, [L, N, C] float32, through the engine's one loop
    (length-sorted batches, scattered back), and the per-exit ``features`` asked for ([L, N] each). The
    model's train / eval mode is restored afterwards."""
    was_training = model.training
    pad = collator.pad_token_id if collator is not None else 0
    try:
        return dataset_exit_outputs(model.segments(precision), dataset, Collator(pad_token_id=pad, return_tensors="np"),
                                    batch_size, features)  # fmt: skip
    finally:
        model.train(was_training)


def dataset_labels(dataset: EncodedDataset) -> np.ndarray | None:
    """Labels in dataset order (None for an unlabeled test set)."""
    if not dataset.has_labels:
        return None
    return np.asarray([f["labels"] for f in dataset.features])
