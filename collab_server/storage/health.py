"""Whether commits are failing, stuck or the database is corrupt: for the log, for /ready, and to hold clients
off meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from collab_server.logs import Throttled

log = logging.getLogger("collab_server.storage")

FAILING_FOR = 10.0  # seconds after the latest failed commit that the store still counts as failing
RETRY_AFTER = 5  # seconds a client refused while storage fails is asked to wait (HTTP Retry-After)
PROBE_EVERY = 1.0  # while commits fail, one new client per this many seconds is let in: do they work again?
SETTLED = 0.5  # seconds after the latest failure that a success ends the spell in the log (a nearly full disk
# lets a commit through now and then: each would otherwise log a recovery)
STUCK_AFTER = 1.0  # seconds a commit may take before commits count as stuck (/ready answers 503)
STUCK_WARN = 5.0  # seconds a commit may take before the log warns that it is stuck (then once per 10 s)


class CommitHealth:
    """A full disk or a lost database fails every commit: the first failure is logged, then at most one line every
    10 s, and one line when commits succeed again (with the time from the spell's first failure to the first
    success after its last). `failing` is the latest error while commits fail: until one succeeds, or FAILING_FOR
    seconds after the latest failure, so a node a load balancer stopped sending clients to (and so commits) is
    tried again.

    Meanwhile each failure resets its room and closes its connections, and a client let in again would sync
    (which resets y-websocket's backoff), re-send its edit, fail and be back in 200 ms: a reload storm. So `admits`
    lets one new client in per PROBE_EVERY seconds, from PROBE_EVERY after the latest failure on; its commits tell
    whether storage works again. The others are refused, and their backoff grows.

    A database found corrupt (`corrupted`) stays failing for the life of the process, whatever commits do: a
    truncated `-wal` let commits go on "succeeding" into a file no restart could open. Repairing it is left to an
    operator (restore a backup). `on_error`, if set, is called at each such finding (a metric counts them).

    A store runs each group commit in `committing()`: a commit that does not come back (a frozen file system, where
    /ready's `SELECT 1` is answered from the page cache) makes `stuck_for` report it after STUCK_AFTER seconds,
    the log warn after STUCK_WARN (then once per 10 s) and say when it completes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.on_error: Callable[[], None] | None = None
        self._log = Throttled(log, logging.ERROR, clock=clock)
        self._log_corrupt = Throttled(log, logging.ERROR, clock=clock)
        self.corrupt: str | None = None  # why the database was found corrupt, once it was
        self._log_stuck = Throttled(log, logging.WARNING, clock=clock)
        self._in_flight: list[float] = []  # when each commit in flight began, by `clock`
        self._error: str | None = None
        self._failures = 0
        self._first = self._latest = 0.0
        self._recovered = 0.0  # the first success after the latest failure: when the spell ended
        self._next_probe = float("-inf")

    @property
    def failing(self) -> str | None:
        if self.corrupt is not None:
            return self.corrupt
        if self._error is not None and self.clock() - self._latest < FAILING_FOR:
            return self._error
        return None

    def admits(self) -> bool:
        """Whether a new client may come in now."""
        if self.failing is None:
            return True
        now = self.clock()
        if now - self._latest < PROBE_EVERY or now < self._next_probe:
            return False
        self._next_probe = now + PROBE_EVERY
        return True

    def failed(self, updates: int, exc: BaseException) -> None:
        now = self.clock()
        if not self._failures or now - self._latest >= FAILING_FOR:  # a new spell (an old one may have ended
            self._failures, self._first = 0, now  # with a success too early to count as settled)
        self._failures += 1
        self._latest, self._error = now, reason(exc)
        self._log("storage commit failed updates=%d error=%s", updates, self._error)

    def corrupted(self, exc: BaseException) -> None:
        """Storage found the database corrupt (reading, folding or writing it): failing from now on."""
        self.corrupt, self._latest = reason(exc), self.clock()
        self._log_corrupt("storage: the database is corrupt; restore it from a backup: %s", self.corrupt)
        if self.on_error is not None:
            self.on_error()

    @property
    def stuck_for(self) -> float | None:
        """Seconds the oldest commit in flight has taken, once that is STUCK_AFTER or more; else None."""
        if not self._in_flight:
            return None
        waited = self.clock() - min(self._in_flight)
        return waited if waited >= STUCK_AFTER else None

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Around a commit, from when its batch is taken to when it is written or has failed."""
        started = self.clock()
        self._in_flight.append(started)
        loop = asyncio.get_running_loop()
        warning = loop.call_later(STUCK_WARN, self._warn_stuck, loop, started)
        try:
            yield
        finally:
            warning.cancel()
            self._in_flight.remove(started)
            if (took := self.clock() - started) >= STUCK_WARN:
                log.warning("storage commit completed after %.1f s", took)

    def _warn_stuck(self, loop: asyncio.AbstractEventLoop, started: float) -> None:
        """Warn (throttled), and look again in a while, as long as the commit begun at `started` is in flight."""
        if started in self._in_flight:
            self._log_stuck("storage commit stuck for %.0f s: storage does not answer", self.clock() - started)
            loop.call_later(STUCK_WARN, self._warn_stuck, loop, started)

    def succeeded(self) -> None:
        now = self.clock()
        if self._error is not None:
            self._error, self._recovered = None, now
        if self._failures and now - self._latest >= SETTLED:  # the spell's length: its first failure to recovery
            log.warning("storage commits succeed again after %d failed over %.1f s",
                        self._failures, self._recovered - self._first)
            self._failures = 0


def reason(exc: BaseException) -> str:
    """What went wrong, for a message: a timeout (acquiring a connection, a statement) says nothing itself."""
    return str(exc) or type(exc).__name__
