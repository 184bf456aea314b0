"""Changes a room's document holds back until their dependencies arrive (collab_server/heldback.py): stored,
relayed to every client, kept across a rebuild, and checked for characters they cut."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text

from collab_server import protocol as p
from collab_server.broker import Kind
from collab_server.broker.local import LocalBroker
from collab_server.connection import Connection
from collab_server.metrics import Metrics
from collab_server.room import Room
from collab_server.storage.sqlite import SQLiteStore
from collab_server.surrogates import Characters, apply
from tests.rawclient import deletion, second_unit, two_changes, two_waiting_on_one


class Client:
    """A connection whose messages are applied to a document, as a y-websocket client would. Yjs integrates
    held-back structs that wait on each other once their dependencies come; yrs drops them, so every update
    received is given again with each new one."""

    def __init__(self, room: Room) -> None:
        self.doc = Doc()
        self.updates: list[bytes] = []
        self.received = asyncio.Event()
        self.conn = Connection(self._send, room.metrics)
        room.join(self.conn)

    async def _send(self, message: dict) -> None:
        if message["type"] != "websocket.send":
            return
        msg = p.decode_message(message["bytes"])
        if isinstance(msg, p.SyncMessage) and msg.kind != p.SyncType.STEP1:
            self.doc.apply_update(msg.payload)
            for update in self.updates:
                self.doc.apply_update(update)
            self.updates.append(msg.payload)
            self.received.set()

    async def close(self) -> None:
        self.conn.close(1000, "done")
        await self.conn.wait_closed()

    async def sync(self, room: Room) -> None:
        await room.handle(self.conn, p.sync_step1(self.doc.get_state()))

    def text(self) -> str:
        return str(self.doc.get("t", type=Text))


@pytest.fixture
async def room(tmp_path: Path):
    store = SQLiteStore(str(tmp_path / "held.db"))
    await store.open()
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    yield room
    await room.close()
    await store.close()


async def stored_text(room: Room, *elsewhere: bytes) -> str:
    """The text of what the room stored, with what `elsewhere` (another node) stored. Applied twice: yrs drops
    structs that wait on other held-back structs when those integrate."""
    await room.flush()
    doc, characters = Doc(), Characters()
    for update in [*await room.store.load(room.name), *elsewhere] * 2:
        doc = apply(doc, update, characters)
    return str(doc.get("t", type=Text))


async def wait_for(client: Client, text: str) -> None:
    async def until() -> None:
        while client.text() != text:
            client.received.clear()
            await client.received.wait()
    await asyncio.wait_for(until(), 5)


async def test_a_client_change_held_back_is_stored_and_relayed(room: Room) -> None:
    first, later = two_changes("ab", 1, "X")
    watcher = Client(room)
    await room.apply(later)  # from a client that got `first` from another node, whose event is still to come
    room._on_broker(Kind.UPDATE, first, False)
    await wait_for(watcher, "aXb")
    assert await stored_text(room, first) == "aXb"


async def test_another_nodes_change_integrated_late_reaches_clients_that_synced_without_it(room: Room) -> None:
    first, later = two_changes("ab", 1, "X")
    early = Client(room)
    room._on_broker(Kind.UPDATE, later, False)  # committed by another node, before the change it builds on
    await asyncio.wait_for(early.received.wait(), 5)  # relayed as it came
    late = Client(room)
    await late.sync(room)  # gets the document's state, which holds nothing of `later`
    assert late.text() == ""
    room._on_broker(Kind.UPDATE, first, False)
    await wait_for(late, "aXb")


async def test_two_changes_waiting_on_the_same_change_both_integrate_when_it_comes(room: Room) -> None:
    """yrs (0.28), given two held-back changes that wait on the same change, integrates one of them when it comes
    and drops the other; the room gives what it held back again."""
    before, waiting, awaited, want = two_waiting_on_one()
    assert want == "dcbea"
    plain = Doc()
    for update in [*before, *waiting, awaited]:
        plain.apply_update(update)
    assert str(plain.get("t", type=Text)) != want  # what yrs alone makes of it (if this fails, yrs was fixed)
    client = Client(room)
    for update in before:
        await room.apply(update)
    for update in waiting:
        room._on_broker(Kind.UPDATE, update, False)
    await room.apply(awaited)
    assert str(room.doc.get("t", type=Text)) == want
    await wait_for(client, want)
    assert await stored_text(room, *waiting) == want
    await client.close()


async def test_a_rebuilt_document_keeps_what_it_held_back(room: Room) -> None:
    first, later = two_changes("ab", 1, "X")
    await room.apply(emoji_update())
    client, clock = second_unit(room.doc)
    room._on_broker(Kind.UPDATE, later, False)
    await room.apply(deletion(client, clock))  # cuts the emoji: the document is rebuilt
    await room.apply(first)
    assert str(room.doc.get("t", type=Text)) == "aXb"
    assert await stored_text(room) == "aXb"


def emoji_update() -> bytes:
    doc = Doc()
    doc.get("e", type=Text).insert(0, "c😀d")
    return doc.get_update()


async def test_a_change_held_back_that_cuts_a_character_still_to_come_cuts_it_as_yjs_does(room: Room) -> None:
    doc = Doc()
    doc.get("t", type=Text).insert(0, "a😀b")
    emoji = doc.get_update()
    cut = deletion(*second_unit(doc))  # the emoji's second UTF-16 unit, before the emoji has arrived
    await room.apply(cut)
    await room.apply(emoji)
    assert str(room.doc.get("t", type=Text)) == "a\ufffdb"
    assert await stored_text(room) == "a\ufffdb"


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Edits by three writers, each hearing of the others' edits now and then (and not passing them on):
    (writer, update) in the order made."""
    docs = [Doc(client_id=i + 1) for i in range(3)]
    made: list[tuple[int, bytes]] = []
    hearing = [False]
    for writer, doc in enumerate(docs):
        doc.observe(lambda event, writer=writer: hearing[0] or made.append((writer, event.update)))
    for _ in range(draw(st.integers(2, 14))):
        writer = draw(st.integers(0, 2))
        doc, text = docs[writer], docs[writer].get("t", type=Text)
        if draw(st.booleans()) and len(text):
            start = draw(st.integers(0, len(text) - 1))
            del text[start:min(len(text), start + draw(st.integers(1, 3)))]
        else:
            text.insert(draw(st.integers(0, len(text))), draw(st.sampled_from(["x", "yz"])))
        source = draw(st.integers(0, 2))
        if source != writer:  # the writer hears of another's edits, so its next ones build on them
            hearing[0] = True
            docs[writer].apply_update(docs[source].get_update(docs[writer].get_state()))
            hearing[0] = False
    return made


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), data=st.data())
def test_changes_arriving_in_any_order_from_clients_and_other_nodes_all_reach_room_store_and_clients(
        tmp_path_factory: pytest.TempPathFactory, history: list[tuple[int, bytes]], data: st.DataObject) -> None:
    """Each writer's changes come in the order it made them (a websocket is FIFO), through a client connection or
    as another node's commits, interleaved at random with the other writers'. Whatever the order, the room, what
    is stored (with the other nodes' commits) and a client that joined at the start hold every change."""
    queues = {writer: [update for w, update in history if w == writer] for writer in range(3)}
    from_node = {writer: data.draw(st.booleans(), label=f"writer {writer} on another node") for writer in range(3)}
    order = []
    while any(queues.values()):
        writer = data.draw(st.sampled_from(sorted(w for w, q in queues.items() if q)))
        order.append((writer, queues[writer].pop(0)))
    expected = Doc()
    for _, update in history:
        expected.apply_update(update)
    want = str(expected.get("t", type=Text))
    asyncio.run(_deliver(tmp_path_factory.mktemp("held"), order, from_node, want))


async def _deliver(path: Path, order: list[tuple[int, bytes]], from_node: dict[int, bool], want: str) -> None:
    store = SQLiteStore(str(path / "held.db"))
    await store.open()
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    client = Client(room)
    try:
        elsewhere = []
        for writer, update in order:
            if from_node[writer]:
                room._on_broker(Kind.UPDATE, update, False)
                elsewhere.append(update)
            else:
                await room.apply(update)
        assert str(room.doc.get("t", type=Text)) == want
        await wait_for(client, want)
        assert await stored_text(room, *elsewhere) == want
    finally:
        await client.close()
        await room.close()
        await store.close()


@pytest.mark.parametrize("compacted", [False, True], ids=["log", "checkpoint"])
async def test_a_load_integrates_stored_changes_that_wait_on_a_later_entry(tmp_path: Path, compacted: bool) -> None:
    """A log holding two changes that wait on the same change before it (content a client got from another tab,
    whose own connection sent it later), in log entries or carried in a checkpoint: the loaded room holds it all."""
    before, waiting, awaited, want = two_waiting_on_one()
    store = SQLiteStore(str(tmp_path / "log.db"))
    await store.open()
    for update in [*before, *waiting]:
        await store.submit("doc", update)
    if compacted:
        await store.compact("doc")
    await store.submit("doc", awaited)
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    assert str(room.doc.get("t", type=Text)) == want
    await room.close()
    await store.close()
