"""A process's memory between bursts of work: C-heap settings and trimming (glibc; elsewhere no-ops).

A burst allocates much more than a service holds at rest (bodies, features, ONNX Runtime's tensors,
1,500 connections). glibc gives each busy thread an allocation arena of its own, and memory freed in
one arena only goes back to the system when that arena is trimmed; with the event loop, the batcher
and the parse threads each in their own arena, what stays after a burst depends on which thread last
touched which pages. :func:`one_arena` makes every thread share the main arena (a service's threads
take turns on its cores anyway), and :func:`release_memory`, called once the service is idle, returns
its free pages (scoring a file trims after every chunk). docs/serving.md has the RSS across repeated bursts.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_arena() -> None:
    """Every thread allocates from the main arena from now on (threads that already have one keep it)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now (modules, the model's Python side, the app) out of the
    collector's generations (``gc.freeze``): the collections a burst triggers then walk only the burst's
    own objects, which shortens the pauses of the event loop while it refuses requests."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Free unreachable cycles, then return the C heap's free pages to the system (:func:`trim_c_heap`)."""
    gc.collect()
    trim_c_heap()


def trim_c_heap() -> None:
    """Return the C heap's free pages, in every arena, to the system (glibc's malloc_trim; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both)
        return libc
    except (OSError, AttributeError):
        return None
