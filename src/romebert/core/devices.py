"""Which device a process computes on. Torch is imported only when a device is asked for."""

from __future__ import annotations

import contextlib
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


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: fp32 on the CPU (bf16 autocast is slower than fp32 on most CPUs); on a GPU, bf16 where it
    has bf16 matrix units (fp32's range: no loss scale, half the activation memory), else fp32."""
    import torch

    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context for ``precision`` ("bf16", "fp16"; a no-op for "fp32")."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtypes[precision])
