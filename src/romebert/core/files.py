"""Files written so that an interrupted run never leaves one that looks complete, and read back with
one-line errors: atomic writes, strict JSON (numpy types converted), dataclasses from JSON, checksums."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RomebertError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RomebertError(f"{path}: not valid JSON ({exc})") from None
