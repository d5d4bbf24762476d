"""Data-parallel training without DDP's hooks: every rank computes its gradients locally, then one
collective sums them, then (for GR) the projection runs on identical numbers on every rank.

Why not DDP: its backward hooks all-reduce during *each* backward pass, and GR needs two gradients
(g_A on S, and the total) from two passes; the hooked path cannot keep them apart. Summing both
buffers in a single flattened all-reduce after the local passes is exact and costs one collective per
optimizer step.

Launch with ``accelerate launch -m romebert train ...`` or ``torchrun --nproc-per-node N -m romebert
train ...``: both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which is all this
module reads. Plain ``python -m romebert`` runs as one process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_distributed joined the group, so this process leaves it too (close)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` in place across ranks with one collective (flatten, reduce, copy back)."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every rank start from rank 0's weights."""
        if self.enabled:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def all_gather_json(self, obj: object, device: torch.device | str = "cpu") -> list:
        """Every rank's JSON-able ``obj``, in rank order (sent as UTF-8 JSON bytes: no pickle)."""
        if not self.enabled:
            return [obj]
        data = json.dumps(obj).encode("utf-8")
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=device)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf)
        return [json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode("utf-8")) for b, s in zip(bufs, sizes)]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this process joined, once every rank is done with collectives.

        Why: a gloo group still alive at interpreter exit can abort its process (SIGABRT, "terminate called
        without an active exception") as its worker threads are torn down, and the launcher then fails the
        whole run. The barrier keeps a rank from leaving while another still talks to it.
        """
        if self.enabled and self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group the launcher described in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if device.type == "cuda":
        # bind this rank's GPU before NCCL starts: otherwise every rank's communicator and default
        # CUDA context land on GPU 0
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()  # a group the caller made is the caller's to close
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def shard(global_batch: list[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous share of one global batch (shares differ by at most one example)."""
    n, w = len(global_batch), ctx.world_size
    start = ctx.rank * (n // w) + min(ctx.rank, n % w)
    return global_batch[start : start + n // w + (1 if ctx.rank < n % w else 0)]
