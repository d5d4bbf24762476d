"""Reading GLUE: a task's TSV files in the classic ``download_glue_data.py`` layout (quoting disabled: the
texts hold quote marks), or the Hugging Face hub's ``nyu-mll/glue``. Bad files fail in one line naming
the file and line."""

from __future__ import annotations

import math
from pathlib import Path

from romebert.core.errors import RomebertError
from romebert.data.examples import Example
from romebert.data.tasks import TaskSpec

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
