"""The room registry's periodic work: one keepalive and one awareness timer for all loaded rooms, each pass
done in slices."""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from pycrdt import Doc, Text

from collab_server.broker import Kind
from collab_server.broker.local import LocalBroker
from collab_server.metrics import Metrics
from collab_server.pacing import TURN
from collab_server import surrogates
from collab_server.replay import READ_APART, Replay
from collab_server import replay as replay_module
from collab_server import room as room_module
from collab_server.room import Room, RoomClosed
from collab_server.slicing import SLICE_STRUCTS, SlowDocuments, slow_documents
from collab_server.rooms import Rooms
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import deletion, second_unit, slow_text, text_updates

T = TypeVar("T")


class _Peer:
    """Stands in for a connection: counts the keepalive passes that reached it."""

    def __init__(self, name: str, kept_alive: dict[str, int]) -> None:
        self.name, self.kept_alive = name, kept_alive

    def keep_alive(self, since: float) -> None:
        self.kept_alive[self.name] = self.kept_alive.get(self.name, 0) + 1


async def test_rooms_share_two_timers_that_stop_when_no_room_is_loaded(tmp_path: Path, monkeypatch) -> None:
    """Every loaded room is swept and every connection kept alive on the registry's timers, one failing room
    does not stop the others', and with no room loaded nothing keeps waking the loop."""
    store = SQLiteStore(str(tmp_path / "r.db"))
    await store.open()
    rooms = Rooms(store, LocalBroker(), Metrics(), idle_unload_seconds=0.01, awareness_timeout=0.04,
                  keepalive_interval=0.02)
    swept: dict[str, int] = {}
    kept_alive: dict[str, int] = {}

    def sweep(room: Room) -> None:
        swept[room.name] = swept.get(room.name, 0) + 1
        if room.name == "broken":
            raise RuntimeError("sweep failed")

    monkeypatch.setattr(Room, "sweep", sweep)
    try:
        loaded = [await rooms.acquire(name) for name in ("a", "broken", "b")]
        for room in loaded:
            room.connections.add(_Peer(room.name, kept_alive))  # type: ignore[arg-type]
        assert all(room._subscription is not None for room in loaded)
        async with asyncio.timeout(10):
            while min(swept.get(name, 0) for name in ("a", "broken", "b")) < 3 or len(kept_alive) < 3:
                await asyncio.sleep(0.01)
        for room in loaded:
            room.connections.clear()
            rooms.release(room)
        async with asyncio.timeout(10):
            while rooms.loaded or rooms._keepalive_timer or rooms._sweep_timer:
                await asyncio.sleep(0.01)
        again = await rooms.acquire("a")  # loading a room starts them again
        assert rooms._keepalive_timer is not None and rooms._sweep_timer is not None
        rooms.release(again)
    finally:
        await rooms.close()
        await store.close()
    assert rooms._keepalive_timer is None and rooms._sweep_timer is None


async def test_a_room_held_during_a_delete_stores_nothing_more(tmp_path: Path) -> None:
    """An API request or a session can still hold a room the document was deleted from under: whatever it
    applies afterwards is refused, so a late message never writes the deleted document back."""
    store = SQLiteStore(str(tmp_path / "d.db"))
    await store.open()
    rooms = Rooms(store, LocalBroker(), Metrics())
    try:
        _, updates = text_updates(3)
        room = await rooms.acquire("d")
        await room.apply(updates[0])
        await room.flush()
        assert await rooms.delete("d") is True
        with pytest.raises(RoomClosed):
            await room.apply(updates[1])
        rooms.release(room)
        assert await store.load("d") == [] and "d" not in rooms.loaded
        assert await rooms.delete("d") is False
        reloaded = await rooms.acquire("d")  # the name starts over
        assert reloaded is not room and reloaded.doc.get_state() == b"\x00"
        rooms.release(reloaded)
    finally:
        await rooms.close()
        await store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An open store, closed however the test ends (its threads would keep the process from exiting)."""
    store = SQLiteStore(str(tmp_path / "r.db"))
    await store.open()
    yield store
    await store.close()


@asynccontextmanager
async def counting_turns(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[int]]:
    """Meanwhile each update or part of one applied to a document being built (slow_documents times each) takes 5 ms
    more; yields how many turns the rest of the loop had had as each began."""
    timed = SlowDocuments.timed
    seen_at: list[int] = []

    def slower(documents: SlowDocuments, name: str | None, apply: Callable[[T], object], update: T) -> None:
        seen_at.append(turns)
        time.sleep(0.005)
        timed(documents, name, apply, update)

    monkeypatch.setattr(SlowDocuments, "timed", slower)
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    ticker = asyncio.create_task(tick())
    try:
        yield seen_at
    finally:
        ticker.cancel()
        monkeypatch.setattr(SlowDocuments, "timed", timed)


async def load_counting_turns(store: SQLiteStore, name: str,
                              monkeypatch: pytest.MonkeyPatch) -> tuple[Room, list[int]]:
    """Load room `name` counting turns (see counting_turns)."""
    async with counting_turns(monkeypatch) as seen_at:
        room = Room(name, store, LocalBroker(), Metrics())
        await room.load()
    return room, seen_at


def typed_after(doc: Doc, client_id: int, chars: str) -> bytes:
    """What a replica holding `doc` sends when it types `chars` at the end of its text."""
    replica = Doc(client_id=client_id)
    replica.apply_update(doc.get_update())
    text = replica.get("t", type=Text)
    before = replica.get_state()
    text += chars
    return replica.get_update(before)


async def test_a_long_load_gives_the_event_loop_turns(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load replays stored updates on the event loop: one that takes long (here 40 updates of 5 ms each) lets the
    loop run other work every TURN, rather than holding every connection of the process until it is done."""
    doc, updates = text_updates(40)
    for update in updates:
        await store.submit("d", update)
    room, seen_at = await load_counting_turns(store, "d", monkeypatch)
    assert str(room.doc.get("t", type=Text)) == str(doc.get("t", type=Text))
    assert len(seen_at) == 40
    # ~200 ms of replay: the loop ran other work about every TURN (10 ms) of it
    assert seen_at[-1] - seen_at[0] >= 0.2 / TURN / 2


async def test_a_document_known_to_be_slow_is_loaded_in_parts_with_turns_between(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """yrs holds the GIL while it applies an update, and integrating some documents takes a second
    (collab_server/slicing.py): a load applies a large update of a document seen to be slow in parts of
    SLICE_STRUCTS structs, giving the loop turns between them."""
    doc = slow_text(2000)
    text = doc.get("t", type=Text)
    update = doc.get_update()
    name = "test_rooms-slow"
    await store.submit(name, update)
    slow_documents.note(name)  # as an earlier slow load would
    room, seen_at = await load_counting_turns(store, name, monkeypatch)
    assert str(room.doc.get("t", type=Text)) == str(text)
    assert len(seen_at) >= 2000 // SLICE_STRUCTS
    assert seen_at[-1] - seen_at[0] >= len(seen_at) // 8  # parts of 5 ms: a turn every TURN (10 ms), give or take


async def test_a_large_stored_update_is_read_for_emoji_off_the_event_loop(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python reads a state for characters beyond the BMP ~12 times slower than yrs applies it: a load reads a
    large update in a worker thread (the GIL is handed back and forth every few ms meanwhile), and the room knows
    its characters after, so a cut of one is made as Yjs makes it."""
    doc = Doc()
    text = doc.get("t", type=Text)
    for i in range(3000):
        text.insert(0, "😀" if i % 3 == 0 else "x")  # each typed before the last: items that cannot join
    update = doc.get_update()
    assert len(update) >= READ_APART
    await store.submit("emoji", update)
    reads: list[tuple[int, bool]] = []
    scan = surrogates.Scan.__init__

    def read(self: surrogates.Scan, data: bytes, cuts: bool = True) -> None:
        reads.append((len(data), threading.current_thread() is threading.main_thread()))
        scan(self, data, cuts)

    monkeypatch.setattr(surrogates.Scan, "__init__", read)
    room = Room("emoji", store, LocalBroker(), Metrics())
    await room.load()
    assert str(room.doc.get("t", type=Text)) == str(text)
    assert (len(update), False) in reads and not any(on_loop for size, on_loop in reads if size >= READ_APART)
    characters = surrogates.Characters()
    characters.add(update)
    client, clocks = next(iter(characters.seconds.items()))
    await room.apply(deletion(client, min(clocks)))
    assert str(room.doc.get("t", type=Text)).count("\ufffd") == 1
    await room.flush()


async def slow_room_with_an_emoji(store: SQLiteStore, name: str) -> tuple[Room, Doc]:
    """Room `name`, loaded from a slow document (see slow_text) with an emoji at the start, and that document; the
    room's document is known to be slow, as after an earlier slow load."""
    doc = slow_text(2000)
    doc.get("t", type=Text).insert(0, "😀")
    await store.submit(name, doc.get_update())
    slow_documents.note(name)
    room = Room(name, store, LocalBroker(), Metrics())
    await room.load()
    return room, doc


async def test_a_cut_in_a_large_document_is_read_in_a_worker_thread_and_counted_to_its_update(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading all of the cut client's text for the character took the loop ~0.1 s per 50,000 items: a large
    one is read in a worker thread, the loop going on meanwhile, and the rebuild counts as the update's time
    (fairshare.py). The document is then the one a Yjs replica holds."""
    doc = Doc()
    text = doc.get("t", type=Text)
    text += "😀" + "x" * (2 * READ_APART)
    name = "test_rooms-large-cut"
    await store.submit(name, doc.get_update())
    room = Room(name, store, LocalBroker(), Metrics())
    await room.load()
    cut = deletion(*second_unit(doc))
    threads: list[str] = []
    run = surrogates.Fix.run

    def recorded_run(fix: surrogates.Fix) -> tuple[bytes | None, list[tuple[int, int]]]:
        threads.append(threading.current_thread().name)
        return run(fix)

    monkeypatch.setattr(surrogates.Fix, "run", recorded_run)
    turned = asyncio.Event()
    asyncio.get_running_loop().call_soon(turned.set)
    spent = await room.apply(cut)
    assert turned.is_set() and threads and threads[0] != threading.main_thread().name
    expected = Replay()
    for update in (doc.get_update(), cut):
        expected.apply(update)
    assert str(room.doc.get("t", type=Text)) == str(expected.doc.get("t", type=Text))
    assert str(room.doc.get("t", type=Text)).startswith("\ufffd")
    assert spent > 0
    await room.close()


async def test_a_cut_in_a_document_known_to_be_slow_rebuilds_it_in_parts_while_changes_wait(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change cutting a character between its UTF-16 units has the room rebuild its document (surrogates.py).
    Rebuilt whole, a slow document would hold the loop for as long as its load; rebuilt in parts, the loop has
    turns between them, while a client's change waits and other nodes' changes (broadcast, or caught up from
    storage) are deferred: once it is rebuilt, the document holds them all, as a Yjs replica does."""
    room, doc = await slow_room_with_an_emoji(store, "test_rooms-slow-cut")
    cut = deletion(*second_unit(doc))
    written, broadcast, stored = (typed_after(doc, 100 + i, chars) for i, chars in enumerate(["A", "B", "C"]))
    async with counting_turns(monkeypatch) as seen_at:
        cutting = asyncio.create_task(room.apply(cut))
        await asyncio.sleep(0)
        assert room._rebuild is not None
        writing = asyncio.create_task(room.apply(written))
        room._on_broker(Kind.UPDATE, broadcast, False)
        assert room.catch_up([stored]) is True
        await asyncio.gather(cutting, writing)
        await room.flush()
    expected = Replay()
    for update in [doc.get_update(), cut, written, broadcast, stored]:
        expected.apply(update)
    want = str(expected.doc.get("t", type=Text))
    assert want.startswith("\ufffd") and sorted(want[-3:]) == list("ABC")  # the cut made as Yjs makes it
    assert str(room.doc.get("t", type=Text)) == want
    assert len(seen_at) >= 2000 // SLICE_STRUCTS
    assert seen_at[-1] - seen_at[0] >= len(seen_at) // 8  # parts of 5 ms: a turn every TURN (10 ms), give or take
    await room.close()


async def test_a_room_closed_while_it_rebuilds_stops_the_rebuild_and_refuses_the_changes_that_wait(
        store: SQLiteStore) -> None:
    """A room can be deleted, or the server stop, while it rebuilds its document: the rebuild is dropped, and a
    change that waits for it is refused as any change to a closed room is, rather than applied and stored."""
    room, doc = await slow_room_with_an_emoji(store, "test_rooms-slow-cut-closed")
    cutting = asyncio.create_task(room.apply(deletion(*second_unit(doc))))
    await asyncio.sleep(0)
    rebuild = room._rebuild
    assert rebuild is not None and not rebuild.done()
    await room.close()
    with pytest.raises(RoomClosed):
        await cutting
    assert rebuild.cancelled() and room._rebuild is None
    assert len(await store.load(room.name)) == 1  # nothing more stored


async def test_at_shutdown_a_rebuild_still_running_at_half_the_grace_stops_and_its_changes_are_refused(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopping gives the connections' messages half its graceful timeout; a rebuild still running then
    (minutes, for a large document in parts) held the sessions waiting on it until uvicorn cancelled them, each
    logging a traceback, and then the shutdown itself: it stops, and the changes waiting are refused, never
    applied or stored (their clients send them again)."""
    rooms = Rooms(store, LocalBroker(), Metrics())
    room, doc = await slow_room_with_an_emoji(store, "test_rooms-slow-cut-shutdown")
    rooms.loaded[room.name] = room
    async with counting_turns(monkeypatch):  # every part takes 5 ms more: the rebuild takes over 150 ms
        cutting = asyncio.create_task(room.apply(deletion(*second_unit(doc))))
        await asyncio.sleep(0)
        rebuild = room._rebuild
        assert rebuild is not None
        waiting = asyncio.create_task(room.apply(typed_after(doc, 100, "A")))
        rooms.stop_at(asyncio.get_running_loop().time() + 0.02)
        async with asyncio.timeout(5):
            for change in (cutting, waiting):
                with pytest.raises(RoomClosed):
                    await change
            assert rebuild.cancelled()
            await rooms.close()
    assert len(await store.load(room.name)) == 1  # nothing more stored


async def test_a_rebuild_that_fails_discards_the_room(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that fails leaves the document in doubt: the room is discarded (its clients reconnect to a fresh
    load of what is stored), and the change that waited for it is refused, not applied to the old document."""
    room, doc = await slow_room_with_an_emoji(store, "test_rooms-slow-cut-fails")

    async def failing(*args: object) -> Doc:
        raise RuntimeError("no memory left")

    monkeypatch.setattr(room_module, "build_paced", failing)
    with pytest.raises(RoomClosed):
        await room.apply(deletion(*second_unit(doc)))
    assert room.failed and room._rebuild is None
    assert len(await store.load(room.name)) == 1
    await room.close()


async def test_a_cut_stored_in_the_log_of_a_document_known_to_be_slow_is_made_before_the_load_applies_it(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load replays the log as a Yjs replica would: a character a stored change cuts is replaced before anything
    is applied (surrogates.precut), so the document is not built twice; a slow document's state is applied in
    parts, with the loop's turns between them."""
    doc = slow_text(2000)
    doc.get("t", type=Text).insert(0, "😀")
    cut = deletion(*second_unit(doc))
    name = "test_rooms-slow-cut-stored"
    for update in (doc.get_update(), cut):
        await store.submit(name, update)
    slow_documents.note(name)

    async def no_rebuild(*args: object) -> Doc:
        raise AssertionError("the document was rebuilt")

    monkeypatch.setattr(replay_module, "build_paced", no_rebuild)
    room, seen_at = await load_counting_turns(store, name, monkeypatch)
    expected = Replay()
    for update in (doc.get_update(), cut):
        expected.apply(update)
    assert str(room.doc.get("t", type=Text)) == str(expected.doc.get("t", type=Text))
    assert str(room.doc.get("t", type=Text)).startswith("\ufffd")
    assert len(seen_at) >= 2000 // SLICE_STRUCTS  # the state loaded in parts
    assert seen_at[-1] - seen_at[0] >= len(seen_at) // 8


class _GatedLoads(SQLiteStore):
    """Counts loads; while `gate` is clear, a load waits for it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.loads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def load(self, doc: str) -> list[bytes]:
        self.loads += 1
        await self.gate.wait()
        return await super().load(doc)


async def test_a_room_is_never_loaded_twice_at_once(tmp_path: Path) -> None:
    """A room unloading while a client waits to join it: the waiter reloads it, and a client arriving during that
    reload joins the same room. (The name's lock was dropped as the unload released it, with the waiter not yet
    running; the late client took a new lock and loaded a second room, which replaced the first in the registry
    and its broker subscription: the first room's clients stopped hearing other nodes.)"""
    store = _GatedLoads(str(tmp_path / "r.db"))
    await store.open()
    rooms = Rooms(store, LocalBroker(), Metrics(), idle_unload_seconds=3600)
    first = await rooms.acquire("r")
    rooms.release(first)
    closing, original_close = asyncio.Event(), first.close

    async def slow_close() -> None:
        await closing.wait()
        await original_close()

    first.close = slow_close  # type: ignore[method-assign]
    unload = asyncio.create_task(rooms._unload(first))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(rooms.acquire("r"))  # waits for the unload
    await asyncio.sleep(0)
    store.gate.clear()
    closing.set()
    await unload
    async with asyncio.timeout(5):
        while store.loads < 2:  # the waiter is reloading the room
            await asyncio.sleep(0)
    late = asyncio.create_task(rooms.acquire("r"))
    for _ in range(10):
        await asyncio.sleep(0)
    store.gate.set()
    reloaded, joined = await waiter, await late
    assert joined is reloaded and rooms.loaded["r"] is reloaded and store.loads == 2
    rooms.release(reloaded)
    rooms.release(joined)
    await rooms.close()
    await store.close()
