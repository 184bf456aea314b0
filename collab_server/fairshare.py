"""A connection's share of the event loop. Most messages take microseconds, but some take the loop for
milliseconds or more: an update cutting an emoji between its UTF-16 units rebuilds its room's document
(surrogates.py), a sync request on a large document encodes all of it. A client sending such messages as fast as
it can took the loop from every other room (two clients cutting emoji put another room's updates 0.4 s late at
p50). Each connection has an account of the loop time its messages took, refilled at `share` seconds a second up
to what BURST seconds bring; once it is overdrawn the connection is not read until it is even again, so TCP holds
its further messages back, its peers and every other room go on, and nothing it sent is refused. The account is
small (12.5 ms at the default share): with 0.5 s, each of two clients cutting emoji took the loop for its first
half second, and the other room's p99 was 2-5x longer. A single costly message is still handled whole; only the
next one waits (a 200 ms update: 0.75 s)."""

from __future__ import annotations

import math
import time

BURST = 0.05  # seconds a connection's account takes to fill: it holds at most share × BURST of loop time


class LoopShare:
    """The loop time one connection's messages took against its share."""

    __slots__ = ("share", "balance", "stamp")

    def __init__(self, share: float) -> None:
        self.share = share  # of the loop's time, over a while; 0: unlimited
        self.balance = BURST * share
        self.stamp = time.perf_counter()

    def available(self) -> float:
        """Seconds of loop time the connection's messages may take now before it is overdrawn (inf: unlimited)."""
        if not self.share:
            return math.inf
        return min(BURST * self.share, self.balance + (time.perf_counter() - self.stamp) * self.share)

    def spend(self, seconds: float) -> float:
        """Account for a message that took the loop `seconds`; return how long to pause reading (0: none)."""
        if not self.share:
            return 0.0
        now = time.perf_counter()
        self.balance = min(BURST * self.share, self.balance + (now - self.stamp) * self.share) - seconds
        self.stamp = now
        return -self.balance / self.share if self.balance < 0 else 0.0
