"""The user's own files: CSV, TSV and JSON Lines, read a row at a time with the columns named by the
header row (or each object's keys), and written back in the same format (:func:`render_rows`). Bad rows
fail in one line naming the file and line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.data.examples import Example

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
    reader = ExampleReader(records, text_a, text_b, label)
    count = 0
    for number, row in records.rows():
        yield reader.example(number, row, f"{records.path.stem}-{count}")
        count += 1
    if count == 0:
        raise RomebertError(f"{records.path}: file has a header row but no data rows")


class ExampleReader:
    """Turns rows of ``records`` into :class:`Example` s: the text (and pair, label) columns checked once
    against the header, each row's cells checked as it comes (one line naming the file and line)."""

    def __init__(self, records: Records, text_a: str, text_b: str | None = None, label: str | None = None) -> None:
        self.path, self.label = records.path, label
        self.wanted = {"text_a": text_a, "text_b": text_b, "label": label}
        self.check_rows = records.format != JSONL
        if self.check_rows:
            for role, column in self.wanted.items():
                if column is not None and column not in records.columns:
                    raise RomebertError(
                        f"{self.path}: column '{column}' (for {role}) not found; available columns: {records.columns}"
                    )
        wanted = [c for c in self.wanted.values() if c in records.columns]
        self.needed = max((records.columns.index(c) + 1 for c in wanted), default=0)

    def example(self, number: int, row: dict[str, Any], guid: str) -> Example:
        path = self.path
        if self.check_rows and len(row) < self.needed:
            raise RomebertError(f"{path}:{number}: expected at least {self.needed} columns, got {len(row)}")
        values: dict[str, str | None] = {}
        for role, column in self.wanted.items():
            if column is None:
                continue
            if column not in row:
                raise RomebertError(f"{path}:{number}: no '{column}' field (for {role})")
            try:
                values[role] = _cell_text(row[column])
            except ValueError as err:
                raise RomebertError(f"{path}:{number}: '{column}' must be text or a number, got {err}") from None
        if self.label is not None and not (values["label"] or "").strip():
            raise RomebertError(f"{path}:{number}: empty label in column '{self.label}'")
        for role in ("text_a", "text_b"):
            if role in values and values[role] is None:
                raise RomebertError(f"{path}:{number}: '{self.wanted[role]}' is null")
        return Example(
            guid=guid,
            text_a=values["text_a"],  # type: ignore[arg-type]
            text_b=values.get("text_b"),
            label=values["label"].strip() if self.label is not None else None,  # type: ignore[union-attr]
            where=f"{path}:{number}",
        )


def render_rows(fmt: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], header: bool = False) -> str:
    """``rows`` as the text of a file in format ``fmt`` (a delimiter or ``JSONL``), the header row first
    when ``header``. CSV quotes as needed; TSV has no quoting (like the files it reads), so a value with
    a tab or a line break is refused. JSON Lines keeps each row's keys and value types; CSV / TSV write
    ``columns`` in order (a missing value as an empty cell) with :func:`cell_text`."""
    if fmt == JSONL:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    out = io.StringIO()
    quoting = csv.QUOTE_NONE if fmt == "\t" else csv.QUOTE_MINIMAL
    writer = csv.writer(out, delimiter=fmt, quoting=quoting, lineterminator="\n")
    try:
        if header:
            writer.writerow(columns)
        for row in rows:
            writer.writerow([cell_text(row.get(c)) for c in columns])
    except csv.Error:
        raise RomebertError("a value holds a tab or a line break, which a TSV file cannot hold (use CSV)") from None
    return out.getvalue()


def cell_text(value: Any) -> str:
    """A value as a CSV / TSV cell: floats with 6 significant digits, None as empty, the rest as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    try:
        return _cell_text(value) or ""
    except ValueError:  # a JSON list or object
        return json.dumps(value, ensure_ascii=False)
