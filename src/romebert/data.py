"""Reading GLUE / custom files, tokenizing, dynamic-padding collation and length-grouped batching."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from romebert.errors import RomebertError
from romebert.tasks import TaskSpec

_BOM = b"\xef\xbb\xbf"

# Our split names -> the split names of the HF "nyu-mll/glue" dataset.
HUB_SPLITS: dict[str, str] = {
    "train": "train",
    "dev": "validation",
    "test": "test",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}


@dataclass
class Example:
    """One input row. ``label`` is the label string as written in the file (float for regression)."""

    guid: str
    text_a: str
    text_b: str | None
    label: str | float | None


# --------------------------------------------------------------------------------------------- reading


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of ``data`` without a BOM; bad bytes -> RomebertError naming the line."""
    data = data.removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RomebertError(f"{path}:{line}: file is not valid UTF-8 (byte {data[err.start]:#04x})") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RomebertError(f"{path}: cannot read file: {err.strerror or err}") from None
    return _decode(path, data)


def _split_lines(text: str) -> list[str]:
    """Physical lines without their terminators, with blank trailing lines dropped.

    Splits on "\\n" only: ``str.splitlines`` would also break on characters such as U+2028 or \\x1c
    that can occur inside GLUE sentences.
    """
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _resolve_split_path(task: TaskSpec, data_dir: str | Path, split: str) -> Path:
    """``<data_dir>/<task dir>/<file>``; also accepts ``data_dir`` pointing at the task folder itself."""
    path = task.split_path(data_dir, split)
    if path.is_file():
        return path
    direct = Path(data_dir) / task.split(split).file
    if direct.is_file():
        return direct
    raise RomebertError(f"{task.name} {split} file not found: expected {path}")


def _parse_label(task: TaskSpec, raw: str, where: str) -> str | float:
    raw = raw.strip()
    if task.labels is None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RomebertError(f"{where}: score '{raw}' is not a number for task {task.name}")
        return value
    if raw not in task.labels:
        raise RomebertError(f"{where}: label '{raw}' is not one of {list(task.labels)} for task {task.name}")
    return raw


def read_split(task: TaskSpec, data_dir: str | Path, split: str) -> list[Example]:
    """Read one split of a GLUE task from its TSV file (quoting disabled: text contains quote marks).

    ``data_dir`` is the GLUE root holding ``<TASK>/`` folders (the task folder itself is accepted too).
    """
    spec = task.split(split)
    path = _resolve_split_path(task, data_dir, split)
    lines = _split_lines(_read_text(path))
    if not lines:
        raise RomebertError(f"{path}: file is empty")
    first = 1 if spec.header else 0
    if len(lines) <= first:
        raise RomebertError(f"{path}: file has a header row but no data rows")

    examples: list[Example] = []
    for number, line in enumerate(lines[first:], start=first + 1):
        # A tab split is exactly csv.reader(delimiter="\t", quoting=csv.QUOTE_NONE) for these files.
        cols = line.split("\t") if line else []
        if len(cols) < spec.min_columns:
            raise RomebertError(
                f"{path}:{number}: expected at least {spec.min_columns} tab-separated columns, got {len(cols)}"
            )
        label = None if spec.label is None else _parse_label(task, cols[spec.label], f"{path}:{number}")
        examples.append(
            Example(
                guid=f"{split}-{len(examples)}",
                text_a=cols[spec.text_a],
                text_b=None if spec.text_b is None else cols[spec.text_b],
                label=label,
            )
        )
    return examples


_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def read_custom(
    path: str | Path,
    text_a: str,
    text_b: str | None = None,
    label: str | None = None,
    delimiter: str | None = None,
) -> list[Example]:
    """Read the user's own CSV/TSV file whose header row names the columns.

    The delimiter follows the extension (.csv -> ",", .tsv -> tab) unless given. CSV uses standard
    quoting; TSV has quoting disabled like the GLUE files. Labels are returned as stripped strings
    (turn them into ids with ``label_ids``). Blank lines are skipped.
    """
    path = Path(path)
    if delimiter is None:
        delimiter = _DELIMITERS.get(path.suffix.lower())
        if delimiter is None:
            raise RomebertError(
                f"{path}: cannot tell the delimiter from the extension '{path.suffix}' "
                "(use .csv or .tsv, or give the delimiter)"
            )
    if not path.is_file():
        raise RomebertError(f"{path}: file not found")
    text = _read_text(path)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise RomebertError(f"{path}: file is empty")
        names = [name.strip() for name in header]
        wanted = {"text_a": text_a, "text_b": text_b, "label": label}
        index: dict[str, int] = {}
        for role, column in wanted.items():
            if column is None:
                continue
            if column not in names:
                raise RomebertError(f"{path}: column '{column}' (for {role}) not found; available columns: {names}")
            index[role] = names.index(column)
        needed = max(index.values()) + 1

        examples: list[Example] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < needed:
                raise RomebertError(f"{path}:{reader.line_num}: expected at least {needed} columns, got {len(row)}")
            examples.append(
                Example(
                    guid=f"{path.stem}-{len(examples)}",
                    text_a=row[index["text_a"]],
                    text_b=row[index["text_b"]] if "text_b" in index else None,
                    label=row[index["label"]].strip() if "label" in index else None,
                )
            )
    except csv.Error as err:
        raise RomebertError(f"{path}:{reader.line_num}: malformed {path.suffix or 'delimited'} row: {err}") from None
    if not examples:
        raise RomebertError(f"{path}: file has a header row but no data rows")
    return examples


def load_hub_glue(task: TaskSpec, split: str) -> list[Example]:
    """Load a GLUE split from the Hugging Face hub ("nyu-mll/glue"); needs the optional ``datasets``."""
    task.split(split)  # unknown split -> RomebertError
    if task.hub_name is None:
        raise RomebertError(f"task {task.name} is not part of the nyu-mll/glue hub dataset")
    try:
        import datasets
    except ImportError:
        raise RomebertError(
            "loading GLUE from the Hugging Face hub needs the 'datasets' package: pip install romebert[hub]"
        ) from None
    hub_split = HUB_SPLITS[split]
    try:
        rows = datasets.load_dataset("nyu-mll/glue", task.hub_name, split=hub_split)
    except Exception as err:  # noqa: BLE001 - network, cache and hub errors all become one readable line
        message = " ".join(str(err).split())
        raise RomebertError(f"cannot load nyu-mll/glue/{task.hub_name} split {hub_split}: {message}") from None

    col_a, col_b = task.hub_columns
    examples: list[Example] = []
    for i, row in enumerate(rows):
        raw = row.get("label", -1)
        label: str | float | None
        if task.labels is None:
            label = None if raw is None or raw == -1 or split.startswith("test") else float(raw)
        elif raw is None or int(raw) < 0:  # the hub marks unlabeled (test) rows with -1
            label = None
        else:
            label = task.labels[int(raw)]  # task.labels is ordered like the hub's class ids
        examples.append(
            Example(
                guid=f"{split}-{i}",
                text_a=row[col_a],
                text_b=None if col_b is None else row[col_b],
                label=label,
            )
        )
    return examples


def label_set(examples: Sequence[Example]) -> tuple[str, ...]:
    """The distinct label strings of ``examples``, sorted (numerically when all labels are integers)."""
    found = {str(ex.label) for ex in examples if ex.label is not None}
    if all(_is_int(label) for label in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def label_ids(examples: Sequence[Example], labels: tuple[str, ...] | None) -> list[int | float | None]:
    """Label strings -> class indices (position in ``labels``); regression (``labels=None``) -> floats."""
    ids: list[int | float | None] = []
    if labels is None:
        for ex in examples:
            if ex.label is None:
                ids.append(None)
                continue
            try:
                ids.append(float(ex.label))
            except ValueError:
                raise RomebertError(f"example {ex.guid}: score '{ex.label}' is not a number") from None
        return ids
    position = {label: i for i, label in enumerate(labels)}
    for ex in examples:
        if ex.label is None:
            ids.append(None)
        elif str(ex.label) in position:
            ids.append(position[str(ex.label)])
        else:
            raise RomebertError(f"example {ex.guid}: label '{ex.label}' is not one of {list(labels)}")
    return ids


# -------------------------------------------------------------------------------------------- encoding


@dataclass
class EncodedDataset(Dataset):
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
    """Tokenize ``examples`` (pairs truncated "longest_first" to ``max_seq_length``), without padding."""
    pairs = [ex.text_b is not None for ex in examples]
    if any(pairs) and not all(pairs):
        raise RomebertError("cannot encode a mix of single-sentence and sentence-pair examples")
    ids = label_ids(examples, labels)
    features: list[dict[str, Any]] = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start : start + _ENCODE_CHUNK]
        batch = tokenizer(
            [ex.text_a for ex in chunk],
            [ex.text_b for ex in chunk] if pairs and pairs[0] else None,
            truncation="longest_first",
            max_length=max_seq_length,
            padding=False,
        )
        keys = [key for key in _MODEL_INPUTS if key in batch]
        for i in range(len(chunk)):
            feature = {key: batch[key][i] for key in keys}
            label = ids[start + i]
            if label is not None:
                feature["labels"] = label
            features.append(feature)
    return EncodedDataset(features)


class Collator:
    """Pads a list of features to the longest one in the batch and stacks them into tensors.

    Labels become ``long`` for classification and ``float`` for regression (decided by their Python type).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            raise RomebertError("the tokenizer has no padding token (pad_token_id is None)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, values: list[int], width: int, fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + values if self.padding_side == "left" else values + padding

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in _MODEL_INPUTS:
            if key not in features[0]:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            # Padding Python lists and converting once is ~2x faster than filling a tensor row by row.
            rows = [self._pad(list(f[key]), width, fill) for f in features]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        labelled = ["labels" in f for f in features]
        if any(labelled):
            if not all(labelled):
                raise RomebertError("cannot collate a batch that mixes labeled and unlabeled examples")
            values = [f["labels"] for f in features]
            dtype = torch.float if any(isinstance(v, float) for v in values) else torch.long
            batch["labels"] = torch.tensor(values, dtype=dtype)
        return batch


# -------------------------------------------------------------------------------------------- batching


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Mix seed and epoch so that (seed, epoch + 1) never replays (seed + 1, epoch).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class RandomEpochSampler(Sampler[int]):
    """A plain random permutation per epoch, deterministic for a given (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int = 42) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.num_samples, generator=_epoch_generator(self.seed, self.epoch)).tolist()


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that consecutive ``batch_size`` runs hold examples of similar length.

    Shuffle, cut into mega-batches of ``mega_batch_mult * batch_size``, sort each by length (descending),
    cut into batches and shuffle the batch order. Padding waste drops while batches stay random.
    Deterministic for a given (seed, epoch); call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 42,
        mega_batch_mult: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = _epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(len(self.lengths), generator=generator)
        mega = self.batch_size * max(1, self.mega_batch_mult)
        batches: list[torch.Tensor] = []
        for start in range(0, len(perm), mega):
            chunk = perm[start : start + mega]
            order = torch.argsort(self.lengths[chunk], descending=True, stable=True)
            batches.extend(chunk[order].split(self.batch_size))
        # Only the last batch can be short (mega is a multiple of batch_size). Keep it last: the
        # DataLoader regroups the flat index stream into batch_size runs, and a short batch in the
        # middle would shift every later run across two length groups.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        for batch in shuffled + tail:
            yield from batch.tolist()


def make_dataloader(
    dataset: EncodedDataset,
    batch_size: int,
    collator: Collator,
    shuffle: bool,
    seed: int = 42,
    group_by_length: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``dataset``.

    ``shuffle=False`` (evaluation / prediction) keeps file order, so outputs map back to rows.
    ``shuffle=True`` uses a seeded sampler; call ``set_epoch(loader, epoch)`` at each epoch start.
    """
    sampler: Sampler[int]
    if not shuffle:
        sampler = SequentialSampler(dataset)
    elif group_by_length:
        sampler = LengthGroupedSampler(dataset.lengths, batch_size, seed=seed)
    else:
        sampler = RandomEpochSampler(len(dataset), seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=False,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a loader's shuffling sampler for ``epoch`` (no-op for sequential loaders)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
