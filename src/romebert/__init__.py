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
    "EarlyExitClassifier": "romebert.deploy.classifier",
    "Predictions": "romebert.deploy.classifier",
    "EarlyExitConfig": "romebert.runtime.artefacts",
    "ExportManifest": "romebert.runtime.artefacts",
    "DataSpec": "romebert.data.spec",
    "EarlyExitEngine": "romebert.runtime.engine",
    "RomebertError": "romebert.core.errors",
    "export_run": "romebert.deploy.export",
    "MultiExitModel": "romebert.model.modeling",
    "MultiExitConfig": "romebert.model.modeling",
    "OrtSegments": "romebert.runtime.onnx_runtime",
    "CRITERIA": "romebert.runtime.policies",
    "get_policy": "romebert.runtime.policies",
    "Trainer": "romebert.training.trainer",
    "TrainingArguments": "romebert.training.training_args",
    "PRESETS": "romebert.training.training_args",
    "train_run": "romebert.jobs.pipeline",
    "evaluate_run": "romebert.jobs.pipeline",
    "predict_run": "romebert.jobs.predict",
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
