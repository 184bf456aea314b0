"""One peer: a bounded send queue drained by one task, keepalive traffic, close codes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from enum import IntEnum

from starlette.websockets import WebSocket

from collab_server.metrics import Metrics
from collab_server.protocol import KEEPALIVE

log = logging.getLogger(__name__)
_ids = itertools.count(1)


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
    """Messages queued with `send` are written in order by `run_sender`; `close` ends the connection."""

    def __init__(self, websocket: WebSocket, metrics: Metrics, *, readonly: bool = False,
                 send_queue_limit: int = 4096, keepalive_interval: float = 10.0) -> None:
        self.id = next(_ids)
        self.metrics = metrics
        self.websocket = websocket
        self.readonly = readonly
        self.awareness_ids: set[int] = set()
        self.send_queue_limit = send_queue_limit
        self.keepalive_interval = keepalive_interval
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
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

    async def run_sender(self) -> None:
        """Write queued messages until closed; send a keepalive when idle so clients' timers stay happy."""
        ws = self.websocket
        try:
            while True:
                if not self._queue and not self.closed:
                    try:
                        async with asyncio.timeout(self.keepalive_interval):
                            await self._wake.wait()
                    except TimeoutError:
                        self._queue.append(KEEPALIVE)
                    self._wake.clear()
                sent = 0
                while self._queue:
                    message = self._queue.popleft()
                    await ws.send_bytes(message)
                    sent += len(message)
                self.metrics.bytes_sent.inc(sent)
                if self.closed:
                    await ws.close(self.close_code or CloseCode.NORMAL, self.close_reason[:120])
                    return
        except Exception as exc:
            # The peer went away mid-send. Stop sending, but leave the connection open for reading:
            # frames it sent before leaving are still queued and must be applied and stored.
            log.debug("sender stopped id=%d error=%r", self.id, exc)
            self.send_failed = True
            self._queue.clear()
