"""Batched early-exit inference: run layer by layer and drop the samples that have left.

After layer i, only the rows still in the batch go through exit head i; the policy decides who leaves;
the leavers' logits are written to the output rows they came from (``index_copy_``), and the hidden
states, the 2-D mask, the policy state and the row map are compacted with ``index_select``. Trailing
columns that are padding for every remaining row are cut off, so a batch also gets shorter as its long
samples leave. The loop stops as soon as no row is left.

One host synchronisation per layer (the exit mask is read once, to size the compaction); everything
else is tensor ops over the batch, so batch size 1 takes the same path with little overhead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from romebert.errors import RomebertError
from romebert.modeling import MultiExitModel
from romebert.policies import ExitPolicy


@dataclass
class EngineOutput:
    """Results in input order."""

    logits: Tensor  # [N, C] float32: the chosen exit's logits (divided by its temperature, if any)
    exit_layer: Tensor  # [N] int64 on the CPU, 1-based
    layer_work: int  # rows x layers actually run through an encoder layer
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (rows, columns) entering each layer run

    @property
    def token_work(self) -> int:
        """Padded tokens x layers actually computed (what the encoder's cost scales with)."""
        return sum(b * t for b, t in self.shapes)


class EarlyExitEngine:
    """Early-exit inference of a :class:`MultiExitModel` under an exit ``policy``.

    ``temperatures``: one per exit (from :mod:`romebert.calibration`); exit i's logits are divided by
    ``temperatures[i]`` before the policy sees them, and the returned logits are the scaled ones.
    Padding is assumed on the right (trailing padding columns are trimmed).
    """

    def __init__(self, model: MultiExitModel, policy: ExitPolicy, temperatures: Sequence[float] | None = None) -> None:
        self.model = model.eval()
        self.policy = policy
        if temperatures is not None:
            temperatures = [float(t) for t in temperatures]
            if len(temperatures) != model.num_layers:
                raise RomebertError(f"temperatures: need one per exit ({model.num_layers}), got {len(temperatures)}")
            if min(temperatures) <= 0:
                raise RomebertError(f"temperatures must be positive, got {temperatures}")
        self.temperatures = temperatures
        # Exits are read once per batch; the policy rejects regression for criteria it cannot apply.
        policy.init_state(0, model.num_layers, model.config.is_regression)

    @torch.no_grad()
    def run(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> EngineOutput:
        """Early-exit logits and exit layers for one padded batch ``input_ids`` [N, T]."""
        model = self.model
        device = next(model.parameters()).device
        num_layers, num_classes = model.num_layers, model.config.num_labels
        if input_ids.ndim != 2:
            raise RomebertError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        n, width = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise RomebertError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        exit_layer = torch.full((n,), num_layers, dtype=torch.int64)
        out = torch.zeros(n, num_classes, dtype=torch.float32, device=device)
        if n == 0:
            return EngineOutput(out, exit_layer, 0)

        # Extent of each row = last real column + 1 (host side: it sizes every later trim).
        mask_cpu = attention_mask.detach().to("cpu", torch.bool)
        extent = (mask_cpu * torch.arange(1, width + 1)).amax(1)  # [N]
        cols = max(int(extent.max()), 1)
        ids = input_ids[:, :cols].to(device)
        mask = attention_mask[:, :cols].to(device)
        types = token_type_ids[:, :cols].to(device) if token_type_ids is not None else None

        hidden = model.embed(ids, types)  # [N, T, H]
        layer_mask = model.attention_mask(hidden, mask)
        state = self.policy.init_state(n, num_layers, model.config.is_regression, device)
        rows = torch.arange(n)  # [b] CPU: input row of each active row
        rows_dev = rows.to(device)
        shapes: list[tuple[int, int]] = []
        for i in range(num_layers):
            hidden = model.run_layer(i, hidden, layer_mask)  # [b, T, H]
            b = rows.shape[0]
            shapes.append((b, hidden.shape[1]))
            logits = model.exits[i](hidden, mask).float()  # [b, C]
            if self.temperatures is not None:
                logits = logits / self.temperatures[i]
            if i == num_layers - 1:  # the final head takes everyone left; no decision needed
                out.index_copy_(0, rows_dev, logits)
                exit_layer[rows] = num_layers
                break
            exit_mask, state = self.policy.step(i, logits, state)
            leave = exit_mask.cpu()  # [b] bool: the one host sync of this layer
            n_leave = int(leave.sum())
            if n_leave == 0:
                continue
            if n_leave == b:
                out.index_copy_(0, rows_dev, logits)
                exit_layer[rows] = i + 1
                break
            gone = leave.nonzero().squeeze(1)  # [g] CPU
            keep = (~leave).nonzero().squeeze(1)  # [b - g] CPU
            gone_dev, keep_dev = gone.to(device), keep.to(device)
            out.index_copy_(0, rows_dev.index_select(0, gone_dev), logits.index_select(0, gone_dev))
            exit_layer[rows[gone]] = i + 1
            rows, rows_dev = rows[keep], rows_dev.index_select(0, keep_dev)
            # Cut trailing columns that are padding for every remaining row, then drop the rows.
            cols = int(extent[rows].max())
            hidden = hidden[:, :cols].index_select(0, keep_dev)  # [b', T', H]
            mask = mask[:, :cols].index_select(0, keep_dev)  # [b', T']
            state = self.policy.select(state, keep_dev)
            layer_mask = model.attention_mask(hidden, mask)
        return EngineOutput(out, exit_layer, sum(b for b, _ in shapes), shapes)
