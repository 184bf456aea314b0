"""PostgreSQL store (asyncpg): the SQLite store's semantics, safe for several nodes sharing one database.

One writer task commits every submitted update in batches (group commit). Log ids come from one sequence, so
updates committed by different nodes interleave; within a node they keep submit order. Compaction folds a
snapshot in the background, then swaps it in under the document's row lock, deleting exactly the log rows it
folded, so a concurrent commit from another node (or a second compaction) never loses an update. Loads read
checkpoint and log from one REPEATABLE READ snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from array import array
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import asyncpg

from collab_server.pacing import in_thread
from collab_server.slicing import slow_documents
from collab_server.storage.base import (
    Compactor,
    Deferred,
    DeletedMeanwhile,
    DocInfo,
    HistoryCompacted,
    LogEntry,
    LogMark,
    Pending,
    SlowMarks,
    StorageError,
    VersionInfo,
    fold_updates,
    log_weight,
    rows_weight,
    take,
)
from collab_server.storage.health import CommitHealth, reason

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    name TEXT PRIMARY KEY,
    checkpoint BYTEA,
    checkpoint_seq BIGINT NOT NULL DEFAULT 0,
    updated DOUBLE PRECISION NOT NULL,
    slow BOOLEAN NOT NULL DEFAULT FALSE  -- slow to apply, applied in parts (base.SlowMarks)
);
CREATE TABLE IF NOT EXISTS updates (
    id BIGSERIAL PRIMARY KEY,
    doc TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    data BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_doc ON updates (doc, id);
CREATE INDEX IF NOT EXISTS documents_name_c ON documents (name COLLATE "C");
CREATE TABLE IF NOT EXISTS versions (
    id BIGSERIAL PRIMARY KEY,
    doc TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    label TEXT NOT NULL,
    auto BOOLEAN NOT NULL DEFAULT FALSE,
    data BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_doc ON versions (doc, id);
CREATE TABLE IF NOT EXISTS deletions (
    name TEXT PRIMARY KEY,
    count BIGINT NOT NULL  -- times the document was deleted: a room loaded before the latest writes no more
);
"""
# what SCHEMA creates: when all of it is there, a starting node runs none of it (CREATE INDEX IF NOT EXISTS
# locks its table before it finds the index, so a node starting while others commit deadlocked with them)
SCHEMA_OBJECTS = re.findall(r"IF NOT EXISTS (\w+)", SCHEMA)
# webhook marks (Store.keep_marks), created when webhooks are first turned on, at each document's current time
MARKS_SCHEMA = """
CREATE TABLE webhook_marks (
    name TEXT PRIMARY KEY,
    notified DOUBLE PRECISION NOT NULL,  -- documents.updated as read before the latest change event accepted
    deleted BOOLEAN NOT NULL DEFAULT FALSE  -- a deletion to report
);
CREATE INDEX webhook_marks_deleted ON webhook_marks (name) WHERE deleted;
INSERT INTO webhook_marks (name, notified) SELECT name, updated FROM documents;
"""
# documents of a batch in name order whose last commit is not reported (kind 0), then the batch's last name and
# size (kind 1)
UNREPORTED = """
WITH batch AS (SELECT name, updated FROM documents WHERE name COLLATE "C" > $1 ORDER BY name COLLATE "C" LIMIT $2)
SELECT 0 AS kind, b.name, 0 AS n FROM batch b LEFT JOIN webhook_marks m ON m.name = b.name
    WHERE b.updated <= $3 AND (m.name IS NULL OR b.updated > m.notified)
UNION ALL
SELECT 1, max(name COLLATE "C"), count(*) FROM batch
"""
COMPACT_ATTEMPTS = 3  # folds from a fresh snapshot when other nodes keep compacting the same document
SCHEMA_LOCK = 0x636F6C6C  # advisory lock key: nodes starting together create the tables one at a time
NODE_LOCK = 0x6E6F6465  # advisory lock class, with the schema's hash: the nodes serving a schema (see _join)
SWEEP_LOCK = 0x73776570  # advisory lock class, with the schema's hash: the node sweeping for webhook events


class PostgresStore:
    def __init__(self, dsn: str, *, compact_threshold: int = 500, schema: str | None = None,
                 pool_size: int = 4, timeout: float = 10.0, sole: bool = False) -> None:
        """`schema` (created if missing) holds the tables; default: the connection's search_path. `sole`: this node
        must be the only one on the schema (it has no broker to hear of other nodes' changes); see `_join`."""
        self.dsn = dsn
        self.schema = schema
        self.sole = sole
        self._membership: asyncpg.Connection | None = None  # holds this node's advisory lock on the schema
        self._settings: dict[str, str] | None = None  # the connections' server settings (search_path)
        self._sweep: asyncpg.Connection | None = None  # asks for, then holds, the sweep's lock (leads_sweep)
        self._leads = False
        self.pool_size = pool_size
        self.timeout = timeout  # seconds for acquiring a connection and for each statement
        self._pool: asyncpg.Pool | None = None
        # the writer's own connection: commits never wait behind loads and compactions for one of the pool's
        self._writes: asyncpg.Pool | None = None
        self._queue: list[Pending] = []
        # deletions of each document its room saw at load, and of each write submitted (`_deleted_meanwhile`)
        self._loaded_at: dict[str, int] = {}
        self._submitted_at: dict[asyncio.Future[int], int] = {}
        self._wake = asyncio.Event()
        self._slow = SlowMarks(self._wake)  # documents found slow to apply, to mark so
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._log_counts: dict[str, int] = defaultdict(int)  # this node's appends since its last compaction
        self._compactor = Compactor(self.compact, self._log_counts, compact_threshold)
        self.on_commit: Callable[[int, float], None] | None = None  # (batch size, seconds), for metrics
        self.health = CommitHealth()

    async def open(self) -> None:
        settings = self._settings = {"search_path": _quote(self.schema)} if self.schema else None
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size,
                                                   command_timeout=self.timeout, server_settings=settings)
            async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                if self.schema:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.schema)}")
                present = await conn.fetchval(
                    "SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
                    " AND relname = ANY($1::text[])", SCHEMA_OBJECTS)
                if present < len(SCHEMA_OBJECTS):
                    await conn.execute(SCHEMA)
                await _migrate(conn)
            self._writes = await asyncpg.create_pool(self.dsn, min_size=1, max_size=1, command_timeout=self.timeout,
                                                     server_settings=settings)
            await self._join(settings)
        except Exception as exc:
            for pool in (self._pool, self._writes):
                if pool is not None:
                    await pool.close()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"opening postgres store failed: {reason(exc)}") from exc
        self._task = asyncio.create_task(self._write_loop(), name="postgres-writer")
        self._slow.open()

    async def _join(self, settings: dict[str, str] | None) -> None:
        """Take this node's advisory lock on the schema, on a connection of its own held until `close`: shared by
        nodes that publish their changes (several may run), exclusive for a `sole` node. Two nodes that do not
        hear of each other's changes would each serve their own clients a different live document. Checked at
        start: a lock lost with its connection in an outage is not taken again."""
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout, server_settings=settings)
        take = "pg_try_advisory_lock" if self.sole else "pg_try_advisory_lock_shared"
        try:
            schema, joined = await conn.fetchrow(
                f"SELECT current_schema(), {take}($1, hashtext(current_schema()))", NODE_LOCK)
        except BaseException:
            await conn.close()
            raise
        if not joined:
            await conn.close()
            raise StorageError(
                f"another collab-server node uses PostgreSQL schema {schema!r}" + (
                    ": with the local broker a node never hears of another's changes, so run one node or give "
                    "every node --broker redis" if self.sole else
                    ", with the local broker: give it --broker redis too, or run that node alone"))
        self._membership = conn

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._compactor.close()
        self._slow.close()
        if self._slow:  # found by the last folds
            await self._mark_slow(self._slow.take())
        for pool in (self._pool, self._writes):
            if pool is not None:
                await pool.close()
        for conn in (self._membership, self._sweep):
            if conn is not None:
                with contextlib.suppress(Exception):  # gone with an outage: its lock went with it
                    await conn.close()
        self._membership = self._sweep = None

    def submit(self, doc: str, update: Deferred) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(StorageError("store is closing"))
            return fut
        self._queue.append((doc, update, fut))
        if (deletions := self._loaded_at.get(doc)) is not None:
            self._submitted_at[fut] = deletions
        self._wake.set()
        return fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue and not self._slow:
                if self._closing:
                    return
                continue
            batch, self._queue = self._queue, []
            with self.health.committing():
                await self._commit(batch)
            if self._slow:
                await self._mark_slow(self._slow.take())
            for doc in {doc for doc, _, _ in batch}:
                self._compactor.after_commit(doc)
            if self._queue or self._closing:
                self._wake.set()

    async def _commit(self, pending: list[Pending]) -> None:
        assert self._writes is not None
        submitted_at = {fut: self._submitted_at.pop(fut) for _, _, fut in pending if fut in self._submitted_at}
        batch = take(pending)
        if not batch:
            return
        started = time.perf_counter()
        now = time.time()
        try:
            async with self._writes.acquire(timeout=self.timeout) as conn, conn.transaction():
                dropped = await self._deleted_meanwhile(conn, batch, submitted_at)
                kept = [entry for entry in batch if entry[2] not in dropped]
                ids = sorted(await conn.fetchval(
                    "SELECT array_agg(nextval(pg_get_serial_sequence('updates', 'id'))) "
                    "FROM generate_series(1, $1)", len(kept))) if kept else []
                await conn.execute(
                    "INSERT INTO updates (id, doc, ts, data) "
                    "SELECT id, doc, $3, data FROM unnest($1::bigint[], $2::text[], $4::bytea[]) AS u(id, doc, data)",
                    ids, [doc for doc, _, _ in kept], now, [update for _, update, _ in kept])
                # sorted, so two nodes' writers lock document rows in the same order and cannot deadlock
                await conn.execute(
                    "INSERT INTO documents (name, updated) SELECT unnest($1::text[]), $2 "
                    "ON CONFLICT (name) DO UPDATE SET updated = excluded.updated",
                    sorted({doc for doc, _, _ in kept}), now)
        except Exception as exc:  # noqa: BLE001  any failure, even an unknown commit outcome: not durable
            error = StorageError(f"commit of {len(batch)} updates failed: {reason(exc)}")
            self.health.failed(len(batch), exc)
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        self.health.succeeded()
        for doc, _, fut in batch:
            if fut in dropped and not fut.done():
                fut.set_exception(DeletedMeanwhile(f"{doc!r} was deleted after this node loaded it"))
        for (doc, update, fut), seq in zip(kept, ids):
            self._log_counts[doc] += log_weight(update)
            if not fut.done():
                fut.set_result(seq)
        if self.on_commit is not None:
            self.on_commit(len(batch), time.perf_counter() - started)

    @staticmethod
    async def _deleted_meanwhile(conn: asyncpg.Connection, batch: list[tuple[str, bytes, asyncio.Future[int]]],
                                 submitted_at: dict[asyncio.Future[int], int]) -> set[asyncio.Future[int]]:
        """The writes of `batch` whose document was deleted (by any node) after their room loaded it: a client of
        another node could send one before its node heard of the deletion, and committed after it, it started the
        document again (listed, with a few stray entries). Takes the documents' advisory locks, shared (a deletion
        takes them exclusively), so that a deletion comes wholly before or after this commit."""
        docs = sorted({doc for doc, _, _ in batch})  # in the same order on every node: no deadlock
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(d)) FROM unnest($1::text[]) AS d", docs)
        if not submitted_at:
            return set()
        counts = dict(await conn.fetch("SELECT name, count FROM deletions WHERE name = ANY($1::text[])", docs))
        return {fut for doc, _, fut in batch if fut in submitted_at and submitted_at[fut] != counts.get(doc, 0)}

    async def _mark_slow(self, docs: list[str]) -> None:
        """Mark `docs` slow to apply (see SlowMarks); a failure is logged, the mark learned again later."""
        assert self._writes is not None
        try:
            async with self._writes.acquire(timeout=self.timeout) as conn:
                for doc in docs:  # a row at a time: locking several could deadlock with another node's commit
                    await conn.execute("UPDATE documents SET slow = TRUE WHERE name = $1 AND NOT slow", doc)
        except Exception as exc:  # noqa: BLE001
            log.warning("postgres: marking documents slow to apply failed error=%s", reason(exc))

    async def load(self, doc: str) -> list[bytes]:
        updates, _, _ = await self._load(doc, None)
        return updates

    async def load_until(self, doc: str, seq: int) -> list[bytes]:
        checkpoint, checkpoint_seq, rows = await self._snapshot(doc)
        if seq < checkpoint_seq:
            raise HistoryCompacted(f"history of {doc!r} before entry {checkpoint_seq} was compacted")
        return ([checkpoint] if checkpoint else []) + [data for id_, data in rows if id_ <= seq]

    async def load_new(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark | None]:
        """One snapshot; the checkpoint and the entries `since` held are left out (not sent) if still there. Read
        whole (a room's load), the deletions of `doc` so far are noted: the room's writes are dropped if it is
        deleted again (`_deleted_meanwhile`)."""
        updates, mark, deletions = await self._load(doc, since)
        if since is None:
            self._loaded_at[doc] = deletions
        return updates, mark

    async def _load(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark, int]:
        """`load_new`, and how many times `doc` was deleted, in the same snapshot."""
        assert self._pool is not None
        known = since.checkpoint if since else -1
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow("SELECT checkpoint_seq, CASE WHEN checkpoint_seq = $2 THEN NULL ELSE "
                                          "checkpoint END AS checkpoint, slow FROM documents WHERE name = $1",
                                          doc, known)
                same = row is not None and row["checkpoint_seq"] == known
                held = since.entries.tolist() if since and same else []
                rows = await conn.fetch("SELECT id, CASE WHEN id = ANY($2::bigint[]) THEN NULL ELSE data END AS data "
                                        "FROM updates WHERE doc = $1 ORDER BY id", doc, held)
                deletions = await conn.fetchval("SELECT count FROM deletions WHERE name = $1", doc) or 0
        except Exception as exc:
            raise StorageError(f"loading {doc!r} failed: {reason(exc)}") from exc
        if row is not None and row["slow"]:
            slow_documents.recall(doc)
        checkpoint = row["checkpoint"] if row else None
        log = [r["data"] for r in rows if r["data"] is not None]
        if since is None:  # the whole log, as a room's load reads it: what counts toward the next compaction
            self._compactor.loaded(doc, log, checkpoint)
        mark = LogMark(row["checkpoint_seq"] if row else 0, array("q", [r["id"] for r in rows]))
        return ([checkpoint] if checkpoint else []) + log, mark, deletions

    async def _snapshot(self, doc: str) -> tuple[bytes | None, int, list[tuple[int, bytes]]]:
        """Checkpoint and log read in one snapshot, so a concurrent compaction is never half seen."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow("SELECT checkpoint, checkpoint_seq, slow FROM documents WHERE name = $1",
                                          doc)
                rows = await conn.fetch("SELECT id, data FROM updates WHERE doc = $1 ORDER BY id", doc)
        except Exception as exc:
            raise StorageError(f"loading {doc!r} failed: {reason(exc)}") from exc
        if row is not None and row["slow"]:
            slow_documents.recall(doc)
        checkpoint = row["checkpoint"] if row else None
        return checkpoint, (row["checkpoint_seq"] if row else 0), [(r["id"], r["data"]) for r in rows]

    async def compact(self, doc: str) -> None:
        """Fold the log into the checkpoint. The fold works on a snapshot in a worker thread, holding no lock;
        the swap (checkpoint written, exactly the folded rows deleted) is one short transaction under the
        document's row lock. If another node swapped in a checkpoint meanwhile, fold again from a new
        snapshot. A row with a lower id that commits after the snapshot is kept for the next fold."""
        assert self._pool is not None
        for _ in range(COMPACT_ATTEMPTS):
            checkpoint, checkpoint_seq, rows = await self._snapshot(doc)
            if not rows:
                break
            parts = ([checkpoint] if checkpoint else []) + [data for _, data in rows]
            folded_ids = [id_ for id_, _ in rows]
            folded = await in_thread(fold_updates, parts, doc)
            try:
                async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                    current = await conn.fetchval(
                        "SELECT checkpoint_seq FROM documents WHERE name = $1 FOR UPDATE", doc)
                    if current != checkpoint_seq:
                        continue  # another node compacted since the snapshot
                    await conn.execute(
                        "UPDATE documents SET checkpoint = $1, checkpoint_seq = $2 WHERE name = $3",
                        folded, max(checkpoint_seq + 1, folded_ids[-1]), doc)  # grows with every fold
                    await conn.execute("DELETE FROM updates WHERE id = ANY($1::bigint[])", folded_ids)
            except Exception as exc:
                raise StorageError(f"compaction of {doc!r} failed: {reason(exc)}") from exc
            self._compactor.folded(doc, rows_weight(rows), folded)
            return
        self._log_counts[doc] = 0  # nothing left to fold, or other nodes keep folding it

    def unloaded(self, doc: str) -> None:
        self._loaded_at.pop(doc, None)
        self._compactor.after_unload(doc)

    def stop_compacting_at(self, when: float) -> None:
        self._compactor.stop_at(when)

    async def delete(self, doc: str) -> bool:
        """A compaction another node swaps in afterwards finds no document row and folds nothing; a write of a room
        another node loaded before is dropped (`_deleted_meanwhile`), one loaded since starts the document again."""
        assert self._pool is not None
        await self._compactor.forget(doc)
        self._loaded_at.pop(doc, None)
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", doc)
                await conn.execute("INSERT INTO deletions (name, count) VALUES ($1, 1) "
                                   "ON CONFLICT (name) DO UPDATE SET count = deletions.count + 1", doc)
                if await conn.fetchval("SELECT to_regclass('webhook_marks') IS NOT NULL"):  # a deletion to report
                    await conn.execute("INSERT INTO webhook_marks (name, notified, deleted) SELECT name, 0, TRUE "
                                       "FROM documents WHERE name = $1 ON CONFLICT (name) DO UPDATE SET deleted = TRUE",
                                       doc)
                row = await conn.fetchval("DELETE FROM documents WHERE name = $1 RETURNING 1", doc)
                status = await conn.execute("DELETE FROM updates WHERE doc = $1", doc)
                await conn.execute("DELETE FROM versions WHERE doc = $1", doc)
        except Exception as exc:
            raise StorageError(f"deleting {doc!r} failed: {reason(exc)}") from exc
        return row is not None or status != "DELETE 0"

    async def list_docs(self, prefix: str = "", after: str = "", limit: int | None = None) -> list[DocInfo]:
        query = ("SELECT d.name, d.updated, (SELECT COUNT(*) FROM updates u WHERE u.doc = d.name) AS n "
                 'FROM documents d WHERE d.name COLLATE "C" > $1 AND d.name COLLATE "C" >= $2 '
                 'AND starts_with(d.name, $2) ORDER BY d.name COLLATE "C" LIMIT $3')  # code point order, any locale
        rows = await self._fetch(query, after, prefix, limit, what="listing documents")
        return [DocInfo(r["name"], r["updated"], r["n"]) for r in rows]

    async def updated(self, docs: list[str]) -> dict[str, float]:
        rows = await self._fetch("SELECT name, updated FROM documents WHERE name = ANY($1::text[])", docs,
                                 what="reading document times")
        return {r["name"]: r["updated"] for r in rows}

    async def history(self, doc: str) -> list[LogEntry]:
        query = "SELECT id, ts, octet_length(data) AS size FROM updates WHERE doc = $1 ORDER BY id"
        rows = await self._fetch(query, doc, what=f"reading history of {doc!r}")
        return [LogEntry(r["id"], r["ts"], r["size"]) for r in rows]

    async def save_version(self, doc: str, label: str, state: bytes, *, auto: bool = False) -> VersionInfo:
        now = time.time()
        rows = await self._fetch("INSERT INTO versions (doc, ts, label, auto, data) VALUES ($1, $2, $3, $4, $5) "
                                 "RETURNING id", doc, now, label, auto, state, what=f"saving a version of {doc!r}")
        return VersionInfo(rows[0]["id"], now, label, len(state), auto)

    @contextlib.asynccontextmanager
    async def exclusive(self, doc: str) -> AsyncIterator[None]:
        assert self._pool is not None
        try:
            conn = await self._pool.acquire(timeout=self.timeout)
        except Exception as exc:
            raise StorageError(f"locking {doc!r} failed: {reason(exc)}") from exc
        try:
            try:
                await conn.execute("SELECT pg_advisory_lock(hashtext($1), 2)", doc)
            except Exception as exc:
                raise StorageError(f"locking {doc!r} failed: {reason(exc)}") from exc
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a lost connection took its lock with it
                    await conn.execute("SELECT pg_advisory_unlock(hashtext($1), 2)", doc)
        finally:
            await self._pool.release(conn)

    async def save_auto_version(self, doc: str, label: str, state: bytes, since: float) -> VersionInfo | None:
        assert self._pool is not None
        now = time.time()
        try:  # nodes saving at once take turns (an advisory lock of their own), so the second finds the first's
            async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), 1)", doc)
                version = await conn.fetchval(
                    "INSERT INTO versions (doc, ts, label, auto, data) SELECT $1, $2, $3, TRUE, $4 WHERE NOT EXISTS "
                    "(SELECT 1 FROM versions WHERE doc = $1 AND auto AND ts >= $5) RETURNING id",
                    doc, now, label, state, since)
        except Exception as exc:
            raise StorageError(f"saving a version of {doc!r} failed: {reason(exc)}") from exc
        return None if version is None else VersionInfo(version, now, label, len(state), True)

    async def prune_versions(self, doc: str, keep: int) -> int:
        rows = await self._fetch("DELETE FROM versions WHERE doc = $1 AND auto AND id NOT IN "
                                 "(SELECT id FROM versions WHERE doc = $1 AND auto ORDER BY id DESC LIMIT $2) "
                                 "RETURNING id", doc, keep, what=f"pruning versions of {doc!r}")
        return len(rows)

    async def versions(self, doc: str) -> list[VersionInfo]:
        query = ("SELECT id, ts, label, octet_length(data) AS size, auto FROM versions WHERE doc = $1 "
                 "ORDER BY id")
        rows = await self._fetch(query, doc, what=f"listing versions of {doc!r}")
        return [VersionInfo(r["id"], r["ts"], r["label"], r["size"], r["auto"]) for r in rows]

    async def load_version(self, doc: str, version: int) -> bytes | None:
        rows = await self._fetch("SELECT data FROM versions WHERE doc = $1 AND id = $2", doc, version,
                                 what=f"reading version {version} of {doc!r}")
        return rows[0]["data"] if rows else None

    async def ping(self) -> None:
        await self._fetch("SELECT 1", what="postgres ping")

    async def keep_marks(self) -> None:
        assert self._pool is not None
        try:  # nodes starting together take turns: the first creates the marks
            async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                if not await conn.fetchval("SELECT to_regclass('webhook_marks') IS NOT NULL"):
                    await conn.execute(MARKS_SCHEMA)
        except Exception as exc:
            raise StorageError(f"creating webhook marks failed: {reason(exc)}") from exc

    async def unreported(self, after: str, before: float, limit: int) -> tuple[list[str], str | None]:
        rows = await self._fetch(UNREPORTED, after, limit, before, what="finding unreported changes")
        (last, count), = [(r["name"], r["n"]) for r in rows if r["kind"] == 1]
        return [r["name"] for r in rows if r["kind"] == 0], last if count == limit else None

    async def deletions_to_report(self, limit: int) -> list[str]:
        rows = await self._fetch("SELECT name FROM webhook_marks WHERE deleted LIMIT $1", limit,
                                 what="finding unreported deletions")
        return [r["name"] for r in rows]

    async def mark_reported(self, changed: dict[str, float], deleted: list[str]) -> None:
        assert self._pool is not None
        names = sorted(changed)  # every node locks mark rows in the same order: no deadlock
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO webhook_marks (name, notified) SELECT m.name, m.notified "
                    "FROM unnest($1::text[], $2::float8[]) WITH ORDINALITY AS m(name, notified, i) "
                    "JOIN documents d ON d.name = m.name ORDER BY m.i "
                    "ON CONFLICT (name) DO UPDATE SET notified = GREATEST(webhook_marks.notified, excluded.notified)",
                    names, [changed[name] for name in names])
                await conn.execute("DELETE FROM webhook_marks WHERE deleted AND name = ANY($1::text[])", deleted)
        except Exception as exc:
            raise StorageError(f"recording webhook marks failed: {reason(exc)}") from exc

    async def leads_sweep(self) -> bool:
        """The lead is a session advisory lock held on a connection of its own: another node takes it once this
        node's connection ends, however it ends."""
        try:
            if self._sweep is None:
                self._sweep = await asyncpg.connect(self.dsn, timeout=self.timeout, server_settings=self._settings)
            if self._leads:
                await self._sweep.fetchval("SELECT 1", timeout=self.timeout)  # the session, and its lock, live on
            else:
                self._leads = await self._sweep.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))", SWEEP_LOCK, timeout=self.timeout)
        except Exception as exc:
            if self._sweep is not None:
                self._sweep.terminate()  # the lock, if held, goes with the session
            self._sweep, self._leads = None, False
            raise StorageError(f"taking the webhook sweep failed: {reason(exc)}") from exc
        return self._leads

    async def _fetch(self, query: str, *args: object, what: str) -> list[asyncpg.Record]:
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                return await conn.fetch(query, *args)
        except Exception as exc:
            raise StorageError(f"{what} failed: {reason(exc)}") from exc


async def _migrate(conn: asyncpg.Connection) -> None:
    """Bring an older schema's `documents` table up to date (the slow mark added), touching it only if it lacks
    something: altering a table waits for every transaction using it."""
    if not await conn.fetchval("SELECT count(*) FROM pg_attribute WHERE attrelid = 'documents'::regclass "
                               "AND attname = 'slow' AND NOT attisdropped"):
        await conn.execute("ALTER TABLE documents ADD COLUMN IF NOT EXISTS slow BOOLEAN NOT NULL DEFAULT FALSE")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
