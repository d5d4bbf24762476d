"""Result tables and GLUE submission files, written atomically (``core/files.py``).

CSV choice: exit counts are written one column per layer, ``exit_1 .. exit_L`` (not one packed
column), so a spreadsheet or pandas can use them directly.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.files import write_atomic

_STSB_NAMES = {"sts-b", "stsb"}
_STSB_RANGE = (0.0, 5.0)


def _cell(v: Any) -> Any:
    """CSV cell: numpy scalars to python, lists packed as ``a;b;c``, None as empty."""
    if v is None:
        return ""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return ";".join(str(_cell(x)) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _write_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    # Union of keys in first-seen order: rows may carry extra keys (e.g. wall time) added by callers.
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    write_atomic(path, buf.getvalue())


def write_sweep_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Threshold-sweep table (rows from ``exits.sweep``); ``counts`` becomes columns exit_1..exit_L."""
    flat: list[dict[str, Any]] = []
    for row in rows:
        out: dict[str, Any] = {}
        for k, v in row.items():
            if k == "counts":
                for i, c in enumerate(np.asarray(v).reshape(-1).tolist(), start=1):
                    out[f"exit_{i}"] = c
            else:
                out[k] = v
        flat.append(out)
    _write_csv(path, flat)


def write_per_exit_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Per-exit metrics table (rows from ``exits.per_exit_metrics``); adds a leading ``exit`` column
    (1..L, from the row order) unless the rows already carry one."""
    out = [row if "exit" in row else {"exit": i, **row} for i, row in enumerate(rows, start=1)]
    _write_csv(path, out)


def _is_stsb(task: Any) -> bool:
    return str(task.name).strip().lower() in _STSB_NAMES


def write_submission(path: str | os.PathLike[str], preds: Sequence[Any] | np.ndarray, task: Any) -> None:
    """GLUE submission file: header ``index<TAB>prediction``, rows 0..N-1 in input order.

    Classification: ``preds`` are class indices, written as ``task.labels[i]``. Regression: floats as
    ``%.3f``; STS-B predictions are clipped to [0, 5], the range the server scores.
    """
    arr = np.asarray(preds)
    if arr.ndim != 1:
        raise RomebertError(f"{task.name}: predictions must be one value per example, got {arr.shape}")
    lines = ["index\tprediction"]
    if task.is_regression:
        values = arr.astype(np.float64)
        if not np.isfinite(values).all():
            raise RomebertError(f"{task.name}: predictions contain NaN or infinite values")
        if _is_stsb(task):
            values = np.clip(values, *_STSB_RANGE)
        lines += [f"{i}\t{v:.3f}" for i, v in enumerate(values.tolist())]
    else:
        labels = task.labels
        if not labels:
            raise RomebertError(f"{task.name}: task has no label strings to write")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise RomebertError(f"{task.name}: classification predictions must be class indices")
        if arr.size and (arr.min() < 0 or arr.max() >= len(labels)):
            raise RomebertError(
                f"{task.name}: prediction index out of range 0..{len(labels) - 1} "
                f"(got {int(arr.min())}..{int(arr.max())})"
            )
        lines += [f"{i}\t{labels[int(p)]}" for i, p in enumerate(arr.tolist())]
    write_atomic(path, "\n".join(lines) + "\n")


def submission_files(task: Any) -> list[tuple[str, str]]:
    """The task's ``(test split, GLUE submission file name)`` pairs, e.g. ``[("test", "SST-2.tsv")]``."""
    return [(str(split), str(name)) for split, name in task.test_files]
