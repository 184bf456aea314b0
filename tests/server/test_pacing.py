"""Passes over many connections or rooms run in slices, with the event loop turning between them; a busy loop
still lets the worker threads it waits on finish."""

import asyncio
import gc
import logging
import time
import weakref
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from collab_server.pacing import in_slices
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import text_updates


async def test_a_pass_gives_the_loop_back_between_slices_and_survives_a_failing_item(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    done: list[int] = []
    ready_meanwhile: list[int] = []

    def action(item: int) -> None:
        if item == 5:
            raise RuntimeError("one bad item")
        done.append(item)
        if item == 0:  # made ready while the first slice runs: it must run before the second slice
            loop.call_soon(lambda: ready_meanwhile.append(len(done)))

    with caplog.at_level(logging.ERROR, logger="collab_server.pacing"):
        in_slices(range(300), action, what="test pass", size=128)
        assert len(done) == 127  # the first slice runs at once
        async with asyncio.timeout(5):
            while len(done) < 299:
                await asyncio.sleep(0)
    assert done == [item for item in range(300) if item != 5]
    assert ready_meanwhile == [127]
    assert [r.getMessage() for r in caplog.records] == ["test pass failed for 5"]


async def test_a_finished_pass_holds_nothing_for_the_cyclic_collector() -> None:
    """The rooms and connections of a pass are freed when it ends and nobody else holds them, not at the next
    full collection: every keepalive, ping and awareness pass would otherwise keep closed connections and
    unloaded documents in memory until then."""
    class Item:
        pass

    items = [Item() for _ in range(300)]
    refs = [weakref.ref(item) for item in items]
    gc.disable()
    try:
        in_slices(items, lambda item: None, what="test pass", size=128)
        del items  # the pass is the only holder now
        async with asyncio.timeout(5):  # three slices, then nothing refers to them
            while any(ref() is not None for ref in refs):
                await asyncio.sleep(0)
    finally:
        gc.enable()


async def test_commits_and_folds_go_on_while_the_event_loop_is_kept_busy(tmp_path: Path) -> None:
    """A worker thread back from SQLite (or a fold) must take the GIL again, which CPython hands over only after
    5 ms without a switch; a loop that never idles lets go of it for an instant at every turn, and so kept the
    thread waiting while it stayed busy (measured: up to a minute per aiosqlite call). With a coroutine busy in
    Python between turns, as a client flooding a room keeps the loop, commits and a compaction still finish."""
    store = SQLiteStore(str(tmp_path / "busy.db"))
    await store.open()
    source, updates = text_updates(20)
    stop = False

    async def busy() -> None:
        while not stop:
            ends = time.perf_counter() + 0.001
            while time.perf_counter() < ends:
                pass
            await asyncio.sleep(0)

    async def commit_and_fold() -> None:
        for update in updates:  # one at a time: a trip to the writer thread each
            await store.submit("d", update)
        await store.compact("d")

    spinning = asyncio.create_task(busy())
    try:
        try:
            await asyncio.wait_for(commit_and_fold(), 20)
        finally:
            stop = True
            await spinning
        [checkpoint] = await store.load("d")
    finally:
        await store.close()
    doc = Doc()
    doc.apply_update(checkpoint)
    assert str(doc.get("t", type=Text)) == str(source.get("t", type=Text))
