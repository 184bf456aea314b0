"""SQLite store (aiosqlite, WAL): an append-only update log with group commit and atomic compaction.

One writer connection serves every document: updates submitted while a commit is in flight are committed
together in the next transaction, so throughput does not collapse to one fsync per update. A group commit is
one multi-row INSERT in autocommit mode: one implicit transaction, one trip to the database thread. A second,
read-only connection serves loads from a consistent WAL snapshot. Compaction folds a snapshot of the log in a
worker thread, off the commit path, and holds the writer only for the short transaction that swaps the folded
rows for the checkpoint. One process at a time opens a database: the store holds an advisory lock on the
database file while it is open (see `claim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiosqlite

from collab_server.pacing import in_thread, offering_gil
from collab_server.slicing import slow_documents
from collab_server.storage.base import (
    Compactor,
    Deferred,
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
from collab_server.storage.health import CommitHealth

log = logging.getLogger(__name__)
T = TypeVar("T")

# Checkpoints live apart from `documents`: the trigger updates a document's row on every commit, and SQLite
# rewrites a whole row when one column changes (a 6 MB checkpoint made every commit take ~8 ms).
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    name TEXT PRIMARY KEY,
    updated REAL NOT NULL,
    slow INTEGER NOT NULL DEFAULT 0  -- 1: slow to apply, applied in parts (base.SlowMarks)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    ts REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_doc ON updates (doc, id);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    ts REAL NOT NULL,
    label TEXT NOT NULL,
    auto INTEGER NOT NULL DEFAULT 0,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_doc ON versions (doc, id);
CREATE TRIGGER IF NOT EXISTS updates_touch_document AFTER INSERT ON updates BEGIN
    INSERT INTO documents (name, updated) VALUES (NEW.doc, NEW.ts)
    ON CONFLICT (name) DO UPDATE SET updated = excluded.updated;
END;
"""

# databases written before the checkpoints table kept each checkpoint in its `documents` row
MIGRATE_CHECKPOINTS = """
INSERT INTO checkpoints (name, seq, data)
    SELECT name, checkpoint_seq, checkpoint FROM documents WHERE checkpoint IS NOT NULL;
ALTER TABLE documents DROP COLUMN checkpoint;
ALTER TABLE documents DROP COLUMN checkpoint_seq;
"""

# a row if the document is marked slow to apply (kind -1), the checkpoint row (kind 0), then the log in commit
# order (kind 1)
SNAPSHOT = """
SELECT -1 AS kind, 0 AS seq, NULL AS data FROM documents WHERE name = ? AND slow
UNION ALL
SELECT 0, seq, data FROM checkpoints WHERE name = ?
UNION ALL
SELECT 1, id, data FROM updates WHERE doc = ?
ORDER BY kind, seq
"""

# webhook marks (Store.keep_marks), created when webhooks are first turned on, at each document's current time
MARKS_SCHEMA = """
CREATE TABLE webhook_marks (
    name TEXT PRIMARY KEY,
    notified REAL NOT NULL,  -- documents.updated as read before the latest change event the receiver accepted
    deleted INTEGER NOT NULL DEFAULT 0  -- 1: a deletion to report
);
CREATE INDEX webhook_marks_deleted ON webhook_marks (name) WHERE deleted;
INSERT INTO webhook_marks (name, notified) SELECT name, updated FROM documents;
"""

# documents of a batch in name order whose last commit is not reported (kind 0), then the batch's last name and
# size (kind 1)
UNREPORTED = """
WITH batch AS (SELECT name, updated FROM documents WHERE name > ? ORDER BY name LIMIT ?)
SELECT 0, b.name, 0 FROM batch b LEFT JOIN webhook_marks m ON m.name = b.name
    WHERE b.updated <= ? AND (m.name IS NULL OR b.updated > m.notified)
UNION ALL
SELECT 1, max(name), count(*) FROM batch
"""

LEGACY_LOCK_SUFFIX = "-lock"  # the file earlier versions locked instead of the database: locked too if it exists
LOCK_POLL = 0.1  # seconds between attempts while another process holds the database
LOCK_WAIT = 15.0  # seconds to wait for the process holding a database: a predecessor still shutting down
INSERT_CHUNK = 8000  # rows per INSERT statement: 4 parameters each, under SQLite's 32766-parameter limit
RECLAIM_PAGES = 256  # free pages given back to the file system per write transaction after a compaction
RECLAIM_SHARE = 8  # free pages are given back once they are 1/RECLAIM_SHARE of the file; fewer are reused
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # primary result codes of a damaged database file


class SQLiteStore:
    def __init__(self, path: str, *, synchronous: str = "full", compact_threshold: int = 500,
                 lock_wait: float = LOCK_WAIT) -> None:
        if synchronous.lower() not in ("full", "normal", "extra"):
            raise ValueError(f"sqlite_synchronous must be full, normal or extra, not {synchronous!r}")
        self.path = path
        self.lock_wait = lock_wait
        self.synchronous = synchronous.upper()
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._write_lock = asyncio.Lock()  # group commits and compaction swaps take turns on the writer
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._slow = SlowMarks(self._wake)  # documents found slow to apply, to mark so
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._next_id = 1
        self._reclaims = False  # whether the database was created with auto_vacuum=INCREMENTAL
        self._log_counts: dict[str, int] = defaultdict(int)
        self._compactor = Compactor(self.compact, self._log_counts, compact_threshold)
        self.on_commit: Callable[[int, float], None] | None = None  # (batch size, seconds), for metrics
        self.health = CommitHealth()
        self._locks: list[int] = []  # file descriptors holding the database's locks while open
        self._marks = False  # whether the database keeps webhook marks (see keep_marks)

    async def open(self) -> None:
        new = not os.path.lexists(self.path)  # a link to a file not made yet is the user's: kept
        self._locks = await claim(self.path, self.lock_wait)
        try:
            await self._connect()
        except BaseException as exc:
            if new:  # a full disk, say: no empty database is left behind
                _remove_empty(self.path)
            await self._release()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"opening {self.path} failed: {exc}") from exc
            raise

    async def _connect(self) -> None:
        self._writer = await _Connection.to(self.path)
        # a new database gives back the pages compaction frees; the mode is fixed before its first table
        # (and before WAL mode) is written, so an older database keeps reusing them instead
        await self._writer.execute("PRAGMA auto_vacuum=INCREMENTAL")
        await self._writer.execute("PRAGMA journal_mode=WAL")
        await self._writer.execute(f"PRAGMA synchronous={self.synchronous}")
        await self._writer.execute("PRAGMA busy_timeout=5000")
        await self._writer.executescript(SCHEMA)
        await self._migrate()
        async with self._writer.execute("SELECT COALESCE(MAX(id), 0) FROM updates") as cur:
            (max_id,) = await cur.fetchone()  # type: ignore[misc]
        async with self._writer.execute("SELECT COALESCE(MAX(seq), 0) FROM checkpoints") as cur:
            (max_ck,) = await cur.fetchone()  # type: ignore[misc]
        self._next_id = max(max_id, max_ck) + 1
        async with self._writer.execute("PRAGMA auto_vacuum") as cur:
            (mode,) = await cur.fetchone()  # type: ignore[misc]
        self._reclaims = mode == 2
        self._marks = bool(await self._writer.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'webhook_marks'"))
        self._reader = await _Connection.to(self.path)
        await self._reader.execute("PRAGMA query_only=1")
        await self._reader.execute("PRAGMA busy_timeout=5000")
        self._task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        self._slow.open()

    async def _migrate(self) -> None:
        """Bring an older database's `documents` table up to date: the slow mark added, checkpoints moved out of
        its rows (in one transaction)."""
        assert self._writer is not None
        columns = {row[1] for row in await self._writer.execute_fetchall("PRAGMA table_info(documents)")}
        if "slow" not in columns:
            await self._writer.execute("ALTER TABLE documents ADD COLUMN slow INTEGER NOT NULL DEFAULT 0")
        if "checkpoint" not in columns:
            return
        try:
            await self._writer.executescript("BEGIN IMMEDIATE;" + MIGRATE_CHECKPOINTS + "COMMIT;")
        except Exception as exc:
            await self._rollback()
            raise StorageError(f"moving checkpoints to their own table failed: {exc}") from exc
        log.info("sqlite: moved checkpoints out of the documents table path=%s", self.path)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._compactor.close()
        self._slow.close()
        if self._slow:  # found by the last folds
            await self._mark_slow(self._slow.take())
        await self._release()

    async def _release(self) -> None:
        """Close both connections, then give up the database's lock (in that order: see `claim`)."""
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None
        for fd in self._locks:
            os.close(fd)  # gives up its lock
        self._locks = []

    def submit(self, doc: str, update: Deferred) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(StorageError("store is closing"))
            return fut
        self._queue.append((doc, update, fut))
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
                async with self._write_lock:
                    await self._commit(batch)
                    if self._slow:
                        await self._mark_slow(self._slow.take())
            for doc in {doc for doc, _, _ in batch}:
                self._compactor.after_commit(doc)
            if self._queue or self._closing:
                self._wake.set()

    async def _commit(self, pending: list[Pending]) -> None:
        assert self._writer is not None
        batch = take(pending)
        if not batch:
            return
        started = time.perf_counter()
        now = time.time()
        first = self._next_id
        for start in range(0, len(batch), INSERT_CHUNK):
            chunk = batch[start:start + INSERT_CHUNK]
            params = [value for i, (doc, update, _) in enumerate(chunk) for value in (first + i, doc, now, update)]
            sql = "INSERT INTO updates (id, doc, ts, data) VALUES " + ",".join(["(?, ?, ?, ?)"] * len(chunk))
            try:
                await self._writer.execute(sql, params)
            except Exception as exc:  # any failure: nothing in this chunk (or after it) is durable
                error = self._failure(f"commit of {len(batch) - start} updates", exc)
                self.health.failed(len(batch) - start, exc)
                for _, _, fut in batch[start:]:
                    if not fut.done():
                        fut.set_exception(error)
                return
            for i, (doc, update, fut) in enumerate(chunk):
                self._log_counts[doc] += log_weight(update)
                if not fut.done():
                    fut.set_result(first + i)
            first += len(chunk)
            self._next_id = first
        self.health.succeeded()
        if self.on_commit is not None:
            self.on_commit(len(batch), time.perf_counter() - started)

    async def _mark_slow(self, docs: list[str]) -> None:
        """Mark `docs` slow to apply (see SlowMarks); a failure is logged, the mark learned again later."""
        assert self._writer is not None
        try:
            await self._writer.execute(
                f"UPDATE documents SET slow = 1 WHERE NOT slow AND name IN ({','.join('?' * len(docs))})", docs)
        except Exception as exc:
            log.warning("sqlite: marking documents slow to apply failed error=%s", exc)

    async def _rollback(self) -> None:
        assert self._writer is not None
        try:
            if self._writer.in_transaction:
                await self._writer.execute("ROLLBACK")
        except Exception:
            log.exception("rollback failed")

    async def load(self, doc: str) -> list[bytes]:
        checkpoint, _, rows = await self._snapshot(doc)
        log = [data for _, data in rows]
        self._compactor.loaded(doc, log, checkpoint)
        return ([checkpoint] if checkpoint else []) + log

    async def load_new(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark | None]:
        """All of `doc`, with no mark: entry ids are not unique over time here (a deleted last row's id is given
        again), and only one process opens a database, so no other node commits to it."""
        return await self.load(doc), None

    async def load_until(self, doc: str, seq: int) -> list[bytes]:
        checkpoint, checkpoint_seq, rows = await self._snapshot(doc)
        if seq < checkpoint_seq:
            raise HistoryCompacted(f"history of {doc!r} before entry {checkpoint_seq} was compacted")
        return ([checkpoint] if checkpoint else []) + [data for id_, data in rows if id_ <= seq]

    async def _snapshot(self, doc: str) -> tuple[bytes | None, int, list[tuple[int, bytes]]]:
        """Checkpoint and log in one statement: SQLite runs a statement on one read snapshot, so a concurrent
        compaction is never half seen, and concurrent loads need no lock (one trip to the database thread)."""
        rows = await self._read(SNAPSHOT, (doc, doc, doc), what=f"loading {doc!r}")
        checkpoint, checkpoint_seq = None, 0
        log_rows = []
        for kind, seq, data in rows:
            if kind == -1:
                slow_documents.recall(doc)
            elif kind == 0:
                checkpoint, checkpoint_seq = (bytes(data) if data is not None else None), seq
            else:
                log_rows.append((seq, bytes(data)))
        return checkpoint, checkpoint_seq, log_rows

    async def compact(self, doc: str) -> None:
        """Fold the log into the checkpoint. The fold works on a snapshot in a worker thread; the swap of the
        folded rows for the new checkpoint is one transaction, so a crash at any point leaves a whole state."""
        assert self._writer is not None
        checkpoint, checkpoint_seq, rows = await self._snapshot(doc)
        if not rows:
            self._log_counts[doc] = 0
            return
        parts = ([checkpoint] if checkpoint else []) + [data for _, data in rows]
        folded = await in_thread(fold_updates, parts, doc)
        last = rows[-1][0]
        async with self._write_lock:
            try:
                await self._writer.run(_swap, doc, last, len(rows), None if checkpoint is None else checkpoint_seq,
                                       folded)
            except Exception as exc:
                raise self._failure(f"compaction of {doc!r}", exc) from exc
        self._compactor.folded(doc, rows_weight(rows), folded)
        if self._reclaims:
            await self._reclaim()

    async def _reclaim(self) -> None:
        """Shrink the file by the pages compaction or a deletion freed, a batch per transaction so commits
        interleave, once they are a share of the file worth giving back; fewer are left for the next writes to
        reuse (a busy document's compaction frees its old checkpoint each time, and giving that back cost a
        transaction and its fsync holding the writer each time, 20-60 ms with clients flooding their rooms).
        A failure only leaves the pages free for reuse."""
        assert self._writer is not None
        try:
            (free, pages), = await self._writer.execute_fetchall("SELECT * FROM pragma_freelist_count, "
                                                                  "pragma_page_count")
            if free * RECLAIM_SHARE < pages:
                return
            while True:
                async with self._write_lock:
                    if not await self._writer.run(_give_back):
                        return
        except Exception as exc:
            log.warning("sqlite: giving back free pages failed path=%s error=%s", self.path, exc)

    def unloaded(self, doc: str) -> None:
        self._compactor.after_unload(doc)

    def stop_compacting_at(self, when: float) -> None:
        self._compactor.stop_at(when)

    async def delete(self, doc: str) -> bool:
        assert self._writer is not None
        await self._compactor.forget(doc)
        removed = 0
        async with self._write_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                if self._marks:  # a deletion to report, with the deletion itself
                    await self._writer.execute(
                        "INSERT INTO webhook_marks (name, notified, deleted) SELECT name, 0, 1 FROM documents "
                        "WHERE name = ? ON CONFLICT (name) DO UPDATE SET deleted = 1", (doc,))
                for sql in ("DELETE FROM updates WHERE doc = ?", "DELETE FROM checkpoints WHERE name = ?",
                            "DELETE FROM documents WHERE name = ?"):
                    async with self._writer.execute(sql, (doc,)) as cur:
                        removed += cur.rowcount
                await self._writer.execute("DELETE FROM versions WHERE doc = ?", (doc,))
                await self._writer.execute("COMMIT")
            except Exception as exc:
                await self._rollback()
                raise self._failure(f"deleting {doc!r}", exc) from exc
        if removed and self._reclaims:
            await self._reclaim()
        return removed > 0

    async def list_docs(self, prefix: str = "", after: str = "", limit: int | None = None) -> list[DocInfo]:
        # GLOB on a BINARY-collated key: SQLite turns the prefix into an index range (LIKE would not)
        pattern = "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"
        query = ("SELECT d.name, d.updated, (SELECT COUNT(*) FROM updates u WHERE u.doc = d.name) "
                 "FROM documents d WHERE d.name > ? AND d.name GLOB ? ORDER BY d.name LIMIT ?")
        rows = await self._read(query, (after, pattern, -1 if limit is None else limit), what="listing documents")
        return [DocInfo(name, updated, count) for name, updated, count in rows]

    async def updated(self, docs: list[str]) -> dict[str, float]:
        stamps: dict[str, float] = {}
        for start in range(0, len(docs), 500):
            chunk = docs[start:start + 500]
            query = f"SELECT name, updated FROM documents WHERE name IN ({','.join('?' * len(chunk))})"
            stamps.update(await self._read(query, chunk, what="reading document times"))
        return stamps

    async def history(self, doc: str) -> list[LogEntry]:
        query = "SELECT id, ts, LENGTH(data) FROM updates WHERE doc = ? ORDER BY id"
        rows = await self._read(query, (doc,), what=f"reading history of {doc!r}")
        return [LogEntry(seq, ts, size) for seq, ts, size in rows]

    async def save_version(self, doc: str, label: str, state: bytes, *, auto: bool = False) -> VersionInfo:
        now = time.time()
        version = await self._write("INSERT INTO versions (doc, ts, label, auto, data) VALUES (?, ?, ?, ?, ?)",
                                    (doc, now, label, auto, state), what=f"saving a version of {doc!r}")
        return VersionInfo(version, now, label, len(state), auto)

    def exclusive(self, doc: str) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # one node: its room applies a request's change as it reads the document

    async def save_auto_version(self, doc: str, label: str, state: bytes, since: float) -> VersionInfo | None:
        now = time.time()
        version = await self._write("INSERT INTO versions (doc, ts, label, auto, data) SELECT ?, ?, ?, 1, ? "
                                    "WHERE NOT EXISTS (SELECT 1 FROM versions WHERE doc = ? AND auto AND ts >= ?) "
                                    "RETURNING id", (doc, now, label, state, doc, since),
                                    what=f"saving a version of {doc!r}", returning=True)
        return VersionInfo(version, now, label, len(state), True) if version else None

    async def prune_versions(self, doc: str, keep: int) -> int:
        return await self._write("DELETE FROM versions WHERE doc = ? AND auto AND id NOT IN "
                                 "(SELECT id FROM versions WHERE doc = ? AND auto ORDER BY id DESC LIMIT ?)",
                                 (doc, doc, keep), what=f"pruning versions of {doc!r}", rows=True)

    async def _write(self, sql: str, params: Sequence[object], *, what: str, rows: bool = False,
                     returning: bool = False) -> int:
        """One statement on the writer, in its own transaction; returns the new row id (or the rows changed, or
        what its RETURNING gave: 0 if no row)."""
        assert self._writer is not None
        async with self._write_lock:
            try:
                async with self._writer.execute(sql, params) as cur:
                    if returning:
                        result = row[0] if (row := await cur.fetchone()) is not None else 0
                    else:
                        result = cur.rowcount if rows else cur.lastrowid
            except Exception as exc:
                raise self._failure(what, exc) from exc
        assert result is not None
        return result

    async def versions(self, doc: str) -> list[VersionInfo]:
        query = "SELECT id, ts, label, LENGTH(data), auto FROM versions WHERE doc = ? ORDER BY id"
        rows = await self._read(query, (doc,), what=f"listing versions of {doc!r}")
        return [VersionInfo(id_, ts, label, size, bool(auto)) for id_, ts, label, size, auto in rows]

    async def load_version(self, doc: str, version: int) -> bytes | None:
        rows = await self._read("SELECT data FROM versions WHERE doc = ? AND id = ?", (doc, version),
                                what=f"reading version {version} of {doc!r}")
        return rows[0][0] if rows else None

    async def ping(self) -> None:
        await self._read("SELECT 1", what="sqlite ping")

    async def keep_marks(self) -> None:
        assert self._writer is not None
        async with self._write_lock:
            try:
                await self._writer.run(_create_marks)
            except Exception as exc:
                raise self._failure("creating webhook marks", exc) from exc
        self._marks = True

    async def unreported(self, after: str, before: float, limit: int) -> tuple[list[str], str | None]:
        rows = await self._read(UNREPORTED, (after, limit, before), what="finding unreported changes")
        (last, count), = [(name, count) for kind, name, count in rows if kind == 1]
        return [name for kind, name, _ in rows if kind == 0], last if count == limit else None

    async def deletions_to_report(self, limit: int) -> list[str]:
        rows = await self._read("SELECT name FROM webhook_marks WHERE deleted LIMIT ?", (limit,),
                                what="finding unreported deletions")
        return [name for name, in rows]

    async def mark_reported(self, changed: dict[str, float], deleted: list[str]) -> None:
        assert self._writer is not None
        async with self._write_lock:
            try:
                await self._writer.run(_mark_reported, changed, deleted)
            except Exception as exc:
                raise self._failure("recording webhook marks", exc) from exc

    async def leads_sweep(self) -> bool:
        return True  # the only process on the database

    async def _read(self, query: str, params: Sequence[object] = (), *, what: str) -> list[Any]:
        """One query on the read-only connection, in one trip to the database thread."""
        assert self._reader is not None
        try:
            return list(await self._reader.execute_fetchall(query, params))
        except Exception as exc:
            raise self._failure(what, exc) from exc

    def _failure(self, what: str, exc: Exception) -> StorageError:
        """The StorageError of `what` failing with `exc`; a corrupt database is reported to `health` (failing from
        then on), wherever it is found."""
        error = StorageError(f"{what} failed: {exc}")
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in CORRUPT:  # absent from errors of the sqlite3 module itself
            self.health.corrupted(error)
        return error


def _swap(conn: sqlite3.Connection, doc: str, last: int, rows: int, checkpoint_seq: int | None,
          folded: bytes) -> None:
    """Replace `doc`'s log rows up to `last` (`rows` of them) and its checkpoint at `checkpoint_seq` (None: it had
    none) by `folded`, in one transaction, on the connection's own thread: one trip to it rather than one per
    statement, each of which waited up to a millisecond for the GIL while clients flooded the loop, all of it
    holding the writer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        deleted = conn.execute("DELETE FROM updates WHERE doc = ? AND id <= ?", (doc, last)).rowcount
        if deleted != rows:  # e.g. the document was deleted: no checkpoint brings it back
            raise StorageError("the log changed during compaction")
        if checkpoint_seq is None:
            swapped = conn.execute("INSERT INTO checkpoints (name, seq, data) VALUES (?, ?, ?) "
                                   "ON CONFLICT (name) DO NOTHING", (doc, last, folded)).rowcount
        else:
            swapped = conn.execute("UPDATE checkpoints SET data = ?, seq = ? WHERE name = ? AND seq = ?",
                                   (folded, last, doc, checkpoint_seq)).rowcount
        if swapped != 1:
            raise StorageError("the checkpoint changed during compaction")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_marks(conn: sqlite3.Connection) -> None:
    """Create the webhook marks (MARKS_SCHEMA) unless they exist, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'webhook_marks'").fetchone():
            for statement in filter(str.strip, MARKS_SCHEMA.split(";")):
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _mark_reported(conn: sqlite3.Connection, changed: dict[str, float], deleted: list[str]) -> None:
    """Store.mark_reported in one transaction; a change mark is kept only for a document still stored."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("INSERT INTO webhook_marks (name, notified) SELECT name, ? FROM documents WHERE name = ? "
                         "ON CONFLICT (name) DO UPDATE SET notified = max(notified, excluded.notified)",
                         [(stamp, doc) for doc, stamp in changed.items()])
        conn.executemany("DELETE FROM webhook_marks WHERE name = ? AND deleted", [(doc,) for doc in deleted])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _give_back(conn: sqlite3.Connection) -> bool:
    """Give up to RECLAIM_PAGES free pages back to the file system (one trip to the connection's thread); False
    if there were none."""
    (free,), = conn.execute("PRAGMA freelist_count").fetchall()
    if free:  # executescript steps the pragma to completion (one execute() frees a single page)
        conn.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES})")
    return bool(free)


class _Connection(aiosqlite.Connection):
    """An aiosqlite connection (autocommit: each statement is its own transaction unless BEGIN opens one) whose
    thread the event loop offers the GIL while it waits on it (pacing.offering_gil), so that a busy loop does not
    hold up commits, and with them every room's broadcasts."""

    @classmethod
    def to(cls, path: str) -> _Connection:
        return cls(lambda: sqlite3.connect(path, isolation_level=None), 64)

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:  # every call goes here
        return await offering_gil(super()._execute(fn, *args, **kwargs))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on the connection's thread, with its sqlite3 connection."""
        return await self._execute(fn, self._conn, *args)


async def claim(path: str, wait: float) -> list[int]:
    """Lock the database file `path` for this store, waiting up to `wait` seconds for the process that holds it (a
    restart can begin before its predecessor has committed and exited); then raise StorageError naming it.

    One process serves a database: rooms live in its memory, so a second process on the same file would neither
    reach the first one's clients nor keep its log ids apart (several processes need `--store postgres --broker
    redis`). An advisory `flock` on the database file itself, so that no file can be deleted to get around it (a
    `-lock` file beside it could be): SQLite locks with POSIX `fcntl` locks, which on Linux neither block nor are
    blocked by a `flock`, so SQLite, and `collab-server backup` in another process, work as before. A `-lock` file
    left by an earlier version is locked too, so that a predecessor of that version is waited for. The kernel
    releases the locks when the process ends, however it ends.

    Returns the descriptors to close, which must stay open until the store's connections are closed: closing any
    descriptor of the database file drops every POSIX lock this process holds on it, SQLite's included."""
    paths = [path] + ([path + LEGACY_LOCK_SUFFIX] if os.path.exists(path + LEGACY_LOCK_SUFFIX) else [])
    fds: list[int] = []
    deadline = time.monotonic() + wait
    warned = False
    try:
        for lock_path in paths:
            fds.append(fd := _open(lock_path))
            while not _try_lock(fd, lock_path):
                holder = _holder(fd)
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"{path} is in use by another collab-server process (pid {holder}): one process serves a "
                        f"SQLite database; to run several, use --store postgres --broker redis")
                if not warned:
                    log.warning("sqlite: %s is in use by pid %s; waiting up to %.0f s for it", path, holder, wait)
                    warned = True
                await asyncio.sleep(LOCK_POLL)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _remove_empty(path: str) -> None:
    """Remove the database file `path` and SQLite's files beside it, if it holds nothing (not one page)."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            for name in (path, path + "-wal", path + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)


def _open(path: str) -> int:
    """A descriptor of `path`, created (empty: SQLite takes an empty file for a new database) if missing."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc


def _holder(fd: int) -> str:
    """The pid holding a `flock` on the file open as `fd`, as /proc/locks shows it (Linux); "unknown" if not found."""
    stat = os.fstat(fd)
    file = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2304507 0 EOF"; a waiter's has "->"
                fields = line.split()
                if fields[1:2] == ["FLOCK"] and fields[5:6] == [file]:
                    return fields[4]
    except OSError:
        pass
    return "unknown"


def _try_lock(fd: int, lock_path: str) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot lock {lock_path}: {exc}") from exc
    return True


def backup(path: str, dest: str) -> int:
    """Copy the database at `path` to the new file `dest` as one consistent snapshot (`VACUUM INTO`), safe
    while a server writes to it; returns the number of documents copied. Restore by putting the copy in
    place of the database with the server stopped.

    The copy is written beside `dest` under a name of its own and renamed to `dest` once whole and synced: a copy
    that fails (a full disk) is removed, where it used to stay at `dest`, where a server opened it as a database
    holding what it had copied so far."""
    if not os.path.isfile(path):
        raise StorageError(f"no database at {path}")
    if os.path.exists(dest):
        raise StorageError(f"{dest} exists; a backup is only written to a new file")
    partial = f"{dest}.{os.getpid()}.partial"
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("VACUUM INTO ?", (partial,))
        with contextlib.closing(sqlite3.connect(f"file:{quote(partial)}?mode=ro", uri=True)) as copy:
            (docs,) = copy.execute("SELECT COUNT(*) FROM documents").fetchone()
        _sync(partial)
        if os.path.exists(dest):  # created meanwhile: not replaced
            raise StorageError(f"{dest} exists; a backup is only written to a new file")
        os.rename(partial, dest)
    except BaseException as exc:
        for leftover in (partial, partial + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise StorageError(f"backup of {path} to {dest} failed: {exc}") from exc
        raise
    try:
        _sync(os.path.dirname(os.path.abspath(dest)))  # the rename
    except OSError as exc:
        raise StorageError(f"backup of {path} written to {dest}, but syncing its directory failed: {exc}") from exc
    return docs


def _sync(path: str) -> None:
    """fsync the file or directory `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
