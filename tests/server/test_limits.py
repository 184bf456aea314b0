"""Abuse limits: connections per room, messages per second, and a send queue that never grows unbounded.
Each closes only the offending connection, with a clear code; everyone else keeps working."""

import asyncio

import httpx
import pytest
from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect

from collab_server import protocol as p
from tests.rawclient import RawPeer, text_updates
from tests.serverproc import wait_until


def errors(server, kind: str) -> float:
    return server.metric(f'collab_errors_total{{kind="{kind}"}}')


async def synced_peers(server, count: int, room: str = "room") -> list[RawPeer]:
    peers = [await RawPeer.connect(f"{server.ws_url}/{room}") for _ in range(count)]
    for peer in peers:
        await peer.sync()
    return peers


async def test_a_full_room_refuses_the_next_connection_only(server_factory) -> None:
    server = server_factory("--max-connections-per-room", "2")
    first, second = await synced_peers(server, 2)
    third = await RawPeer.connect(f"{server.ws_url}/room")
    code, reason = await third.wait_closed()
    assert (code, reason) == (1008, "room is full")
    elsewhere = await RawPeer.connect(f"{server.ws_url}/other")  # the limit is per room
    await elsewhere.sync()
    await first.edit(lambda d: d.get("t", type=Text).insert(0, "still fine"))
    await second.wait_for(lambda: str(second.doc.get("t", type=Text)) == "still fine")
    await second.close()
    again = await RawPeer.connect(f"{server.ws_url}/room")  # a freed place can be taken
    await again.sync()
    assert str(again.doc.get("t", type=Text)) == "still fine" and not again.closed.is_set()
    assert errors(server, "room_full") == 1


async def test_the_default_limits_let_one_room_hold_thousands_of_peers(server) -> None:
    """Benchmarks and big rooms (a lecture, a dashboard) open more than a thousand connections to one room."""
    count = 1500
    sockets = [await connect(f"{server.ws_url}/hall", max_size=None) for _ in range(count)]
    doc, updates = text_updates(1)

    async def receives_the_update(ws) -> None:
        async for frame in ws:
            msg = p.decode_message(frame)
            if isinstance(msg, p.SyncMessage) and msg.kind == p.SyncType.UPDATE:
                return

    waiting = [asyncio.create_task(asyncio.wait_for(receives_the_update(ws), 30)) for ws in sockets]
    await sockets[0].send(p.sync_update(updates[0]))
    await asyncio.gather(*waiting)
    assert server.metric("collab_connections") == count and errors(server, "room_full") == 0
    for ws in sockets:
        await ws.close()


async def test_a_flooding_client_is_cut_off_and_its_accepted_edits_kept(server_factory) -> None:
    server = server_factory("--rate-limit-per-second", "5", "--rate-limit-burst", "20")
    calm = await RawPeer.connect(f"{server.ws_url}/room")
    await calm.sync()
    flooder = await RawPeer.connect(f"{server.ws_url}/room")
    doc, updates = text_updates(100)
    for update in updates:
        try:
            await flooder.send(p.sync_update(update))
        except Exception:  # the server may close before all frames are written
            break
    code, reason = await flooder.wait_closed()
    assert (code, reason) == (1008, "rate limit exceeded")
    # the burst allowance was applied and stored, in order; the rest was refused
    await calm.sync()
    text = str(calm.doc.get("t", type=Text))
    assert 19 <= len(text) < 100 and str(doc.get("t", type=Text)).startswith(text)
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == text
    assert errors(server, "rate_limit") == 1 and not calm.closed.is_set()


async def stall_behind(url: str, writer: RawPeer, reader: RawPeer, broadcasts: int) -> tuple[Doc, ClientConnection]:
    """Connect a peer that never reads (one frame at a time into a one-frame buffer: TCP backpressure reaches
    the server), then broadcast `broadcasts` changes of 200 KB, far more than socket buffers hold."""
    stalled = await connect(url, max_queue=1, max_size=None)
    doc = Doc()
    text = doc.get("t", type=Text)
    for i in range(broadcasts):
        before = doc.get_state()
        text.insert(len(text), f"{i % 10}" * 200_000)
        await writer.send(p.sync_update(doc.get_update(before)))
        await reader.wait_for(lambda: len(str(reader.doc.get("t", type=Text))) == len(text), 30)
    return doc, stalled


async def test_a_client_that_stops_reading_gets_what_it_missed_merged(server_factory) -> None:
    """Broadcasts queued for a backed-up peer are merged, so a short queue limit does not drop it, and it
    catches up with a few messages once it reads again."""
    server = server_factory("--send-queue-limit", "8")
    writer, reader = await synced_peers(server, 2)
    doc, stalled = await stall_behind(f"{server.ws_url}/room", writer, reader, 60)
    assert server.metric("collab_messages_coalesced_total") > 0
    replica, updates = Doc(), 0
    while len(str(replica.get("t", type=Text))) < len(doc.get("t", type=Text)):
        message = p.decode_message(await asyncio.wait_for(stalled.recv(), 30))
        if isinstance(message, p.SyncMessage) and message.kind == p.SyncType.UPDATE:
            replica.apply_update(message.payload)
            updates += 1
    assert str(replica.get("t", type=Text)) == str(doc.get("t", type=Text))
    assert updates < 60 and errors(server, "slow_client") == 0
    await stalled.close()


@pytest.mark.parametrize("limit", [("--send-queue-limit", "8"), ("--send-queue-bytes", "1000000")],
                         ids=["messages", "bytes"])
async def test_a_client_that_stops_reading_is_dropped_instead_of_queueing_forever(server_factory, limit) -> None:
    """Updates merge but keep their content, so bytes overflow; sync answers do not merge, so a peer that
    asks for them without reading overflows the message limit."""
    server = server_factory(*limit)
    writer, reader = await synced_peers(server, 2)
    doc, stalled = await stall_behind(f"{server.ws_url}/room", writer, reader, 60)
    for _ in range(20):
        await stalled.send(p.sync_step1(doc.get_state()))  # answered with an empty SyncStep2
    await wait_until(lambda: errors(server, "slow_client") == 1, 30)
    assert "send queue overflow" in server.log()
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == str(doc.get("t", type=Text))
    assert not writer.closed.is_set() and not reader.closed.is_set()
    await stalled.close()


async def test_awareness_beyond_the_limits_is_refused_whole(server) -> None:
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    many = await RawPeer.connect(f"{server.ws_url}/room")
    await many.send(p.encode_awareness([p.AwarenessEntry(1000 + i, 1, '{"u":1}') for i in range(17)]))
    code, reason = await many.wait_closed()
    assert code == 1008 and "awareness clients" in reason
    huge = await RawPeer.connect(f"{server.ws_url}/room")
    await huge.send(p.encode_awareness([p.AwarenessEntry(7, 1, '{"u":1}'),
                                        p.AwarenessEntry(8, 1, '"' + "x" * 70_000 + '"')]))
    code, reason = await huge.wait_closed()
    assert code == 1008 and "awareness state" in reason
    wide = await RawPeer.connect(f"{server.ws_url}/room")  # 40,002 characters, 80,002 bytes of UTF-8
    await wide.send(p.encode_awareness([p.AwarenessEntry(9, 1, '"' + "é" * 40_000 + '"')]))
    code, reason = await wide.wait_closed()
    assert code == 1008 and "awareness state over 65536 bytes" in reason
    # a normal presence still flows, and nothing from the refused messages was merged
    normal = await RawPeer.connect(f"{server.ws_url}/room")
    await normal.send(p.encode_awareness([p.AwarenessEntry(42, 1, '{"user":"ok"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(42) == '{"user":"ok"}')
    assert set(watcher.awareness) == {42}
    assert errors(server, "limit") == 3 and not watcher.closed.is_set()


@pytest.mark.parametrize("deflate", [False, True], ids=["direct", "through-asgi"])
async def test_copies_of_relayed_awareness_do_not_count_toward_the_rate_limit(server_factory, deflate) -> None:
    """A y-websocket client sends back every awareness message it receives: in a busy room most of what it
    sends. Those copies change nothing and are dropped unread, so a rate limit counts only its own messages
    (both where frames are read by the transport and, with permessage-deflate, through ASGI)."""
    server = server_factory("--rate-limit-per-second", "1", "--rate-limit-burst", "10",
                            *(["--per-message-deflate"] if deflate else []))
    mover = await RawPeer.connect(f"{server.ws_url}/room")
    echoer = await RawPeer.connect(f"{server.ws_url}/room")
    await echoer.sync()
    for clock in (1, 2, 3):
        await mover.send(p.encode_awareness([p.AwarenessEntry(5, clock, '{"at":%d}' % clock)]))
    await echoer.wait_for(lambda: echoer.awareness.get(5) == '{"at":3}')
    received = [p.awareness_message(m.payload) for m in echoer.messages if isinstance(m, p.AwarenessMessage)]
    for copy in received * 20:  # 60 copies, the burst allowance 10
        await echoer.send(copy)
    await echoer.sync()  # answered: still connected, after every copy was read
    for clock in range(1, 15):  # not copies: stale, but read and counted
        await echoer.send(p.encode_awareness([p.AwarenessEntry(5, clock, '{"at":0}')]))
    code, reason = await echoer.wait_closed()
    assert (code, reason) == (1008, "rate limit exceeded")
    assert not mover.closed.is_set()


async def test_states_a_room_holds_do_not_count_toward_the_limit(server) -> None:
    """A y-websocket joiner sends back every state it receives: echoes change nothing and are not the
    joiner's clients; a state past the limit among them (new to the room) is still refused, and so is an update
    of more entries than a y-websocket client can send (the client ids the room knows and 16 new ones)."""
    crowd = []
    for i in range(20):
        peer = await RawPeer.connect(f"{server.ws_url}/room")
        await peer.send(p.encode_awareness([p.AwarenessEntry(100 + i, 1, '{"u":%d}' % i)]))
        crowd.append(peer)
    await crowd[0].wait_for(lambda: len(crowd[0].awareness) == 20)
    joiner = await RawPeer.connect(f"{server.ws_url}/room")
    await joiner.wait_for(lambda: len(joiner.awareness) == 20)
    echo = [p.AwarenessEntry(cid, 1, state) for cid, state in joiner.awareness.items()]
    await joiner.send(p.encode_awareness(echo + [p.AwarenessEntry(7, 1, '{"me":1}')]))
    await crowd[0].wait_for(lambda: 7 in crowd[0].awareness)
    await joiner.send(p.encode_awareness([p.AwarenessEntry(cid, 1, '{"x":1}') for cid in range(200, 216)]))
    code, reason = await joiner.wait_closed()
    assert code == 1008 and "awareness clients" in reason  # 7 and 16 new ones: 17
    assert not any(peer.closed.is_set() for peer in crowd) and errors(server, "limit") == 1
    # more entries than the 21 client ids the room knows and 16 new ones: refused before they are decoded
    await crowd[1].send(p.encode_awareness([p.AwarenessEntry(1000 + i, 1, "null") for i in range(38)]))
    code, reason = await crowd[1].wait_closed()
    assert code == 1008 and reason.startswith("awareness update of 38 entries, for 21 client ids")


async def test_a_client_that_never_finishes_its_request_is_disconnected(server_factory) -> None:
    """A socket that sends nothing, or trickles a request's headers (slowloris), cannot hold the connection
    for ever; a keep-alive HTTP client and websocket clients are unaffected."""
    server = server_factory("--request-header-timeout", "0.5")

    async def closed_by_server(first_bytes: bytes, trickle: bytes = b"") -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = asyncio.get_running_loop().time()
        writer.write(first_bytes)
        for byte in trickle:  # one header byte every 0.1 s: always some data, never a whole head
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # EOF: the server closed it
        writer.close()
        return asyncio.get_running_loop().time() - started

    assert await closed_by_server(b"") < 5
    assert await closed_by_server(b"GET /room HTTP/1.1\r\n", b"Host: example\r\nUpgrade: websocket\r\n" * 4) < 5
    async with httpx.AsyncClient(base_url=server.http_url) as http:  # one connection, kept alive
        assert (await http.get("/health")).status_code == 200
        await asyncio.sleep(0.8)  # longer than the deadline, shorter than uvicorn's keep-alive
        assert (await http.get("/health")).status_code == 200
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    await peer.sync()
    await asyncio.sleep(0.8)  # an open websocket has no head deadline
    await peer.edit(lambda d: d.get("t", type=Text).insert(0, "still here"))
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == "still here")
