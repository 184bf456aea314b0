"""The event-loop lag watcher (collab_server/looplag.py): a loop held up is measured and logged."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from collab_server import looplag
from collab_server.metrics import Metrics


def lag_sum(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("collab_event_loop_lag_seconds_sum") or 0.0


async def test_a_loop_held_up_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    caplog.set_level(logging.WARNING, logger="collab_server.looplag")
    watcher = asyncio.create_task(looplag.watch(metrics, interval=0.02, warn=0.2))
    try:
        await asyncio.sleep(0.1)
        assert not caplog.records and lag_sum(metrics) < 0.2  # an idle loop is not held up
        time.sleep(0.3)  # a synchronous step the loop cannot leave
        async with asyncio.timeout(5):
            while not caplog.records:
                await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    assert caplog.records[0].getMessage().startswith("event loop held up for 0.")
    assert lag_sum(metrics) >= 0.28
