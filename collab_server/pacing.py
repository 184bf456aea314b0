"""Long work done a part at a time, so the event loop handles what is ready between the parts. Periodic passes
over every connection or room go in slices: a keepalive pass over 5,000 idle connections takes ~0.1 s, and done in
one callback, every message that arrives meanwhile waits for all of it. A coroutine with a long run of synchronous
steps (a room's load, a batch of broker entries) offers the loop a turn between them (`Turns`), and long work in a
worker thread (a compaction's fold) offers it the GIL (`GilTurns`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

SLICE = 128  # items per turn of the event loop: a few milliseconds of sends at most
TURN = 0.01  # seconds of a coroutine's synchronous steps between the turns it gives the rest of the loop
GIL_TURN = 0.001  # seconds of a worker thread's work between offers of the GIL to the event loop


class Turns:
    """`await turns.offer()` between the steps of a long run gives the rest of the event loop a turn once per
    TURN of them."""

    __slots__ = ("ends",)

    def __init__(self) -> None:
        self.ends = time.perf_counter() + TURN

    async def offer(self) -> None:
        if time.perf_counter() >= self.ends:
            await asyncio.sleep(0)
            self.ends = time.perf_counter() + TURN


class GilTurns:
    """`turns.offer()` between the steps of long work in a worker thread offers the GIL to other threads once per
    GIL_TURN of them, so the event loop waits at most about that long behind it rather than a whole switch
    interval (5 ms)."""

    __slots__ = ("ends",)

    def __init__(self) -> None:
        self.ends = time.perf_counter() + GIL_TURN

    def offer(self) -> None:
        if time.perf_counter() >= self.ends:
            time.sleep(0)
            self.ends = time.perf_counter() + GIL_TURN


def in_slices(items: Sequence[T], action: Callable[[T], None], *, what: str, size: int = SLICE) -> None:
    """Apply `action` to every item, `size` of them per turn of the running loop, starting now. An item
    whose action raises is logged and skipped; the others still get theirs. Nothing refers to `items` once the
    last slice has run (a closure that schedules itself is a reference cycle: it held every connection or room of
    a pass, closed or unloaded ones included, until the cyclic collector's next full collection)."""
    _run_slice(asyncio.get_running_loop(), items, action, what, size, 0)


def _run_slice(loop: asyncio.AbstractEventLoop, items: Sequence[T], action: Callable[[T], None], what: str,
               size: int, start: int) -> None:
    for item in items[start:start + size]:
        try:
            action(item)
        except Exception:
            log.exception("%s failed for %r", what, item)
    if start + size < len(items):
        loop.call_soon(_run_slice, loop, items, action, what, size, start + size)
