"""ONNX Runtime's quantizer, kept quiet: what it logs and prints while ``deploy/quantize.py`` runs it."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[list[str]]:
    """ONNX Runtime's quantizer logs on the root logger (one "Please consider to run pre-processing" per
    graph: shape inference that dynamic quantization does not need) and prints calibration progress.
    Both are kept from the user; anything else it logs is collected in the yielded list."""
    notes: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname.replace("\\", "/"):
            return True
        if "pre-process" not in record.getMessage() and record.levelno >= logging.WARNING:
            notes.append(record.getMessage().splitlines()[0])
        return False

    root = logging.getLogger()
    guard = logging.NullHandler()  # a root logger without handlers would be given one by logging.warning()
    root.addFilter(keep)
    root.addHandler(guard)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield notes
    finally:
        root.removeFilter(keep)
        root.removeHandler(guard)
