"""Batched early-exit inference: run layer by layer and drop the samples that have left.

After layer i, only the rows still in the batch go through exit head i; the policy decides who leaves;
the leavers' logits are kept with the output rows they came from (scattered into input order once, at
the end), and the hidden states, the 2-D mask, the policy state and the row map are compacted with
``index_select``. Trailing columns that are padding for every remaining row are cut off, so a batch
also gets shorter as its long samples leave. The loop stops as soon as no row is left.

One host synchronisation per layer (the exit mask is read once, to size the compaction); everything
else is tensor ops over the batch, so batch size 1 takes the same path with little overhead. Host-side
bookkeeping (row map, row lengths) is numpy, and the path between two layers is kept to a few calls:
right after a layer, whose weights have pushed code and data out of the CPU caches, each distinct call
costs 10-50 us instead of the 1-5 us a warm micro-benchmark shows (``benchmarks/inference_speed.py``).

:meth:`EarlyExitEngine.run` serves one batch. :meth:`EarlyExitEngine.run_stream` serves many: the
survivors of a layer wait in a per-layer queue until a full batch of them can run the next layer
together, so deep layers do not run on a handful of rows (the batch stays large and the hardware busy).
Both make exactly the same per-sample decisions. :meth:`EarlyExitEngine.run_dataset` feeds an encoded
dataset to ``run_stream`` in length-sorted batches and returns the results in dataset order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from romebert.errors import RomebertError
from romebert.modeling import MultiExitModel, pool_weights, pool_weights_host
from romebert.policies import ExitPolicy, PolicyState

Batch = tuple[Tensor, Tensor | None, Tensor | None]  # input_ids [n, T], attention_mask, token_type_ids


@dataclass
class EngineOutput:
    """Results in input order."""

    logits: Tensor  # [N, C] float32: the chosen exit's logits (divided by its temperature, if any)
    exit_layer: Tensor  # [N] int64 on the CPU, 1-based
    layer_work: int  # rows x layers actually run through an encoder layer
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (rows, columns) of each layer call

    @property
    def token_work(self) -> int:
        """Padded tokens x layers actually computed (what the encoder's cost scales with)."""
        return sum(b * t for b, t in self.shapes)


@dataclass
class _Group:
    """Rows waiting for (or running) the same layer."""

    hidden: Tensor  # [g, T, H]: input of the next layer
    mask: Tensor  # [g, T] 2-D attention mask
    weights: Tensor | None  # [g, T] mean-pooling weights (pool_weights(mask)); None for cls pooling
    rows: np.ndarray  # [g] int64: output row of each row
    extent: np.ndarray  # [g] int64: last real column + 1
    count: np.ndarray  # [g] int64: real tokens (every row's count == the width: the group has no padding)
    state: PolicyState
    padded: bool | None = None  # whether any row has padding (None: not known yet, computed from count)
    layer_mask: Tensor | None = None  # the backbone's mask for (hidden, mask), once built
    has_layer_mask: bool = False  # (None is a valid mask: "no padding")

    def __len__(self) -> int:
        return self.rows.shape[0]


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
        # Looked up once: module attribute access costs microseconds, and batch size 1 pays it per layer.
        self._num_layers = model.num_layers
        self._probe = model.exits[0].classifier.weight  # a Parameter keeps its identity across .to(device)
        self._heads_at: tuple[int, torch.device] | None = None  # (storage, device) the head closures see
        self._heads: list = []
        self._regression = model.config.is_regression
        self._mean_pooling = model.config.pooling == "mean"
        self._uniform: dict[tuple[int, torch.device], Tensor] = {}  # see _uniform_weights
        # Fail early: the policy rejects regression for criteria it cannot apply, or bad thresholds.
        policy.init_state(0, model.num_layers, model.config.is_regression)

    # ------------------------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def run(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> EngineOutput:
        """Early-exit logits and exit layers for one padded batch ``input_ids`` [N, T]."""
        n = _check(input_ids, attention_mask)
        if n == 0:
            return self._assemble(0, [], [])
        self._prepare()
        group = self._embed(input_ids, attention_mask, token_type_ids, offset=0)
        shapes: list[tuple[int, int]] = []
        done: list[_Done] = []
        for i in range(self._num_layers):
            group = self._layer(i, group, done, shapes)
            if group is None:
                break
        return self._assemble(n, done, shapes)

    # ----------------------------------------------------------------------------------- many batches
    @torch.inference_mode()
    def run_stream(self, batches: Iterable[Batch], batch_size: int | None = None) -> EngineOutput:
        """Early exit over several padded batches, results in their concatenated order.

        Every layer call runs ``batch_size`` rows (default: the first batch's size) gathered from any
        input batch (the shortest waiting rows first, so little padding), except at most one smaller
        call per layer once the input is used up. Decisions equal :meth:`run`'s on each batch. Memory:
        under ``2 * batch_size`` waiting rows per layer.
        """
        batches = list(batches)
        sizes = [_check(ids, mask) for ids, mask, _ in batches]
        n = sum(sizes)
        if n == 0:
            return self._assemble(0, [], [])
        bs = batch_size or max(sizes[0], 1)
        if bs < 1:
            raise RomebertError(f"batch_size must be >= 1, got {bs}")
        self._prepare()
        num_layers = self._num_layers
        queues: list[deque[_Group]] = [deque() for _ in range(num_layers)]
        waiting = [0] * num_layers  # rows queued per layer
        shapes: list[tuple[int, int]] = []
        done: list[_Done] = []
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        next_batch = 0
        while True:
            full = [i for i in range(num_layers) if waiting[i] >= bs]
            if full:
                layer = full[-1]  # the deepest full queue first: it drains, so memory stays bounded
            elif next_batch < len(batches):
                ids, mask, types = batches[next_batch]
                if sizes[next_batch]:
                    group = self._embed(ids, mask, types, offset=offsets[next_batch])
                    queues[0].append(group)
                    waiting[0] += len(group)
                next_batch += 1
                continue
            else:
                # Input used up: flush the shallowest queue, whose survivors join the deeper ones.
                pending = [i for i in range(num_layers) if waiting[i]]
                if not pending:
                    break
                layer = pending[0]
            group = _take(queues[layer], bs)
            waiting[layer] -= len(group)
            survivors = self._layer(layer, group, done, shapes)
            if survivors is not None:
                queues[layer + 1].append(survivors)
                waiting[layer + 1] += len(survivors)
        return self._assemble(n, done, shapes)

    def run_dataset(self, dataset, collator, batch_size: int = 32) -> EngineOutput:
        """Early exit over an encoded dataset (``romebert.data.encode``), results in dataset order.

        Inputs go in length-sorted batches (little padding) through :meth:`run_stream`, and the results
        are scattered back to the dataset's order.
        """
        if batch_size < 1:
            raise RomebertError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.from_numpy(np.argsort(np.asarray(dataset.lengths), kind="stable"))
        batches = []
        for start in range(0, len(dataset), batch_size):
            b = collator([dataset[int(i)] for i in order[start : start + batch_size]])
            batches.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
        out = self.run_stream(batches, batch_size)
        logits, exit_layer = torch.empty_like(out.logits), torch.empty_like(out.exit_layer)
        logits[order.to(logits.device)] = out.logits
        exit_layer[order] = out.exit_layer
        return EngineOutput(logits, exit_layer, out.layer_work, out.shapes)

    # ------------------------------------------------------------------------------------- internals
    @property
    def device(self) -> torch.device:
        return self._probe.device

    def _prepare(self) -> None:
        """(Re)build the exit heads' closures when the weights moved (``model.to``) since last time."""
        at = (self._probe.data_ptr(), self._probe.device)
        if at != self._heads_at:
            self._heads = [head.inference_fn() for head in self.model.exits]
            self._heads_at = at

    def _assemble(self, n: int, done: list[_Done], shapes: list[tuple[int, int]]) -> EngineOutput:
        """Every row's logits and exit layer, in input order."""
        work = sum(b for b, _ in shapes)
        if len(done) == 1:  # one batch that left together (always so at batch size 1): already in order
            rows, logits, layer = done[0]
            if n == 1 or np.array_equal(rows, np.arange(n)):
                return EngineOutput(logits, torch.full((n,), layer, dtype=torch.int64), work, shapes)
        out = torch.empty(n, self.model.config.num_labels, dtype=torch.float32, device=self.device)
        exit_layer = np.empty(n, dtype=np.int64)
        if done:
            rows = np.concatenate([d[0] for d in done])
            exit_layer[rows] = np.concatenate([np.full(len(d[0]), d[2], dtype=np.int64) for d in done])
            out.index_copy_(0, torch.from_numpy(rows).to(out.device), torch.cat([d[1] for d in done]))
        return EngineOutput(out, torch.from_numpy(exit_layer), work, shapes)

    def _embed(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None, offset: int):
        """A group of freshly embedded rows, trailing all-padding columns cut off."""
        device = self.device
        n, width = input_ids.shape
        real = padded = None  # host bool mask [n, T] (numpy path); whether padding is left (one row)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
            extent = count = np.full(n, width, dtype=np.int64)
            cols = max(width, 1)
        elif n == 1:
            # Batch size 1 (serving): one host read and plain Python, where the numpy path below costs
            # about 200 us in cold calls per request.
            last, real_tokens = _row_lengths(_host(attention_mask).tolist()[0])
            extent, count = np.array([last]), np.array([real_tokens])
            cols = max(last, 1)
            padded = real_tokens < cols
        else:
            real = _host(attention_mask).numpy() != 0  # [n, T] bool (masks are integer: no grad to detach)
            extent, count = _extent(real), real.sum(1)
            cols = max(int(extent.max()), 1)
        if cols < width:
            input_ids, attention_mask = input_ids[:, :cols], attention_mask[:, :cols]
            token_type_ids = token_type_ids[:, :cols] if token_type_ids is not None else None
            real = real[:, :cols] if real is not None else None
        ids, mask = _on(input_ids, device), _on(attention_mask, device)
        types = _on(token_type_ids, device) if token_type_ids is not None else None
        hidden = self.model.embed(ids, types)  # [n, T, H]
        state = self.policy.init_state(n, self._num_layers, self._regression, device)
        weights = None
        if self._mean_pooling:
            if padded is False and hidden.dtype == torch.float32:  # one unpadded row
                weights = self._uniform_weights(cols, device)
            elif real is not None and hidden.dtype == torch.float32:
                weights = _on(pool_weights_host(real), device)
            else:
                weights = pool_weights(mask, hidden.dtype)
        rows = np.arange(offset, offset + n, dtype=np.int64)
        return _Group(hidden, mask, weights, rows, extent, count, state, padded)

    def _uniform_weights(self, cols: int, device: torch.device) -> Tensor:
        """``pool_weights`` (float32) of one unpadded row of ``cols`` tokens, cached per width: the same
        bits (1/cols rounded once to float32), without a call per request. Never written to."""
        key = (cols, device)
        w = self._uniform.get(key)
        if w is None:
            w = self._uniform[key] = torch.full((1, cols), float(np.float32(1) / np.float32(cols)), device=device)
        return w

    def _layer(self, i: int, g: _Group, done: list[_Done], shapes: list[tuple[int, int]]) -> _Group | None:
        """Run layer ``i`` and exit head ``i`` on ``g``; record the leavers in ``done``; return the rest."""
        model = self.model
        if not g.has_layer_mask:  # rebuilt only when rows or columns changed
            padded = g.padded if g.padded is not None else bool((g.count < g.hidden.shape[1]).any())  # host-side
            g.layer_mask, g.has_layer_mask = model.attention_mask(g.hidden, g.mask, padded), True
        hidden = model.run_layer(i, g.hidden, g.layer_mask)  # [b, T, H]
        b = len(g)
        shapes.append((b, hidden.shape[1]))
        logits = self._heads[i](hidden, g.weights)  # [b, C]
        if logits.dtype != torch.float32:  # (a no-op .float() still costs a dispatch per layer)
            logits = logits.float()
        if self.temperatures is not None:
            logits = logits / self.temperatures[i]
        if i == self._num_layers - 1:  # the final head takes everyone left; no decision needed
            done.append((g.rows, logits, i + 1))
            return None
        exit_mask, state = self.policy.step(i, logits, g.state)
        # The one host sync of this layer. After a layer every distinct call costs 10-50 us, not the
        # 1-5 us of a warm loop (the layer's weights have pushed code and data out of the caches), so
        # batch size 1 reads its single flag with one call.
        if b == 1:
            n_leave = int(exit_mask.item())
            leave = None
        else:
            leave = _host(exit_mask).numpy()  # [b] bool
            n_leave = int(np.count_nonzero(leave))
        if n_leave == 0:
            g.hidden, g.state = hidden, state  # same rows, same columns: the masks stay valid
            return g
        if n_leave == b:
            done.append((g.rows, logits, i + 1))
            return None
        assert leave is not None  # b > 1 here
        gone = np.flatnonzero(leave)
        done.append((g.rows[gone], logits.index_select(0, torch.from_numpy(gone).to(logits.device)), i + 1))
        # The rest go on, trailing columns that are padding for every one of them cut off.
        return _select(_Group(hidden, g.mask, g.weights, g.rows, g.extent, g.count, state), np.flatnonzero(~leave))


_Done = tuple[np.ndarray, Tensor, int]  # rows that left together: (output rows, logits [k, C], exit layer)


def _host(x: Tensor) -> Tensor:
    """``x`` on the CPU (no call at all when it is there already: each call costs at batch size 1)."""
    return x if x.device.type == "cpu" else x.cpu()


def _on(x: Tensor, device: torch.device) -> Tensor:
    return x if x.device == device else x.to(device)


def _extent(mask: np.ndarray) -> np.ndarray:
    """Last real column + 1 of each row of a bool mask [n, T], int64 (an all-padding row counts as full
    width: it is never trimmed, and its result is meaningless anyway).

    numpy, not torch: on a handful of host values a numpy call costs a microsecond, a torch call several.
    """
    return mask.shape[1] - mask[:, ::-1].argmax(1)


def _row_lengths(row: list[int]) -> tuple[int, int]:
    """(last real column + 1, real tokens) of one mask row; ``_extent``'s convention for a row
    without a real token (full width)."""
    count = extent = 0
    for j, v in enumerate(row):
        if v:
            count, extent = count + 1, j + 1
    return (extent if count else len(row)), count


def _check(input_ids: Tensor, attention_mask: Tensor | None) -> int:
    if input_ids.ndim != 2:
        raise RomebertError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise RomebertError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    return int(input_ids.shape[0])


def _take(queue: deque[_Group], k: int) -> _Group:
    """Pop ``k`` queued rows as one group: the ``k`` shortest, so a batch mixes rows of similar length.

    Rows of one layer's queue come from input batches of different lengths; taking the shortest
    (rather than the oldest) keeps the padding of the merged batch small. The rest stays queued.
    """
    if len(queue) == 1 and len(queue[0]) <= k:
        return queue.popleft()
    parts = list(queue)
    queue.clear()
    extent = np.concatenate([p.extent for p in parts])  # [m]
    order = np.argsort(extent, kind="stable")
    take, rest = order[:k], order[k:]
    if len(parts) == 1:
        merged = parts[0]
    else:
        cols = int(extent.max())
        merged = _Group(
            torch.cat([_width(p.hidden, cols) for p in parts]),  # [m, T, H]
            torch.cat([_width(p.mask, cols) for p in parts]),  # [m, T]
            torch.cat([_width(p.weights, cols) for p in parts]) if parts[0].weights is not None else None,
            np.concatenate([p.rows for p in parts]),
            extent,
            np.concatenate([p.count for p in parts]),
            PolicyState.cat([p.state for p in parts]),
        )
    if rest.size:
        queue.append(_select(merged, rest))
    return _select(merged, take)


def _select(g: _Group, index: np.ndarray) -> _Group:
    """Rows ``index`` (int64) of ``g``, trailing all-padding columns cut off."""
    extent = g.extent[index]
    cols = int(extent.max())
    index_dev = torch.from_numpy(index).to(g.hidden.device)
    return _Group(
        g.hidden[:, :cols].index_select(0, index_dev),
        g.mask[:, :cols].index_select(0, index_dev),
        _rows(g.weights, index_dev, cols),
        g.rows[index],
        extent,
        g.count[index],
        g.state.select(index_dev),
    )


def _rows(x: Tensor | None, index: Tensor, cols: int) -> Tensor | None:
    """Rows ``index`` of ``x`` [g, T] cut to ``cols`` columns (None stays None)."""
    return None if x is None else x[:, :cols].index_select(0, index)


def _width(x: Tensor, cols: int) -> Tensor:
    """``x`` [g, T, ...] cut or zero-padded (padding = masked out) to ``cols`` columns."""
    t = x.shape[1]
    if t >= cols:
        return x[:, :cols]
    pad = [0, 0] * (x.ndim - 2) + [0, cols - t]
    return F.pad(x, pad)
