"""Readiness checks that answer promptly: a backend that does not answer at all (a frozen PostgreSQL or Redis)
would hold each `/ready` for its client's own timeouts (20 s, 5 s), longer than a load balancer's probe waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

CHECK_TIMEOUT = 1.0  # seconds `/ready` waits for a backend's answer before reporting that it timed out


class Check:
    """Whether a backend answers, by its `ping` (which raises when it is unreachable), within `timeout` seconds.

    A ping that has not answered in time is left to end by its own timeouts, not cancelled (a query or command
    cancelled in flight leaves its connection to clean up, which a frozen backend may hold up as long), and the
    next checks wait on it rather than start more: a prober asking every second does not pile up pings, each
    holding a connection, while its backend hangs.
    """

    def __init__(self, what: str, ping: Callable[[], Awaitable[None]], timeout: float = CHECK_TIMEOUT) -> None:
        self.what = what
        self.timeout = timeout
        self._ping = ping
        self._pending: asyncio.Future[None] | None = None

    async def __call__(self) -> None:
        """Return once the backend answers; raise what its ping raises, or TimeoutError ("<what> timed out")."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._ping())
        try:  # shielded: a check that gives up leaves the ping running (its failure is then marked retrieved)
            await asyncio.wait_for(asyncio.shield(self._pending), self.timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.what} timed out: no answer within {self.timeout:g} s") from None
