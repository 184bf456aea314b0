"""Event-loop lag: how late a timer fires. Every connection of the process waits that long for anything, so a loop
held up (a long synchronous step, or a CPU shared with more than it can do) shows in the histogram and, past
`warn` seconds, in a warning."""

from __future__ import annotations

import asyncio
import logging

from collab_server.logs import Throttled
from collab_server.metrics import Metrics

log = logging.getLogger(__name__)


async def watch(metrics: Metrics, interval: float = 0.5, warn: float = 1.0) -> None:
    """Look every `interval` seconds until cancelled."""
    loop = asyncio.get_running_loop()
    held_up = Throttled(log, logging.WARNING)
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        lag = loop.time() - start - interval
        metrics.loop_lag.observe(lag)
        if lag >= warn:
            held_up("event loop held up for %.1f s: every connection waited that long", lag)
