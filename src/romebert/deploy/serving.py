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

With an accuracy guard (``guard.py``), a share of the default policy's inputs is watched: the logits of
every exit they pass are kept; one that exits early is answered at once and a copy of it runs to the
final exit in the *shadow* lane, which runs when no request's work can, or when it has a full batch
(so the guard keeps learning under sustained load); the guard then gets every exit's logits. Its
threshold updates run on a thread of their own, and new inputs take the thresholds in force.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.deploy.guard import AccuracyGuard
from romebert.runtime.encoding import Collator
from romebert.runtime.engine import EarlyExitEngine, Group, LayerQueues
from romebert.runtime.exit_policy import ExitPolicy
from romebert.runtime.policies import get_policy


def lower_priority(nice: int, idle: bool = False) -> None:
    """Lower the calling thread's scheduling priority (Linux, where a thread has its own; elsewhere a
    no-op, since it would lower the whole process). ``idle``: the SCHED_IDLE class, in which the thread
    runs when nothing else on its core wants to, and a waking event loop takes the core from it at once
    (a nice value only shortens its turns: a burst measured with nice 10 still gave it 20 % of the loop's
    core); otherwise ``nice`` steps nicer than the process."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if idle:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        elif nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError:  # a sandbox that forbids it: run at the normal priority
        pass


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
    threshold: Any = None  # the threshold its inputs ran with (the guard's per-exit ones, when it set them)

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


@dataclass
class _Watched:
    """A watched input: its features (to re-run it), its logits at each exit passed, its answer's exit."""

    features: dict[str, Any]
    logits: list[np.ndarray] = field(default_factory=list)
    served: int = 0


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
    (each input's exit layer) and "depth" (inputs in flight) for metrics, and "rerun" (rows of each layer
    call re-running watched inputs for the ``guard``; at most ``rerun_backlog`` of them wait, by default
    4 x ``max_batch``). ``nice``, ``idle``: see :func:`lower_priority`.
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
        guard: AccuracyGuard | None = None,
        nice: int = 0,
        idle: bool = False,
        rerun_backlog: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise RomebertError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.segments = segments
        self.default = policy
        self.collator = collator
        self.temperatures = temperatures
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.priority = nice, idle  # its threads' below the caller's (the event loop's): see lower_priority
        self.observe = observe or (lambda event, value: None)
        self._lanes: dict[str, _Lane] = {}
        self._lane(policy)  # fail now on a bad default policy
        self._rows: dict[int, tuple[Job, int]] = {}  # row id -> (its job, its index in the job)
        self._next_row = 0
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.guard = guard
        self._watched: dict[int, _Watched] = {}  # row id -> a watched input (of a request, or re-running)
        self._shadow: _Lane | None = None
        self._shadow_in_flight = 0
        # re-runs in flight; past it, watched early exits are dropped (and the re-runs go first)
        self._shadow_cap = rerun_backlog or 4 * max_batch
        if guard is not None:  # re-runs: every input to the last layer (entropy < 0 never holds)
            self._shadow = _Lane(EarlyExitEngine(segments, get_policy("entropy", 0.0), temperatures), max_batch)
            self._guard_due = threading.Event()
            threading.Thread(target=self._guard_updates, name="romebert-guard", daemon=True).start()
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
        guarded = self.guard is not None and policy is None and thresholds is None
        job.threshold = list(self.guard.thresholds) if guarded else (policy or self.default).threshold
        if not features:
            on_done(job)
            return job
        watch = self.guard.watch(len(features)) if guarded else None
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
                if watch is not None and watch[i]:
                    self._watched[r] = _Watched(features[i])
            lane.new.append(_Pending(list(features), list(thresholds or [job.threshold] * len(features)), rows,
                                     time.perf_counter()))  # fmt: skip
            self._in_flight += len(features)
            self.observe("depth", self._in_flight)
            self._cond.notify()
        return job

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, finish every input in flight (up to ``timeout`` s), stop the worker (re-runs
        still waiting are dropped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.guard is not None:
            self._guard_due.set()

    def _guard_updates(self) -> None:
        """The guard's thread: an update whenever the batcher says one is due (the search takes a few ms
        to tens of ms; the batcher does not wait for it)."""
        lower_priority(*self.priority)
        while True:
            self._guard_due.wait()
            self._guard_due.clear()
            if self._stopping:
                return
            self.guard.update()

    # ------------------------------------------------------------------------------------ the worker
    def _lane(self, policy: ExitPolicy) -> _Lane:
        key = repr({k: v for k, v in policy.params().items() if k != "threshold"})
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(EarlyExitEngine(self.segments, policy, self.temperatures), self.max_batch)
        return lane

    def _all_lanes(self) -> list[_Lane]:
        return [*self._lanes.values(), self._shadow] if self._shadow is not None else list(self._lanes.values())

    def _run(self) -> None:
        lower_priority(*self.priority)
        while True:
            with self._cond:
                while not self._stopping and self._in_flight == 0 and self._shadow_in_flight == 0:
                    self._cond.wait()
                if self._stopping and self._in_flight == 0:
                    return
                starts = [(lane, lane.new) for lane in self._all_lanes() if lane.new]
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
        has waited ``max_wait_ms`` (or the service is draining); else nothing yet. Re-runs go when none
        of that can, or first when a full batch of them waits at some layer or their backlog is full (so
        the guard keeps learning under sustained load, a batch at a time)."""
        shadow = self._shadow
        if shadow is not None and (
            self._shadow_in_flight >= self._shadow_cap or max(shadow.queues.waiting) >= self.max_batch
        ):
            return self._deepest(shadow)
        work = self._regular()
        if work is None and shadow is not None and self._shadow_in_flight:
            return self._deepest(shadow)
        return work

    @staticmethod
    def _deepest(lane: _Lane) -> tuple[_Lane, int] | None:
        layer = max((i for i, w in enumerate(lane.queues.waiting) if w), default=None)
        return None if layer is None else (lane, layer)

    def _regular(self) -> tuple[_Lane, int] | None:
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
        shadow = lane is self._shadow
        self.observe("rerun" if shadow else "batch", len(group))
        done: list = []
        seen: list | None = [] if self._watched else None
        survivors = lane.engine.run_layer(layer, group, done, [], seen)
        if survivors is not None:
            lane.queues.put(layer + 1, survivors)
        for rows, logits in seen or ():
            for r, lg in zip(rows.tolist(), logits):
                w = self._watched.get(r)
                if w is not None:
                    w.logits.append(lg)
        if shadow:
            if done:  # re-runs leave at the last layer only
                self._rerun_done([r for rows, _, _ in done for r in rows.tolist()])
            return
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
                    if self._watched:
                        self._watched_exit(r, exit_layer)
                self._in_flight -= len(rows)
            self.observe("depth", self._in_flight)
        for job in finished:
            job.on_done(job)

    # ------------------------------------------------------------------------------------ the guard
    def _watched_exit(self, row: int, exit_layer: int) -> None:
        """A request's input left (under the lock): a watched one that ran every layer is a sample now;
        one that left early re-runs to the final exit in the shadow lane, if its backlog has room."""
        w = self._watched.pop(row, None)
        if w is None:
            return
        if exit_layer == self.guard.num_layers:
            self._sample([w], [exit_layer])
        elif self._shadow_in_flight >= self._shadow_cap:
            self.guard.note_dropped(1)
        else:
            copy = self._next_row
            self._next_row += 1
            self._watched[copy] = _Watched(w.features, served=exit_layer)
            self._shadow.new.append(_Pending([w.features], [0.0], [copy], time.perf_counter()))
            self._shadow_in_flight += 1

    def _rerun_done(self, rows: list[int]) -> None:
        with self._cond:
            done = [self._watched.pop(r) for r in rows]
            self._shadow_in_flight -= len(rows)
        self._sample(done, [w.served for w in done])
        self.guard.note_rerun(len(done), len(done) * self.guard.num_layers)

    def _sample(self, watched: list[_Watched], served: list[int]) -> None:
        logits = np.stack([np.stack(w.logits) for w in watched], axis=1)  # [L, m, C]
        if self.guard.add(logits, np.asarray(served)):
            self._guard_due.set()

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            jobs = {id(job): job for job, _ in self._rows.values()}
            self._rows.clear()
            self._watched.clear()
            for lane in self._all_lanes():
                lane.new, lane.oldest0 = [], None
                lane.queues = LayerQueues(lane.engine.num_layers, self.max_batch, lane.engine.merge_groups,
                                          lane.engine.select_rows)  # fmt: skip
            self._in_flight = self._shadow_in_flight = 0
        for job in jobs.values():
            job.error = exc
            job.on_done(job)
