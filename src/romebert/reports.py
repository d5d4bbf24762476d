"""Writing results: JSON, CSV tables and GLUE submission files.

Every writer is atomic (temp file in the target directory, then ``os.replace``), so an interrupted
run never leaves a half-written result that looks complete. Parent directories are created.

CSV choice: exit counts are written one column per layer, ``exit_1 .. exit_L`` (not one packed
column), so a spreadsheet or pandas can use them directly.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from romebert.errors import RomebertError

_STSB_NAMES = {"sts-b", "stsb"}
_STSB_RANGE = (0.0, 5.0)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, ``\\n`` newlines kept) to ``path`` atomically.

    A temp file in the target directory is written, fsynced and renamed over ``path``, so a reader
    (or a run interrupted mid-write) sees the old file or the new one, never half of it. Parent
    directories are created; failures are one-line :class:`RomebertError`s naming the file.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise RomebertError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise RomebertError(f"cannot write {target}: {e.strerror or e}") from None
        raise


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, paths and dataclasses to plain JSON values.

    Non-finite floats (e.g. a NaN correlation of constant predictions) become ``null``, so the file is
    strict JSON that any tool can read.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if obj is None or isinstance(obj, str):
        return obj
    raise RomebertError(f"cannot write a value of type {type(obj).__name__} to JSON")


def dataclass_from_json(cls: type, data: Any, where: str, what: str = "") -> Any:
    """``cls(**data)`` from a parsed JSON object; anything else, an unknown field, or a value ``cls``
    refuses ends in one line naming ``where`` (the file)."""
    if not isinstance(data, dict):
        raise RomebertError(f"{where}: the {what or 'config'} must be a JSON object")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise RomebertError(f"{where}: unknown {what + ' ' if what else ''}fields {unknown}")
    try:
        return cls(**data)
    except (RomebertError, TypeError) as exc:
        raise RomebertError(f"{where}: {exc}") from None


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON, atomically (numpy types converted)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    write_atomic(path, text)


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
