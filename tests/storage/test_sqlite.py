"""SQLite-specific store behaviour (the shared contract, anchor defects 1-3 included, is in
test_store_contract.py)."""

import asyncio
import fcntl
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from collab_server.storage import health as health_module
from collab_server.storage import sqlite as sqlite_module
from collab_server.storage.base import StorageError
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import text_updates
from tests.storage.corrupt import a_database_with_a_corrupt_document
from tests.serverproc import wait_until


def rebuild(updates: list[bytes]) -> str:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("t", type=Text))


async def store_folding_with(monkeypatch: pytest.MonkeyPatch, path: str, fold) -> SQLiteStore:
    """An open store (compaction at 10 log rows) whose compactions fold with `fold`."""
    monkeypatch.setattr(sqlite_module, "fold_updates", fold)
    store = SQLiteStore(path, compact_threshold=10)
    await store.open()
    return store


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(str(tmp_path / "s.db"), compact_threshold=10_000)
    await s.open()
    yield s
    await s.close()


async def test_concurrent_loads_of_different_documents(store: SQLiteStore) -> None:
    """Loads share one reader connection: concurrent snapshots must not interleave their transactions."""
    docs = {f"doc{i}": text_updates(i + 1) for i in range(8)}
    for name, (_, updates) in docs.items():
        await asyncio.gather(*(store.submit(name, u) for u in updates))
    loaded = await asyncio.gather(*(store.load(name) for name in docs))
    for (name, (doc, _)), updates in zip(docs.items(), loaded):
        assert rebuild(updates) == str(doc.get("t", type=Text)), name


def test_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        SQLiteStore(str(tmp_path / "x.db"), synchronous="off")


async def test_commits_proceed_while_a_compaction_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction folds off the commit path: a commit submitted mid-fold is durable before the fold ends,
    and the row it added survives the compaction."""
    folding, release = threading.Event(), threading.Event()
    released: list[bool] = []  # False: the fold gave up waiting, so nothing could commit meanwhile
    real_fold = sqlite_module.fold_updates

    def held_fold(parts: list[bytes], doc: str | None = None) -> bytes:
        folding.set()
        released.append(release.wait(5))
        return real_fold(parts, doc)

    path = str(tmp_path / "c.db")
    store = await store_folding_with(monkeypatch, path, held_fold)
    doc, updates = text_updates(11)
    try:
        await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))  # reaches the threshold
        assert await asyncio.to_thread(folding.wait, 10)
        await asyncio.wait_for(store.submit("d", updates[10]), 10)  # committed while the fold is held
    finally:
        release.set()
        await store.close()  # waits for the compaction
    assert released == [True]
    reopened = SQLiteStore(path)
    await reopened.open()
    loaded = await reopened.load("d")
    await reopened.close()
    assert len(loaded) == 2  # the checkpoint and the row committed during the fold
    assert rebuild(loaded) == str(doc.get("t", type=Text))


async def test_a_burst_committed_during_a_fold_is_folded_without_further_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows committed while a compaction folds (a burst that then stops) are folded by a follow-up
    compaction; otherwise every later load would replay them one by one."""
    folds: list[int] = []
    first_held, release, second_done = threading.Event(), threading.Event(), threading.Event()
    real_fold = sqlite_module.fold_updates

    def counted_fold(parts: list[bytes], doc: str | None = None) -> bytes:
        folds.append(len(parts))
        if len(folds) == 1:
            first_held.set()
            release.wait(5)
        folded = real_fold(parts, doc)
        if len(folds) == 2:
            second_done.set()
        return folded

    path = str(tmp_path / "b.db")
    store = await store_folding_with(monkeypatch, path, counted_fold)
    doc, updates = text_updates(40)
    try:
        await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))
        assert await asyncio.to_thread(first_held.wait, 10)
        await asyncio.gather(*(store.submit("d", u) for u in updates[10:]))  # the burst, during the fold
        release.set()
        assert await asyncio.to_thread(second_done.wait, 10)  # no commit after the burst triggers it
    finally:
        release.set()
        await store.close()
    assert folds == [10, 31]  # the second fold: the first checkpoint plus the 30 rows of the burst
    reopened = SQLiteStore(path)
    await reopened.open()
    loaded = await reopened.load("d")
    await reopened.close()
    assert len(loaded) == 1 and rebuild(loaded) == str(doc.get("t", type=Text))


OLD_SCHEMA = """
CREATE TABLE documents (name TEXT PRIMARY KEY, checkpoint BLOB, checkpoint_seq INTEGER NOT NULL DEFAULT 0,
                        updated REAL NOT NULL);
CREATE TABLE updates (id INTEGER PRIMARY KEY, doc TEXT NOT NULL, ts REAL NOT NULL, data BLOB NOT NULL);
CREATE INDEX updates_doc ON updates (doc, id);
CREATE TRIGGER updates_touch_document AFTER INSERT ON updates BEGIN
    INSERT INTO documents (name, updated) VALUES (NEW.doc, NEW.ts)
    ON CONFLICT (name) DO UPDATE SET updated = excluded.updated;
END;
"""


async def test_a_database_with_checkpoints_in_the_documents_table_is_migrated(tmp_path: Path) -> None:
    """Databases written before checkpoints had their own table open with every checkpoint and log row,
    and keep compacting and committing afterwards."""
    import sqlite3

    from collab_server.storage.base import fold_updates

    path = str(tmp_path / "old.db")
    doc, updates = text_updates(30)
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.executemany("INSERT INTO updates (id, doc, ts, data) VALUES (?, 'd', 1.0, ?)",
                         list(enumerate(updates[20:], start=21)))
        conn.execute("UPDATE documents SET checkpoint = ?, checkpoint_seq = 20 WHERE name = 'd'",
                     (fold_updates(updates[:20]),))
        conn.execute("INSERT INTO documents (name, updated) VALUES ('empty', 1.0)")
    store = SQLiteStore(path, compact_threshold=10_000)
    await store.open()
    try:
        loaded = await store.load("d")
        assert len(loaded) == 11 and rebuild(loaded) == str(doc.get("t", type=Text))
        with pytest.raises(Exception, match="compacted"):
            await store.load_until("d", 19)
        _, more = text_updates(35)
        assert await store.submit("d", more[30]) == 31  # ids continue after the migrated log
        await store.compact("d")
        assert len(await store.load("d")) == 1
        assert {info.name for info in await store.list_docs()} == {"d", "empty"}
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(documents)")}
    assert columns == {"name", "updated", "slow"}


async def test_compaction_gives_freed_pages_back_to_the_file_system(tmp_path: Path) -> None:
    """A new database shrinks when a long log is folded; a database created without incremental vacuum
    (before this store chose it) keeps its free pages for reuse and works as before."""
    import sqlite3

    def pages(path: str) -> tuple[int, int]:
        with sqlite3.connect(path) as conn:
            return conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA freelist_count").fetchone()[0]

    doc, updates = text_updates(2000)  # 2,000 log rows: dozens of pages once deleted
    for path, created_before in ((str(tmp_path / "new.db"), False), (str(tmp_path / "old.db"), True)):
        if created_before:
            sqlite3.connect(path).execute("CREATE TABLE unrelated (x)").connection.close()
        store = SQLiteStore(path, compact_threshold=100_000)
        await store.open()
        try:
            await asyncio.gather(*(store.submit("d", u) for u in updates))
            grown, _ = pages(path)
            await store.compact("d")
            size, free = pages(path)
            assert rebuild(await store.load("d")) == str(doc.get("t", type=Text))
        finally:
            await store.close()
        if created_before:
            assert size == grown and free > 20
        else:
            assert free == 0 and size < grown - 20


async def test_a_few_freed_pages_are_kept_for_reuse_not_given_back(tmp_path: Path) -> None:
    """A compaction that frees a small share of the file leaves the pages for the next writes: giving them back
    is a write transaction (and an fsync) holding the writer, after every compaction of a busy document."""
    import sqlite3

    path = str(tmp_path / "reuse.db")

    def pages() -> tuple[int, int]:
        with sqlite3.connect(path) as conn:
            return conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA freelist_count").fetchone()[0]

    _, big = text_updates(3000, client_id=1)
    doc, small = text_updates(300, client_id=2)  # fixed clients: page counts do not depend on their ids' sizes
    store = SQLiteStore(path, compact_threshold=100_000)
    await store.open()
    try:
        await asyncio.gather(*(store.submit("big", u) for u in big))
        await asyncio.gather(*(store.submit("d", u) for u in small))
        await store.compact("d")
        size, free = pages()
        assert 0 < free * 8 < size  # kept: a small share of the file
        assert rebuild(await store.load("d")) == str(doc.get("t", type=Text))
        _, more = text_updates(300, name="u", client_id=3)
        await asyncio.gather(*(store.submit("e", u) for u in more))
        grown, left = pages()
        assert grown == size and left < free  # the next writes took them
    finally:
        await store.close()


async def test_a_database_is_open_in_one_store_at_a_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second store (in production, a second process) on the same file waits for the first to close, and is
    refused with the holder's pid once its wait is over; the first keeps working meanwhile."""
    path = str(tmp_path / "one.db")
    doc, updates = text_updates(2)
    first = SQLiteStore(path)
    await first.open()
    with pytest.raises(StorageError, match=rf"in use by another collab-server process \(pid {os.getpid()}\)"):
        await SQLiteStore(path, lock_wait=0.3).open()
    await first.submit("d", updates[0])
    second = SQLiteStore(path, lock_wait=20)
    opening = asyncio.create_task(second.open())
    await wait_until(lambda: f"in use by pid {os.getpid()}; waiting" in caplog.text)
    assert not opening.done()
    await first.close()
    await asyncio.wait_for(opening, 10)
    await second.submit("d", updates[1])
    assert rebuild(await second.load("d")) == str(doc.get("t", type=Text))
    await second.close()


async def test_a_corrupt_database_found_by_a_read_is_a_storage_failure_for_good(tmp_path: Path) -> None:
    """SQLite's "database disk image is malformed" on a load or a compaction fails them with StorageError, and
    marks storage failing (for /ready, the log and shutdown) until the process ends: commits that still
    succeed, or time, do not clear it."""
    path = tmp_path / "c.db"
    await a_database_with_a_corrupt_document(path)
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert store.health.failing is None
        with pytest.raises(StorageError, match="loading 'early' failed: database disk image is malformed"):
            await store.load("early")
        assert store.health.corrupt == "loading 'early' failed: database disk image is malformed"
        with pytest.raises(StorageError, match="malformed"):
            await store.compact("early")
        assert len(await store.load("later")) == 20  # the rest still reads
        await store.submit("new", b"\x00\x00")
        now = store.health.clock()
        store.health.clock = lambda: now + 3600.0
        assert store.health.failing == store.health.corrupt is not None
    finally:
        await store.close()


async def test_a_commit_that_does_not_come_back_is_reported_stuck_then_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A commit held in the writer thread (here by another connection's write lock; in production, a frozen file
    system) shows in `health.stuck_for` after a second, is warned about in the log, and its completion logged."""
    monkeypatch.setattr(health_module, "STUCK_WARN", 0.2)
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path))
    await store.open()
    _, updates = text_updates(2)
    await store.submit("d", updates[0])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        committed = store.submit("d", updates[1])
        await wait_until(lambda: "storage commit stuck for 0 s: storage does not answer" in caplog.text)
        await wait_until(lambda: store.health.stuck_for is not None)
        assert not committed.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await committed
    assert "storage commit completed after" in caplog.text
    assert store.health.stuck_for is None and store.health.failing is None
    await store.close()


async def test_the_claim_on_a_database_is_on_the_file_itself_and_waits_for_an_earlier_version_s_lock_file(
        tmp_path: Path) -> None:
    """Deleting a file beside the database (the `-lock` earlier versions locked) let a second process open it while
    the first served it. The lock is now on the database file; a `-lock` file an earlier version may hold is
    locked too, so a restart into this version still waits for its predecessor."""
    path = tmp_path / "one.db"
    first = SQLiteStore(str(path))
    await first.open()
    for leftover in tmp_path.glob("one.db-*"):
        if not leftover.name.endswith(("-wal", "-shm")):
            leftover.unlink()
    with pytest.raises(StorageError, match=rf"in use by another collab-server process \(pid {os.getpid()}\)"):
        await SQLiteStore(str(path), lock_wait=0.3).open()
    await first.close()

    legacy = os.open(f"{path}-lock", os.O_RDWR | os.O_CREAT)  # an earlier version's server, still stopping
    fcntl.flock(legacy, fcntl.LOCK_EX)
    try:
        with pytest.raises(StorageError, match="in use by another collab-server process"):
            await SQLiteStore(str(path), lock_wait=0.3).open()
    finally:
        os.close(legacy)
    second = SQLiteStore(str(path))
    await second.open()
    await second.close()
