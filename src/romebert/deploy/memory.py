"""A process's memory between bursts of work: C-heap settings and trimming (glibc; elsewhere no-ops).

A burst allocates much more than a service holds at rest (bodies, features, ONNX Runtime's tensors,
1,500 connections). glibc gives each busy thread an allocation arena of its own, and memory freed in
one arena only goes back to the system when that arena is trimmed; with the event loop, the batcher
and the parse threads each in their own arena, what stays after a burst depends on which thread last
touched which pages. :func:`one_arena` makes every thread share the main arena (a service's threads
take turns on its cores anyway), and :func:`release_memory`, called once the service is idle, returns
its free pages (scoring a file trims after every chunk).

Python's own small-object allocator (pymalloc) sits on top: it takes memory in 1 MiB arenas, returns an
arena only once every object in it is gone, and never returns the pages of the free pools inside one.
The few hundred small objects that outlive each burst (held by C-level caches) land wherever the burst
left room, so each burst can pin arenas of its own and RSS ratchets up. With the objects on the C heap
(``PYTHONMALLOC=malloc``) a survivor pins one page, and the trim returns the rest:
:func:`restart_on_c_heap` restarts a process that way (``romebert serve`` does, unless
``--no-system-allocator``). docs/serving.md has the RSS across repeated bursts.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter
# The interpreter and glibc read these at start-up only. glibc's per-thread caches (tcache) hold up to
# 7 freed chunks of every size per thread, counted as in use: the trim cannot return their pages. Two
# keep most of their speed (docs/serving.md).
C_HEAP_ENV = {"PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=2"}


def objects_on_c_heap() -> bool:
    """Whether this interpreter allocates its objects with the C library's malloc (no pymalloc: then
    ``sys.getallocatedblocks`` has no blocks to count)."""
    return sys.getallocatedblocks() == 0


def restart_on_c_heap() -> None:
    """Replace this process with its own command line run again with :data:`C_HEAP_ENV` (a variable the
    user set keeps its value); returns at once where objects are already on the C heap, where the C
    library is not glibc (no trim to return pages), or where ``PYTHONMALLOC`` is set already (the user's
    choice, or ignored by the interpreter: ``python -E``)."""
    if objects_on_c_heap() or _libc() is None or "PYTHONMALLOC" in os.environ:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**C_HEAP_ENV, **os.environ})


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
