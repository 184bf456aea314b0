"""PostgreSQL store shared by several nodes: concurrent commits and compactions never lose an update."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from pycrdt import Doc, Text

from collab_server.broker.local import LocalBroker
from collab_server.connection import Connection
from collab_server.metrics import Metrics
from collab_server.room import Room
from collab_server.storage.base import DeletedMeanwhile, StorageError
from collab_server.storage.postgres import PostgresStore
from tests.rawclient import text_updates

pytestmark = pytest.mark.distributed

GATE = 7_240_001  # advisory lock key the test holds to pause a compaction


def rebuild(updates: list[bytes]) -> Doc:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def text_of(doc: Doc) -> str:
    return str(doc.get("t", type=Text))


@pytest.fixture
async def nodes(postgres_dsn: str, pg_schema: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a = PostgresStore(postgres_dsn, schema=pg_schema, compact_threshold=10_000)
    b = PostgresStore(postgres_dsn, schema=pg_schema, compact_threshold=10_000)
    await asyncio.gather(a.open(), b.open())  # concurrent schema creation must not race
    yield a, b
    await asyncio.gather(a.close(), b.close())


async def test_two_nodes_writing_and_compacting_at_once(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    doc_a, updates_a = text_updates(400)
    doc_b, updates_b = text_updates(400)

    async def write_and_compact(store: PostgresStore, updates: list[bytes]) -> None:
        for i in range(0, len(updates), 50):
            await asyncio.gather(*(store.submit("d", u) for u in updates[i:i + 50]))
            await store.compact("d")

    await asyncio.gather(write_and_compact(a, updates_a), write_and_compact(b, updates_b),
                         a.compact("d"), b.compact("d"))
    expected = rebuild([doc_a.get_update(), doc_b.get_update()])
    for store in (a, b):
        assert text_of(rebuild(await store.load("d"))) == text_of(expected)


async def test_row_committed_while_compacting_is_kept(
        nodes: tuple[PostgresStore, PostgresStore], postgres_dsn: str, pg_schema: str) -> None:
    """A log row committed between a compaction's read and its delete was not folded, so it must stay."""
    a, _ = nodes
    doc, updates = text_updates(3)
    settings = {"search_path": pg_schema}
    gate = await asyncpg.connect(postgres_dsn, server_settings=settings)
    slow = await asyncpg.connect(postgres_dsn, server_settings=settings)
    try:
        await a.submit("d", updates[0])
        tx = slow.transaction()
        await tx.start()
        await slow.execute("INSERT INTO updates (doc, ts, data) VALUES ('d', 0, $1)", updates[1])  # a lower id
        await a.submit("d", updates[2])
        # hold the compaction after its read, at the checkpoint write, until the slow row has committed
        await gate.execute(
            f"CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN PERFORM pg_advisory_xact_lock({GATE}); RETURN NEW; END $$;"
            f"CREATE TRIGGER gate BEFORE UPDATE ON documents FOR EACH ROW EXECUTE FUNCTION gate()")
        await gate.execute("SELECT pg_advisory_lock($1)", GATE)
        compaction = asyncio.create_task(a.compact("d"))
        await until(lambda: gate.fetchval(
            "SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted", GATE))
        await tx.commit()
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        await compaction
    finally:
        await gate.close()
        await slow.close()
    assert len(await a.history("d")) == 1  # the late row is still in the log
    assert text_of(rebuild(await a.load("d"))) == text_of(doc)


async def test_a_late_row_folded_alone_is_still_read_as_new(
        nodes: tuple[PostgresStore, PostgresStore], postgres_dsn: str, pg_schema: str) -> None:
    """A row with a lower id commits after a compaction folded past it (as above), is folded alone by the next one,
    and was never seen by a resync read: the next read must still return it, so that fold changes the checkpoint's
    number."""
    a, _ = nodes
    doc, updates = text_updates(3)
    await asyncio.gather(*(a.submit("d", u) for u in updates[:2]))
    await a.compact("d")
    seen, mark = await a.load_new("d", None)
    assert mark is not None
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:  # its id was taken before the compaction's read: a lower one than the checkpoint's
        await conn.execute("INSERT INTO updates (id, doc, ts, data) VALUES ($1, 'd', 0, $2)",
                           mark.checkpoint - 1, updates[2])
    finally:
        await conn.close()
    await a.compact("d")
    assert len(await a.history("d")) == 0
    new, _ = await a.load_new("d", mark)
    assert text_of(rebuild(seen + new)) == text_of(doc)


async def test_a_room_loaded_on_one_node_then_reads_only_what_came_after(
        nodes: tuple[PostgresStore, PostgresStore]) -> None:
    """The mark of a room's load is where its node's resync starts: the next read holds only later commits."""
    a, b = nodes
    doc, updates = text_updates(4)
    await asyncio.gather(*(a.submit("d", u) for u in updates[:3]))
    room = Room("d", a, LocalBroker(), Metrics())
    await room.load()
    assert room.mark is not None and await a.load_new("d", room.mark) == ([], room.mark)
    await b.submit("d", updates[3])  # another node commits
    new, _ = await a.load_new("d", room.mark)
    assert new == [updates[3]]
    assert room.catch_up(new) and text_of(room.doc) == text_of(doc)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


async def test_load_during_compaction_sees_a_whole_state(nodes: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = nodes
    doc, updates = text_updates(300)
    await asyncio.gather(*(a.submit("d", u) for u in updates))
    expected = text_of(doc)
    loads = [b.load("d") for _ in range(20)]
    results = await asyncio.gather(a.compact("d"), *loads)
    for loaded in results[1:]:
        assert text_of(rebuild(loaded)) == expected


async def test_commits_proceed_while_a_compaction_folds(
        postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction runs beside the writer: an update submitted while a fold is held is durable before the
    fold ends, and survives the compaction (it was not in the folded snapshot)."""
    import threading

    from collab_server.storage import postgres as postgres_module

    folding, release = threading.Event(), threading.Event()
    real_fold = postgres_module.fold_updates

    def held_fold(parts: list[bytes], doc: str | None = None) -> bytes:
        folding.set()
        release.wait(10)
        return real_fold(parts, doc)

    monkeypatch.setattr(postgres_module, "fold_updates", held_fold)
    store = PostgresStore(postgres_dsn, schema=pg_schema, compact_threshold=10)
    await store.open()
    doc, updates = text_updates(11)
    try:
        await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))  # reaches the threshold
        assert await asyncio.to_thread(folding.wait, 10)
        await asyncio.wait_for(store.submit("d", updates[10]), 5)  # committed while the fold is held
        release.set()
    finally:
        release.set()
        await store.close()  # waits for the compaction
    reopened = PostgresStore(postgres_dsn, schema=pg_schema)
    await reopened.open()
    try:
        loaded = await reopened.load("d")
    finally:
        await reopened.close()
    assert len(loaded) == 2 and text_of(rebuild(loaded)) == text_of(doc)


async def test_a_node_without_a_broker_is_alone_on_its_schema(postgres_dsn: str, pg_schema: str) -> None:
    """Nodes that publish their changes share a schema; a node with the local broker (`sole`) would never hear of
    another node's changes, so it is refused while any other node is there, and they are refused while it is."""
    publishing = [PostgresStore(postgres_dsn, schema=pg_schema) for _ in range(2)]
    for store in publishing:
        await store.open()
    sole = PostgresStore(postgres_dsn, schema=pg_schema, sole=True)
    with pytest.raises(StorageError, match=rf"uses PostgreSQL schema '{pg_schema}': .* give every node --broker redis"):
        await sole.open()
    for store in publishing:
        await store.close()
    await sole.open()
    late = PostgresStore(postgres_dsn, schema=pg_schema)
    with pytest.raises(StorageError, match="with the local broker: give it --broker redis too"):
        await late.open()
    await sole.close()
    await late.open()  # the sole node is gone
    await late.close()


async def test_a_node_starts_while_others_hold_their_tables(postgres_dsn: str, pg_schema: str) -> None:
    """A node (re)starting while others commit: `CREATE INDEX IF NOT EXISTS` locks its table before it finds the
    index there, so it waited for every commit in flight and deadlocked with them (a rolling restart under load
    failed with "deadlock detected"). With the tables in place, opening takes no lock on them."""
    first = PostgresStore(postgres_dsn, schema=pg_schema)
    await first.open()
    writer = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        async with writer.transaction():  # as a commit in flight on another node holds them
            await writer.execute("LOCK TABLE documents, updates, versions IN ROW EXCLUSIVE MODE")
            second = PostgresStore(postgres_dsn, schema=pg_schema)
            await asyncio.wait_for(second.open(), 5)
            await second.close()
    finally:
        await writer.close()
        await first.close()


async def test_commits_do_not_wait_for_a_connection_busy_reads_hold(postgres_dsn: str, pg_schema: str) -> None:
    """Every connection of the pool busy with reads (loads, compactions' snapshots, API reads): commits have a
    connection of their own, so they go on."""
    store = PostgresStore(postgres_dsn, schema=pg_schema, pool_size=1, timeout=10.0)
    await store.open()
    locker = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE versions IN ACCESS EXCLUSIVE MODE")
            listing = asyncio.create_task(store.versions("d"))  # takes the pool's one connection, and waits
            await asyncio.sleep(0.2)
            _, updates = text_updates(3)
            for update in updates:  # each alone: the writer needs a connection each time
                await asyncio.wait_for(store.submit("d", update), 3)
            assert not listing.done()
        assert await listing == []
        assert text_of(rebuild(await store.load("d"))) == "abc"
    finally:
        await locker.close()
        await store.close()


async def test_a_schema_written_before_the_slow_mark_gets_it_and_keeps_its_documents(
        postgres_dsn: str, pg_schema: str) -> None:
    from collab_server.storage import postgres

    _, updates = text_updates(5)
    old = postgres.SCHEMA.replace(",\n    slow BOOLEAN NOT NULL DEFAULT FALSE  -- slow to apply, applied in parts "
                                  "(base.SlowMarks)", "")
    assert "slow" not in old
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        await conn.execute(old)
        await conn.execute("INSERT INTO documents (name, updated) VALUES ('d', 1.0)")
        await conn.execute("INSERT INTO updates (doc, ts, data) VALUES ('d', 1.0, $1)", updates[0])
    finally:
        await conn.close()
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    try:
        assert await store.load("d") == [updates[0]]
        assert await store.submit("d", updates[1]) > 0
        assert await store.load("d") == updates[:2]
    finally:
        await store.close()


async def test_a_write_of_a_room_loaded_before_another_node_deleted_the_document_is_dropped(
        nodes: tuple[PostgresStore, PostgresStore]) -> None:
    """A client of node B sends a change before B hears that node A deleted the document: committed after the
    deletion, it started the document again (listed, a few stray entries, 404 on reads). Now the write is dropped,
    and B's room closes its clients with 4410 at once; a room B loads after the deletion starts it again."""
    a, b = nodes
    doc, updates = text_updates(3)
    await b.submit("d", updates[0])
    room = Room("d", b, LocalBroker(), Metrics())
    await room.load()
    closed: list[tuple[int, str]] = []

    async def send(message: dict) -> None:
        if message["type"] == "websocket.close":
            closed.append((message["code"], message["reason"]))

    conn = Connection(send, room.metrics)
    room.join(conn)
    assert await a.delete("d")
    with pytest.raises(DeletedMeanwhile):
        await b.submit("d", updates[1])  # as the room's write: B loaded the document before A deleted it
    await room.apply(updates[1])
    await conn.wait_closed()
    assert room.closed and closed == [(4410, "document deleted")]
    assert await a.list_docs() == [] and await a.load("d") == []
    await b.load_new("d", None)  # a room loaded since: a new document
    await b.submit("d", updates[2])
    assert [info.name for info in await a.list_docs()] == ["d"] and await a.load("d") == [updates[2]]
