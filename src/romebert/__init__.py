"""romebert: multi-exit (early-exit) transformer classifiers, RomeBERT and DeeBERT training, and early-exit
inference on PyTorch or ONNX Runtime.

The public names below import lazily, so ``import romebert`` stays light: the ONNX runtime path never
loads torch, and the PyTorch names load it only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "EarlyExitClassifier": "romebert.api",
    "Predictions": "romebert.api",
    "EarlyExitConfig": "romebert.artefacts",
    "ExportManifest": "romebert.artefacts",
    "DataSpec": "romebert.data",
    "EarlyExitEngine": "romebert.engine",
    "RomebertError": "romebert.errors",
    "export_run": "romebert.export",
    "MultiExitModel": "romebert.modeling",
    "MultiExitConfig": "romebert.modeling",
    "OrtSegments": "romebert.onnx_runtime",
    "CRITERIA": "romebert.policies",
    "get_policy": "romebert.policies",
    "Trainer": "romebert.trainer",
    "TrainingArguments": "romebert.training_args",
    "PRESETS": "romebert.training_args",
    "train_run": "romebert.pipeline",
    "evaluate_run": "romebert.pipeline",
    "predict_run": "romebert.predict",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'romebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
