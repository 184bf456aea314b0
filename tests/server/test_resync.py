"""The resync loop (collab_server/resync.py) in process: it outlives a failing check."""

from __future__ import annotations

import asyncio
import logging

import pytest

from collab_server.resync import Resync


class _Rooms:
    loaded: dict = {}


class _FlakyStore:
    """`updated` fails the first time with an error that is not a StorageError, then answers."""

    def __init__(self) -> None:
        self.calls = 0
        self.answered = asyncio.Event()

    async def updated(self, docs: list[str]) -> dict[str, float]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("something nobody expected")
        self.answered.set()
        return {}


async def test_an_unexpected_error_is_logged_and_the_next_check_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    store = _FlakyStore()
    task = asyncio.create_task(Resync(_Rooms(), store, 0.01).run())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="collab_server.resync"):
        await asyncio.wait_for(store.answered.wait(), 5)
    assert not task.done() and "resync failed" in caplog.text
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
