"""Tokenizing and padding for the model, on any runtime: :func:`encode` (examples -> unpadded token ids),
:class:`FastTokenizer` (``tokenizer.json`` without transformers), :func:`mean_pool_weights` and the
dynamic-padding :class:`Collator`. Torch-free: the ONNX runtime pads with numpy (``return_tensors="np"``);
only ``return_tensors="pt"`` imports torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.data.examples import Example, label_ids


@dataclass
class EncodedDataset:
    """Tokenized, unpadded examples.

    ``features[i]`` holds ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer
    makes them) as lists of ints, and ``labels`` (int or float) when the example is labeled.
    ``lengths[i]`` is the token count, used for length-grouped batching.
    """

    features: list[dict[str, Any]]
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = [len(f["input_ids"]) for f in self.features]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]

    @property
    def has_labels(self) -> bool:
        return bool(self.features) and all("labels" in f for f in self.features)


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Tokenize in chunks: the fast tokenizer's Encoding objects (offsets, tokens) are large, so a single
# call over MNLI's 393k pairs would hold several GB at once.
_ENCODE_CHUNK = 4096


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    labels: tuple[str, ...] | None,
    max_seq_length: int = 128,
) -> EncodedDataset:
    """Tokenize ``examples`` (pairs truncated "longest_first" to ``max_seq_length``), without padding.
    Single texts and pairs may be mixed (a service request can hold both); order is kept."""
    ids = label_ids(examples, labels)
    features: list[dict[str, Any]] = [{} for _ in examples]
    for pair in (False, True):
        todo = [i for i, ex in enumerate(examples) if (ex.text_b is not None) == pair]
        for start in range(0, len(todo), _ENCODE_CHUNK):
            chunk = todo[start : start + _ENCODE_CHUNK]
            batch = tokenizer(
                [examples[i].text_a for i in chunk],
                [examples[i].text_b for i in chunk] if pair else None,
                truncation="longest_first",
                max_length=max_seq_length,
                padding=False,
            )
            keys = [key for key in _MODEL_INPUTS if key in batch]
            for j, i in enumerate(chunk):
                features[i] = {key: batch[key][j] for key in keys}
                if ids[i] is not None:
                    features[i]["labels"] = ids[i]
    return EncodedDataset(features)


class FastTokenizer:
    """A ``tokenizers`` tokenizer (``tokenizer.json``) behind the part of the Hugging Face tokenizer call
    that :func:`encode` makes, so the ONNX runtime tokenizes without transformers. The same backend and
    the same truncation give the same ids as ``AutoTokenizer`` on the folder (tests check it)."""

    def __init__(self, path: str | Path, pad_token_id: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a dependency of every install
            raise RomebertError("the tokenizers package is missing: pip install tokenizers") from exc
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for unreadable files
            raise RomebertError(f"{path}: not a readable tokenizer.json ({str(exc).splitlines()[0]})") from None
        self.backend.no_padding()
        self.pad_token_id = int(pad_token_id)

    def __call__(
        self,
        text_a: Sequence[str],
        text_b: Sequence[str] | None = None,
        truncation: str = "longest_first",
        max_length: int = 128,
        padding: bool = False,
    ) -> dict[str, list[list[int]]]:
        self.backend.enable_truncation(max_length, strategy=truncation)
        inputs = list(text_a) if text_b is None else list(zip(text_a, text_b))
        out = self.backend.encode_batch(inputs)
        return {
            "input_ids": [e.ids for e in out],
            "token_type_ids": [e.type_ids for e in out],
            "attention_mask": [e.attention_mask for e in out],
        }


def mean_pool_weights(mask: np.ndarray) -> np.ndarray:
    """Masked-mean pooling weights [B, T] float32 from a 0/1 mask [B, T]: 1 / (real tokens) on real
    tokens, 0 on padding (an exact sum, one correctly rounded division: the bits of
    ``modeling.pool_weights``). Hosts compute them once per batch for every exit, on any runtime."""
    m = (np.asarray(mask) != 0).astype(np.float32)
    return m / np.maximum(m.sum(1, keepdims=True), np.float32(1.0))


def unpadded_row(mask: np.ndarray) -> bool:
    """Whether ``mask`` is one row of ones, int64 [1, T]. Compared as bytes with a row of ones, not by a
    numpy reduction: at batch size 1 the host's work sits between two graph calls, whose kernels have
    evicted numpy's code from the caches, and a reduction (``mask.all()``) then costs several times a
    bytes comparison. Other masks answer False (the caller takes its general path)."""
    return mask.shape[0] == 1 and mask.dtype == np.int64 and mask.tobytes() == _ones(mask.shape[1])


@lru_cache(maxsize=1024)
def _ones(length: int) -> bytes:
    return np.ones(length, np.int64).tobytes()


class Collator:
    """Pads a list of features to the longest one in the batch and stacks them into arrays.

    ``return_tensors``: "pt" (torch tensors, for the model) or "np" (int64 numpy arrays, for the ONNX
    runtime). Labels become integer for classification and float for regression (by their Python type).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str = "pt",
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            raise RomebertError("the tokenizer has no padding token (pad_token_id is None)")
        if return_tensors not in ("pt", "np"):
            raise RomebertError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors

    def _pad(self, values: list[int], width: int, fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + values if self.padding_side == "left" else values + padding

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, np.ndarray] = {}
        for key in _MODEL_INPUTS:
            if key not in features[0]:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            # Padding Python lists and converting once is ~2x faster than filling an array row by row.
            rows = [self._pad(list(f[key]), width, fill) for f in features]
            batch[key] = np.array(rows, dtype=np.int64).reshape(len(rows), width)
        labelled = ["labels" in f for f in features]
        if any(labelled):
            if not all(labelled):
                raise RomebertError("cannot collate a batch that mixes labeled and unlabeled examples")
            values = [f["labels"] for f in features]
            regression = any(isinstance(v, float) for v in values)
            batch["labels"] = np.array(values, dtype=np.float32 if regression else np.int64)
        if self.return_tensors == "np":
            return batch
        import torch  # only the "pt" flavour needs it (the runtime extra has no torch)

        return {k: torch.from_numpy(v) for k, v in batch.items()}
