"""Continuous early-exit batching across requests (what ``romebert serve`` runs; no HTTP here).

One worker thread runs the engine's loop for every request at once. New inputs enter layer 1 while the
survivors of earlier batches wait in per-layer queues to run deeper layers together (``LayerQueues``:
the deepest full queue runs first); an input's answer is ready when it exits, and a request completes
when its last input has exited, not when its batch finishes. When no queue is full the worker waits at
most ``max_wait_ms`` (0 by default) for more inputs before running a smaller batch; inputs that arrive
while it is busy form the next batch anyway. The number of inputs in flight is bounded: past
``max_queue`` a submission is refused (:class:`Overloaded`), and the caller answers 503.

Requests may bring their own threshold (one per row, ``PolicyState`` carries them) and criterion (a
*lane* per criterion: its own engine and queues). Torch-free; PyTorch segments work too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.encoding import Collator
from romebert.runtime.engine import EarlyExitEngine, Group, LayerQueues
from romebert.runtime.exit_policy import ExitPolicy


class Overloaded(RomebertError):
    """Too many inputs in flight: the caller should retry later."""


@dataclass
class Job:
    """One request: its inputs' results fill in as they exit; ``on_done(job)`` runs when the last has."""

    size: int
    on_done: Callable[[Job], None]
    logits: list[np.ndarray | None] = field(default_factory=list)
    exit_layer: list[int] = field(default_factory=list)
    remaining: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.logits = [None] * self.size
        self.exit_layer = [0] * self.size
        self.remaining = self.size


@dataclass
class _Pending:
    features: list[dict[str, Any]]
    thresholds: list[Any]
    rows: list[int]  # global row ids
    arrived: float


class _Lane:
    """The engine and per-layer queues of one criterion (thresholds vary per row inside a lane)."""

    def __init__(self, engine: EarlyExitEngine, max_batch: int) -> None:
        self.engine = engine
        self.queues = LayerQueues(engine.num_layers, max_batch, engine.merge_groups, engine.select_rows)
        self.new: list[_Pending] = []  # submitted, not yet embedded (the worker takes them each round)
        self.oldest0: float | None = None  # arrival of the oldest input waiting for layer 1


class ContinuousBatcher:
    """Runs ``segments`` for many concurrent requests in one background thread.

    ``policy`` is the default; :meth:`submit` may name another policy (a lane is made for it) and
    per-input thresholds. ``observe(event, value)`` receives "batch" (rows of each layer call), "exit"
    (each input's exit layer) and "depth" (inputs in flight) for metrics.
    """

    def __init__(
        self,
        segments: Any,
        policy: ExitPolicy,
        collator: Collator,
        temperatures: Sequence[float] | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise RomebertError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.segments = segments
        self.default = policy
        self.collator = collator
        self.temperatures = temperatures
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.observe = observe or (lambda event, value: None)
        self._lanes: dict[str, _Lane] = {}
        self._lane(policy)  # fail now on a bad default policy
        self._rows: dict[int, tuple[Job, int]] = {}  # row id -> (its job, its index in the job)
        self._next_row = 0
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="romebert-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ API
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, features: list[dict[str, Any]], on_done: Callable[[Job], None],
               policy: ExitPolicy | None = None, thresholds: Sequence[Any] | None = None) -> Job:  # fmt: skip
        """Queue one request's encoded inputs; ``on_done(job)`` is called from the worker thread."""
        job = Job(len(features), on_done)
        if not features:
            on_done(job)
            return job
        with self._cond:
            if self._stopping:
                raise Overloaded("the service is shutting down")
            if self._in_flight + len(features) > self.max_queue:
                raise Overloaded(f"{self._in_flight} inputs in flight; the queue holds {self.max_queue}")
            lane = self._lane(policy or self.default)
            rows = list(range(self._next_row, self._next_row + len(features)))
            self._next_row += len(features)
            for i, r in enumerate(rows):
                self._rows[r] = (job, i)
            default = (policy or self.default).threshold
            lane.new.append(_Pending(list(features), list(thresholds or [default] * len(features)), rows,
                                     time.perf_counter()))  # fmt: skip
            self._in_flight += len(features)
            self.observe("depth", self._in_flight)
            self._cond.notify()
        return job

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, finish every input in flight (up to ``timeout`` s), stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------ the worker
    def _lane(self, policy: ExitPolicy) -> _Lane:
        key = repr({k: v for k, v in policy.params().items() if k != "threshold"})
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(EarlyExitEngine(self.segments, policy, self.temperatures), self.max_batch)
        return lane

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._in_flight == 0:
                    self._cond.wait()
                if self._stopping and self._in_flight == 0:
                    return
                starts = [(lane, lane.new) for lane in self._lanes.values() if lane.new]
                for lane, _ in starts:
                    lane.new = []
            try:
                for lane, pending in starts:
                    self._enter(lane, pending)
                work = self._choose()
                if work is None:  # only fresh inputs, fewer than a batch: wait a little for more
                    with self._cond:
                        if not any(lane.new for lane in self._lanes.values()) and not self._stopping:
                            self._cond.wait(self._wait_left())
                    continue
                self._step(*work)
            except Exception as exc:  # a runtime failure fails the requests in flight, not the service
                self._fail_all(exc)

    def _wait_left(self) -> float:
        oldest = min((lane.oldest0 for lane in self._lanes.values() if lane.oldest0 is not None), default=None)
        return self.max_wait if oldest is None else max(0.0, self.max_wait - (time.perf_counter() - oldest))

    def _choose(self) -> tuple[_Lane, int] | None:
        """What runs next: the deepest full queue of any lane; else the deepest non-empty queue below
        layer 1 (work-conserving: survivors never wait for company); else layer 1 once its oldest input
        has waited ``max_wait_ms`` (or the service is draining); else nothing yet."""
        lanes = list(self._lanes.values())
        for pick in (
            lambda q, i: q.waiting[i] >= self.max_batch,
            lambda q, i: i > 0 and q.waiting[i] > 0,
        ):
            best = max(((lane, i) for lane in lanes for i in range(lane.engine.num_layers) if pick(lane.queues, i)),
                       key=lambda x: x[1], default=None)  # fmt: skip
            if best is not None:
                return best
        due = self._stopping or self._wait_left() <= 0.0
        return next(((lane, 0) for lane in lanes if lane.queues.waiting[0] and due), None)

    def _enter(self, lane: _Lane, pending: list[_Pending]) -> None:
        """New inputs join layer 1's queue, in batches of at most ``max_batch`` rows."""
        feats = [f for p in pending for f in p.features]
        rows = [r for p in pending for r in p.rows]
        thresholds = [t for p in pending for t in p.thresholds]
        order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")  # similar lengths together
        for s in range(0, len(order), self.max_batch):
            idx = order[s : s + self.max_batch]
            batch = self.collator([feats[i] for i in idx])
            group: Group = lane.engine.start_group(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), 0,
                row_thresholds=[thresholds[i] for i in idx],
            )  # fmt: skip
            group.rows = np.asarray([rows[i] for i in idx], dtype=np.int64)
            lane.queues.put(0, group)
        first = min(p.arrived for p in pending)
        lane.oldest0 = first if lane.oldest0 is None else min(lane.oldest0, first)

    def _step(self, lane: _Lane, layer: int) -> None:
        if not lane.queues.waiting[layer]:
            return
        group = lane.queues.take(layer)
        if layer == 0 and not lane.queues.waiting[0]:
            lane.oldest0 = None
        self.observe("batch", len(group))
        done: list = []
        survivors = lane.engine.run_layer(layer, group, done, [])
        if survivors is not None:
            lane.queues.put(layer + 1, survivors)
        finished = []
        with self._cond:
            for rows, logits, exit_layer in done:
                for r, lg in zip(rows.tolist(), logits):
                    job, i = self._rows.pop(r)
                    job.logits[i], job.exit_layer[i] = lg, exit_layer
                    job.remaining -= 1
                    self.observe("exit", exit_layer)
                    if job.remaining == 0:
                        finished.append(job)
                self._in_flight -= len(rows)
            self.observe("depth", self._in_flight)
        for job in finished:
            job.on_done(job)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            jobs = {id(job): job for job, _ in self._rows.values()}
            self._rows.clear()
            for lane in self._lanes.values():
                lane.new, lane.oldest0 = [], None
                lane.queues = LayerQueues(lane.engine.num_layers, self.max_batch, lane.engine.merge_groups,
                                          lane.engine.select_rows)  # fmt: skip
            self._in_flight = 0
        for job in jobs.values():
            job.error = exc
            job.on_done(job)
