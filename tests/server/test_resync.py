"""The resync loop (collab_server/resync.py) in process: it outlives a failing check."""

from __future__ import annotations

import asyncio
import logging
import time
from array import array

import pytest
from pycrdt import Doc

from collab_server.metrics import Metrics
from collab_server.resync import Resync
from collab_server.storage import LogMark


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
    with caplog.at_level(logging.ERROR, logger="collab_server.pacing"):
        await asyncio.wait_for(store.answered.wait(), 5)
    assert not task.done() and "resync failed" in caplog.text
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class _Room:
    settled, failed = True, False
    mark: LogMark | None = None

    def __init__(self) -> None:
        self.doc = Doc()

    def catch_up(self, updates: list[bytes]) -> bool:
        return True  # storage held something this room lacked


class _StampedStore:
    def __init__(self, stamp: float) -> None:
        self.stamp = stamp

    async def updated(self, docs: list[str]) -> dict[str, float]:
        return {doc: self.stamp for doc in docs}

    async def load_new(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark | None]:
        return [], None


@pytest.mark.parametrize(("age", "level"), [(0.5, logging.DEBUG), (60.0, logging.WARNING)],
                         ids=["latest-commit-recent", "latest-commit-old"])
async def test_a_catch_up_is_a_warning_only_when_the_missing_change_cannot_still_be_in_flight(
        caplog: pytest.LogCaptureFixture, age: float, level: int) -> None:
    rooms = _Rooms()
    rooms.loaded = {"doc": _Room()}
    rooms.metrics = Metrics()
    with caplog.at_level(logging.DEBUG, logger="collab_server.resync"):
        caught = await Resync(rooms, _StampedStore(time.time() - age), 30).once()  # type: ignore[arg-type]
    assert caught == ["doc"]
    assert [(r.levelno, "room caught up from storage name=doc" in r.getMessage()) for r in caplog.records] == [
        (level, True)]


class _MarkingStore:
    """Stamps that change on every read; `load_new` notes the mark each read was given and returns a new one."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, LogMark | None]] = []

    async def updated(self, docs: list[str]) -> dict[str, float]:
        return {doc: time.time() for doc in docs}

    async def load_new(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark | None]:
        self.reads.append((doc, since))
        return [b"update"], LogMark(len(self.reads), array("q"))


async def test_a_room_reads_what_was_committed_since_its_last_catch_up() -> None:
    """Each read of a room is given the mark of its previous one, the first the mark of the room's load (so a busy
    room reads only its newest entries); a room loaded again starts from its own load's mark, since its document
    may lack what the old mark saw."""
    store = _MarkingStore()
    rooms = _Rooms()
    first = _Room()
    first.mark = LogMark(7, array("q", [3, 5]))
    rooms.loaded = {"doc": first}
    rooms.metrics = Metrics()
    resync = Resync(rooms, store, 30)  # type: ignore[arg-type]
    await resync.once()
    await resync.once()
    rooms.loaded["doc"] = _Room()  # unloaded and loaded again meanwhile
    await resync.once()
    assert store.reads == [("doc", LogMark(7, array("q", [3, 5]))), ("doc", LogMark(1, array("q"))), ("doc", None)]
    assert first.mark is None  # taken by the first read


class _BrokenRoom(_Room):
    def __init__(self) -> None:
        super().__init__()
        self.discarded: tuple[int, str] | None = None

    def catch_up(self, updates: list[bytes]) -> bool:
        raise RuntimeError("yrs refused what storage holds")

    def discard(self, code: int, reason: str) -> None:
        self.discarded = (code, reason)


async def test_a_room_that_fails_to_catch_up_is_discarded_and_the_others_still_catch_up(
        caplog: pytest.LogCaptureFixture) -> None:
    rooms = _Rooms()
    broken, fine = _BrokenRoom(), _Room()
    rooms.loaded = {"broken": broken, "fine": fine}
    rooms.metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="collab_server.pacing"):
        caught = await Resync(rooms, _MarkingStore(), 30).once()  # type: ignore[arg-type]
    assert caught == ["fine"]
    assert broken.discarded == (1011, "server error")
    assert "room failed to catch up from storage name=broken" in caplog.text
