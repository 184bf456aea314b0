"""Awareness: joiners get existing states, a closed connection's presence is removed, no phantom peer."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

from pycrdt import Doc

from websockets.asyncio.client import connect

from collab_server import protocol as p
from collab_server.broker import Kind
from collab_server.broker.local import LocalBroker
from collab_server.connection import Connection
from collab_server.metrics import Metrics
from collab_server.presence import CLOCK_STEP, MAX_CLOCK_TAKEN, Presence
from collab_server.room import Room
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import RawPeer, text_updates


def presence(client_id: int, clock: int, state: dict | None) -> bytes:
    return p.encode_awareness([p.AwarenessEntry(client_id, clock, json.dumps(state))])


async def test_joiner_receives_existing_states(server) -> None:
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    await alice.send(presence(111, 1, {"user": "alice"}))
    await alice.wait_for(lambda: 111 in alice.awareness)  # echoed back, as the reference server does
    bob = await RawPeer.connect(f"{server.ws_url}/room")
    await bob.wait_for(lambda: bob.awareness.get(111) == json.dumps({"user": "alice"}))


async def test_presence_removed_when_connection_drops(server) -> None:
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    bob = await RawPeer.connect(f"{server.ws_url}/room")
    await alice.send(presence(111, 3, {"user": "alice"}))
    await bob.wait_for(lambda: 111 in bob.awareness)
    alice.ws.transport.abort()  # no close handshake, no removal message from the client
    await bob.wait_for(lambda: 111 not in bob.awareness)
    removal = [e for m in bob.messages if isinstance(m, p.AwarenessMessage)
               for e in p.decode_awareness(m.payload) if e.client_id == 111 and e.removed]
    assert removal and removal[-1].clock == 4  # the clock moves past the last state, so clients accept it
    carol = await RawPeer.connect(f"{server.ws_url}/room")
    await carol.sync()
    assert 111 not in carol.awareness


async def test_older_clock_is_ignored_and_query_awareness_is_answered(server) -> None:
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    await alice.send(presence(7, 5, {"v": "new"}))
    await alice.send(presence(7, 4, {"v": "old"}))
    await alice.send(p.query_awareness())
    answers = lambda: [m for m in alice.messages if isinstance(m, p.AwarenessMessage)
                       and any(e.client_id == 7 for e in p.decode_awareness(m.payload))]
    await alice.wait_for(lambda: len(answers()) >= 2)
    assert alice.awareness[7] == json.dumps({"v": "new"})
    assert all(e.state != json.dumps({"v": "old"}) for m in answers() for e in p.decode_awareness(m.payload))


async def test_awareness_read_in_one_turn_is_relayed_as_one_message(server) -> None:
    """Cursor moves that arrive together reach every peer as one message with each client's newest state."""
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    protocol = alice.ws.protocol
    for client_id, clock in [(1, 1), (2, 1), (1, 2), (1, 3)]:
        protocol.send_binary(presence(client_id, clock, {"at": clock}))
    alice.ws.transport.write(b"".join(protocol.data_to_send()))  # four frames, one read for the server
    await watcher.wait_for(lambda: watcher.awareness.get(1) == json.dumps({"at": 3}))
    relayed = [p.decode_awareness(m.payload) for m in watcher.messages if isinstance(m, p.AwarenessMessage)]
    assert [sorted((e.client_id, e.clock) for e in entries) for entries in relayed if entries] == [[(1, 3), (2, 1)]]


async def test_no_phantom_server_peer(server_factory) -> None:
    """Defect 6: the server never invents awareness states; its keepalives carry no entries."""
    server = server_factory("--keepalive-interval", "0.2")
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    keepalives = lambda: [m for m in peer.messages if isinstance(m, p.AwarenessMessage)]
    await peer.wait_for(lambda: len(keepalives()) >= 3)
    assert all(p.decode_awareness(m.payload) == [] for m in keepalives())
    assert peer.awareness == {}


async def test_presence_not_renewed_in_time_is_removed(server_factory) -> None:
    server = server_factory("--awareness-timeout", "0.6")
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    bob = await RawPeer.connect(f"{server.ws_url}/room")
    await alice.send(presence(42, 1, {"user": "alice"}))
    await bob.wait_for(lambda: 42 in bob.awareness)
    await bob.wait_for(lambda: 42 not in bob.awareness, timeout=5)  # alice never renews
    assert not alice.closed.is_set()  # her connection stays; only the stale state goes


async def test_removals_of_clients_the_room_holds_no_state_for_are_dropped(server) -> None:
    """Such a removal changes nothing for any peer (none holds a state for it): it is not relayed, and the room
    keeps no clock for it, so it costs nothing lasting. A client's removal of its own state still goes out."""
    alice = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    unknown = [p.AwarenessEntry(500 + i, 5, "null") for i in range(15)]
    await alice.send(p.encode_awareness([*unknown, p.AwarenessEntry(7, 1, '{"me":1}')]))
    await watcher.wait_for(lambda: 7 in watcher.awareness)
    relayed = [e.client_id for m in watcher.messages if isinstance(m, p.AwarenessMessage)
               for e in p.decode_awareness(m.payload)]
    assert relayed == [7]
    await alice.send(presence(500, 1, {"late": 1}))  # no clock 5 remembered for it
    await watcher.wait_for(lambda: 500 in watcher.awareness)
    await alice.send(p.encode_awareness([p.AwarenessEntry(7, 2, "null")]))
    await watcher.wait_for(lambda: 7 not in watcher.awareness)
    await alice.send(presence(7, 1, {"me": "stale"}))  # older than the removal the room holds a clock for
    await alice.send(presence(8, 1, {"probe": 1}))
    await watcher.wait_for(lambda: 8 in watcher.awareness)
    assert 7 not in watcher.awareness and not alice.closed.is_set()


async def test_queries_are_not_answered_again_while_the_answer_waits_unsent(server_factory) -> None:
    """A peer asking for the room's awareness again and again without reading gets one answer queued, not one per
    query: 100 one-byte queries for 1 MB of states filled its send queue 12 times over, each time merged."""
    server = server_factory("--send-queue-bytes", "8000000")
    setter = await RawPeer.connect(f"{server.ws_url}/room")
    await setter.send(p.encode_awareness([p.AwarenessEntry(100 + i, 1, '"%s"' % ("x" * 60_000)) for i in range(16)]))
    await setter.wait_for(lambda: len(setter.awareness) == 16)
    asker = await connect(f"{server.ws_url}/room", max_size=None, max_queue=1)  # read no further than one frame
    for _ in range(100):
        await asker.send(p.query_awareness())
    await asker.send(p.sync_update(text_updates(1)[1][0]))  # handled once every query before it is
    await setter.wait_for(lambda: any(isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE
                                      for m in setter.messages))
    assert server.metric("collab_messages_coalesced_total") == 0
    assert asker.close_code is None
    asker.transport.abort()  # a close handshake would wait behind what it does not read


@asynccontextmanager
async def room_in_process(tmp_path: Path) -> AsyncIterator[tuple[Room, Connection, list[bytes]]]:
    """A loaded Room on SQLite and a local broker, with one Connection joined, and what is sent to it."""
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    room = Room("doc", store, LocalBroker(), Metrics())
    await room.load()
    sent: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "websocket.send":
            sent.append(message["bytes"])

    conn = Connection(send, room.metrics)
    room.join(conn)
    try:
        yield room, conn, sent
    finally:
        conn.close(1000, "done")
        await conn.wait_closed()
        await room.close()
        await store.close()


async def test_awareness_another_node_relays_that_this_version_refuses_is_dropped_with_a_warning(
        tmp_path, caplog) -> None:
    """A node of an older version may relay a state JavaScript's JSON.parse refuses (NaN): it is not relayed to
    this node's clients (every Node y-websocket peer died on one), and the broker's reader logs no traceback."""
    async with room_in_process(tmp_path) as (room, _, sent):
        bad, good = (p.decode_message(p.encode_awareness([entry])).payload
                     for entry in (p.AwarenessEntry(7, 1, '{"x": NaN}'), p.AwarenessEntry(8, 1, '{"x": 1}')))
        room._on_broker(Kind.AWARENESS, bad, False)
        room._on_broker(Kind.AWARENESS, good, False)
        awareness = lambda: [m for m in map(p.decode_message, sent) if isinstance(m, p.AwarenessMessage)]
        for _ in range(100):
            if awareness():
                break
            await asyncio.sleep(0.01)
        assert [m.payload for m in awareness()] == [good]
        assert "awareness from another node refused" in caplog.text


async def test_the_clocks_of_removed_clients_are_forgotten_after_a_sweep_interval(tmp_path) -> None:
    """The room remembers a removed client's clock, so a stale state cannot bring it back, but it never forgot
    one: a connection setting states for new client ids and removing them, again and again, grew it without
    bound. A clock is forgotten at the second sweep after its removal if the client has no state by then."""
    async with room_in_process(tmp_path) as (room, conn, _):
        update = lambda *entries: p.encode_awareness_update(list(entries))
        room.apply_awareness(update(p.AwarenessEntry(1, 1, '{"stays":1}')), conn)
        for first in range(100, 1600, 15):
            ids = range(first, first + 15)  # and its own client 1: as many as one connection may have
            room.apply_awareness(update(*(p.AwarenessEntry(cid, 1, '{"u":1}') for cid in ids)), conn)
            room.apply_awareness(update(*(p.AwarenessEntry(cid, 2, "null") for cid in ids)), conn)
        room.sweep()
        room.apply_awareness(update(p.AwarenessEntry(100, 1, '{"stale":1}')), conn)  # removed, not long enough
        assert [e.client_id for e in room.presence()] == [1]
        room.sweep()
        assert list(room._presence._clock) == [1]
        room.apply_awareness(update(p.AwarenessEntry(100, 3, '{"back":1}')), conn)
        room.apply_awareness(update(p.AwarenessEntry(100, 4, "null")), conn)
        room.apply_awareness(update(p.AwarenessEntry(100, 3, '{"stale":1}')), conn)  # right after its removal
        assert [e.client_id for e in room.presence()] == [1]


def test_a_clock_near_2_53_is_taken_only_a_step_at_a_time() -> None:
    """A y-protocols client takes a higher clock for its own id from anyone, and sends its next state one above:
    a peer forging a user's id at 2^53 - 1 made that user's next state 2^53, refused (1007) at every reconnect, so
    the user could never save an edit. Clocks above 2^52 are taken at most CLOCK_STEP above the one held, on any
    connection (a user a peer pushed to 2^52 reconnects and goes on from there)."""
    presence_ = Presence()
    doc = Doc()
    victim = SimpleNamespace(readonly=False, awareness_ids=set())
    forger = SimpleNamespace(readonly=False, awareness_ids=set())

    def accepted(conn, clock: int, state: dict | None) -> bool:
        update = p.encode_awareness_update([p.AwarenessEntry(7, clock, json.dumps(state))])
        return bool(presence_.accept(update, conn, doc))

    assert accepted(victim, 3, {"user": "v"})
    assert not accepted(forger, p.MAX_SAFE_INTEGER, {"user": "forged"})
    assert not accepted(forger, MAX_CLOCK_TAKEN + 1, None)  # a removal counts too: y-protocols bumps past it
    assert presence_.states[7].clock == 3
    assert accepted(forger, MAX_CLOCK_TAKEN, {"user": "forged"})  # rw peers may still speak for anyone
    assert accepted(victim, MAX_CLOCK_TAKEN + 1, {"user": "v"})  # so the user goes on from there
    reconnected = SimpleNamespace(readonly=False, awareness_ids=set())
    assert accepted(reconnected, MAX_CLOCK_TAKEN + 2, {"user": "v"})  # on a new connection too
    assert accepted(reconnected, MAX_CLOCK_TAKEN + 2 + CLOCK_STEP, {"user": "v"})
    assert not accepted(forger, MAX_CLOCK_TAKEN + 3 + 2 * CLOCK_STEP, {"user": "forged"})  # one step at most
    assert presence_.states[7] == p.AwarenessEntry(7, MAX_CLOCK_TAKEN + 2 + CLOCK_STEP, json.dumps({"user": "v"}))


def test_a_viewer_cannot_claim_the_id_of_a_user_who_showed_presence_from_a_writer_s_connection() -> None:
    """A user who showed presence but never edited, gone long enough for the room to forget the clock: a viewer sent
    that client id, and the user's y-protocols client took the viewer's state as its own on reconnecting."""
    presence_ = Presence()
    doc = Doc()
    user = SimpleNamespace(readonly=False, awareness_ids=set())
    viewer = SimpleNamespace(readonly=True, awareness_ids=set())
    update = p.encode_awareness_update([p.AwarenessEntry(7, 5, json.dumps({"user": "u"}))])
    assert presence_.accept(update, user, doc)
    presence_.bump(7)  # the user's connection closed
    for _ in range(2):  # its clock is forgotten
        presence_.sweep(0.0)
    forged = p.encode_awareness_update([p.AwarenessEntry(7, 99, json.dumps({"user": "forged"}))])
    assert presence_.accept(forged, viewer, doc) == [] and 7 not in presence_.states
    own = p.encode_awareness_update([p.AwarenessEntry(8, 1, json.dumps({"user": "viewer"}))])
    assert presence_.accept(own, viewer, doc)  # a viewer's own id is still its own
