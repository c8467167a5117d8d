"""glibc's malloc settings for the processes that stream large buffers: a worker (a task's arrays)
and the merge (each shard's blobs, each SQLite connection's caches)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def tune() -> None:
    """Serve allocations up to 64 MiB from the heap and keep up to 256 MiB of it free.

    glibc's defaults (and Dask's nanny, which starts workers with MALLOC_TRIM_THRESHOLD_ at 64 KiB,
    freezing the mmap threshold at 128 KiB) give every large buffer freshly mapped pages, and each
    free hands the top of the heap back to the kernel, so the next task, or the next shard of a
    merge, faults it in again (README, Performance). Process-wide: called where unidask's work is
    what the process does."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
