"""Where examples come from (``DataSpec``), reading GLUE / custom files, tokenizing, and dynamic-padding
collation. Torch-free: the ONNX runtime reads and pads with this module too (``return_tensors="np"``);
training's samplers and loader are in ``batching.py``."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from romebert.errors import RomebertError
from romebert.options import option
from romebert.reports import write_json
from romebert.tasks import TaskSpec, custom_task, get_task

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
    where: str | None = None  # "file:line" of a user's file, for messages


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


# A user's file format, by extension: a delimiter, or JSON Lines (one JSON object per line).
JSONL = "jsonl"
FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": JSONL, ".ndjson": JSONL}


def file_format(path: str | Path, delimiter: str | None = None) -> str:
    """``delimiter`` if given, else the format the extension names ("," for .csv, tab for .tsv, JSONL)."""
    path = Path(path)
    if delimiter is not None:
        return delimiter
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise RomebertError(
            f"{path}: cannot tell the format from the extension '{path.suffix}' "
            f"(use {', '.join(FORMATS)}, or give the delimiter)"
        )
    return fmt


@dataclass
class Records:
    """The rows of a user's CSV / TSV / JSON Lines file, read one at a time (nothing is held but the
    current row): ``columns`` (the header row; for JSON Lines the keys of the first object) and
    ``rows()``, which yields ``(line number, {column: value})``. CSV uses standard quoting; TSV has
    quoting disabled, like the GLUE files. Blank lines are skipped."""

    path: Path
    format: str
    columns: list[str]

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with _open_text(self.path) as f:
            if self.format == JSONL:
                yield from _jsonl_rows(self.path, f)
                return
            reader = _csv_reader(f, self.format)
            line = 0
            try:
                for row in reader:
                    start, line = line + 1, reader.line_num
                    if start == 1 or not any(cell.strip() for cell in row):
                        continue  # the header (read by open_records), or a blank line
                    # a short row lacks its last columns: refused only where one of them is asked for
                    yield start, dict(zip(self.columns, row))
            except csv.Error as err:
                raise RomebertError(f"{self.path}:{reader.line_num}: malformed {self.path.suffix} row: {err}") from None
            except UnicodeDecodeError as err:
                raise RomebertError(f"{self.path}:{line + 1}: file is not valid UTF-8 ({err.reason})") from None


def open_records(path: str | Path, delimiter: str | None = None) -> Records:
    """The user's file ``path`` as :class:`Records`; its header (or first object) is read now, so a
    missing, empty or unreadable file fails in one line before any work."""
    path = Path(path)
    fmt = file_format(path, delimiter)
    if not path.is_file():
        raise RomebertError(f"{path}: file not found")
    with _open_text(path) as f:
        try:
            if fmt == JSONL:
                first = next(_jsonl_rows(path, f), None)
                if first is None:
                    raise RomebertError(f"{path}: file is empty")
                return Records(path, fmt, list(first[1]))
            header = next(_csv_reader(f, fmt), None)
        except UnicodeDecodeError as err:
            raise RomebertError(f"{path}:1: file is not valid UTF-8 ({err.reason})") from None
        except csv.Error as err:
            raise RomebertError(f"{path}:1: malformed header row: {err}") from None
    if header is None or not any(cell.strip() for cell in header):
        raise RomebertError(f"{path}: file is empty (the first line must name the columns)")
    return Records(path, fmt, [name.strip() for name in header])


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise RomebertError(f"{path}: cannot read file: {err.strerror or err}") from None


def _csv_reader(f: Any, delimiter: str):
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    return csv.reader(f, delimiter=delimiter, quoting=quoting)


def _jsonl_rows(path: Path, f: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    try:
        for number, text in enumerate(f, start=1):  # noqa: B007 - the number names a bad line below
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise RomebertError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            if not isinstance(obj, dict):
                raise RomebertError(f"{path}:{number}: not a JSON object (a {type(obj).__name__})")
            yield number, obj
    except UnicodeDecodeError as err:
        raise RomebertError(f"{path}:{number + 1}: file is not valid UTF-8 ({err.reason})") from None


def _cell_text(value: Any) -> str | None:
    """A cell as text: JSON numbers and booleans as written, None (JSON null, a missing cell) as None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return json.dumps(value)
    raise ValueError(type(value).__name__)


def read_custom(
    path: str | Path,
    text_a: str,
    text_b: str | None = None,
    label: str | None = None,
    delimiter: str | None = None,
) -> list[Example]:
    """Read the user's own CSV / TSV / JSON Lines file (the header row, or each object's keys, name the
    columns). Labels are returned as stripped strings (turn them into ids with ``label_ids``); an
    empty or missing label is refused with the file and line (it would otherwise become a class)."""
    return list(iter_custom(open_records(path, delimiter), text_a, text_b, label))


def iter_custom(
    records: Records, text_a: str, text_b: str | None = None, label: str | None = None
) -> Iterator[Example]:
    """:func:`read_custom` one example at a time, each naming its ``file:line`` in ``where``."""
    path = records.path
    wanted = {"text_a": text_a, "text_b": text_b, "label": label}
    if records.format != JSONL:
        for role, column in wanted.items():
            if column is not None and column not in records.columns:
                raise RomebertError(
                    f"{path}: column '{column}' (for {role}) not found; available columns: {records.columns}"
                )
    needed = max((records.columns.index(c) + 1 for c in wanted.values() if c in records.columns), default=0)
    count = 0
    for number, row in records.rows():
        if records.format != JSONL and len(row) < needed:
            raise RomebertError(f"{path}:{number}: expected at least {needed} columns, got {len(row)}")
        values: dict[str, str | None] = {}
        for role, column in wanted.items():
            if column is None:
                continue
            if column not in row:
                raise RomebertError(f"{path}:{number}: no '{column}' field (for {role})")
            try:
                values[role] = _cell_text(row[column])
            except ValueError as err:
                raise RomebertError(f"{path}:{number}: '{column}' must be text or a number, got {err}") from None
        if label is not None and not (values["label"] or "").strip():
            raise RomebertError(f"{path}:{number}: empty label in column '{label}'")
        for role in ("text_a", "text_b"):
            if role in values and values[role] is None:
                raise RomebertError(f"{path}:{number}: '{wanted[role]}' is null")
        yield Example(
            guid=f"{path.stem}-{count}",
            text_a=values["text_a"],  # type: ignore[arg-type]
            text_b=values.get("text_b"),
            label=values["label"].strip() if label is not None else None,  # type: ignore[union-attr]
            where=f"{path}:{number}",
        )
        count += 1
    if count == 0:
        raise RomebertError(f"{path}: file has a header row but no data rows")


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


def _where(ex: Example) -> str:
    return ex.where or f"example {ex.guid}"


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
                raise RomebertError(f"{_where(ex)}: score '{ex.label}' is not a number") from None
        return ids
    position = {label: i for i, label in enumerate(labels)}
    for ex in examples:
        if ex.label is None:
            ids.append(None)
        elif str(ex.label) in position:
            ids.append(position[str(ex.label)])
        else:
            raise RomebertError(f"{_where(ex)}: label '{ex.label}' is not one of {list(labels)}")
    return ids


# ------------------------------------------------------------------------------------ the data of a run


@dataclass
class DataSpec:
    """Where a run's examples come from: a GLUE task (TSV folder or the hub) or the user's own files."""

    task: str | None = option(None, "GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    data_dir: str | None = option(None, "GLUE folder in the classic layout (<dir>/<TASK>/train.tsv ...)")
    hub: bool = option(False, "load GLUE from the Hugging Face hub (needs romebert[hub] and a network)")
    train_file: str | None = option(None, "your own train file: CSV, TSV or JSON Lines")
    dev_file: str | None = option(None, "your own dev file: CSV, TSV or JSON Lines")
    test_file: str | None = option(None, "your own test file: CSV, TSV or JSON Lines")
    text_a: str | None = option(None, "custom data: column of the (first) text", flag="--text-column")
    text_b: str | None = option(None, "custom data: column of the second text, if any", flag="--text-pair-column")
    label_column: str | None = option(None, "custom data: column of the label")
    labels: list[str] | None = option(None, "custom data: the label set (default: read from the train file)")
    regression: bool = option(False, "custom data: the label is a number")
    metric: str | None = option(None, "custom data: accuracy, f1, mcc, pearson or spearman")
    max_seq_length: int = option(128, "tokens per input (pairs truncated longest-first)")
    max_train_examples: int | None = option(None, "train on a seeded random subset of this many examples")
    subset_seed: int = option(0, "seed of that subset")
    extra: dict = option(default_factory=dict, cli=False)

    @property
    def is_custom(self) -> bool:
        return self.task is None

    def validate(self) -> None:
        if self.is_custom:
            if not self.train_file and not self.dev_file and not self.test_file:
                raise RomebertError("give --task (a GLUE task) or --train-file/--dev-file/--test-file (your own data)")
            if not self.text_a:
                raise RomebertError("custom data needs --text-column naming the text column")
        else:
            get_task(self.task)
            if self.data_dir is None and not self.hub:
                raise RomebertError(f"task {self.task}: give --data-dir (GLUE TSV folder) or --hub")
            if self.data_dir is not None and not Path(self.data_dir).is_dir():
                raise RomebertError(f"--data-dir {self.data_dir}: no such folder")

    def task_spec(self) -> TaskSpec:
        if not self.is_custom:
            return get_task(self.task)
        labels = None
        if not self.regression:
            labels = tuple(self.labels) if self.labels else label_set(self._custom_examples(self.train_file))
        return custom_task(labels, metric=self.metric, pair=self.text_b is not None)

    def replaced(self, override: dict[str, Any] | None) -> DataSpec:
        """A copy with the fields of ``override`` that are not None (data flags given to evaluate / predict)."""
        if not override:
            return self
        return DataSpec(**{**asdict(self), **{k: v for k, v in override.items() if v is not None}})

    def task_for(self, trained_task: str | None, trained_labels: Sequence[str] | None, num_labels: int) -> TaskSpec:
        """The task of a model trained for ``trained_task`` with ``trained_labels`` (None: regression) on
        this data; a model of another task or label set is refused in one line. For custom data the
        label set is the one the model was trained on."""
        trained = list(trained_labels) if trained_labels is not None else None
        if self.is_custom:
            return custom_task(tuple(trained) if trained else None, metric=self.metric, pair=self.text_b is not None)
        task = get_task(self.task)
        expected = list(task.labels) if task.labels is not None else None
        if num_labels != task.num_labels or (trained is not None and trained != expected):
            raise RomebertError(
                f"the model was trained for {trained_task or 'another task'} with labels {trained} "
                f"({num_labels} outputs); task {task.name} needs {expected} ({task.num_labels} outputs)"
            )
        return task

    def _custom_examples(self, path: str | None) -> list[Example]:
        if path is None:
            raise RomebertError("no file given for this split")
        return read_custom(path, self.text_a, self.text_b, self.label_column)

    def examples(self, split: str) -> list[Example]:
        if self.is_custom:
            path = {"train": self.train_file, "dev": self.dev_file, "test": self.test_file}.get(split)
            if path is None:
                raise RomebertError(f"no --{split}-file given")
            rows = read_custom(path, self.text_a, self.text_b, None if split == "test" else self.label_column)
        elif self.hub:
            rows = load_hub_glue(get_task(self.task), split)
        else:
            rows = read_split(get_task(self.task), self.data_dir, split)
        if split == "train" and self.max_train_examples and self.max_train_examples < len(rows):
            rows = random.Random(self.subset_seed).sample(rows, self.max_train_examples)
        return rows

    def check_inputs(self, splits: Sequence[str], with_tests: bool = False) -> dict[str, list[Example]]:
        """Read every split a job will use (and, ``with_tests``, every submission input) now, so that a
        missing file, a missing column or a label outside the task's set fails in one line before any
        training rather than after it. Returns the examples of ``splits``, for the caller to use."""
        self.validate()
        task = self.task_spec()
        read: dict[str, list[Example]] = {}
        for split in splits:
            examples = self.examples(split)
            if not examples:
                raise RomebertError(f"the {split} split has no examples")
            try:
                label_ids(examples, task.labels)
            except RomebertError as exc:
                if self.is_custom:
                    raise  # the message names the file and line
                raise RomebertError(f"{self.describe(split)}: {exc}") from None
            read[split] = examples
        if with_tests:
            for test_task, split, _ in self.test_files():
                if test_task is None or test_task.name == task.name:
                    self.examples(split)
                elif self.data_dir is not None:  # AX for MNLI: another task's folder
                    read_split(test_task, self.data_dir, split)
        return read

    def describe(self, split: str) -> str:
        """Where ``split`` comes from, for messages."""
        if self.is_custom:
            return str({"train": self.train_file, "dev": self.dev_file, "test": self.test_file}.get(split))
        return f"{self.task} {split} ({'the hub' if self.hub else self.data_dir})"

    def eval_splits(self) -> list[str]:
        if self.is_custom:
            return ["dev"] if self.dev_file else []
        return list(get_task(self.task).eval_splits)

    def test_files(self) -> list[tuple[TaskSpec | None, str, str]]:
        """(task whose files to read, split, output file name) for every submission file.

        The task is None for custom data: its labels come from the trained model (``run_task``).
        """
        if self.is_custom:
            return [(None, "test", "predictions.tsv")] if self.test_file else []
        task = get_task(self.task)
        out = [(task, split, name) for split, name in task.test_files]
        if task.name == "MNLI":  # GLUE's diagnostic set is predicted by the MNLI model
            out += [(get_task("AX"), split, name) for split, name in get_task("AX").test_files]
        return out

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> DataSpec:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        except FileNotFoundError:
            raise RomebertError(f"{path}: not found (is this a run folder made by 'romebert train'?)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RomebertError(f"{path}: not a valid run file ({exc})") from None
        return cls(**data)


# -------------------------------------------------------------------------------------------- encoding


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
