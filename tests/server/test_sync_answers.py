"""Sync requests alike (fresh clients opening a document, a client asking again) share one encoding of the answer,
kept only while the room's document is unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text

from collab_server import protocol as p
from collab_server.broker.local import LocalBroker
from collab_server.connection import Connection
from collab_server.metrics import Metrics
from collab_server.room import Room
from collab_server.storage.sqlite import SQLiteStore
from tests.server.test_held_back import histories


@pytest.fixture
async def room(tmp_path: Path) -> AsyncIterator[Room]:
    store = SQLiteStore(str(tmp_path / "answers.db"))
    await store.open()
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    yield room
    await room.close()
    await store.close()


def typed(doc: Doc, chars: str) -> bytes:
    """Type `chars` at the end of `doc`'s text; the update that makes."""
    before = doc.get_state()
    doc.get("t", type=Text).insert(len(str(doc.get("t", type=Text)).encode()), chars)
    return doc.get_update(before)


def text_of(*updates: bytes) -> str:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("t", type=Text))


class _Asker:
    """A connection that records the sync answers it is sent."""

    def __init__(self, room: Room) -> None:
        self.answers: list[bytes] = []
        self.messages: list[bytes] = []
        self.answered = asyncio.Event()
        self.conn = Connection(self._send, room.metrics)

    async def _send(self, message: dict) -> None:
        if message["type"] == "websocket.send":
            msg = p.decode_message(message["bytes"])
            if isinstance(msg, p.SyncMessage) and msg.kind == p.SyncType.STEP2:
                self.answers.append(msg.payload)
                self.messages.append(message["bytes"])
                self.answered.set()


async def test_requests_alike_share_one_answer_until_the_document_changes(room: Room) -> None:
    writer = Doc(client_id=7)
    hello = typed(writer, "hello")
    await room.apply(hello)
    await room.flush()
    fresh = await room.encode_state()
    assert await room.encode_state() is fresh  # one encoding for both
    assert text_of(fresh) == "hello"
    askers = [_Asker(room), _Asker(room)]
    for asker in askers:
        await room.handle(asker.conn, p.sync_step1(b"\x00"))
    async with asyncio.timeout(5):
        for asker in askers:
            await asker.answered.wait()
            asker.conn.close(1000, "done")
            await asker.conn.wait_closed()
    first, second = (asker.messages[0] for asker in askers)
    assert first is second and p.decode_message(first).payload == fresh  # one message in both send queues

    at_hello = writer.get_state()
    await room.apply(typed(writer, " world"))
    await room.flush()
    changed = await room.encode_state()
    assert changed is not fresh and text_of(changed) == "hello world"
    lacked = await room.encode_state(at_hello)
    assert text_of(hello, lacked) == "hello world" and text_of(lacked) == ""  # the rest only

    room.sweep()  # asked for since the last sweep: kept
    assert await room.encode_state(at_hello) is lacked
    room.sweep()
    room.sweep()  # nobody asked in between: forgotten, encoded again when asked
    again = await room.encode_state(at_hello)
    assert again is not lacked and again == lacked


@settings(max_examples=100, deadline=None)
@given(history=histories(), data=st.data())
def test_every_answer_is_what_the_document_lacks_at_that_moment(tmp_path_factory: pytest.TempPathFactory,
                                                                history: list[tuple[int, bytes]],
                                                                data: st.DataObject) -> None:
    """Clients' changes (emoji typed and cut between their UTF-16 units, so the document is now and then rebuilt)
    interleaved at random with sync requests, at the empty state or at states the room passed through, and with
    sweeps: each answer is exactly the update the room's document would encode afresh at that moment."""
    steps = []
    for _, update in history:
        steps.append(("apply", update))
        for _ in range(data.draw(st.integers(0, 2), label="requests")):
            steps.append(data.draw(st.sampled_from([("ask", "empty"), ("ask", "passed"), ("sweep", None)])))
    picks = [data.draw(st.integers(0, 1_000), label="state picked") for _ in steps]
    asyncio.run(_check_answers(tmp_path_factory.mktemp("answers"), steps, picks))


async def _check_answers(path: Path, steps: list[tuple[str, object]], picks: list[int]) -> None:
    store = SQLiteStore(str(path / "answers.db"))
    await store.open()
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    asker = _Asker(room)
    passed = [b"\x00"]  # state vectors the room's document had
    expected: list[bytes] = []
    try:
        for (step, arg), pick in zip(steps, picks):
            if step == "apply":
                await room.apply(arg)  # type: ignore[arg-type]
                await room.flush()
                passed.append(room.doc.get_state())
            elif step == "sweep":
                room.sweep()
            else:
                state = b"\x00" if arg == "empty" else passed[pick % len(passed)]
                await room.handle(asker.conn, p.sync_step1(state))
                expected.append(room.doc.get_update(state))  # no await since the answer was encoded
        async with asyncio.timeout(5):
            while len(asker.answers) < len(expected):
                asker.answered.clear()
                await asker.answered.wait()
        assert asker.answers == expected
    finally:
        asker.conn.close(1000, "done")
        await asker.conn.wait_closed()
        await room.close()
        await store.close()
