"""One forward pass over a data set that caches every exit's logits; everything else (per-exit metrics,
threshold sweeps, test predictions at any threshold) is computed from that cache in ``exits.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from romebert.model.modeling import MultiExitModel
from romebert.runtime.encoding import Collator, EncodedDataset


@torch.no_grad()
def collect_logits(
    model: MultiExitModel,
    dataset: EncodedDataset,
    collator: Collator,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """All exits' logits for ``dataset`` in its own order, shape [L, N, C] (float32).

    Batches are built from length-sorted indices (far less padding) and scattered back to input order;
    padding does not change a result, so the order is invisible in the output.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = np.argsort(np.asarray(dataset.lengths), kind="stable")
    out = np.empty((model.num_layers, len(dataset), model.config.num_labels), dtype=np.float32)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator([dataset[int(i)] for i in idx])
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()})  # [L, b, C]
            out[:, idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def dataset_labels(dataset: EncodedDataset) -> np.ndarray | None:
    """Labels in dataset order (None for an unlabeled test set)."""
    if not dataset.has_labels:
        return None
    return np.asarray([f["labels"] for f in dataset.features])
