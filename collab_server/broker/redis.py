"""Redis broker: fan-out between nodes over one Redis stream per room.

`publish` delivers to this node's subscriber at once (local=True), so a node's own clients never wait on
Redis, and queues the event; one task XADDs the queue in order, in pipelined batches, retrying a batch until
it is sent. One reader task XREADs every subscribed stream from the last id it saw and hands other nodes'
entries to their handlers (local=False). A subscription starts at the stream's last id as read when
`subscribe` runs, so nothing published after it returns is missed. The reader also blocks on a per-node wake
stream, which `subscribe` pokes so a new room is read at once.

Redis is a relay here, not a store: a room's stream keeps its last `maxlen` entries (approximately) and is dropped
`stream_ttl` seconds after its last event, so Redis holds only rooms active lately, not every document ever edited.
Subscribed nodes read events within milliseconds; a node that misses some (it lagged past `maxlen`, or was cut off
from Redis longer than `stream_ttl`) takes the changes from storage at its next resync (resync.py). A stream created
again gets ids past those of the one dropped (they are Redis's clock), so its subscribers read on from their last ids.

While Redis is down, a node's own clients are still served; events wait in a bounded queue (the oldest are
dropped, and logged, past `max_pending`), the reader retries with backoff and resumes from its last ids, and
`subscribe` raises BrokerError, so a room that cannot be kept in sync with other nodes is not opened.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from collab_server.broker.base import BrokerError, Handler, Kind
from collab_server.pacing import Turns

log = logging.getLogger(__name__)

BATCH = 500  # stream entries per XADD pipeline and per stream per XREAD
WAKE_TTL = 3600  # seconds a node's wake stream outlives its last poke (a killed node leaves it behind)


@dataclass
class _Subscription:
    key: str
    handler: Handler
    last_id: str  # entries up to and including this id are not delivered


class RedisBroker:
    def __init__(self, url: str, *, prefix: str = "collab:", maxlen: int = 10_000, stream_ttl: int = 600,
                 block_ms: int = 5_000, max_pending: int = 100_000, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.maxlen = maxlen  # entries kept per room stream (approximately): how long a node may lag
        self.stream_ttl = stream_ttl  # seconds a room's stream outlives its last event
        self.block_ms = block_ms
        self.node_id = uuid.uuid4().hex
        self._wake_key = f"{prefix}node:{self.node_id}"
        self._wake_id = "0-0"
        self._connect_timeout = connect_timeout
        self._subs: dict[str, _Subscription] = {}
        self._outbox: deque[tuple[str, dict[Any, Any]]] = deque(maxlen=max_pending)
        self._queued = asyncio.Event()
        self._dropped = 0  # events dropped from a full queue since the last successful send
        self._closing = asyncio.Event()  # set by close: stops the tasks and ends their backoff pauses
        self._client: Redis | None = None
        self._reader_client: Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def stream_key(self, room: str) -> str:
        return f"{self.prefix}room:{room}"

    async def start(self) -> None:
        timeout = self._connect_timeout
        name = f"collab-{self.node_id}"  # shows in CLIENT LIST: which node holds a connection
        self._client = Redis.from_url(self.url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      client_name=name)
        self._reader_client = Redis.from_url(self.url, socket_connect_timeout=timeout,
                                             socket_timeout=self.block_ms / 1000 + timeout, client_name=name)
        try:
            await self._client.ping()
        except RedisError as exc:
            await self._close_clients()
            raise BrokerError(f"redis unreachable at start: {exc}") from exc
        self._tasks = [asyncio.create_task(self._publish_loop(), name="redis-publisher"),
                       asyncio.create_task(self._read_loop(), name="redis-reader")]

    async def close(self) -> None:
        """Send what is queued (dropping it if Redis fails now), then stop.

        The tasks are stopped by the closing flag, not cancelled: cancelling a redis-py command in flight
        can leave the task stuck. Disconnecting the reader's connection ends its blocking XREAD at once.
        """
        self._closing.set()
        self._queued.set()
        if self._tasks:
            publisher, reader = self._tasks
            await publisher
            assert self._reader_client is not None
            while not reader.done():  # repeated in case the reader was connecting when it was cut off
                await self._reader_client.connection_pool.disconnect()
                await asyncio.wait([reader], timeout=0.5)
        self._subs.clear()
        if self._client is not None:
            try:
                await self._client.delete(self._wake_key)
            except RedisError:
                pass
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._client, self._reader_client):
            if client is not None:
                await client.aclose()

    async def subscribe(self, room: str, handler: Handler) -> None:
        """Deliver `room`'s events published after this returns; raises BrokerError when Redis is down."""
        assert self._client is not None
        key = self.stream_key(room)
        try:
            last: Any = await self._client.xrevrange(key, "+", "-", count=1)
        except RedisError as exc:
            raise BrokerError(f"subscribing to {room!r} failed: {exc}") from exc
        self._subs[room] = _Subscription(key, handler, last[0][0].decode() if last else "0-0")
        try:  # registered first: the woken reader must find the new stream
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"wake": room}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, WAKE_TTL)
                await pipe.execute()
        except RedisError as exc:  # the reader picks the room up after its current XREAD instead
            log.warning("redis wake failed room=%s error=%s", room, exc)

    async def ping(self) -> None:
        assert self._client is not None
        try:
            await self._client.ping()
        except RedisError as exc:
            raise BrokerError(f"redis unreachable: {exc}") from exc

    async def unsubscribe(self, room: str) -> None:
        self._subs.pop(room, None)  # the reader drops it from its next XREAD; entries in flight are ignored

    def publish(self, room: str, kind: Kind, payload: bytes) -> None:
        sub = self._subs.get(room)
        if sub is not None:
            sub.handler(kind, payload, True)
        if self._closing.is_set():
            return
        if len(self._outbox) == self._outbox.maxlen:
            self._dropped += 1
            if self._dropped == 1:
                log.error("redis publish queue full: dropping the oldest events, other nodes miss them")
        self._outbox.append((self.stream_key(room), {"kind": kind.value, "node": self.node_id, "data": payload}))
        self._queued.set()

    # --- publishing ----------------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(BATCH, len(self._outbox)))]
                await self._send(batch)
            if self._closing.is_set():
                return

    async def _send(self, batch: list[tuple[str, dict[Any, Any]]]) -> None:
        """XADD `batch` in order, retrying with backoff until Redis takes it (a retry may duplicate entries,
        which subscribers tolerate: updates and awareness states are idempotent)."""
        assert self._client is not None
        for delay in _backoff():
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, fields in batch:
                        pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
                    for key in dict.fromkeys(key for key, _ in batch):
                        pipe.expire(key, self.stream_ttl)
                    results = await pipe.execute(raise_on_error=False)
            except RedisError as exc:
                if self._closing.is_set():
                    log.error("redis publish failed while closing: %d events dropped error=%s",
                              len(batch) + len(self._outbox), exc)
                    self._outbox.clear()
                    return
                log.warning("redis publish failed events=%d retry_in=%.1fs error=%s", len(batch), delay, exc)
                await self._pause(delay)
                continue
            if self._dropped:
                log.error("redis publishing resumed; %d events were dropped", self._dropped)
                self._dropped = 0
            for (key, _), result in zip(batch, results):  # the XADDs' (the EXPIREs' follow)
                if isinstance(result, Exception):
                    log.error("redis rejected an event stream=%s error=%s", key, result)
            return

    # --- reading -------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._reader_client is not None
        backoff = _backoff()
        while not self._closing.is_set():
            streams: dict[Any, Any] = {self._wake_key: self._wake_id,
                                       **{s.key: s.last_id for s in self._subs.values()}}
            try:
                reply: Any = await self._reader_client.xread(streams, count=BATCH, block=self.block_ms)
            except Exception as exc:
                if self._closing.is_set():  # cut off by close(); mid-connect, redis-py raises AttributeError
                    return
                if not isinstance(exc, RedisError):
                    raise
                delay = next(backoff)
                log.warning("redis read failed retry_in=%.1fs error=%s", delay, exc)
                await self._pause(delay)
                if isinstance(exc, ResponseError):
                    await self._drop_broken_streams()
                continue
            backoff = _backoff()
            turns = Turns()  # handlers may be slow (a room rebuilt): the loop runs between them
            for key, entries in reply or ():
                await self._dispatch(key.decode(), entries, turns)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the broker is closing."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def _dispatch(self, key: str, entries: list[tuple[bytes, dict[bytes, bytes]]], turns: Turns) -> None:
        """Hand `entries` to their room's handler in order, offering the loop turns between them (the
        subscription is looked up for each entry: it may change meanwhile)."""
        if key == self._wake_key:
            self._wake_id = entries[-1][0].decode()
            return
        room = key.removeprefix(f"{self.prefix}room:")
        for raw_id, fields in entries:
            await turns.offer()
            entry_id = raw_id.decode()
            sub = self._subs.get(room)
            if sub is None or not _after(entry_id, sub.last_id):
                continue  # unsubscribed meanwhile, or older than a newer subscription's start
            sub.last_id = entry_id
            try:
                node = fields[b"node"].decode()
                if node != self.node_id:  # this node's own events were delivered when published
                    sub.handler(Kind(fields[b"kind"].decode()), fields[b"data"], False)
            except Exception:
                log.exception("skipping bad broker entry stream=%s id=%s", key, entry_id)

    async def _drop_broken_streams(self) -> None:
        """A key that is no longer a stream fails every XREAD: unsubscribe its room so the others keep going."""
        assert self._client is not None
        subs = list(self._subs.items())
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for _, sub in subs:
                    pipe.type(sub.key)
                types = await pipe.execute()
        except RedisError as exc:
            log.warning("redis type probe failed error=%s", exc)
            return
        for (room, sub), kind in zip(subs, types):
            if kind not in (b"stream", b"none") and self._subs.get(room) is sub:
                log.error("room %s stops receiving other nodes' events: %s is a %s", room, sub.key, kind.decode())
                del self._subs[room]


def _after(a: str, b: str) -> bool:
    """Stream id `a` comes after `b`."""
    a_ms, a_seq = a.split("-")
    b_ms, b_seq = b.split("-")
    return (int(a_ms), int(a_seq)) > (int(b_ms), int(b_seq))


def _backoff(first: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Delays doubling from `first` up to `cap`, forever."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)
