"""The transport: uvicorn's sans-I/O websocket protocol, plus direct writes of encoded frames, and its HTTP
protocol with a deadline for a request's head.

A broadcast goes to every connection of a room with the same bytes. Through ASGI, each `websocket.send`
re-frames the message per connection and needs a task per connection to await it. Server frames are never
masked, so the room frames a message once (`binary_frame`) and each connection whose socket is open and
not backed up writes those bytes straight to its transport (`FrameWriter.write_frame`). Anything else
(a peer that is backed up, permessage-deflate, the close handshake) falls back to the ASGI send.

The writer reaches the application as the ASGI scope extension `collab.frames`; under another server, or
a uvicorn that does not load this class, it is absent and every send goes through ASGI. The same protocol
object is how the application reads (`reading`): a pause that a shutdown ends, the messages already queued
behind the one it received, so it can handle those together, and whether a shutdown drops what it has not
handled yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import socket
import struct
import termios
import weakref
from collections.abc import Callable, Container
from typing import Any, Protocol

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Opcode, apply_mask
from websockets.http11 import Request
from websockets.protocol import State

from collab_server.pacing import in_slices

log = logging.getLogger(__name__)

SCOPE_EXTENSION = "collab.frames"
# bytes waiting to go to a peer past which its pings are answered only once they drain, the latest only: a peer
# flooding pings and reading nothing piled up pongs without bound (470 MB in 25 s)
PONG_BACKLOG = 64 * 1024
# seconds a closing connection may take to write what is buffered for its peer before its socket is aborted: closing
# waits for that, which a peer that reads nothing (a frozen tab, a stopped process) never lets happen, so its socket,
# the bytes buffered for it and, through its session, its room stayed for as long as the peer lived
CLOSE_GRACE = 5.0
DROP_FOR = 10.0  # seconds at most that what a peer sends after a refused frame is read and dropped before closing
QUIET = 0.2  # seconds without bytes from such a peer after which its connection is closed
SHARED_FROM = 64 * 1024  # bytes of a message from which `write_message` writes it without copying it into a frame
# websockets' own logger, for the sans-I/O protocol uvicorn hands its "uvicorn.error" logger to (see logs.py)
WEBSOCKETS_LOG = logging.getLogger("websockets.server")


class FrameWriter(Protocol):
    def write_frame(self, frame: bytes) -> bool:
        """Write a complete encoded frame now and return True, or return False if the socket cannot take it
        without queueing (not open, closing or backed up)."""

    def write_message(self, message: bytes) -> bool:
        """`write_frame(binary_frame(message))`, without copying `message` into a frame: a message several
        connections are sent (a sync answer they share) is buffered once for all of them, not once each."""

    def ignore(self, messages: Container[bytes]) -> None:
        """From now on drop, as they are read, incoming messages found in `messages` (which the application
        knows change nothing), before they cost it a receive."""

    def abort_later(self) -> None:
        """Reset the socket if it is still connected CLOSE_GRACE seconds from now and the peer took nothing of what
        waits for it meanwhile (the application is closing it; a peer that takes some is given another grace)."""


def frame_writer(scope: Scope) -> FrameWriter | None:
    """The accepted connection's FrameWriter, or None if there is none or frames need per-connection
    encoding (a negotiated extension such as permessage-deflate)."""
    writer = _protocol(scope)
    if writer is not None and writer.handshake_complete and not writer.conn.extensions:
        return writer
    return None


class Reading(Protocol):
    """How the application reads a connection beyond ASGI's receive."""

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` before reading the connection's next message (a server shutdown ends the wait early)."""

    def take_queued(self, accept: Callable[[bytes], bool]) -> bytes | None:
        """The connection's next queued message, taken without waiting, if it is a binary one `accept` accepts;
        else None (there is none, or it is not such a message)."""

    def dropping_received(self) -> bool:
        """Whether received messages not yet handled are dropped now (the server is shutting down)."""


class _PlainReading:
    """Reading under another protocol: a plain sleep, nothing queued to take, nothing dropped."""

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def take_queued(self, accept: Callable[[bytes], bool]) -> bytes | None:
        return None

    def dropping_received(self) -> bool:
        return False


def reading(scope: Scope) -> Reading:
    """The connection's protocol as the application reads through it, or a plain stand-in under another
    protocol."""
    protocol = _protocol(scope)
    return protocol if protocol is not None else _PlainReading()


def _protocol(scope: Scope) -> CollabWebSocketProtocol | None:
    """The connection's protocol if it is this module's (it offers itself in the scope's extensions)."""
    protocol = (scope.get("extensions") or {}).get(SCOPE_EXTENSION)
    return protocol if isinstance(protocol, CollabWebSocketProtocol) else None


def frame_header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """Where the payload of the frame that starts at `pos` begins and how long it is (RFC 6455 §5.2; a masked
    frame's key precedes the payload), or None while its header is incomplete."""
    if len(buf) - pos < 2:
        return None
    second = buf[pos + 1]
    length, start = second & 0x7F, pos + 2
    if length >= 126:
        width = 2 if length == 126 else 8
        if len(buf) - start < width:
            return None
        length, start = int.from_bytes(buf[start:start + width], "big"), start + width
    return (start + 4 if second & 0x80 else start), length


def binary_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented binary websocket frame (RFC 6455 §5.2) carrying `payload`."""
    return binary_frame_head(len(payload)) + payload


def binary_frame_head(size: int) -> bytes:
    """The header of `binary_frame` for a payload of `size` bytes."""
    first = 0x80 | Opcode.BINARY  # FIN
    if size < 126:
        return struct.pack("!BB", first, size)
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


class _Inbox:
    """The receive queue uvicorn's protocol needs (put_nowait, get, empty), without asyncio.Queue's four
    deques: about 3 KB less per connection; `take_now` takes a queued message without waiting. One reader (the
    session) at a time. Items are taken by index, not
    `pop(0)`, which moved every item behind: one 256 KB read of tiny frames queues ~37,000 messages, and
    draining them with `pop(0)` took 68 ms against 7."""

    __slots__ = ("_items", "_next", "_waiter", "_deadline")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._next = 0  # index of the oldest item not yet taken
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # loop time after which received messages are dropped (shutdown)

    def drop_after(self, deadline: float) -> None:
        """From loop time `deadline` on, drop the received messages still queued rather than hand them out
        (the events after them, a disconnect, are still handed out)."""
        self._deadline = deadline

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while self._next >= len(self._items):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, taken = self._items, self._next
        if self.dropping():
            taken = self._skip_received()
        item, items[taken] = items[taken], None
        self._next = taken + 1
        if self._next == len(items) or self._next > 4096:  # drained, or a long backlog: drop what was taken
            del items[:self._next]
            self._next = 0
        return item

    def empty(self) -> bool:
        return self._next >= len(self._items)

    def dropping(self) -> bool:
        """Whether received messages are dropped now (`drop_after`'s deadline has passed)."""
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    def take_now(self, accept: Callable[[bytes], bool]) -> bytes | None:
        """The next item's bytes if it is a received binary message they `accept` (taken), else None (left)."""
        items, taken = self._items, self._next
        if taken >= len(items) or self.dropping():
            return None
        item = items[taken]
        data = item.get("bytes") if item["type"] == "websocket.receive" else None
        if data is None or not accept(data):
            return None
        items[taken] = None
        self._next = taken + 1
        return data

    def _skip_received(self) -> int:
        """Drop the received messages before the next other event, or before the last item if there is none;
        return the index of the item to hand out."""
        items, taken = self._items, self._next
        while taken < len(items) - 1 and items[taken]["type"] == "websocket.receive":
            items[taken] = None
            taken += 1
        if taken > self._next:
            log_dropped(taken - self._next)
        return taken


def log_dropped(count: int) -> None:
    """Say that a shutdown dropped `count` messages a connection sent, unhandled."""
    log.info("shutdown: dropped %d messages a connection sent that were not handled in time (never applied; the"
             " client sends them again when it syncs with the server next)", count)


class _Flag:
    """asyncio.Event's set/clear/is_set/wait without its deque of waiters."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class _PingRounds:
    """Keepalive pings for every connection of one loop and configuration on a single timer, rather than
    uvicorn's timer per connection. Each round (a quarter of the shorter of interval and timeout) pings a
    connection whose last ping was answered and is `interval` old, and fails one whose ping has gone
    unanswered for `timeout` (uvicorn's keepalive_timeout: close 1011)."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[float, float | None], _PingRounds]]
    _by_loop = weakref.WeakKeyDictionary()

    def __init__(self, interval: float, timeout: float | None) -> None:
        self.interval, self.timeout = interval, timeout  # no reference to the loop: it keys the registry weakly
        self.period = min(interval, timeout or interval) / 4
        self.members: set[CollabWebSocketProtocol] = set()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, interval: float, timeout: float | None) -> "_PingRounds":
        rounds = cls._by_loop.setdefault(loop, {})
        if (interval, timeout) not in rounds:
            rounds[interval, timeout] = cls(interval, timeout)
        return rounds[interval, timeout]

    def add(self, member: "CollabWebSocketProtocol") -> None:
        self.members.add(member)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._round)

    def discard(self, member: "CollabWebSocketProtocol") -> None:
        self.members.discard(member)
        if not self.members and self._timer is not None:
            self._timer.cancel()  # a pending timer would keep the loop, and so this registry entry, alive
            self._timer = None

    def _round(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() - min(self.interval, self.timeout or self.interval)
        in_slices([member for member in self.members if member.ping_sent_at <= due], self._visit, what="ping")
        self._timer = loop.call_later(self.period, self._round) if self.members else None

    def _visit(self, member: "CollabWebSocketProtocol") -> None:
        if member not in self.members:  # closed since the round began
            return
        waited = asyncio.get_running_loop().time() - member.ping_sent_at
        try:
            if member.pending_ping_payload is not None and self.timeout is not None:
                if waited >= self.timeout:
                    self.discard(member)
                    member.keepalive_timeout()
            elif waited >= self.interval:  # answered, or no timeout: ping again
                member.send_keepalive_ping()
        except Exception:  # one connection's failure must not stop the others' pings
            log.exception("keepalive ping failed; no more pings for this connection")
            self.discard(member)


class CollabHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for each request's head (request line and headers, a websocket
    upgrade included). uvicorn has none for a new connection, so a client that connects and never finishes
    its request (a slowloris, a stuck scanner) held a socket for ever; now it is disconnected once
    `header_timeout` seconds pass. Between requests uvicorn's keep-alive timeout applies as before."""

    def __init__(self, *args: Any, header_timeout: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_message_begin(self) -> None:  # the next request on a keep-alive connection
        super().on_message_begin()
        if self._head_deadline is None:
            self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        log.info("closing a connection that sent no complete request within %g s", self.header_timeout)
        self.transport.close()


class CollabWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol that offers itself as the `collab.frames` FrameWriter, cuts the
    frames it receives itself once accepted, and keeps lighter per-connection state: a plain receive queue and
    writable flag, the handshake's request and response dropped once the connection is accepted, and the HTTP
    protocol it upgrades from freed at once.

    Incoming frames: websockets parses a frame with a generator per field, about a sixth of the server's CPU in a
    many-rooms run. Once the connection is accepted (and nothing was negotiated that changes frames, and no byte
    arrived between the request and the acceptance, which websockets may have begun parsing) the protocol keeps its
    own buffer of incoming bytes and cuts it into frames. A masked, unfragmented binary frame, which is what
    y-websocket clients send, is unmasked and handed to the application as uvicorn would; every other frame
    (control frames, text, fragments, anything malformed) is given whole to websockets, which checks and handles
    it, so its parser only ever sees whole frames and stays in step. Once the connection is no longer open, or a
    frame's header claims more than the size limit (refused by websockets from the header alone), websockets parses
    everything from there on.

    websockets' protocol logs through `WEBSOCKETS_LOG` rather than uvicorn's error logger: it writes "connection
    open" at INFO for every handshake, a line without address or path next to uvicorn's "[accepted]" one.

    uvicorn's protocol sets 37 attributes per connection. Past 30, CPython gives each instance its own
    ~1.6 KB hash table instead of sharing the class's keys; as slots they take 8 bytes each. An attribute a
    later uvicorn adds still works: it goes to an instance dict."""

    __slots__ = (
        "app", "app_state", "asgi_version", "client", "close_sent", "close_timeout", "close_timer", "config",
        "conn", "connections", "curr_msg_data_type", "default_headers", "disconnected", "frames",
        "handshake_complete", "handshake_initiated", "initial_response", "last_ping_rtt", "logger", "loop",
        "pending_ping_payload", "ping_interval", "ping_sent_at", "ping_timeout", "ping_timer", "pong_timer",
        "queue", "read_paused", "request", "response", "root_path", "scheme", "scope", "server", "tasks",
        "transport", "writable", "_inbound", "_early", "_ignored", "_owed_pong", "_pause", "_shut_down", "_aborting",
        "_dropping_until", "_last_received",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.writable.set()
        self.conn.logger = WEBSOCKETS_LOG
        self.conn.debug = WEBSOCKETS_LOG.isEnabledFor(logging.DEBUG)
        self._inbound: bytearray | None = None  # received bytes not yet a whole frame, while this splits frames
        self._early = False  # bytes came after the request but before the acceptance
        self._ignored: Container[bytes] = ()
        self._owed_pong: bytes | None = None  # the latest ping left unanswered while answers backed up
        self._pause: asyncio.Future[None] | None = None  # while the application waits before reading on
        self._shut_down = False  # the server is shutting down
        self._aborting: asyncio.TimerHandle | None = None  # abort_later's timer
        self._dropping_until: float | None = None  # loop time until which what the peer sends is dropped unread
        self._last_received = 0.0  # loop time of the last bytes dropped so

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn's HTTP protocol hands its transport over; until then it is the transport's protocol. Its
        # httptools parser refers back to it, so left alone it waits for the cyclic GC, and a burst of
        # handshakes piles up ~4 KB of such garbage per connection and leaves the heap fragmented.
        handed_over = transport.get_protocol()
        super().connection_made(transport)
        if handed_over is not self and hasattr(handed_over, "parser"):
            handed_over.parser = None  # type: ignore[attr-defined]  # freed as soon as the upgrade returns

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # uvicorn's sans-I/O protocol sends an HTTP answer to the upgrade (a 503 while storage fails) but
            # leaves this unset, then logs "ASGI callable returned without completing handshake" as an error
            # (fixed upstream by the open pull request Kludex/uvicorn#3138)
            self.handshake_complete = True
        elif message["type"] == "websocket.accept":
            self._release_handshake()
            conn = self.conn
            if (self.handshake_complete and conn.state is State.OPEN and not conn.extensions and not self._early
                    and hasattr(conn, "current_size") and hasattr(conn, "max_message_size")):
                self._inbound = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._dropping_until is not None:  # refused: see handle_parser_exception
            self._last_received = self.loop.time()
            return
        if self._inbound is None:
            self._early |= self.handshake_initiated and not self.handshake_complete
            super().data_received(data)
            return
        self._inbound += data
        rest = self._take_frames() if self.conn.state is State.OPEN else bytes(self._inbound)
        if rest is not None:  # websockets parses everything from here on
            self._inbound = None
            if rest:
                super().data_received(rest)

    def _take_frames(self) -> bytes | None:
        """Handle the whole frames at the start of the buffer and keep the rest; return the unhandled bytes
        instead when websockets must take over (see the class docstring)."""
        buf = self._inbound
        assert buf is not None
        limit = self.conn.max_message_size
        pos, handover = 0, False
        with memoryview(buf) as view:
            while not handover and (header := frame_header(view, pos)) is not None:
                start, length = header
                if limit is not None and length > limit:
                    handover = True
                    break
                end = start + length
                if end > len(view):
                    break
                if view[pos] == 0x80 | Opcode.PING and self.transport.get_write_buffer_size() > PONG_BACKLOG:
                    # its answers back up: only the latest is answered, once they drain (RFC 6455 §5.5.3)
                    self._owed_pong = apply_mask(view[start:end], view[start - 4:start])
                elif view[pos] == 0x80 | Opcode.BINARY and view[pos + 1] & 0x80 and self.conn.current_size is None:
                    message = apply_mask(view[start:end], view[start - 4:start])
                    if message not in self._ignored:
                        self.curr_msg_data_type = "bytes"  # as uvicorn's handle_bytes for a final frame
                        self.frames = [message]
                        self.send_receive_event_to_app()
                else:
                    super().data_received(bytes(view[pos:end]))
                    handover = self.conn.state is not State.OPEN
                pos = end
        if handover:
            return bytes(buf[pos:])
        del buf[:pos]
        return None

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._owed_pong is not None and self.conn.state is State.OPEN:
            self.conn.send_pong(self._owed_pong)
            self.transport.write(b"".join(self.conn.data_to_send()))
        self._owed_pong = None

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":  # refused whatever it says (session.py, 1003): uvicorn decoded it
            # strictly, and invalid UTF-8 made it log a traceback and close with 1007 and no reason
            self.frames = [b"".join(self.frames).decode(errors="replace").encode()]
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        """As uvicorn's, but the disconnect says the server refused what the peer sent (a frame over the size
        limit, a malformed frame), so the application logs and counts it as it does other bad input."""
        close = self.conn.close_sent
        assert close is not None
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason,
                               "refused": True})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # what the peer still sends (the rest of a message over the limit) is read and dropped until it goes quiet:
        # closing with it unread made the kernel reset the connection, the peer lost the close frame, and a client
        # sent the refused message again
        self._dropping_until = self.loop.time() + DROP_FOR
        self._last_received = self.loop.time()
        self._close_when_quiet()

    def _close_when_quiet(self) -> None:
        if self.disconnected:
            return
        now = self.loop.time()
        if now - self._last_received >= QUIET or now >= self._dropping_until:  # type: ignore[operator]
            self.transport.close()
            self.abort_later()
        else:
            self.loop.call_later(QUIET, self._close_when_quiet)

    def _release_handshake(self) -> None:
        """Free what only the handshake needed once accepted: collab_server reads the scope (path, query, headers,
        subprotocols) only while admitting, and uvicorn only before accepting. The application's frames hold the
        scope for the connection's life, so it is emptied in place but for its type and this writer (~0.6 KB less
        per connection); so are the request's headers, which websockets' parser keeps alive."""
        if self.request is not None:
            self.request.headers.clear()
        self.request = self.response = None  # type: ignore[assignment]
        self.scope.clear()
        self.scope.update(type="websocket", extensions={SCOPE_EXTENSION: self})  # type: ignore[typeddict-item]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the upgrade was rejected
        if scope is not None:
            scope["extensions"][SCOPE_EXTENSION] = self

    def connection_lost(self, exc: Exception | None) -> None:
        if self._aborting is not None:
            self._aborting.cancel()
            self._aborting = None
        super().connection_lost(exc)
        # the scope offers this protocol as its frame writer: a cycle the cyclic GC alone would free, so every
        # closed connection (its buffers and parser included) would wait for a collection
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(SCOPE_EXTENSION, None)

    async def run_asgi(self) -> None:
        _SESSIONS.add(self)
        try:
            await super().run_asgi()
        finally:
            _SESSIONS.discard(self)
            self.abort_later()

    def shutdown(self) -> None:
        """Server shutdown of a connected peer: `stopping`, then uvicorn's (it closes the socket and queues a
        disconnect after what the peer sent)."""
        self.stopping()
        super().shutdown()
        self.abort_later()

    def keepalive_timeout(self) -> None:
        """uvicorn's (close 1011), said at INFO (uvicorn logs it at TRACE), and the socket aborted if the close cannot
        be written (`abort_later`)."""
        if not (self.close_sent or self.transport.is_closing()):
            log.info("closing connection: keepalive ping not answered in %s s", self.ping_timeout)
        super().keepalive_timeout()
        self.abort_later()

    def abort_later(self) -> None:
        if self._aborting is None and not self.disconnected:
            self._arm_abort(self._unsent())

    def _arm_abort(self, unsent: int) -> None:
        grace = CLOSE_GRACE
        if self._shut_down and self.config.timeout_graceful_shutdown is not None:
            grace = min(grace, self.config.timeout_graceful_shutdown / 4)
        self._aborting = self.loop.call_later(grace, self._abort, grace, unsent)

    def _unsent(self) -> int:
        """Bytes written to the peer that it has not taken yet: in the transport's buffer, and in the socket's send
        queue (not acknowledged)."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, ValueError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return unsent

    def _abort(self, grace: float, unsent_before: int) -> None:
        """Abort the socket, unless the peer took some of what waits for it since (a slow link, still reading: it
        is given another grace), outside a shutdown. The abort resets the connection, so the kernel does not keep the
        socket and what waits in it either."""
        self._aborting = None
        if self.disconnected:
            return
        unsent = self._unsent()
        if 0 < unsent < unsent_before and not self._shut_down:
            self._arm_abort(unsent)
            return
        log.info("aborting a connection whose peer took nothing of what was written to it (%d bytes) in %g s since "
                 "it was closed", unsent, grace)
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def stopping(self) -> None:
        """Server shutdown: the application goes on taking what the peer sent before it for half of the graceful
        timeout, without pauses, and what is left then is dropped. Those messages were never applied, so nothing
        acknowledged is lost, and a backlog of costly ones (each cutting an emoji, paced by the connection's share
        of the loop) cannot hold the process until uvicorn cancels its session."""
        if self._shut_down:
            return
        self._shut_down = True
        timeout = self.config.timeout_graceful_shutdown
        if timeout is not None:
            self.queue.drop_after(self.loop.time() + timeout / 2)  # type: ignore[attr-defined]
        _wake(self._pause)

    def take_queued(self, accept: Callable[[bytes], bool]) -> bytes | None:
        """The next queued message's bytes if it is a binary one `accept` accepts, taken as `receive` would take it
        (which resumes reading the socket once the queue is empty); else None."""
        data = self.queue.take_now(accept)  # type: ignore[attr-defined]
        if data is not None and self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def dropping_received(self) -> bool:
        return self.queue.dropping()  # type: ignore[attr-defined, no-any-return]

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` before the application reads on (see fairshare.py), or until the server shuts down; not
        at all once it does. (A peer that closes its end still has what it sent before paced: handled at once, a
        backlog of costly messages would take the loop from every other room.)"""
        if self._shut_down:
            return
        self._pause = self.loop.create_future()
        timer = self.loop.call_later(seconds, _wake, self._pause)
        try:
            await self._pause
        finally:
            timer.cancel()
            self._pause = None

    # keepalive pings: one _PingRounds timer for all connections; handle_pong (uvicorn's) clears the payload
    def start_keepalive(self) -> None:
        if self.ping_interval is not None and self.ping_interval > 0:
            self.ping_sent_at = self.loop.time()  # the first ping goes out one interval after accepting
            _PingRounds.of(self.loop, self.ping_interval, self.ping_timeout).add(self)

    def stop_keepalive(self) -> None:
        if self.ping_interval is not None and self.ping_interval > 0:
            _PingRounds.of(self.loop, self.ping_interval, self.ping_timeout).discard(self)
        self.pending_ping_payload = None

    def send_keepalive_ping(self) -> None:
        if self.close_sent or self.transport.is_closing():
            return
        self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))  # matched by handle_pong
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(self.pending_ping_payload)
        self.transport.write(b"".join(self.conn.data_to_send()))

    def ignore(self, messages: Container[bytes]) -> None:
        self._ignored = messages

    def write_frame(self, frame: bytes) -> bool:
        if not self._open():
            return False
        self.transport.write(frame)
        return True

    def write_message(self, message: bytes) -> bool:
        if not self._open():
            return False
        if len(message) < SHARED_FROM:
            self.transport.write(binary_frame(message))
        else:  # the transport keeps `message` itself where the socket cannot take it at once
            self.transport.writelines((binary_frame_head(len(message)), message))
        return True

    def _open(self) -> bool:
        """Whether the socket takes frames now (open, not closing, not backed up)."""
        return not (self.close_sent or self.disconnected or not self.writable.is_set()
                    or self.conn.state is not State.OPEN or self.transport.is_closing())


_SESSIONS: set[CollabWebSocketProtocol] = set()  # connections whose application (session) still runs


def stop_sessions() -> None:
    """Server shutdown: every session still running stops as a connected one does (`stopping`). uvicorn tells
    only the connected ones: a session whose peer left may still be handling, paced, what it sent before, and
    was cancelled at the graceful timeout with a traceback."""
    for protocol in list(_SESSIONS):
        protocol.stopping()


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
