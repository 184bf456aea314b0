"""One peer: a bounded send queue drained by one task, keepalive traffic, close codes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

from collab_server.metrics import Metrics
from collab_server.protocol import KEEPALIVE

log = logging.getLogger(__name__)
_ids = itertools.count(1)

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


class Connection:
    """Messages queued with `send` are written in order by `run_sender`; `close` ends the connection.

    `asgi_send` is the server's raw ASGI send for an accepted websocket: the hot path skips framework wrappers.
    A connection that sent nothing for half a keepalive interval when the keepalive timer fires gets an empty
    awareness message, so clients' inactivity timers never fire (silence lasts at most 1.5 intervals).
    """

    def __init__(self, asgi_send: AsgiSend, metrics: Metrics, *, readonly: bool = False,
                 send_queue_limit: int = 4096, keepalive_interval: float = 10.0) -> None:
        self.id = next(_ids)
        self.metrics = metrics
        self.readonly = readonly
        self.awareness_ids: set[int] = set()
        self.send_queue_limit = send_queue_limit
        self.keepalive_interval = keepalive_interval
        self._asgi_send = asgi_send
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._last_send = 0.0  # loop time of the last write
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.close_code: int | None = None
        self.send_failed = False
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def send(self, message: bytes) -> None:
        if self.closed or self.send_failed:
            return
        if len(self._queue) >= self.send_queue_limit:
            self.metrics.errors.labels("slow_client").inc()
            self.close(CloseCode.TRY_AGAIN_LATER, "send queue overflow: client too slow")
            return
        self._queue.append(message)
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        """Ask the sender task to close the socket; queued messages are dropped unless the close is normal."""
        if self.closed:
            return
        self.close_code, self.close_reason = code, reason
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self._queue.clear()
            log.info("closing connection id=%d code=%d reason=%s", self.id, code, reason)
        self._wake.set()

    def _keepalive_tick(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_send >= self.keepalive_interval / 2:
            self.send(KEEPALIVE)
        self._keepalive_timer = loop.call_later(self.keepalive_interval, self._keepalive_tick)

    async def run_sender(self) -> None:
        """Write queued messages until closed."""
        send = self._asgi_send
        loop = asyncio.get_running_loop()
        self._keepalive_timer = loop.call_later(self.keepalive_interval, self._keepalive_tick)
        try:
            while True:
                if not self._queue and not self.closed:
                    await self._wake.wait()
                    self._wake.clear()
                sent = 0
                while self._queue:
                    message = self._queue.popleft()
                    await send({"type": "websocket.send", "bytes": message})
                    sent += len(message)
                self._last_send = loop.time()
                self.metrics.bytes_sent.inc(sent)
                if self.closed:
                    await send({"type": "websocket.close", "code": self.close_code or CloseCode.NORMAL,
                                "reason": self.close_reason[:120]})
                    return
        except Exception as exc:
            # The peer went away mid-send. Stop sending, but leave the connection open for reading:
            # frames it sent before leaving are still queued and must be applied and stored.
            log.debug("sender stopped id=%d error=%r", self.id, exc)
            self.send_failed = True
            self._queue.clear()
        finally:
            self._keepalive_timer.cancel()
