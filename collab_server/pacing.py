"""Long work done a part at a time, so the event loop handles what is ready between the parts. Periodic passes
over every connection or room go in slices: a keepalive pass over 5,000 idle connections takes ~0.1 s, and done in
one callback, every message that arrives meanwhile waits for all of it. A coroutine with a long run of synchronous
steps (a room's load, a batch of broker entries) offers the loop a turn between them (`Turns`), long work in a
worker thread (a compaction's fold) offers it the GIL (`GilTurns`), and a busy loop offers the GIL to the worker
threads it waits on (`offering_gil`, `in_thread`)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

SLICE = 128  # items per turn of the event loop: a few milliseconds of sends at most
TURN = 0.01  # seconds of a coroutine's synchronous steps between the turns it gives the rest of the loop
GIL_TURN = 0.001  # seconds of a worker thread's work between offers of the GIL to the event loop, and back


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


class _GilOffers:
    """A loop's offers of the GIL to the worker threads it waits on, every GIL_TURN while it waits on any.

    A thread back from a blocking call (SQLite's write and fsync, the wait for its next job) must take the GIL again
    to finish. CPython asks the holder to hand it over only once the GIL has gone a whole switch interval (5 ms)
    without changing hands, and an event loop that is never idle lets go of it for an instant at every turn (its
    poll for I/O) and takes it straight back, which restarts that wait: so the thread waits as long as the loop stays
    busy. Measured with a client flooding one room, a commit for another room took 0.1-0.5 s (and that room's
    updates as long to reach anyone); with a loop busy in Python, an aiosqlite call waited up to a minute."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _GilOffers] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.waiting = 0  # awaited jobs of worker threads; no reference to the loop: it keys the registry weakly
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _GilOffers:
        offers = cls._by_loop.get(loop)
        if offers is None:
            offers = cls._by_loop[loop] = cls()
        return offers

    def start(self) -> None:
        self.waiting += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(GIL_TURN, self._offer)

    def stop(self) -> None:
        self.waiting -= 1
        if not self.waiting and self._timer is not None:
            self._timer.cancel()  # a pending timer would keep the loop, and so this registry entry, alive
            self._timer = None

    def _offer(self) -> None:
        time.sleep(0)  # lets go of the GIL for ~50-80 µs (timer slack): a waiting thread takes it meanwhile
        self._timer = asyncio.get_running_loop().call_later(GIL_TURN, self._offer)


async def offering_gil(job: Awaitable[T]) -> T:
    """`await job`, which a worker thread does, the running loop offering it the GIL every GIL_TURN meanwhile (see
    _GilOffers); a job done sooner costs no offer."""
    offers = _GilOffers.of(asyncio.get_running_loop())
    offers.start()
    try:
        return await job
    finally:
        offers.stop()


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread (asyncio.to_thread), offered the GIL while the loop waits on it."""
    return await offering_gil(asyncio.to_thread(function, *args))


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


async def every(interval: float, step: Callable[[], Awaitable[Any]], what: str, *,
                expected: tuple[type[Exception], ...] = (), at_once: bool = False) -> None:
    """Run `step` every `interval` seconds (the first time at once if `at_once`) until cancelled. A failure is logged
    (one line for an `expected` one, a traceback otherwise) and the next run comes as planned: an unexpected error
    must not end the work for the node's lifetime."""
    if not at_once:
        await asyncio.sleep(interval)
    while True:
        try:
            await step()
        except expected as exc:
            log.warning("%s failed error=%s", what, exc)
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(interval)
