"""Giving the C heap's freed memory back to the operating system (glibc's `malloc_trim`).

glibc keeps what a process frees for reuse and on its own returns only free memory at the top of its heap. After
documents are loaded, folded and unloaded and connections come and go, most freed memory lies between live
allocations, so the resident size stays near its peak: 40 s after 90 clients had edited 30 documents for a minute
and left, 133 MB were resident without trimming and 64 MB with it (48 MB at start; benchmarks/README.md, finding
40). `collab-server serve` trims every `--heap-trim-interval` seconds, in a worker thread (ctypes releases the GIL
for the call; ~9 ms for that heap, ~0.04 ms when there is little to give back).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

from collab_server.pacing import in_thread

log = logging.getLogger(__name__)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def resident_bytes() -> int:
    """This process's resident set size, or 0 where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


async def trim_every(interval: float, trim: Callable[[], int]) -> None:
    """Run `trim` every `interval` seconds in a worker thread, for ever; a failure is logged and the next one tried.
    A trim with little to give back takes ~0.04 ms: only those after a busy spell hold a heap's lock for long."""
    while True:
        await asyncio.sleep(interval)
        before, started = resident_bytes(), time.perf_counter()
        try:
            await in_thread(trim)
        except Exception:
            log.exception("heap trim failed")
            continue
        log.debug("heap trimmed: resident %.1f -> %.1f MB in %.2f ms", before / 1e6, resident_bytes() / 1e6,
                  (time.perf_counter() - started) * 1000)
