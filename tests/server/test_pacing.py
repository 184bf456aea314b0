"""Passes over many connections or rooms run in slices, with the event loop turning between them."""

import asyncio
import gc
import logging
import weakref

import pytest

from collab_server.pacing import in_slices


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
