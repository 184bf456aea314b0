"""A connection whose messages take more than its share of the event loop is read more slowly, not refused."""

import asyncio
import base64
import logging
import os
import socket
import struct
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from pycrdt import Array, Doc, Map, Text

from collab_server import fairshare, session
from collab_server import protocol as p
from collab_server.config import Settings
from collab_server.fairshare import BURST, LoopShare
from collab_server.metrics import Metrics
from tests.rawclient import RawPeer, text_updates, typed_and_cut
from tests.serverproc import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_a_connection_pauses_once_overdrawn_and_its_account_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(fairshare, "time", clock)
    share = LoopShare(0.25)
    assert share.spend(BURST * 0.25 - 0.01) == 0  # the burst: no pause
    assert share.spend(0.02) == pytest.approx(0.01 / 0.25)  # overdrawn by 10 ms: 40 ms to even out
    clock.now += 0.04
    assert share.spend(0) == 0  # even again
    clock.now += 1000  # refilled, to the burst only
    assert share.spend(BURST * 0.25) == 0
    assert share.spend(0.001) == pytest.approx(0.004)
    unlimited = LoopShare(0)
    assert unlimited.spend(1000) == 0


async def test_the_session_pauses_reading_an_overdrawn_connection_and_handles_everything_it_sent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each message of this connection takes the loop 50 ms (as a rebuild would): past what its account holds,
    reading pauses for as long as its share needs to cover each one; every message is still handled, in order."""
    cost, count = 0.05, 30
    handled: list[bytes] = []
    pauses: list[float] = []
    clock = Clock()  # time passes only in the pauses
    monkeypatch.setattr(fairshare, "time", clock)

    async def recorded_sleep(seconds: float) -> None:
        if seconds:
            pauses.append(seconds)
            clock.now += seconds
        await asyncio.sleep(0)

    metrics = Metrics()

    class Room:
        relayed_awareness: frozenset[bytes] = frozenset()

        def __init__(self) -> None:
            self.metrics = metrics

        async def handle(self, conn: object, data: bytes) -> float:
            handled.append(data)
            return cost

    messages = [{"type": "websocket.receive", "bytes": bytes([i])} for i in range(count)]
    messages.append({"type": "websocket.disconnect"})
    inbox = iter(messages)

    async def receive() -> dict:
        return next(inbox)

    conn = SimpleNamespace(closed=False, direct=True, close=lambda code, reason: setattr(conn, "closed", True))
    reading = SimpleNamespace(pause=recorded_sleep, take_queued=lambda accept: None, dropping_received=lambda: False)
    await session._read_frames(receive, conn, Room(), Settings(loop_share=0.25), reading)
    assert handled == [m["bytes"] for m in messages[:-1]]
    within = int(BURST * 0.25 / cost)  # messages the burst covers
    assert len(pauses) == count - within
    assert pauses[1:] == pytest.approx([cost / 0.25] * (len(pauses) - 1))  # each overdraft covered, no more
    assert sum(pauses) == pytest.approx((count * cost - BURST * 0.25) / 0.25)
    assert metrics.share_pauses._value.get() == len(pauses)


async def test_what_a_peer_sent_before_it_left_is_all_applied_and_still_paced(server_factory) -> None:
    """A peer that sends a backlog and closes its end has every message applied (its last edits are kept), at its
    share of the loop still: handled at once, a departed client's backlog of costly messages would take the loop
    from every other room. Here the share is so small that each message pauses the connection."""
    server = server_factory("--loop-share", "0.001")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(30)
    for update in updates:
        await writer.send(p.sync_update(update))
    await writer.close()  # its close frame is read with (or soon after) the updates, while they wait
    want = str(doc.get("t", type=Text))
    await watcher.wait_for(lambda: str(watcher.doc.get("t", type=Text)) == want, 30)
    # one at a time, each its own commit and broadcast; handled at once, they would join a few commits
    updates_seen = [m for m in watcher.messages if isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE]
    assert len(updates_seen) >= 25


async def test_update_frames_queued_behind_one_are_handled_with_it_as_far_as_the_share_allows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The session hands a room the update frames queued behind one together (up to FRAMES_PER_TURN frames a
    turn), with what is left of the connection's account as their budget; what the room did not handle within it
    is handed over again after the pause, before anything read later. Other frames are handled one at a time, in
    order. A frame over the rate limit closes the connection once every frame before it is handled."""
    clock = Clock()  # time passes only in the pauses
    monkeypatch.setattr(fairshare, "time", clock)
    calls: list[tuple[str, list[bytes], float]] = []
    pauses: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock.now += seconds

    class Room:
        relayed_awareness: frozenset[bytes] = frozenset()
        metrics = Metrics()

        async def handle(self, conn: object, data: bytes) -> float:
            calls.append(("one", [data], 0.0))
            return 0.0

        async def handle_updates(self, conn: object, frames: list[bytes], budget: float) -> tuple[float, int]:
            calls.append(("updates", list(frames), budget))
            return (0.02, 2) if len(calls) == 1 else (0.0, len(frames))  # the first two take 20 ms: overdrawn

    update = [p.sync_update(bytes([i])) for i in range(24)]
    awareness = p.awareness_message(b"\x00")
    queue = [*update[:3], awareness, *update[3:]]
    messages = [{"type": "websocket.receive", "bytes": frame} for frame in queue]
    messages.append({"type": "websocket.disconnect"})

    async def receive() -> dict:
        return messages.pop(0)

    def take_queued(accept: Callable[[bytes], bool]) -> bytes | None:
        if messages and "bytes" in messages[0] and accept(messages[0]["bytes"]):
            return messages.pop(0)["bytes"]
        return None

    closed: list[tuple[int, str]] = []

    def close(code: int, reason: str) -> None:
        closed.append((code, reason))
        conn.closed = True

    conn = SimpleNamespace(closed=False, direct=True, readonly=False, close=close)
    settings = Settings(loop_share=0.25, rate_limit_per_second=0.001, rate_limit_burst=len(queue) - 1)
    inbox = SimpleNamespace(pause=recorded_sleep, take_queued=take_queued, dropping_received=lambda: False)
    await session._read_frames(receive, conn, Room(), settings, inbox)
    assert calls == [
        ("updates", update[:3], pytest.approx(BURST * 0.25)),
        ("updates", update[2:3], pytest.approx(0.0)),  # after the pause that evens its account
        ("one", [awareness], 0.0),
        ("updates", update[3:15], pytest.approx(0.0)),  # the turn's 16 frames are up
        ("updates", update[15:23], pytest.approx(0.0)),  # update[23] is over the rate limit
    ]
    assert pauses == [pytest.approx((0.02 - BURST * 0.25) / 0.25)]
    assert closed == [(1008, "rate limit exceeded")]
    assert messages == [{"type": "websocket.disconnect"}]


def _masked(payload: bytes) -> bytes:
    """A client's binary frame of a short `payload`, masked with zeros (which leave it as it is)."""
    return bytes((0x82, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def _upgraded(port: int, path: str, receive_buffer: int | None = None) -> socket.socket:
    """A socket to the server at `port`, upgraded to a websocket connection to `path` (its frames written by hand)."""
    sock = socket.create_connection(("127.0.0.1", port))
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


async def test_sync_requests_of_a_peer_that_is_gone_are_not_answered(server_factory) -> None:
    """A client that sends many sync requests and resets its socket: once a write to it has failed, the rest are
    dropped unanswered, rather than each encoding the document for no one at its share of the loop (finding 58).
    Here the share is so small that each answer pauses the connection for a fifth of a second or more."""
    server = server_factory("--loop-share", "0.001")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    doc = Doc()
    items = doc.get("a", type=Array)
    for i in range(20_000):
        items.append(i)
    await writer.send(p.sync_update(doc.get_update()))
    await writer.wait_for(lambda: len(writer.doc.get("a", type=Array)) == 20_000)
    with _upgraded(server.port, "/room", receive_buffer=4096) as sock:
        await wait_until(lambda: server.metric("collab_connections") == 2)
        sock.sendall(_masked(p.sync_step1(b"\x00")) * 300)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
    # answering all 300 takes a minute or more; the server learns of the reset at its next write, or later under
    # load (up to 35 answers were seen)
    await wait_until(lambda: server.metric("collab_connections") == 1, 30)
    assert server.metric("collab_share_pauses_total") < 100


async def test_at_shutdown_update_frames_left_for_after_a_pause_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Update frames taken together but left for after a pause are dropped once a shutdown drops the received
    messages still queued (never applied, as those are not: the client sends them again when it syncs next),
    rather than applied one by one past the graceful timeout (a rebuild each, in the backlog test)."""
    caplog.set_level(logging.INFO, logger="collab_server.transport")
    calls: list[list[bytes]] = []
    dropping = False

    class Room:
        relayed_awareness: frozenset[bytes] = frozenset()
        metrics = Metrics()

        async def handle_updates(self, conn: object, frames: list[bytes], budget: float) -> tuple[float, int]:
            nonlocal dropping
            calls.append(list(frames))
            dropping = True  # the shutdown's deadline passes while the first is applied
            return 0.0, 1

    update = [p.sync_update(bytes([i])) for i in range(4)]
    messages = [{"type": "websocket.receive", "bytes": update[0]}, {"type": "websocket.disconnect"}]
    queue = update[1:]

    async def receive() -> dict:
        return messages.pop(0)

    conn = SimpleNamespace(closed=False, direct=True, readonly=False, close=lambda code, reason: None)
    inbox = SimpleNamespace(pause=asyncio.sleep, take_queued=lambda accept: queue.pop(0) if queue else None,
                            dropping_received=lambda: dropping)
    await session._read_frames(receive, conn, Room(), Settings(), inbox)
    assert calls == [update]
    assert "shutdown: dropped 3 messages" in caplog.text


async def test_awareness_work_is_charged_to_the_connection_s_share(server_factory) -> None:
    """Applying awareness and answering QueryAwareness take the loop too: a room's 1 MB of states answered again
    and again went uncharged, so one connection's one-byte queries could take the loop from every room."""
    server = server_factory("--loop-share", "0.001")  # an account of 50 µs: any such message overdraws it
    setter = await RawPeer.connect(f"{server.ws_url}/room")
    await setter.send(p.encode_awareness([p.AwarenessEntry(100 + i, 1, '"%s"' % ("x" * 60_000)) for i in range(16)]))
    await setter.wait_for(lambda: len(setter.awareness) == 16)
    assert server.metric("collab_share_pauses_total") == 1  # the setter's
    asker = await RawPeer.connect(f"{server.ws_url}/room")
    answers = lambda: sum(1 for m in asker.messages if isinstance(m, p.AwarenessMessage))
    await asker.wait_for(lambda: answers() == 1)  # joining
    for _ in range(3):
        await asker.send(p.query_awareness())
    await asker.wait_for(lambda: answers() == 4)
    assert server.metric("collab_share_pauses_total") >= 2


def _turn_room(calls: list[list[bytes]], handled: Callable[[list[bytes]], int] = len) -> object:
    """A room that records the update frames handed to it together and handles `handled` of them."""

    class Room:
        relayed_awareness: frozenset[bytes] = frozenset()
        metrics = Metrics()

        async def handle_updates(self, conn: object, frames: list[bytes], budget: float) -> tuple[float, int]:
            calls.append(list(frames))
            return 0.0, handled(frames)

    return Room()


@pytest.mark.parametrize("dropping", [False, True])
async def test_a_turn_s_last_update_that_may_type_an_emoji_begins_the_next_turn_s_batch(
        dropping: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A turn hands the room up to FRAMES_PER_TURN update frames; where the last may type a character beyond the
    BMP, it goes with the next turn's frames instead, so the message that cuts it (the client's next) is applied
    with it and the document needs no rebuild (surrogates.precut). At shutdown it is dropped with the rest."""
    caplog.set_level(logging.INFO, logger="collab_server.transport")
    calls: list[list[bytes]] = []
    plain = [p.sync_update(bytes([i])) for i in range(session.FRAMES_PER_TURN - 1)]
    emoji, cut = p.sync_update("😀".encode()), p.sync_update(b"x")
    queue = [*plain[1:], emoji, cut]
    messages = [{"type": "websocket.receive", "bytes": plain[0]}, {"type": "websocket.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0)

    conn = SimpleNamespace(closed=False, direct=True, readonly=False, close=lambda code, reason: None)
    inbox = SimpleNamespace(pause=asyncio.sleep, take_queued=lambda accept: queue.pop(0) if queue else None,
                            dropping_received=lambda: dropping and bool(calls))
    await session._read_frames(receive, conn, _turn_room(calls), Settings(), inbox)
    if dropping:
        assert calls == [plain]
        assert "shutdown: dropped 1 messages" in caplog.text
    else:
        assert calls == [plain, [emoji, cut]]


async def test_a_client_typing_emoji_and_cutting_each_in_its_next_message_gets_no_rebuild(server_factory) -> None:
    """Nine such pairs sent at once, behind one other message: the eighth pair straddles the session's first turn
    of FRAMES_PER_TURN frames. Taken in the same batch, nothing is rebuilt (a rebuild costs as much as a load);
    a cut sent on its own, once its emoji is applied, rebuilds the document."""
    server = server_factory()
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    other = Doc()
    other.get("m", type=Map)["k"] = 1
    pairs = typed_and_cut(10)
    frames = [p.sync_update(other.get_update()), *map(p.sync_update, pairs[:18])]
    assert len(frames) > session.FRAMES_PER_TURN and frames[session.FRAMES_PER_TURN - 1] == p.sync_update(pairs[14])
    with _upgraded(server.port, "/room") as sock:
        sock.sendall(b"".join(map(_masked, frames)))
        text = lambda: str(watcher.doc.get("t", type=Text))
        await watcher.wait_for(lambda: text() == "\ufffdx\ufffd" * 9)
        assert server.metric("collab_rebuilds_total") == 0
        sock.sendall(_masked(p.sync_update(pairs[18])))
        await watcher.wait_for(lambda: text() == "\ufffdx\ufffd" * 9 + "😀")
        sock.sendall(_masked(p.sync_update(pairs[19])))
        await wait_until(lambda: server.metric("collab_rebuilds_total") == 1)
    fresh = await RawPeer.connect(f"{server.ws_url}/room")  # pycrdt, as the watcher, would cut the emoji as yrs does
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == "\ufffdx\ufffd" * 10
    await watcher.close()
    await fresh.close()
