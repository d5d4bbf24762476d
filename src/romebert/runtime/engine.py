"""Batched early-exit inference: run layer by layer and drop the samples that have left.

The engine drives *segments*, a model cut after every layer: ``MultiExitModel.segments()`` (PyTorch)
or ``onnx_runtime.OrtSegments`` (ONNX Runtime, no torch). Whatever the runtime, the loop is this one:
after layer i the exit policy decides on exit i's logits; the leavers' logits are kept with the output
rows they came from (scattered into input order once, at the end); the rest is compacted, and trailing
columns that are padding for every remaining row are cut off, so a batch also gets shorter as its long
samples leave. The loop stops as soon as no row is left.

Host bookkeeping (row map, row extents, policy state) is numpy; the runtime's own arrays (hidden
states, masks) stay inside the segments' state objects. This module imports no torch.

:meth:`EarlyExitEngine.run` serves one batch. A batch of one row goes through the segments' one-row runner
when they have one for the policy (``OrtSegments.one_row``: the whole early exit in one ONNX graph, one
call per input); the decisions are the same, since a row the runner cannot settle comes back to this
loop. :meth:`EarlyExitEngine.run_stream` serves many: the
survivors of a layer wait in a per-layer queue until a full batch of them can run the next layer
together, so deep layers do not run on a handful of rows. Both make exactly the same per-sample
decisions. :meth:`EarlyExitEngine.run_dataset` feeds an encoded dataset to ``run_stream`` in
length-sorted batches and returns the results in dataset order. :func:`all_exit_logits` runs every row
to the last layer and keeps every exit's logits (what evaluation and threshold choice need).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.encoding import unpadded_row
from romebert.runtime.exit_policy import ExitPolicy, PolicyState

Batch = tuple[Any, Any, Any]  # input_ids [n, T], attention_mask [n, T] or None, token_type_ids or None


class Segments(Protocol):
    """A multi-exit model cut after every layer, as an engine runs it.

    States are the runtime's own objects (hidden states, masks); the engine only passes them back.
    """

    num_layers: int  # segments, each ending at an exit
    num_labels: int
    regression: bool
    exit_layers: Sequence[int]  # the model's exit (1-based) each segment ends at: 1..L, or [L] for one graph

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None) -> Any:
        """The embeddings' output for a batch [b, T], ready for layer 0."""
        ...

    def layer(self, index: int, state: Any) -> tuple[Any, np.ndarray]:
        """Layer ``index`` (0-based) and its exit: (the next layer's input state, logits [b, C] float32)."""
        ...

    def select(self, state: Any, rows: np.ndarray, cols: int) -> Any:
        """Rows ``rows`` (int64) of ``state``, cut to its first ``cols`` columns."""
        ...

    def merge(self, states: Sequence[Any], cols: int) -> Any:
        """States of the same layer stacked in order, each padded or cut to ``cols`` columns."""
        ...


@dataclass
class EngineOutput:
    """Results in input order."""

    logits: np.ndarray  # [N, C] float32: the chosen exit's logits (divided by its temperature, if any)
    exit_layer: np.ndarray  # [N] int64, 1-based
    layer_work: int  # rows x layers actually run through an encoder layer
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (rows, columns) of each layer call
    # run_dataset(watch=...): each watched row's logits at every exit it passed, [its exit layer, C]
    watched: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def token_work(self) -> int:
        """Padded tokens x layers actually computed (what the encoder's cost scales with)."""
        return sum(b * t for b, t in self.shapes)


@dataclass
class Group:
    """Rows waiting for (or running) the same layer."""

    state: Any  # the segments' state: input of the next layer
    rows: np.ndarray  # [g] int64: output row of each row
    extent: np.ndarray  # [g] int64: last real column + 1
    policy: PolicyState
    width: int  # columns of the state

    def __len__(self) -> int:
        return self.rows.shape[0]


Done = tuple[np.ndarray, np.ndarray, int]  # rows that left together: (output rows, logits [k, C], exit layer)


class EarlyExitEngine:
    """Early-exit inference of ``segments`` (or of a model with a ``segments()`` method) under ``policy``.

    ``temperatures``: one per exit of the model (``calibration.py``); exit k's logits are divided by
    ``temperatures[k - 1]`` before the policy sees them, and the returned logits are the scaled ones.
    Padding is assumed on the right (trailing padding columns are trimmed).
    """

    def __init__(self, segments: Any, policy: ExitPolicy, temperatures: Sequence[float] | None = None) -> None:
        self.segments: Segments = segments.segments() if hasattr(segments, "segments") else segments
        self.policy = policy
        self.num_layers = self.segments.num_layers
        self.exit_layers = [int(k) for k in self.segments.exit_layers]
        self.temperatures = None  # per segment
        if temperatures is not None:
            temperatures = [float(t) for t in temperatures]
            if len(temperatures) != self.exit_layers[-1]:
                raise RomebertError(
                    f"temperatures: need one per exit ({self.exit_layers[-1]}), got {len(temperatures)}"
                )
            if min(temperatures) <= 0:
                raise RomebertError(f"temperatures must be positive, got {temperatures}")
            self.temperatures = [temperatures[k - 1] for k in self.exit_layers]
        # Fail early: the policy rejects regression for criteria it cannot apply, or bad thresholds.
        policy.init_state(0, self.num_layers, self.segments.regression)
        self.features = tuple(policy.needs)  # what the criterion reads besides the logits, asked of every layer
        check_features(self.segments, self.features, f"criterion {policy.name!r}")
        one_row = getattr(self.segments, "one_row", None)  # the fastest path for batches of one row, if any
        self._one_row = one_row(policy, temperatures) if one_row is not None else None

    # ------------------------------------------------------------------------------------ one batch
    def run(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> EngineOutput:
        """Early-exit logits and exit layers for one padded batch ``input_ids`` [N, T]."""
        ids, mask, types = _host_batch(input_ids, attention_mask, token_type_ids)
        n = ids.shape[0]
        if n == 0:
            return self._assemble(0, [], [])
        if n == 1 and self._one_row is not None:
            return self._run_one_row(ids, mask, types)
        return self._run_layers(self.start_group(ids, mask, types, offset=0))

    def _run_layers(self, group: Group) -> EngineOutput:
        """Fresh rows ``group`` through the layers, each to its exit."""
        n, done, shapes = len(group), [], []
        for i in range(self.num_layers):
            group = self.run_layer(i, group, done, shapes)
            if group is None:
                break
        return self._assemble(n, done, shapes)

    def _run_one_row(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None) -> EngineOutput:
        """One row through the segments' one-row runner, with as little host work as possible around the
        call: numpy calls between two graph calls cost several times what they cost in a loop of their own
        (the graph's kernels have pushed numpy's code and data out of the caches). Trailing padding is cut as
        in :meth:`start_group`; a row with other padding runs through the layers."""
        cols = ids.shape[1]
        if not unpadded_row(mask):
            cols = max(int(_extent(mask != 0)[0]), 1)
            ids, mask, types = ids[:, :cols], mask[:, :cols], None if types is None else types[:, :cols]
            if not unpadded_row(mask):  # left padding or holes: the runner is for a row of real tokens
                return self._run_layers(self.start_group(ids, mask, types, offset=0))
        out = self._one_row(self.segments.start(ids, mask, types))
        if out is None:  # stopped within a hair of a threshold (rare): the policy decides, on the segments
            return self._run_layers(self.start_group(ids, mask, types, offset=0))
        logits, layer = out
        return EngineOutput(logits, np.array([layer], np.int64), layer, [(1, cols)] * layer)

    # ----------------------------------------------------------------------------------- many batches
    def run_stream(self, batches: Iterable[Batch], batch_size: int | None = None, seen: list | None = None
                   ) -> EngineOutput:  # fmt: skip
        """Early exit over several padded batches, results in their concatenated order.

        Every layer call runs ``batch_size`` rows (default: the first batch's size) gathered from any
        input batch (the shortest waiting rows first, so little padding), except at most one smaller
        call per layer once the input is used up. Decisions equal :meth:`run`'s on each batch. Memory:
        under ``2 * batch_size`` waiting rows per layer. ``seen``: see :meth:`run_layer`.
        """
        host = [_host_batch(*b) for b in batches]
        sizes = [ids.shape[0] for ids, _, _ in host]
        n = sum(sizes)
        if n == 0:
            return self._assemble(0, [], [])
        bs = batch_size or max(sizes[0], 1)
        if bs < 1:
            raise RomebertError(f"batch_size must be >= 1, got {bs}")
        if bs == 1 and self._one_row is not None and seen is None:  # one row per call: the one-row path
            return self._one_by_one(host)
        queues = LayerQueues(self.num_layers, bs, self.merge_groups, self.select_rows)
        shapes: list[tuple[int, int]] = []
        done: list[Done] = []
        offset, next_batch = 0, 0
        while True:
            layer = queues.next_layer(inputs_left=next_batch < len(host))
            if layer is None:  # nothing is full yet: embed the next input batch
                if next_batch == len(host):
                    break
                if sizes[next_batch]:
                    queues.put(0, self.start_group(*host[next_batch], offset=offset))
                offset += sizes[next_batch]
                next_batch += 1
                continue
            survivors = self.run_layer(layer, queues.take(layer), done, shapes, seen)
            if survivors is not None:
                queues.put(layer + 1, survivors)
        return self._assemble(n, done, shapes)

    def _one_by_one(self, host: list[tuple[np.ndarray, np.ndarray, Any]]) -> EngineOutput:
        outs = [self.run(ids[r : r + 1], mask[r : r + 1], None if types is None else types[r : r + 1])
                for ids, mask, types in host for r in range(ids.shape[0])]  # fmt: skip
        return EngineOutput(np.concatenate([o.logits for o in outs]), np.concatenate([o.exit_layer for o in outs]),
                            sum(o.layer_work for o in outs), [s for o in outs for s in o.shapes])  # fmt: skip

    def run_dataset(self, dataset: Any, collator: Any, batch_size: int = 32, watch: Sequence[int] | None = None
                    ) -> EngineOutput:  # fmt: skip
        """Early exit over an encoded dataset (``romebert.runtime.encoding.encode``), results in dataset order.

        Inputs go in length-sorted batches (little padding) through :meth:`run_stream`, and the results
        are scattered back to the dataset's order. ``watch``: dataset rows whose logits at every exit
        they pass are kept (``EngineOutput.watched``; the accuracy guard replays thresholds on them).
        """
        seen: list | None = [] if watch is not None else None
        out, order = in_length_order(dataset, collator, batch_size, lambda b: self.run_stream(b, batch_size, seen))
        logits, exit_layer = np.empty_like(out.logits), np.empty_like(out.exit_layer)
        logits[order], exit_layer[order] = out.logits, out.exit_layer
        watched: dict[int, np.ndarray] = {}
        if watch is not None and len(watch):
            position = np.empty_like(order)
            position[order] = np.arange(order.size)  # dataset row -> its row in run_stream
            wanted = {int(position[i]): int(i) for i in watch}
            passed: dict[int, list[np.ndarray]] = {int(i): [] for i in watch}
            for rows, layer_logits in seen:  # in layer order for every row
                for j, r in enumerate(rows.tolist()):
                    if r in wanted:
                        passed[wanted[r]].append(layer_logits[j])
            watched = {i: np.stack(v) for i, v in passed.items()}
        return EngineOutput(logits, exit_layer, out.layer_work, out.shapes, watched)

    # --------------------------------------------------------------------------------- the loop's steps
    # (public for schedulers other than run_stream's: the service's continuous batching)
    def start_group(
        self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray | None, offset: int, row_thresholds=None
    ) -> Group:
        """Fresh rows numbered ``offset``.. (trailing all-padding columns cut off), ready for layer 0;
        ``row_thresholds``: one threshold per row instead of the policy's (``ExitPolicy.init_state``)."""
        n, width = ids.shape
        real = mask != 0
        extent = _extent(real)
        cols = max(int(extent.max()), 1)
        if cols < width:
            ids, mask = ids[:, :cols], mask[:, :cols]
            types = types[:, :cols] if types is not None else None
        state = self.segments.start(ids, mask, types)
        rows = np.arange(offset, offset + n, dtype=np.int64)
        policy = self.policy.init_state(n, self.num_layers, self.segments.regression, row_thresholds)
        return Group(state, rows, extent, policy, cols)

    def run_layer(self, i: int, g: Group, done: list[Done], shapes: list[tuple[int, int]], seen: list | None = None
                  ) -> Group | None:  # fmt: skip
        """Run layer ``i`` and exit ``i`` on ``g``; record the leavers in ``done``; return the rest.
        ``seen``: gets (output rows, logits [g, C]) of every row, leaving or not (the accuracy guard's)."""
        if self.features:
            state, logits, extra = self.segments.layer(i, g.state, features=True)
            g.policy.rows.update({k: extra[k] for k in self.features})  # this layer's, for these rows
        else:
            state, logits = self.segments.layer(i, g.state)
        shapes.append((len(g), g.width))
        if self.temperatures is not None:
            logits = logits / np.float32(self.temperatures[i])
        if seen is not None:
            seen.append((g.rows, logits))
        exit_layer = self.exit_layers[i]
        if i == self.num_layers - 1:  # the final head takes everyone left; no decision needed
            done.append((g.rows, logits, exit_layer))
            return None
        leave, policy = self.policy.step(i, logits, g.policy)
        n_leave = int(np.count_nonzero(leave))
        if n_leave == 0:
            g.state, g.policy = state, policy  # same rows, same columns
            return g
        if n_leave == len(g):
            done.append((g.rows, logits, exit_layer))
            return None
        done.append((g.rows[leave], logits[leave], exit_layer))
        keep = np.flatnonzero(~leave)
        return self.select_rows(Group(state, g.rows, g.extent, policy, g.width), keep)

    def select_rows(self, g: Group, index: np.ndarray) -> Group:
        """Rows ``index`` (int64) of ``g``, trailing all-padding columns cut off."""
        extent = g.extent[index]
        cols = int(extent.max())
        state = self.segments.select(g.state, index, cols)
        return Group(state, g.rows[index], extent, g.policy.select(index), cols)

    def merge_groups(self, parts: list[Group]) -> Group:
        """Groups of one layer as one (columns: the widest row's extent)."""
        extent = np.concatenate([p.extent for p in parts])
        cols = int(extent.max())
        state = self.segments.merge([p.state for p in parts], cols)
        rows = np.concatenate([p.rows for p in parts])
        return Group(state, rows, extent, PolicyState.cat([p.policy for p in parts]), cols)

    def _assemble(self, n: int, done: list[Done], shapes: list[tuple[int, int]]) -> EngineOutput:
        """Every row's logits and exit layer, in input order."""
        out = np.empty((n, self.segments.num_labels), dtype=np.float32)
        exit_layer = np.empty(n, dtype=np.int64)
        for rows, logits, layer in done:
            out[rows] = logits
            exit_layer[rows] = layer
        # a row runs every layer up to its exit and none after, whatever the segments span
        return EngineOutput(out, exit_layer, int(exit_layer.sum()), shapes)


class LayerQueues:
    """Per-layer queues of groups waiting for their next layer, and the rule for what runs next.

    The deepest queue holding a full batch runs first (it drains, so memory stays bounded); when no
    queue is full, new input is taken while there is some; then the shallowest non-empty queue is
    flushed (its survivors join the deeper ones). A queue hands out its ``batch_size`` shortest rows,
    so a merged batch mixes rows of similar length.
    """

    def __init__(self, num_layers: int, batch_size: int, merge: Any, select: Any) -> None:
        self.queues: list[deque[Group]] = [deque() for _ in range(num_layers)]
        self.waiting = [0] * num_layers
        self.batch_size = batch_size
        self.merge_groups, self.select_rows = merge, select  # the engine's: (groups) -> group, (group, rows) -> group

    def put(self, layer: int, group: Group) -> None:
        self.queues[layer].append(group)
        self.waiting[layer] += len(group)

    def next_layer(self, inputs_left: bool) -> int | None:
        """The layer to run now, or None: take more input first (or, with none left, nothing to do)."""
        full = [i for i, w in enumerate(self.waiting) if w >= self.batch_size]
        if full:
            return full[-1]
        if inputs_left:
            return None
        return next((i for i, w in enumerate(self.waiting) if w), None)

    def take(self, layer: int) -> Group:
        """Pop up to ``batch_size`` rows of ``layer``'s queue as one group: the shortest ones."""
        queue, k = self.queues[layer], self.batch_size
        if len(queue) == 1 and len(queue[0]) <= k:
            group = queue.popleft()
        else:
            parts = list(queue)
            queue.clear()
            merged = parts[0] if len(parts) == 1 else self.merge_groups(parts)
            order = np.argsort(merged.extent, kind="stable")
            if order.size > k:
                queue.append(self.select_rows(merged, order[k:]))
            group = self.select_rows(merged, order[:k])
        self.waiting[layer] -= len(group)
        return group


def check_features(segments: Any, features: Sequence[str], who: str) -> None:
    """A one-line error when ``segments`` do not give every per-exit feature asked for."""
    missing = [k for k in features if k not in getattr(segments, "features", ())]
    if missing:
        raise RomebertError(
            f"{who} needs each exit's {missing[0]}, which these segments do not give "
            "(an export made before it existed: export the run again)"
        )


def all_exit_logits(segments: Any, batches: Iterable[Batch]) -> np.ndarray:
    """Every exit's logits [L, N, C] (float32) of every row, in the batches' concatenated order: each
    batch runs to the last layer (evaluation, sweeps and threshold choice read these)."""
    return all_exit_outputs(segments, batches)[0]


def all_exit_outputs(
    segments: Any, batches: Iterable[Batch], features: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every exit's logits [L, N, C] float32 and the per-exit ``features`` the segments give ([L, N] each,
    e.g. "nsp"), in the batches' order. Segments that run every exit in one call (``all_logits``, PyTorch's:
    one forward, one copy to the host) do so when no features are asked."""
    seg: Segments = segments.segments() if hasattr(segments, "segments") else segments
    check_features(seg, features, "these outputs")
    whole = getattr(seg, "all_logits", None) if not features else None
    parts, extra = [], {k: [] for k in features}
    for batch in batches:
        ids, mask, types = _host_batch(*batch)
        cols = max(int(_extent(mask != 0).max()), 1) if ids.shape[0] else 1
        ids, mask = ids[:, :cols], mask[:, :cols]
        types = types[:, :cols] if types is not None else None
        if whole is not None:
            parts.append(whole(ids, mask, types))
            continue
        state = seg.start(ids, mask, types)
        per_layer, per_feature = [], {k: [] for k in features}
        for i in range(seg.num_layers):
            if features:
                state, logits, got = seg.layer(i, state, features=True)
                for k in features:
                    per_feature[k].append(got[k])
            else:
                state, logits = seg.layer(i, state)
            per_layer.append(logits)
        parts.append(np.stack(per_layer))
        for k in features:
            extra[k].append(np.stack(per_feature[k]))
    if not parts:
        empty = {k: np.zeros((seg.num_layers, 0), dtype=np.float32) for k in features}
        return np.zeros((seg.num_layers, 0, seg.num_labels), dtype=np.float32), empty
    logits = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
    return logits, {k: np.concatenate(v, axis=1).astype(np.float32, copy=False) for k, v in extra.items()}


def dataset_exit_logits(segments: Any, dataset: Any, collator: Any, batch_size: int = 64) -> np.ndarray:
    """:func:`all_exit_logits` of an encoded dataset, in dataset order (batches sorted by length): the
    one loop behind evaluation, the classifier's dev logits and the export's threshold choice."""
    return dataset_exit_outputs(segments, dataset, collator, batch_size)[0]


def dataset_exit_outputs(
    segments: Any, dataset: Any, collator: Any, batch_size: int = 64, features: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`all_exit_outputs` of an encoded dataset, in dataset order."""
    (logits, extra), order = in_length_order(
        dataset, collator, batch_size, lambda b: all_exit_outputs(segments, b, features)
    )
    out = np.empty_like(logits)
    out[:, order] = logits
    scattered = {}
    for k, v in extra.items():
        scattered[k] = np.empty_like(v)
        scattered[k][:, order] = v
    return out, scattered


def in_length_order(dataset: Any, collator: Any, batch_size: int, run: Any) -> tuple[Any, np.ndarray]:
    """``run(batches)`` over ``dataset`` cut into padded batches of similar length (little padding), and
    the order the rows went in (``result[..., k]`` belongs to dataset row ``order[k]``)."""
    if batch_size < 1:
        raise RomebertError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(np.asarray(dataset.lengths), kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        b = collator([dataset[int(i)] for i in order[start : start + batch_size]])
        batches.append((b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
    return run(batches), order


def _host_batch(input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """int64 numpy arrays of one batch (torch tensors are read back to the host), checked."""
    ids = _numpy(input_ids)
    if ids.ndim != 2:
        raise RomebertError(f"input_ids must be [batch, tokens], got shape {tuple(ids.shape)}")
    mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask)
    if mask.shape != ids.shape:
        raise RomebertError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    types = None if token_type_ids is None else _numpy(token_type_ids)
    return ids, mask, types


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def _extent(mask: np.ndarray) -> np.ndarray:
    """Last real column + 1 of each row of a bool mask [n, T], int64 (an all-padding row counts as full
    width: it is never trimmed, and its result is meaningless anyway)."""
    return mask.shape[1] - mask[:, ::-1].argmax(1)
