"""Predicting a whole file, as ``romebert predict MODEL --input FILE`` and
``EarlyExitClassifier.predict_file`` do: read a chunk, score it, append its rows to a partial output,
and rename the output into place when every row is in. Memory holds one chunk, whatever the file's size.

    <dir>/<name>                   the output (appears only when complete)
    <dir>/.<name>.partial          the rows written so far
    <dir>/.<name>.partial.json     rows done, bytes written and the settings (what --resume checks)

``--shard K/N`` scores contiguous, chunk-aligned row ranges, so the shards' outputs concatenated in
order (:func:`merge_outputs`) are the unsharded output, byte for byte.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.core.files import read_json, to_jsonable, write_atomic, write_json
from romebert.core.options import option
from romebert.core.progress import Progress
from romebert.data.custom import JSONL, file_format, open_records, render_rows
from romebert.deploy.file_scoring import DEFAULT_CHUNK_ROWS, FileScorer, check_chunk_rows
from romebert.deploy.memory import trim_c_heap

STATE_VERSION = 1


@dataclass
class FileOptions:
    """``romebert predict MODEL --input FILE``: what to read and where the rows go (the text columns are
    the data flags ``--text-column`` / ``--text-pair-column``)."""

    input: str | None = option(None, "score this CSV, TSV or JSON Lines file (by extension) instead of "
                               "writing GLUE submission files")  # fmt: skip
    output: str | None = option(
        None,
        "output file, in the input's format (default: ./<input stem>.predictions"
        ".<ext>, with .shard-K-of-N before the extension for --shard)",
        aliases=("-o",),
    )
    id_column: str | None = option(None, "input column copied to the output to join on (default: 'row', the "
                                   "0-based data row)")  # fmt: skip
    keep_columns: bool = option(False, "copy every input column to the output")
    chunk_rows: int = option(DEFAULT_CHUNK_ROWS, "rows read, scored and written at a time")
    resume: bool = option(False, "continue an interrupted run from its partial output (same file and settings)")
    shard: str | None = option(None, "K/N: score only part K (0-based) of N contiguous parts of the input")


@dataclass
class FileSummary:
    """What :func:`predict_file` wrote."""

    output: Path
    rows: int  # rows in the output
    resumed_rows: int  # of which an earlier, interrupted run had written
    seconds: float  # this run's
    rows_per_second: float  # this run's
    mean_exit_layer: float | None  # of the rows this run scored (None when it scored none)
    policy: dict[str, Any]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise RomebertError(f"--shard must be K/N (part K, from 0, of N), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise RomebertError(f"--shard {text}: need 0 <= K < N")
    return k, n


def shard_range(rows: int, k: int, n: int, chunk_rows: int) -> tuple[int, int]:
    """Data rows [start, stop) of part ``k`` of ``n``: the chunks are split into ``n`` contiguous runs,
    so every shard scores exactly the chunks an unsharded run would, and the parts concatenate to it."""
    chunks = -(-rows // chunk_rows)
    return min(k * chunks // n * chunk_rows, rows), min((k + 1) * chunks // n * chunk_rows, rows)


def default_output(path: str | Path, shard: str | None = None) -> Path:
    """``./<stem>.predictions.<ext>`` (``.shard-K-of-N`` before the extension for a shard)."""
    path = Path(path)
    part = ".shard-{}-of-{}".format(*parse_shard(shard)) if shard else ""
    return Path(f"{path.stem}.predictions{part}{path.suffix}")


def predict_file(clf: Any, engine: Any, path: str | Path, output: str | Path | None = None,
                 text_column: str | None = None, text_pair_column: str | None = None, *,
                 id_column: str | None = None, keep_columns: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 batch_size: int = 64, resume: bool = False, shard: str | None = None,
                 progress: bool = False) -> FileSummary:  # fmt: skip
    """Score every row of ``path`` (or its shard) with ``clf`` under ``engine`` into ``output``.

    Rows go out in input order, one chunk of ``chunk_rows`` at a time, to a partial file renamed into
    place at the end; ``resume`` continues a partial file left by an interrupted run with the same
    settings (else it starts again). The columns are checked before any row is scored.
    """
    path = Path(path)
    check_chunk_rows(chunk_rows)  # before anything is read or written
    scorer = FileScorer(clf, path, engine, text_column, text_pair_column, id_column, keep_columns, batch_size)
    out = Path(output) if output is not None else default_output(path, shard)
    if out.resolve() == path.resolve():
        raise RomebertError(f"{out}: the output would overwrite the input")
    start, stop = 0, None
    if shard:
        k, n = parse_shard(shard)
        start, stop = shard_range(scorer.count_rows(), k, n, chunk_rows)
    stat = path.stat()
    settings = {"input": str(path.resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
                "columns": scorer.output_columns, "text": [scorer.columns.text, scorer.columns.pair],
                "policy": engine.policy.params(), "temperatures": engine.temperatures, "labels": clf.label_names,
                "chunk_rows": chunk_rows, "batch_size": batch_size, "shard": shard, "rows": [start, stop]}  # fmt: skip
    fmt = scorer.records.format
    partial = PartialOutput(out, settings)
    done = partial.open(resume, render_rows(fmt, scorer.output_columns, [], header=fmt != JSONL))
    bar = Progress(f"predict {path.name}", None if stop is None else stop - start, progress, initial=done)
    layers, scored = 0, 0
    try:
        for chunk in scorer.chunks(chunk_rows, start + done, stop):
            partial.append(render_rows(fmt, scorer.output_columns, scorer.output_rows(chunk)), len(chunk))
            layers += int(chunk.predictions.exit_layers.sum())
            scored += len(chunk)
            bar.update(len(chunk))
            # glibc keeps freed blocks for reuse, and ONNX Runtime asks for blocks of ever new sizes (every
            # batch has its own shape): without this the heap creeps up chunk after chunk and holds the largest
            # chunk's memory between chunks (results/predict_memory.md has the figures)
            trim_c_heap()
    finally:
        partial.close()
    bar.close()
    partial.publish()
    return FileSummary(out, done + scored, done, time.perf_counter() - bar.start, bar.rate,
                       layers / scored if scored else None, engine.policy.params())  # fmt: skip


class PartialOutput:
    """The output file while it is written: ``.<name>.partial`` and its state ``.<name>.partial.json``.
    Each chunk's bytes are on disk (fsync) before the state counts them, so the state never claims
    rows that a crash lost; the output's name appears only through :meth:`publish`."""

    def __init__(self, target: Path, settings: dict[str, Any]) -> None:
        self.target = target
        self.data = target.with_name(f".{target.name}.partial")
        self.state = target.with_name(f".{target.name}.partial.json")
        self.settings = json.loads(json.dumps(to_jsonable(settings)))  # as the state file will read back
        self.rows = 0
        self.file: Any = None

    def open(self, resume: bool, header: str) -> int:
        """Open for appending; returns the rows already written (0 unless resuming)."""
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RomebertError(f"cannot write {self.target}: {err.strerror or err}") from None
        if resume and self.state.is_file() and self.data.is_file():
            state = read_json(self.state)
            old = state.get("settings", {}) if isinstance(state, dict) else {}
            changed = [k for k in self.settings if old.get(k) != self.settings[k]]
            if changed:
                raise RomebertError(f"{self.data}: written with other settings ({', '.join(changed)} differ); "
                                    "run again without --resume")  # fmt: skip
            if self.data.stat().st_size < state["bytes"]:
                raise RomebertError(f"{self.data}: shorter than its state says; run again without --resume")
            self.file = self._open("r+b")
            self.file.truncate(state["bytes"])  # drop a chunk written after the last state
            self.file.seek(0, os.SEEK_END)
            self.rows = int(state["rows"])
            return self.rows
        self.file = self._open("wb")
        self.append(header, 0)
        return 0

    def _open(self, mode: str):
        try:
            return open(self.data, mode)  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise RomebertError(f"cannot write {self.data}: {err.strerror or err}") from None

    def append(self, text: str, rows: int) -> None:
        try:
            self.file.write(text.encode("utf-8"))
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            raise RomebertError(f"cannot write {self.data}: {err.strerror or err}") from None
        self.rows += rows
        write_json(self.state, {"version": STATE_VERSION, "rows": self.rows, "bytes": self.file.tell(),
                                "settings": self.settings})  # fmt: skip

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def publish(self) -> None:
        """Rename the complete output into place and drop the state."""
        os.replace(self.data, self.target)
        self.state.unlink(missing_ok=True)


def merge_outputs(parts: list[str | Path], output: str | Path) -> Path:
    """The outputs of ``--shard 0/N`` .. ``N-1/N`` (in that order) as one file, atomically: the first's
    header once, then every part's rows. Equal to the unsharded run's output."""
    if not parts:
        raise RomebertError("nothing to merge")
    fmt = file_format(parts[0])
    header = b""
    if fmt != JSONL:
        header = render_rows(fmt, open_records(parts[0]).columns, [], header=True).encode("utf-8")
    pieces = [header]
    for part in parts:
        data = Path(part).read_bytes()
        if not data.startswith(header):
            raise RomebertError(f"{part}: its header differs from {parts[0]}'s; not parts of one output")
        pieces.append(data[len(header) :])
    write_atomic(output, b"".join(pieces))
    return Path(output)
