"""Scoring the rows of a user's file (or a data frame's batch) a chunk at a time: which columns hold the
texts (by default the ones the model was trained on), the early-exit engine on each chunk, and the output
rows a user can join back: an id (or every input column), the label, each class's probability (the value,
for regression) and the exit layer. Torch-free with an export. ``predict_file`` writes these rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.data.custom import JSONL, ExampleReader, Records, open_records

# output columns (after the id column, or every input column)
ROW, PREDICTION, EXIT_LAYER, PROB_PREFIX = "row", "prediction", "exit_layer", "prob_"
DEFAULT_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class FileColumns:
    """The input columns a prediction reads (``text``, ``pair``) and copies (``id``, or all with ``keep``)."""

    text: str
    pair: str | None = None
    id: str | None = None
    keep: bool = False


@dataclass
class PredictionChunk:
    """One chunk of a file: its rows as read and their early-exit predictions, in file order."""

    first_row: int  # 0-based index of the chunk's first data row in the file
    rows: list[tuple[int, dict[str, Any]]]  # (line number, {column: value})
    predictions: Any  # deploy.classifier.Predictions

    def __len__(self) -> int:
        return len(self.rows)


def resolve_columns(clf: Any, records: Records, text: str | None = None, pair: str | None = None,
                    id_column: str | None = None, keep: bool = False) -> FileColumns:  # fmt: skip
    """The columns to read from ``records``, checked against its header (for JSON Lines: the first
    object's keys). Each text column defaults to the one the model was trained on (custom data); a GLUE
    model has none, so ``text`` is then required. A pair model needs a pair column, a single-text model
    refuses one (either would score silently wrong inputs)."""
    trained = clf.text_columns
    where = records.path
    text = text or (trained[0] if trained else None)
    if pair is None and trained:
        pair = trained[1]
    if text is None:
        origin = f"the model was trained on GLUE {clf.task_name}" if clf.task_name else "the model names no column"
        raise RomebertError(f"{where}: give --text-column naming the text column ({origin}); "
                            f"the file's columns: {records.columns}")  # fmt: skip
    for flag, column in (("--text-column", text), ("--text-pair-column", pair), ("--id-column", id_column)):
        if column is not None and column not in records.columns:
            raise RomebertError(f"{where}: no column '{column}' ({flag}); the file's columns: {records.columns}")
    paired = clf.pair_input
    if paired and pair is None:
        raise RomebertError(f"{where}: the model was trained on text pairs; give --text-pair-column "
                            f"(the file's columns: {records.columns})")  # fmt: skip
    if paired is False and pair is not None:
        raise RomebertError(f"{where}: the model was trained on single texts; --text-pair-column {pair} does not apply")
    return FileColumns(text, pair, id_column, keep)


def prediction_columns(label_names: list[str] | None) -> list[str]:
    """The columns a prediction adds: the label (the value, for regression), each class's probability
    (``prob_<label>``) and the exit layer."""
    probs = [PROB_PREFIX + name for name in label_names] if label_names is not None else []
    return [PREDICTION, *probs, EXIT_LAYER]


def _rounded(x: Any) -> float:
    """A float with the 6 significant digits the output files hold (JSON Lines and CSV say the same)."""
    return float(f"{float(x):.6g}")


class RowScorer:
    """A classifier's early-exit engine on rows ``{column: value}`` (from a file, or a data frame's batch).

    ``score(rows)`` runs one chunk through the engine (length-sorted batches of ``batch_size``);
    ``output_rows`` turns a scored chunk into the rows to write.
    """

    def __init__(self, clf: Any, records: Records, columns: FileColumns, engine: Any, batch_size: int = 64) -> None:
        self.clf, self.records, self.columns, self.engine = clf, records, columns, engine
        self.batch_size = batch_size
        self.reader = ExampleReader(records, columns.text, columns.pair)
        head = list(records.columns) if columns.keep else [columns.id or ROW]
        self.added = prediction_columns(clf.label_names)
        clash = sorted(set(head) & set(self.added))
        if clash:
            raise RomebertError(f"{records.path}: input column(s) {clash} would clash with the output's; "
                                "rename them or leave out --keep-columns / --id-column")  # fmt: skip
        self.output_columns = head + self.added

    def score(self, rows: list[tuple[int, dict[str, Any]]], first_row: int = 0) -> PredictionChunk:
        examples = [self.reader.example(number, row, f"row-{first_row + i}") for i, (number, row) in enumerate(rows)]
        return PredictionChunk(first_row, rows, self.clf.predict_examples(examples, self.engine, self.batch_size))

    def output_rows(self, chunk: PredictionChunk) -> list[dict[str, Any]]:
        """One output row per input row: the id (or ``row``, or every input column), then the prediction."""
        p, cols = chunk.predictions, self.columns
        probs = p.probabilities
        names = self.clf.label_names
        out = []
        for i, (number, row) in enumerate(chunk.rows):
            if cols.keep:
                rec = dict(row)
                clash = sorted(set(rec) & set(self.added))  # a CSV header was checked at the start
                if clash:
                    raise RomebertError(f"{self.records.path}:{number}: field(s) {clash} would clash with the output's")
            elif cols.id is not None:
                if cols.id not in row and self.records.format == JSONL:
                    raise RomebertError(f"{self.records.path}:{number}: no '{cols.id}' field (--id-column)")
                rec = {cols.id: row.get(cols.id)}
            else:
                rec = {ROW: chunk.first_row + i}
            if names is None:
                rec[PREDICTION] = _rounded(p.labels[i])
            else:
                rec[PREDICTION] = p.labels[i]
                rec.update((PROB_PREFIX + name, _rounded(v)) for name, v in zip(names, probs[i]))
            rec[EXIT_LAYER] = int(p.exit_layers[i])
            out.append(rec)
        return out


def check_chunk_rows(chunk_rows: int) -> None:
    """A one-line error for a chunk size below one row."""
    if chunk_rows < 1:
        raise RomebertError(f"chunk_rows must be >= 1, got {chunk_rows}")


class FileScorer(RowScorer):
    """A :class:`RowScorer` on the user's file ``path`` (CSV, TSV or JSON Lines, by extension), read a
    chunk at a time: nothing but the current chunk's rows is held."""

    def __init__(self, clf: Any, path: str | Path, engine: Any, text: str | None = None, pair: str | None = None,
                 id_column: str | None = None, keep: bool = False, batch_size: int = 64) -> None:  # fmt: skip
        records = open_records(path)
        super().__init__(clf, records, resolve_columns(clf, records, text, pair, id_column, keep), engine, batch_size)

    def count_rows(self) -> int:
        """The file's data rows (a parsing pass, no model): what ``--shard`` splits."""
        return sum(1 for _ in self.records.rows())

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, start: int = 0, stop: int | None = None
               ) -> Iterator[PredictionChunk]:  # fmt: skip
        """Data rows ``start`` to ``stop`` (0-based, ``stop`` excluded) in chunks of ``chunk_rows``, scored."""
        check_chunk_rows(chunk_rows)
        rows: list[tuple[int, dict[str, Any]]] = []
        first = start
        index = -1
        for index, row in enumerate(self.records.rows()):
            if index < start:
                continue
            if stop is not None and index >= stop:
                break
            rows.append(row)
            if len(rows) == chunk_rows:
                yield self.score(rows, first)
                rows, first = [], index + 1
        if rows:
            yield self.score(rows, first)
        if index < 0:
            raise RomebertError(f"{self.records.path}: file has a header row but no data rows")
