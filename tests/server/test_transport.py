"""Direct frame writes (transport.py): frames equal websockets' own, and both send paths deliver."""

import asyncio
import contextlib
import fcntl
import gc
import socket
import struct
import termios
import weakref
from pathlib import Path

import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.frames import Frame, Opcode

from collab_server import protocol as p
from collab_server import transport
from collab_server.app import create_app
from collab_server.cli import uvicorn_config
from collab_server.config import Settings
from collab_server.transport import SCOPE_EXTENSION, CollabWebSocketProtocol, _Flag, _Inbox, _PingRounds, binary_frame
from tests.rawclient import RawPeer, non_reader, text_writer
from tests.serverproc import free_port


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]) | st.integers(0, 3000), st.binary(max_size=1))
def test_a_binary_frame_is_what_websockets_would_send(size: int, fill: bytes) -> None:
    payload = (fill or b"\x07") * size
    assert binary_frame(payload) == Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])


async def _serve(tmp_path: Path, **overrides):
    port = free_port()
    cfg = Settings(db=str(tmp_path / "t.db"), host="127.0.0.1", port=port, **overrides)
    app = create_app(cfg)
    server = uvicorn.Server(uvicorn_config(cfg, app))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):  # fail rather than hang if the server never starts
        while not server.started:
            await asyncio.sleep(0.01)
    return app, server, task, f"ws://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _serving_without_cyclic_gc(tmp_path: Path, **overrides):
    """A served app while the cyclic collector is off: whatever is freed meanwhile, reference counting freed."""
    app, server, task, url = await _serve(tmp_path, **overrides)
    gc.collect()
    gc.disable()
    try:
        yield app, url
    finally:
        gc.enable()
        server.should_exit = True
        await task


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
async def test_broadcasts_arrive_written_directly_or_through_asgi(tmp_path: Path, deflate: bool) -> None:
    """Plain connections get frames written straight to the socket; with permessage-deflate negotiated
    every frame is compressed per connection through ASGI. Both deliver every edit."""
    app, server, task, url = await _serve(tmp_path, per_message_deflate=deflate)
    try:
        peers = [await RawPeer.connect(f"{url}/room", compression="deflate") for _ in range(3)]
        for peer in peers:
            await peer.sync()
        conns = app.state.rooms.loaded["room"].connections
        assert len(conns) == 3 and all(conn.direct is not deflate for conn in conns)
        for i in range(50):
            await peers[i % 3].edit(lambda doc, i=i: doc.get("t", type=Text).insert(0, str(i % 10)))
        for peer in peers:
            await peer.wait_for(lambda peer=peer: len(peer.doc.get("t", type=Text)) == 50)
        texts = {str(peer.doc.get("t", type=Text)) for peer in peers}
        assert len(texts) == 1 and sorted(texts.pop()) == sorted(str(i % 10) for i in range(50))
        for peer in peers:
            await peer.close()
    finally:
        server.should_exit = True
        await task


async def test_the_receive_queue_is_fifo_and_wakes_a_waiting_reader() -> None:
    inbox = _Inbox()
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done() and inbox.empty()
    for i in range(3):
        inbox.put_nowait(i)
    assert await asyncio.wait_for(reader, 1) == 0
    assert [await inbox.get(), await inbox.get()] == [1, 2] and inbox.empty()


async def test_the_receive_queue_keeps_order_through_a_long_backlog() -> None:
    """Taken items are dropped from the front in batches: order holds across them, with puts in between."""
    inbox = _Inbox()
    taken = []
    for i in range(10_000):
        inbox.put_nowait(i)
        if i % 3 == 0:
            taken.append(await inbox.get())
    while not inbox.empty():
        taken.append(await inbox.get())
    assert taken == list(range(10_000)) and inbox._items == []


async def test_at_its_deadline_the_receive_queue_drops_received_messages_but_not_the_disconnect(
        caplog: pytest.LogCaptureFixture) -> None:
    """Server shutdown (CollabWebSocketProtocol.shutdown): messages are handed out until the deadline; then those
    still queued are dropped, said once, and the disconnect queued after them is handed out."""
    loop = asyncio.get_running_loop()
    inbox = _Inbox()
    for i in range(5):
        inbox.put_nowait({"type": "websocket.receive", "bytes": bytes([i])})
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1012})
    inbox.drop_after(loop.time() + 3600)
    assert (await inbox.get())["bytes"] == b"\x00"  # before the deadline: in order
    inbox.drop_after(loop.time())
    with caplog.at_level("INFO", logger="collab_server.transport"):
        assert await inbox.get() == {"type": "websocket.disconnect", "code": 1012}
    assert inbox.empty() and "shutdown: dropped 4 messages" in caplog.text
    inbox.put_nowait({"type": "websocket.receive", "bytes": b"late"})  # a last item is handed out, whatever it is
    assert (await inbox.get())["bytes"] == b"late"


async def test_the_writable_flag_holds_senders_until_set() -> None:
    flag = _Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    flag.clear()
    late = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not late.done() and not flag.is_set()
    flag.set()
    await asyncio.wait_for(late, 1)


async def test_an_accepted_connection_keeps_no_handshake_headers(tmp_path: Path) -> None:
    """Request headers (a browser sends cookies, user agent...) and the rest of the scope are read while
    admitting, then freed: neither the ASGI scope nor websockets' parser, which keeps the request object alive,
    holds them afterwards."""
    app, server, task, url = await _serve(tmp_path)
    try:
        peer = await RawPeer.connect(f"{url}/room", additional_headers={"X-Padding": "x" * 4000})
        await peer.sync()
        (conn,) = app.state.rooms.loaded["room"].connections
        protocol = conn._frames
        assert protocol.request is None and protocol.scope == {"type": "websocket", "extensions": {SCOPE_EXTENSION: protocol}}
        parsed = protocol.conn.parser.gi_frame.f_locals["request"]  # websockets' parse() still refers to it
        assert len(parsed.headers) == 0
        await peer.edit(lambda doc: doc.get("t", type=Text).insert(0, "still served"))
        await peer.wait_for(lambda: app.state.rooms.loaded["room"].doc.get("t", type=Text).to_py() == "still served")
        await peer.close()
    finally:
        server.should_exit = True
        await task


async def test_a_connection_protocol_keeps_its_attributes_in_slots(tmp_path: Path) -> None:
    """Every attribute uvicorn's protocol sets is a slot, so no connection carries its own attribute hash
    table (a new uvicorn attribute would land in one: add it to the slots)."""
    app, server, task, url = await _serve(tmp_path)
    try:
        peer = await RawPeer.connect(f"{url}/room")
        await peer.sync()
        (conn,) = app.state.rooms.loaded["room"].connections
        assert vars(conn._frames) == {}
        await peer.close()
    finally:
        server.should_exit = True
        await task


async def test_the_http_protocol_that_upgraded_is_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """uvicorn's HTTP protocol and its httptools parser refer to each other. Once a connection is upgraded the
    cycle is broken, so a burst of handshakes leaves no garbage waiting for the collector."""
    async with _serving_without_cyclic_gc(tmp_path) as (app, url):
        peers = [await RawPeer.connect(f"{url}/room") for _ in range(5)]
        for peer in peers:
            await peer.sync()
        lingering = [o for o in gc.get_objects() if isinstance(o, HttpToolsProtocol)]
        assert lingering == []
        for peer in peers:
            await peer.close()


async def test_closed_connections_and_unloaded_rooms_are_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """A connection, however it ends, and a room once unloaded (its document, observers and status resolver)
    are freed by reference counting, so neither their memory nor the collector's work grows with churn."""
    async with _serving_without_cyclic_gc(tmp_path, idle_unload_seconds=0.2) as (app, url):
        peers = [await RawPeer.connect(f"{url}/room-{i % 2}") for i in range(6)]
        for peer in peers:
            await peer.sync()
        await peers[0].edit(lambda doc: doc.get("t", type=Text).insert(0, "observed and resolved"))
        await peers[2].wait_for(lambda: str(peers[2].doc.get("t", type=Text)) == "observed and resolved")
        freed = [weakref.ref(o) for o in gc.get_objects() if isinstance(o, CollabWebSocketProtocol)]
        freed += [weakref.ref(room) for room in app.state.rooms.loaded.values()]
        freed += [weakref.ref(room.doc) for room in app.state.rooms.loaded.values()]
        assert len(freed) == 6 + 2 + 2

        await peers[0].close()  # closing handshake
        await peers[1].send("text frames are refused")  # closed by the server (1003)
        assert (await peers[1].wait_closed())[0] == 1003
        for peer in peers[2:]:
            peer.ws.transport.abort()  # vanished
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while app.state.rooms.loaded or any(ref() is not None for ref in freed):
                    await asyncio.sleep(0.02)
        assert not app.state.rooms.loaded
        assert [type(ref()).__name__ for ref in freed if ref() is not None] == []


class _Member:
    """Stands in for a connection in a ping round: records pings and the keepalive failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, waited: float, pending: bool) -> None:
        self.loop = loop
        self.ping_sent_at = loop.time() - waited
        self.pending_ping_payload = b"ping" if pending else None
        self.pings = 0
        self.failed = False

    def send_keepalive_ping(self) -> None:
        self.pings += 1
        self.pending_ping_payload, self.ping_sent_at = b"ping", self.loop.time()

    def keepalive_timeout(self) -> None:
        self.failed = True


@pytest.mark.parametrize("timeout", [1.0, None], ids=["timeout", "no-timeout"])
async def test_a_ping_round_pings_answered_peers_and_fails_unanswered_ones(timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    rounds = _PingRounds(interval=1.0, timeout=timeout)
    due, fresh = _Member(loop, 1.5, pending=False), _Member(loop, 0.2, pending=False)
    silent, waiting = _Member(loop, 1.5, pending=True), _Member(loop, 0.2, pending=True)
    for member in (due, fresh, silent, waiting):
        rounds.add(member)  # type: ignore[arg-type]
    broken = _Member(loop, 1.5, pending=False)
    broken.send_keepalive_ping = lambda: 1 / 0  # type: ignore[method-assign]
    rounds.add(broken)  # type: ignore[arg-type]
    rounds._round()
    assert rounds._timer is not None and broken not in rounds.members  # the others' pings go on
    rounds._timer.cancel()
    assert (due.pings, fresh.pings, waiting.pings) == (1, 0, 0) and not waiting.failed
    if timeout is None:  # as uvicorn does without a timeout: keep pinging, never fail
        assert silent.pings == 1 and not silent.failed and silent in rounds.members
    else:
        assert silent.pings == 0 and silent.failed and silent not in rounds.members


def test_a_loop_whose_connections_are_gone_is_not_kept_alive_by_the_ping_registry() -> None:
    import weakref

    loop = asyncio.new_event_loop()

    async def one_connection() -> None:
        rounds = _PingRounds.of(asyncio.get_running_loop(), 1.0, 1.0)
        member = _Member(asyncio.get_running_loop(), 0.0, pending=False)
        rounds.add(member)  # type: ignore[arg-type]
        assert rounds._timer is not None
        rounds.discard(member)  # type: ignore[arg-type]
        assert rounds._timer is None

    loop.run_until_complete(one_connection())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None


async def test_live_peers_are_pinged_on_one_timer_and_stay(tmp_path: Path) -> None:
    """Peers that answer pings stay connected over many intervals; all of them share one ping timer."""
    app, server, task, url = await _serve(tmp_path, ping_interval=0.05, ping_timeout=0.05)
    try:
        peers = [await RawPeer.connect(f"{url}/room") for _ in range(3)]
        for peer in peers:
            await peer.sync()
        conns = app.state.rooms.loaded["room"].connections
        protocols = {conn._frames for conn in conns}
        rounds = _PingRounds.of(asyncio.get_running_loop(), 0.05, 0.05)
        assert protocols <= rounds.members
        answered = {protocol: 0 for protocol in protocols}
        async with asyncio.timeout(10):  # a new ping goes out only once the previous one was answered
            while min(answered.values()) < 5:
                before = {protocol: protocol.ping_sent_at for protocol in protocols}
                await asyncio.sleep(0.02)
                for protocol in protocols:
                    if protocol.ping_sent_at != before[protocol]:
                        answered[protocol] += 1
        assert all(not peer.closed.is_set() for peer in peers) and len(conns) == 3
        for peer in peers:
            await peer.close()
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("why", ["ping-timeout", "send-queue-overflow"])
async def test_a_peer_that_reads_nothing_is_dropped_once_closed(tmp_path: Path, monkeypatch, why: str) -> None:
    """Closing a connection waits for what is buffered for the peer to be written: a peer that read nothing kept its
    socket, megabytes buffered for it and its room for as long as it lived, past its ping timeout or its send queue's
    overflow (1013). Its socket is now aborted CLOSE_GRACE after the close."""
    monkeypatch.setattr(transport, "CLOSE_GRACE", 0.3)
    overrides = ({"ping_interval": 0.3, "ping_timeout": 0.3} if why == "ping-timeout"
                 else {"ping_interval": 0, "send_queue_bytes": 1024 * 1024})
    app, server, task, url = await _serve(tmp_path, **overrides)
    try:
        writer = await RawPeer.connect(f"{url}/room")
        doc = Doc()
        doc.get("t", type=Text).insert(0, "x" * 4_000_000)
        await writer.send(p.sync_update(doc.get_update()))
        await writer.sync()
        sock = await non_reader(url, "/room")
        connections = app.state.rooms.loaded["room"].connections
        async with asyncio.timeout(10):
            while len(connections) < 2:
                await asyncio.sleep(0.01)
        if why == "send-queue-overflow":
            for i in range(40):  # 40 updates of 64 KB queue up for the peer that reads nothing
                sv = doc.get_state()
                doc.get("t", type=Text).insert(0, str(i % 10) * 65536)
                await writer.send(p.sync_update(doc.get_update(sv)))
        async with asyncio.timeout(10):
            while len(connections) > 1:
                await asyncio.sleep(0.05)
        assert not writer.closed.is_set()
        sock.close()
    finally:
        server.should_exit = True
        await task


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_a_sync_answer_that_peers_reading_nothing_asked_for_is_buffered_once(server_factory) -> None:
    """Peers that ask for a document and read nothing: each had its own copy of the answer framed and buffered (60
    such peers held 2.1 GB for a 30 MB document). The answer is shared, and written without being copied (uvloop's
    transport keeps the bytes it is given)."""
    server = server_factory("--ping-interval", "0")
    await text_writer(f"{server.ws_url}/room", 8_000_000)

    async def answered(sock: socket.socket) -> None:  # the server wrote (part of) its answer to `sock`
        async with asyncio.timeout(10):
            while not struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]:
                await asyncio.sleep(0.01)

    socks = [await non_reader(server.ws_url, "/room")]
    await answered(socks[0])
    before = _rss_kb(server.proc.pid)
    socks += [await non_reader(server.ws_url, "/room") for _ in range(9)]
    for sock in socks:
        await answered(sock)
    assert _rss_kb(server.proc.pid) - before < 40_000  # nine more copies would be 72 MB
    for sock in socks:
        sock.close()


async def test_a_peer_on_a_slow_link_that_reads_on_is_not_aborted(tmp_path: Path, monkeypatch) -> None:
    """Its ping waits behind the document being sent to it, so its ping times out: the close waits for what is
    buffered for it, and it is aborted only if it takes none of it in a grace (a slow link got a cut frame and no
    close at every reconnect, and never synced a large document)."""
    monkeypatch.setattr(transport, "CLOSE_GRACE", 0.3)
    app, server, task, url = await _serve(tmp_path, ping_interval=0.3, ping_timeout=0.3)
    try:
        await text_writer(f"{url}/room", 2_000_000)
        sock = await non_reader(url, "/room")
        loop = asyncio.get_running_loop()
        received = 0
        async with asyncio.timeout(60):
            while chunk := await loop.sock_recv(sock, 64 * 1024):  # until the server closes, not resets
                received += len(chunk)
                await asyncio.sleep(0.01)  # a slow link (its receive buffer holds 4 KB): about 400 KB/s
        assert received > 2_000_000  # the whole answer, then the close
        sock.close()
    finally:
        server.should_exit = True
        await task
