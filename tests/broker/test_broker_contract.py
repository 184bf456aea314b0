"""The Broker contract, run against every implementation (local; Redis streams on a real server), plus the
Redis broker's behaviour between nodes: ordering, the local flag, subscriptions, bad entries, reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio

from collab_server.broker import Broker, BrokerError, Kind
from collab_server.broker.local import LocalBroker
from collab_server.broker.redis import RedisBroker
from collab_server.pacing import TURN
from tests.serverproc import free_port

Event = tuple[Kind, bytes, bool]


class Inbox:
    """A handler that records events and lets a test wait for them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: Kind, payload: bytes, local: bool) -> None:
        self.events.append((kind, payload, local))
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        """The events, once there are at least `count`."""
        await self.wait_until(lambda: len(self.events) >= count, timeout)
        return self.events

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)


class Nodes:
    """Broker nodes of one kind; Redis nodes share one server and a per-test key prefix."""

    def __init__(self, make: Callable[[], Broker]) -> None:
        self._make = make
        self.started: list[Broker] = []

    async def __call__(self) -> Broker:
        broker = self._make()
        await broker.start()
        self.started.append(broker)
        return broker

    async def close(self) -> None:
        for broker in self.started:
            await broker.close()


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.distributed)])
def broker_kind(request: pytest.FixtureRequest) -> Callable[[], Broker]:
    if request.param == "local":
        return LocalBroker
    url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    return lambda: RedisBroker(url, prefix=prefix, block_ms=1000)


@pytest.fixture
async def node(broker_kind: Callable[[], Broker]) -> AsyncIterator[Nodes]:
    """Start broker nodes of each kind: `await node()`."""
    nodes = Nodes(broker_kind)
    yield nodes
    await nodes.close()


@pytest.fixture
async def redis_node(redis_url: str, redis_prefix: str) -> AsyncIterator[Nodes]:
    """Start Redis broker nodes: `await redis_node()`."""
    nodes = Nodes(lambda: RedisBroker(redis_url, prefix=redis_prefix, block_ms=1000))
    yield nodes
    await nodes.close()


def numbered(count: int) -> list[bytes]:
    return [f"{i:05d}".encode() for i in range(count)]


# --- every broker ------------------------------------------------------------------------------------


async def test_delivers_in_order_with_the_local_flag(node: Nodes) -> None:
    broker = await node()
    inbox = Inbox()
    await broker.subscribe("r", inbox)
    payloads = numbered(300)
    for i, payload in enumerate(payloads):
        broker.publish("r", Kind.AWARENESS if i % 7 == 0 else Kind.UPDATE, payload)
    events = await inbox.wait_for(300)
    assert [e[1] for e in events] == payloads
    assert all(local for _, _, local in events)
    assert [kind for kind, _, _ in events[:8]] == [Kind.AWARENESS] + [Kind.UPDATE] * 6 + [Kind.AWARENESS]


async def test_ping_answers_while_the_broker_is_reachable(node: Nodes) -> None:
    await (await node()).ping()


async def test_rooms_are_separate_and_unsubscribe_stops_delivery(node: Nodes) -> None:
    broker = await node()
    one, two = Inbox(), Inbox()
    await broker.subscribe("one", one)
    await broker.subscribe("two", two)
    broker.publish("one", Kind.UPDATE, b"1")
    broker.publish("two", Kind.UPDATE, b"2")
    assert await one.wait_for(1) == [(Kind.UPDATE, b"1", True)]
    assert await two.wait_for(1) == [(Kind.UPDATE, b"2", True)]
    await broker.unsubscribe("one")
    broker.publish("one", Kind.UPDATE, b"lost")
    broker.publish("two", Kind.UPDATE, b"3")
    await two.wait_for(2)
    assert one.events == [(Kind.UPDATE, b"1", True)]


# --- between nodes -----------------------------------------------------------------------------------


@pytest.mark.distributed
async def test_other_nodes_receive_in_order_and_own_events_once(redis_node: Nodes) -> None:
    a, b = await redis_node(), await redis_node()
    inbox_a, inbox_b = Inbox(), Inbox()
    await a.subscribe("r", inbox_a)
    await b.subscribe("r", inbox_b)
    payloads = numbered(2000)
    for payload in payloads:
        b.publish("r", Kind.UPDATE, payload)
    b.publish("r", Kind.AWARENESS, b"last")
    events = await inbox_a.wait_for(2001)
    assert events == [(Kind.UPDATE, p, False) for p in payloads] + [(Kind.AWARENESS, b"last", False)]
    a.publish("r", Kind.UPDATE, b"from a")  # b sees it after its own events, which it got only once
    assert (await inbox_b.wait_for(2002))[-1] == (Kind.UPDATE, b"from a", False)
    assert len(inbox_b.events) == 2002 and all(local for _, _, local in inbox_b.events[:2001])


@pytest.mark.distributed
async def test_slow_handlers_leave_the_event_loop_turns(redis_node: Nodes) -> None:
    """A batch of entries whose handler is slow (a room rebuilding its document for each) is handed over with a
    turn for the rest of the event loop every TURN, not in one stretch that holds every connection."""
    a, b = await redis_node(), await redis_node()
    turns = 0
    seen_at: list[int] = []

    def slow(kind: Kind, payload: bytes, local: bool) -> None:
        seen_at.append(turns)
        time.sleep(0.005)

    async def tick() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    await a.subscribe("r", slow)
    await b.subscribe("r", Inbox())
    for payload in numbered(40):
        b.publish("r", Kind.UPDATE, payload)
    ticker = asyncio.create_task(tick())
    try:
        async with asyncio.timeout(10):
            while len(seen_at) < 40:
                await asyncio.sleep(0.01)
    finally:
        ticker.cancel()
    # ~200 ms of handlers; those read in one batch still let the loop run about every TURN (10 ms)
    gaps = [later - earlier for earlier, later in zip(seen_at, seen_at[1:])]
    assert sum(1 for gap in gaps if gap > 0) >= 0.2 / TURN / 2


@pytest.mark.distributed
async def test_nothing_published_after_subscribe_returns_is_missed(redis_node: Nodes) -> None:
    """Node b publishes a counter to 20 rooms nonstop; a subscribes to them one by one meanwhile. Each room
    must get every number from the one published right after its subscribe returned (or earlier) on."""
    a, b = await redis_node(), await redis_node()
    rooms = [f"r{i}" for i in range(20)]
    sent = 0
    running = True

    async def publish_forever() -> None:
        nonlocal sent
        while running:
            for room in rooms:
                b.publish(room, Kind.UPDATE, str(sent).encode())
            sent += 1
            await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_forever())
    firsts: dict[str, tuple[int, Inbox]] = {}
    for room in rooms:
        inbox = Inbox()
        await a.subscribe(room, inbox)
        firsts[room] = (sent, inbox)  # no await since subscribe returned: `sent` is the next number out
    running = False
    await publisher
    for room, (first, inbox) in firsts.items():
        await inbox.wait_until(lambda inbox=inbox: bool(inbox.events) and int(inbox.events[-1][1]) == sent - 1)
        numbers = [int(payload) for _, payload, _ in inbox.events]
        assert numbers[0] <= first, room
        assert numbers == list(range(numbers[0], sent)), room


@pytest.mark.distributed
async def test_new_room_is_read_without_waiting_for_the_block_timeout(redis_url: str, redis_prefix: str) -> None:
    a = RedisBroker(redis_url, prefix=redis_prefix, block_ms=60_000)
    b = RedisBroker(redis_url, prefix=redis_prefix)
    await a.start()
    await b.start()
    try:
        inbox = Inbox()
        await a.subscribe("late", inbox)  # the reader is blocked on nothing but its wake stream
        b.publish("late", Kind.UPDATE, b"x")
        assert await inbox.wait_for(1, timeout=5) == [(Kind.UPDATE, b"x", False)]
    finally:
        await a.close()
        await b.close()


@pytest.mark.distributed
async def test_bad_entries_are_skipped_and_other_rooms_keep_flowing(redis_node: Nodes, redis_url: str,
                                                                  redis_prefix: str) -> None:
    a, b = await redis_node(), await redis_node()
    good, bad, hijacked = Inbox(), Inbox(), Inbox()
    for room, inbox in (("good", good), ("bad", bad), ("hijacked", hijacked)):
        await a.subscribe(room, inbox)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        await raw.xadd(f"{redis_prefix}room:bad", {"junk": "1"})
        await raw.xadd(f"{redis_prefix}room:bad", {"kind": "nonsense", "node": "x", "data": "y"})
        await raw.delete(f"{redis_prefix}room:hijacked")
        await raw.set(f"{redis_prefix}room:hijacked", "not a stream")  # every XREAD naming it now fails
    finally:
        await raw.aclose()
    b.publish("bad", Kind.UPDATE, b"after junk")
    b.publish("good", Kind.UPDATE, b"fine")
    assert await bad.wait_for(1) == [(Kind.UPDATE, b"after junk", False)]
    assert await good.wait_for(1) == [(Kind.UPDATE, b"fine", False)]
    assert hijacked.events == []


@pytest.mark.distributed
async def test_reconnects_after_redis_drops_its_connections(redis_node: Nodes, redis_url: str) -> None:
    a, b = await redis_node(), await redis_node()
    inbox = Inbox()
    await a.subscribe("r", inbox)
    b.publish("r", Kind.UPDATE, b"before")
    await inbox.wait_for(1)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        names = {f"collab-{a.node_id}", f"collab-{b.node_id}"}
        clients = [c for c in await raw.client_list() if c.get("name") in names]
        assert len(clients) >= 3  # both nodes' command connections and a's blocked reader
        for client in clients:
            await raw.client_kill_filter(_id=client["id"])
    finally:
        await raw.aclose()
    for i in range(50):
        b.publish("r", Kind.UPDATE, f"after {i}".encode())
    events = await inbox.wait_for(51, timeout=20)
    assert [payload for _, payload, _ in events] == [b"before"] + [f"after {i}".encode() for i in range(50)]


@pytest.mark.distributed
async def test_a_room_stream_is_dropped_after_its_last_event_and_delivery_goes_on(
        redis_url: str, redis_prefix: str) -> None:
    """Redis holds a room's stream only while the room is active (every document ever edited would otherwise stay
    in its memory); a node subscribed across the drop reads on from its last id when the room is active again."""
    a, b = (RedisBroker(redis_url, prefix=redis_prefix, block_ms=1000, stream_ttl=1) for _ in range(2))
    raw = redis.asyncio.Redis.from_url(redis_url)
    await a.start()
    await b.start()
    try:
        inbox = Inbox()
        await b.subscribe("r", inbox)
        key = a.stream_key("r")
        a.publish("r", Kind.UPDATE, b"one")
        await inbox.wait_for(1)
        assert 0 < await raw.ttl(key) <= 1
        deadline = time.monotonic() + 10
        while await raw.exists(key):
            assert time.monotonic() < deadline, "the stream outlived its time to live"
            await asyncio.sleep(0.1)
        a.publish("r", Kind.UPDATE, b"two")
        assert await inbox.wait_for(2, timeout=5) == [(Kind.UPDATE, b"one", False), (Kind.UPDATE, b"two", False)]
        assert 0 < await raw.ttl(key) <= 1  # renewed by each event
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


@pytest.mark.distributed
async def test_close_sends_everything_queued(redis_node: Nodes) -> None:
    a, b = await redis_node(), await redis_node()
    inbox = Inbox()
    await a.subscribe("r", inbox)
    payloads = numbered(500)
    for payload in payloads:
        b.publish("r", Kind.UPDATE, payload)
    await b.close()
    assert [payload for _, payload, _ in await inbox.wait_for(500)] == payloads


async def test_redis_down_fails_loudly() -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1.0)
    with pytest.raises(BrokerError, match="unreachable"):
        await broker.start()


@pytest.mark.distributed
async def test_a_reader_cut_off_mid_connect_by_close_ends_quietly(redis_url: str, redis_prefix: str) -> None:
    # Seen when a node stopped right after starting (its port was taken): close() disconnected the reader while
    # redis-py was still connecting, which raised AttributeError, not a RedisError; the task died with it and
    # asyncio logged "Task exception was never retrieved".
    broker = RedisBroker(redis_url, prefix=redis_prefix)
    await broker.start()
    assert broker._reader_client is not None
    xread = broker._reader_client.xread

    async def cut_off(*args, **kwargs):
        await broker._closing.wait()
        raise AttributeError("'NoneType' object has no attribute 'writelines'")  # as redis-py raised it

    broker._reader_client.xread = cut_off
    await asyncio.sleep(0.05)  # the reader is in the patched XREAD
    reader = broker._tasks[1]
    await broker.close()
    broker._reader_client.xread = xread
    assert reader.done() and reader.exception() is None
