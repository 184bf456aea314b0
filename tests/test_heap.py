"""Returning freed C heap memory to the OS (collab_server/heap.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from collab_server.heap import malloc_trim, resident_bytes, trim_every


def test_glibc_trim_is_found_and_runs() -> None:
    trim = malloc_trim()
    assert trim is not None  # this project's machines run glibc
    assert trim() in (0, 1)  # 1: memory was released
    assert resident_bytes() > 0


async def test_trims_repeat_in_a_worker_thread_and_survive_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collab_server.heap")
    loop = asyncio.get_running_loop()
    on_loop, calls, third = [], [], asyncio.Event()

    def trim() -> int:
        on_loop.append(_running_loop_here())
        calls.append(1)
        if len(calls) == 1:
            raise OSError("first trim fails")
        if len(calls) == 3:
            loop.call_soon_threadsafe(third.set)
        return 1

    task = asyncio.create_task(trim_every(0.01, trim))
    try:
        await asyncio.wait_for(third.wait(), 5)
    finally:
        task.cancel()
    assert on_loop[:3] == [False, False, False]  # never on the event loop's thread
    assert "heap trim failed" in caplog.text and "heap trimmed: resident" in caplog.text


def _running_loop_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True

