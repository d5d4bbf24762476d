"""Timing on a shared 2-core machine: interleaved repeats, medians, and how busy the CPU was."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def busy_cores(seconds: float = 0.5) -> float:
    """Cores kept busy by everything on the machine over ``seconds`` (from /proc/stat; -1 if unknown)."""

    def read() -> tuple[int, int]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except OSError:
        return -1.0
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def wait_idle(limit: float, max_busy: float = 0.3) -> float:
    """Wait up to ``limit`` seconds for the machine to go quiet; returns the busy cores seen last."""
    deadline = time.monotonic() + limit
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(5)
        busy = busy_cores()
    return busy


# idle seconds before each timed pass: an ONNX Runtime session whose threads spin keeps them spinning
# some 20-30 ms after its last call (on this 2-core machine), which would slow the next path's first calls
# (each path is timed as it runs alone, the way it is deployed)
SETTLE_SECONDS = 0.1


def interleaved(work: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every repeat of every callable, the callables interleaved round-robin (so a slow
    minute of the machine hits every path alike), each pass after ``SETTLE_SECONDS`` idle."""
    for fn in work.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(repeats):
        for name, fn in work.items():
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
