"""Tiny random multi-exit models and data for the export tests (test_export.py, test_single_row.py,
test_quantize.py)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig, RobertaConfig

from romebert.model.modeling import MultiExitConfig, MultiExitModel
from romebert.runtime.encoding import Collator, EncodedDataset

from conftest import sharpen_exits
from tiny import VOCAB

LAYERS = 3


def _backbone_config(family: str):
    common = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                  intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    if family == "roberta":
        return RobertaConfig(**common, max_position_embeddings=70, pad_token_id=0, type_vocab_size=1)
    return BertConfig(**common, max_position_embeddings=64)


def _model(family: str = "bert", pooling: str = "mean", seed: int = 0, num_labels: int = 3) -> MultiExitModel:
    torch.manual_seed(seed)
    labels = ["a", "b", "c", "d"][:num_labels]
    cfg = MultiExitConfig(num_labels=num_labels, pooling=pooling, exit_dropout=0.0, task=None, labels=labels)
    return sharpen_exits(MultiExitModel.from_config(_backbone_config(family), cfg).eval())


def _dataset(n: int = 40, seed: int = 0) -> EncodedDataset:
    rng = np.random.default_rng(seed)
    feats = []
    for _ in range(n):
        length = int(rng.integers(2, 30))
        ids = [2, *rng.integers(5, len(VOCAB), size=length - 2).tolist(), 3]
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "token_type_ids": [0] * length})
    return EncodedDataset(feats)


COLLATE = Collator(pad_token_id=0, return_tensors="np")


def _batches(dataset: EncodedDataset, batch_size: int):
    out = []
    for start in range(0, len(dataset), batch_size):
        b = COLLATE([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out.append((b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    return out


def _threshold(scores: np.ndarray, q: float, avoid: np.ndarray) -> float:
    """A threshold near quantile q of ``scores`` with no score of ``avoid`` within 1e-3 (no near-ties:
    ONNX Runtime and torch logits differ in the last float digits)."""
    s = np.sort(scores.ravel())
    for offset in range(len(s)):
        for i in (int(q * len(s)) + offset, int(q * len(s)) - offset):
            if 0 <= i < len(s) - 1 and s[i + 1] - s[i] > 2e-3:
                t = float((s[i] + s[i + 1]) / 2)
                if np.abs(avoid - t).min() > 1e-3:
                    return t
    raise AssertionError("no robust threshold")
