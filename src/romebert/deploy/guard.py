"""The accuracy guard: per-exit thresholds that keep early answers close to the final exit's as traffic drifts.

A fraction ``guard_rate`` of the inputs is *watched*: the logits of every exit they pass are kept, and
those that leave early are also run to the final exit, off the request's path (the service's batcher
runs them in a low-priority lane; batch prediction in a second pass). A watched input then has every
exit's logits [L, C], so the guard can replay any thresholds on it with ``ExitPolicy.decide``, the
engines' own decisions. The most recent ``guard_window`` watched inputs are a uniform sample of the
traffic; for thresholds t the guard counts the share of the sample whose exit under t answers otherwise
than the final exit (the *disagreement*), with a one-sided Wilson bound at ``guard_confidence``.

Every ``guard_every`` new watched inputs it moves the thresholds in force, one exit and one grid step at
a time (the grid: quantiles of the sample's exit scores, inside the criterion's bounds):

* too loose (the lower bound above ``max_disagreement``, or the upper bound above it once the window
  holds enough samples for a clean sample to be within): it tightens the exit that removes the most
  disagreements per layer of work added, until the upper bound is within;
* certified with room (the upper bound at a stricter confidence, 1 - (1 - c) / 5, within): it loosens
  the exit that saves the most layers per disagreement added, while that bound stays within;
* otherwise it waits for more samples.

The bound is computed on the sample the thresholds were chosen on, so it is optimistic; the stricter
confidence for loosening offsets that, the window slides, and the next update corrects a choice that new
traffic contradicts. Pure numpy: the batcher and the classifier feed it; tests feed it synthetic logits.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.options import option
from romebert.runtime.exit_policy import ExitPolicy, threshold_vector
from romebert.runtime.policies import candidate_thresholds, get_policy

GRID_POINTS = 24  # quantiles of the sample's exit scores a threshold may move between (plus the bounds)


@dataclass
class GuardOptions:
    """The accuracy guard's settings (``romebert serve`` flags; ``EarlyExitClassifier.accuracy_guard``)."""

    guard_rate: float = option(0.0, "accuracy guard: the share of inputs watched; those that exit early also "
                               "run to the final exit, off the request's path (0: no guard)")  # fmt: skip
    max_disagreement: float = option(0.02, "accuracy guard: keep the upper confidence bound of the share of "
                                     "early answers that differ from the final exit's within this")  # fmt: skip
    guard_window: int = option(500, "accuracy guard: the estimate uses this many most recent watched inputs")
    guard_every: int = option(25, "accuracy guard: watched inputs between two threshold updates")
    guard_confidence: float = option(0.95, "accuracy guard: one-sided confidence of the bound (Wilson)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.guard_rate <= 1.0:
            raise RomebertError(f"--guard-rate must lie in [0, 1], got {self.guard_rate}")
        if not 0.0 < self.max_disagreement < 1.0:
            raise RomebertError(f"--max-disagreement must lie in (0, 1), got {self.max_disagreement}")
        for name in ("guard_window", "guard_every"):
            if getattr(self, name) < 1:
                raise RomebertError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.5 <= self.guard_confidence < 1.0:
            raise RomebertError(f"--guard-confidence must lie in [0.5, 1), got {self.guard_confidence}")

    @property
    def enabled(self) -> bool:
        return self.guard_rate > 0.0


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """One-sided Wilson score bounds (lower, upper) of a proportion ``k / n`` at normal quantile ``z``
    ((0, 1) when there is no sample)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


class AccuracyGuard:
    """Watches a share of the inputs of one exit policy and moves its per-exit thresholds (see the module).

    ``policy``: the starting criterion, threshold(s) and options; ``bounds``: the criterion's threshold
    bounds for this model (``EarlyExitClassifier.threshold_bounds``). Thread-safe: a batcher adds samples
    while another thread updates.
    """

    def __init__(self, policy: ExitPolicy, num_layers: int, bounds: tuple[float, float], options: GuardOptions,
                 regression: bool = False, seed: int = 0) -> None:  # fmt: skip
        if regression:
            raise RomebertError("the accuracy guard compares class answers; a regression model has none")
        if num_layers < 2:
            raise RomebertError("the accuracy guard needs a model with at least two exits")
        params = policy.params()
        self.criterion = params.pop("criterion")
        params.pop("threshold")
        self.policy_options: dict[str, Any] = params
        self.sign = type(policy).stricter(**params)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.num_layers = num_layers
        self.options = options
        start = threshold_vector(policy.threshold, num_layers)[: num_layers - 1]
        self.thresholds: tuple[float, ...] = tuple(float(np.clip(t, *self.bounds)) for t in start)
        self._z = NormalDist().inv_cdf(options.guard_confidence)
        # hysteresis: loosening needs the bound at a stricter confidence (0.99 for 0.95), which offsets the
        # optimism of bounding thresholds on the sample they were chosen on
        self._z_loosen = NormalDist().inv_cdf(1 - (1 - options.guard_confidence) / 5)
        # the fewest samples whose bound can be within the target at all (none of them disagreeing)
        target = options.max_disagreement
        self.min_samples = math.ceil(self._z**2 * (1 - target) / target)
        self._rng = np.random.default_rng(seed)
        self._window: deque[np.ndarray] = deque(maxlen=options.guard_window)  # each [L, C]
        self._new = 0
        self._lock = threading.Lock()
        # what the guard did (Prometheus counters)
        self.watched = self.rerun_rows = self.rerun_layers = self.dropped = 0
        self.checked = self.disagreed = self.updates = 0
        self.state: dict[str, Any] = {"samples": 0, "estimate": math.nan, "lower": math.nan, "upper": math.nan,
                                      "speedup": math.nan,
                                      "exit_disagreement": [math.nan] * (num_layers - 1)}  # fmt: skip

    # ------------------------------------------------------------------------------- fed by a runtime
    def policy(self) -> ExitPolicy:
        """The policy with the thresholds in force."""
        return get_policy(self.criterion, list(self.thresholds), **self.policy_options)

    def watch(self, n: int) -> np.ndarray:
        """Which of ``n`` new inputs to watch ([n] bool, each with probability ``guard_rate``)."""
        with self._lock:
            picked = self._rng.random(n) < self.options.guard_rate
            self.watched += int(picked.sum())
        return picked

    def add(self, all_logits: np.ndarray, served: np.ndarray) -> bool:
        """Watched inputs done: every exit's logits [L, m, C] and the exit each was answered at [m]
        (1-based). True when an :meth:`update` is due."""
        x = np.asarray(all_logits)
        if x.ndim != 3 or x.shape[0] != self.num_layers:
            raise RomebertError(f"the guard needs every exit's logits [{self.num_layers}, m, C], got {x.shape}")
        served = np.asarray(served, dtype=np.int64)
        preds = x.argmax(-1)  # [L, m]
        early = served < self.num_layers
        differs = preds[served - 1, np.arange(x.shape[1])] != preds[-1]
        with self._lock:
            self._window.extend(np.moveaxis(x, 1, 0))
            self._new += x.shape[1]
            self.checked += int(early.sum())
            self.disagreed += int((differs & early).sum())
            return self._new >= self.options.guard_every

    def note_rerun(self, rows: int, layers: int) -> None:
        with self._lock:
            self.rerun_rows += rows
            self.rerun_layers += layers

    def note_dropped(self, rows: int) -> None:
        with self._lock:
            self.dropped += rows

    # ---------------------------------------------------------------------------------- the decision
    def update(self) -> bool:
        """Move the thresholds on the current window (see the module); True when they changed."""
        with self._lock:
            self._new = 0
            if not self._window:
                return False
            x = np.stack(self._window, axis=1)  # [L, m, C]
            current = self.thresholds
        m = x.shape[1]
        wrong = x.argmax(-1) != x[-1].argmax(-1)  # [L, m]: exit k's answer differs from the final one
        grid = self._grid(x, current)
        scores: dict = {}  # exit scores shared by every replay of this window

        def replay(levels: tuple[int, ...]) -> tuple[int, int, np.ndarray]:
            exit_layer, _ = get_policy(self.criterion, [float(grid[g]) for g in levels],
                                       **self.policy_options).decide(x, scores=scores)  # fmt: skip
            return int(wrong[exit_layer - 1, np.arange(m)].sum()), int(exit_layer.sum()), exit_layer

        levels = tuple(int(np.flatnonzero(grid == t)[0]) for t in current)
        k, work, exits = replay(levels)
        low, high = wilson(k, m, self._z)
        target = self.options.max_disagreement
        if low > target or (m >= self.min_samples and high > target):
            while high > target:
                step = self._best(levels, -1, len(grid), replay, k, work)
                if step is None:
                    break
                levels, k, work, exits = step
                high = wilson(k, m, self._z)[1]
        elif wilson(k, m, self._z_loosen)[1] <= target:
            while True:
                step = self._best(
                    levels, +1, len(grid), replay, k, work, lambda kk: wilson(kk, m, self._z_loosen)[1] <= target
                )
                if step is None:
                    break
                levels, k, work, exits = step
        chosen = tuple(float(grid[g]) for g in levels)
        with self._lock:
            changed = chosen != self.thresholds
            self.thresholds = chosen
            self.updates += int(changed)
            self.state = self._describe(k, work, m, exits, wrong)
        return changed

    def _best(self, levels, direction, size, replay, k, work, allowed=None):
        """The best one-exit move ``direction`` (-1: stricter, +1: looser) from ``levels``: per exit, the
        nearest grid level that changes the sample's outcome; the winner removes the most disagreements
        per layer added (tightening) or saves the most layers per disagreement added (loosening)."""
        best, best_key = None, None
        for e in range(len(levels)):
            g = levels[e] + direction
            while 0 <= g < size:
                moved = levels[:e] + (g,) + levels[e + 1 :]
                k2, work2, exits2 = replay(moved)
                if (k2, work2) != (k, work):
                    break
                g += direction
            else:
                continue
            if direction < 0:
                key = ((k - k2) / max(work2 - work, 1), k - k2, -work2)
            else:
                if work2 >= work or not allowed(k2):
                    continue
                key = ((work - work2) / (max(k2 - k, 0) + 1), work - work2, -k2)
            if best_key is None or key > best_key:
                best, best_key = (moved, k2, work2, exits2), key
        return best

    def _grid(self, x: np.ndarray, current: tuple[float, ...]) -> np.ndarray:
        """The thresholds a move may land on, strictest first: score quantiles of the sample, the bounds
        and the thresholds in force, all inside the bounds."""
        confidence = self.policy_options.get("confidence", "entropy")
        values = candidate_thresholds(self.criterion, x, num=GRID_POINTS, confidence=confidence)
        lo, hi = self.bounds
        pool = {float(np.clip(v, lo, hi)) for v in values} | {lo, hi} | set(current)
        return np.asarray(sorted(pool, key=lambda v: -self.sign * v))

    def _describe(self, k: int, work: int, m: int, exits: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
        low, high = wilson(k, m, self._z)
        per_exit = []
        for e in range(1, self.num_layers):
            here = exits == e
            per_exit.append(float(wrong[e - 1, here].mean()) if here.any() else math.nan)
        return {"samples": m, "estimate": k / m, "lower": low, "upper": high, "speedup": self.num_layers * m / work,
                "exit_disagreement": per_exit}  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """The thresholds in force, the last estimate and the counters (what the metrics show)."""
        with self._lock:
            counters = {name: getattr(self, name) for name in ("watched", "rerun_rows", "rerun_layers", "dropped",
                                                               "checked", "disagreed", "updates")}  # fmt: skip
            return {**self.state, **counters, "thresholds": list(self.thresholds), "window": len(self._window),
                    "max_disagreement": self.options.max_disagreement}  # fmt: skip
