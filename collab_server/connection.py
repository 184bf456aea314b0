"""One peer: direct frame writes, a bounded queue when the peer is backed up, keepalive traffic, close codes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

from collab_server.coalesce import coalesce
from collab_server.metrics import Metrics
from collab_server.protocol import KEEPALIVE
from collab_server.transport import FrameWriter, binary_frame

log = logging.getLogger(__name__)
_ids = itertools.count(1)
KEEPALIVE_FRAME = binary_frame(KEEPALIVE)
COALESCE_BYTES = 16 * 1024 * 1024  # a queue holding more is not merged (`Connection._coalesced`): ~0.15 s to merge

AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # text frames
    INVALID_PAYLOAD = 1007  # malformed message or update
    POLICY_VIOLATION = 1008  # rate limit, room full, forbidden room name
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # storage failure
    TRY_AGAIN_LATER = 1013  # the client cannot keep up with its send queue
    # 4400-4499 tell y-websocket not to reconnect (HTTP mnemonics)
    BAD_REQUEST = 4400  # with auth_close_codes: a path that names no room
    NO_TOKEN = 4401  # with auth_close_codes
    FORBIDDEN = 4403  # with auth_close_codes: invalid, expired or not covering the document
    DELETED = 4410  # the document was deleted (Gone)


class Connection:
    """Messages given to `send` reach the peer in order; `close` ends the connection.

    With a FrameWriter (see transport.py) a message is written to the socket at once, from pre-encoded frame
    bytes when the caller has them. When the socket is backed up, or without a writer, messages queue and one
    drain task writes them through the raw ASGI send, merging what waited (see coalesce.py): a peer that falls
    behind catches up with one update instead of thousands. The queue holds at most `send_queue_limit` messages
    and `send_queue_bytes` bytes; when it is full it is merged, and a peer still beyond either limit is too slow
    and is closed with 1013. Closing also goes through the drain task, which ends once the close frame is out;
    `wait_closed` waits for it.

    `keep_alive` (called by the registry's keepalive timer) sends an empty awareness message to a peer that got
    nothing lately, so clients' inactivity timers never fire.
    """

    __slots__ = ("id", "metrics", "readonly", "awareness_ids", "held", "send_queue_limit", "send_queue_bytes",
                 "_asgi_send", "_frames", "_queue", "_queued_bytes", "_drain", "_more", "_loop", "_last_send",
                 "close_code", "send_failed", "close_reason")

    def __init__(self, asgi_send: AsgiSend, metrics: Metrics, *, frames: FrameWriter | None = None,
                 readonly: bool = False, send_queue_limit: int = 4096,
                 send_queue_bytes: int = 64 * 1024 * 1024) -> None:
        self.id = next(_ids)
        self.metrics = metrics
        self.readonly = readonly
        self.awareness_ids: set[int] = set()
        self.held = 0  # its changes the room held back, waiting for changes not sent yet (room.MAX_HELD_EACH)
        self.send_queue_limit = send_queue_limit
        self.send_queue_bytes = send_queue_bytes
        self._asgi_send = asgi_send
        self._frames = frames
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._drain: asyncio.Task[None] | None = None
        self._more: asyncio.Future[None] | None = None  # the drain task waits here when it has no writer
        self._loop = asyncio.get_running_loop()  # held: looking it up costs a getpid() system call
        self._last_send = self._loop.time()
        self.close_code: int | None = None
        self.send_failed = False
        self.close_reason = ""
        if frames is None:
            self._start_drain()

    def __repr__(self) -> str:
        return f"Connection(id={self.id})"

    @property
    def direct(self) -> bool:
        """Whether messages are written straight to the socket (see transport.py) rather than through ASGI."""
        return self._frames is not None

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def send(self, message: bytes, frame: bytes | None = None) -> None:
        """Send `message`; `frame` is `binary_frame(message)` when the caller already encoded it."""
        if self.closed or self.send_failed:
            return
        if self._drain is None and self._frames is not None:
            if self._frames.write_frame(frame) if frame is not None else self._frames.write_message(message):
                self._last_send = self._loop.time()
                self.metrics.bytes_sent.inc(len(message))
                return
        if self._queue and self._over_limits(len(message)):
            self._queue = self._coalesced(self._queue)
            self._queued_bytes = sum(map(len, self._queue))
            if self._over_limits(len(message)):
                self.metrics.errors.labels("slow_client").inc()
                self.close(CloseCode.TRY_AGAIN_LATER, "send queue overflow: client too slow")
                return
        self._queue.append(message)
        self._queued_bytes += len(message)
        self._start_drain()

    def waiting(self, message: bytes) -> bool:
        """Whether `message`, this very object, waits in the send queue (the peer is backed up)."""
        return any(queued is message for queued in self._queue)

    def close(self, code: int, reason: str, *, quiet: bool = False) -> None:
        """Send a close frame after what is queued; queued messages are dropped unless the close is normal.
        `quiet`: the caller logged why already (a room closing all its connections), so this is a debug line."""
        if self.closed:
            return
        self.close_code, self.close_reason = code, reason
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self._queue.clear()
            self._queued_bytes = 0
            log.log(logging.DEBUG if quiet else logging.INFO, "closing connection id=%d code=%d reason=%s",
                    self.id, code, reason)
        self._start_drain()
        if self._frames is not None:  # a peer that reads nothing would hold the close, and the drain, for ever
            self._frames.abort_later()

    async def wait_closed(self) -> None:
        """Wait until the close frame is sent (or sending failed)."""
        while self._drain is not None:
            await asyncio.shield(self._drain)

    def keep_alive(self, since: float) -> None:
        """Send a keepalive if nothing was sent to the peer since loop time `since`."""
        if self._last_send <= since:
            self.send(KEEPALIVE, KEEPALIVE_FRAME)

    def _over_limits(self, adding: int) -> bool:
        return len(self._queue) >= self.send_queue_limit or self._queued_bytes + adding > self.send_queue_bytes

    def _coalesced(self, messages: list[bytes]) -> list[bytes]:
        """`messages` merged (see coalesce.py); unchanged, and logged, if a message cannot be read, and unchanged if
        they hold more than COALESCE_BYTES (merging 64 MB took up to a second of the event loop, every room's, for
        each peer that fell behind)."""
        if len(messages) < 2 or sum(map(len, messages)) > COALESCE_BYTES:
            return messages
        try:
            merged = coalesce(messages)
        except ValueError as exc:
            log.warning("messages to connection id=%d not merged: %r", self.id, exc)
            return messages
        self.metrics.messages_coalesced.inc(len(messages) - len(merged))
        return merged

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_task(self._run_drain(), name=f"drain:{self.id}")
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def _run_drain(self) -> None:
        """Write queued messages through ASGI; without a FrameWriter keep waiting for more until closed."""
        send = self._asgi_send
        loop = self._loop
        try:
            while True:
                while self._queue:
                    batch, self._queue, self._queued_bytes = self._coalesced(self._queue), [], 0
                    for message in batch:
                        await send({"type": "websocket.send", "bytes": message})
                    self._last_send = loop.time()
                    self.metrics.bytes_sent.inc(sum(map(len, batch)))
                if self.closed:
                    await send({"type": "websocket.close", "code": self.close_code or CloseCode.NORMAL,
                                "reason": self.close_reason[:120]})
                    return
                if self._frames is not None:
                    return  # caught up: back to direct writes
                self._more = loop.create_future()
                await self._more
                self._more = None
        except Exception as exc:
            # The peer went away mid-send. Stop sending, but leave the connection open for reading:
            # frames it sent before leaving are still queued and must be applied and stored.
            log.debug("sender stopped id=%d error=%r", self.id, exc)
            self.send_failed = True
            self._queue.clear()
            self._queued_bytes = 0
        finally:
            self._drain = None
