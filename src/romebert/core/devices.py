"""Which device a process computes on. Torch is imported only when a device is asked for."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``, as a multi-process launcher numbers them) when
    CUDA is available, else the CPU; any other name (``cpu``, ``cuda:1``) as it is."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)
