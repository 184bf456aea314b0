"""SQLite store: group commit, compaction that never loses data, errors that surface (anchor defects 1-3)."""

import asyncio
import sqlite3
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from collab_server.storage import StorageError
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import text_updates


def rebuild(updates: list[bytes]) -> str:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("t", type=Text))


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(str(tmp_path / "s.db"), compact_threshold=10_000)
    await s.open()
    yield s
    await s.close()


async def test_append_then_load_in_order(store: SQLiteStore) -> None:
    doc, updates = text_updates(50)
    seqs = await asyncio.gather(*(store.submit("d", u) for u in updates))
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert await store.load("d") == updates
    assert rebuild(await store.load("d")) == str(doc.get("t", type=Text))
    assert await store.load("other") == []


async def test_group_commit_batches_concurrent_submits(store: SQLiteStore) -> None:
    commits: list[int] = []
    store.on_commit = lambda size, seconds: commits.append(size)
    _, updates = text_updates(300)
    await asyncio.gather(*(store.submit("d", u) for u in updates))
    assert sum(commits) == 300
    assert len(commits) < 300 / 10, f"expected batching, got {len(commits)} commits"


async def test_compaction_keeps_the_document(store: SQLiteStore) -> None:
    """Defect 1 and 2: squashing must never wipe the document, and reload must read the checkpoint."""
    doc, updates = text_updates(120)
    await asyncio.gather(*(store.submit("d", u) for u in updates))
    await store.compact("d")
    loaded = await store.load("d")
    assert len(loaded) == 1
    assert rebuild(loaded) == str(doc.get("t", type=Text))
    assert (await store.list_docs())[0].log_entries == 0
    assert len(loaded[0]) < sum(map(len, updates)) / 5  # a compact checkpoint, not a concatenation


async def test_automatic_compaction_past_threshold(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "a.db"), compact_threshold=25)
    await s.open()
    doc, updates = text_updates(100)
    for u in updates:
        await s.submit("d", u)
    loaded = await s.load("d")
    await s.close()
    assert len(loaded) <= 1 + 25  # the checkpoint plus at most one threshold of log
    assert rebuild(loaded) == str(doc.get("t", type=Text))


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    s = SQLiteStore(path)
    await s.open()
    doc, updates = text_updates(30)
    await asyncio.gather(*(s.submit("d", u) for u in updates[:20]))
    await s.compact("d")
    pending = [s.submit("d", u) for u in updates[20:]]
    await s.close()  # close commits what was submitted
    assert all(f.done() and not f.exception() for f in pending)
    s2 = SQLiteStore(path)
    await s2.open()
    assert rebuild(await s2.load("d")) == str(doc.get("t", type=Text))
    seq = await s2.submit("d", b"\x00\x00")
    assert seq > max(f.result() for f in pending)
    await s2.close()


async def test_sql_error_surfaces_and_nothing_is_stored(store: SQLiteStore) -> None:
    """Defect 3: a failed write must fail its future, not look successful."""
    _, updates = text_updates(3)
    await store.submit("d", updates[0])
    with sqlite3.connect(store.path) as ext:
        ext.execute("CREATE TRIGGER fail BEFORE INSERT ON updates BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(StorageError, match="disk on fire"):
        await store.submit("d", updates[1])
    with sqlite3.connect(store.path) as ext:
        ext.execute("DROP TRIGGER fail")
    assert await store.load("d") == [updates[0]]
    await store.submit("d", updates[1])
    assert await store.load("d") == updates[:2]


async def test_failed_compaction_loses_nothing(store: SQLiteStore) -> None:
    doc, updates = text_updates(40)
    await asyncio.gather(*(store.submit("d", u) for u in updates))
    with sqlite3.connect(store.path) as ext:
        ext.execute("CREATE TRIGGER nodelete BEFORE DELETE ON updates BEGIN SELECT RAISE(ABORT, 'crash'); END")
    with pytest.raises(StorageError, match="crash"):
        await store.compact("d")
    loaded = await store.load("d")
    assert loaded == updates  # checkpoint write was rolled back together with the failed delete
    assert rebuild(loaded) == str(doc.get("t", type=Text))


async def test_history_and_past_versions(store: SQLiteStore) -> None:
    _, updates = text_updates(5)
    seqs = [await store.submit("d", u) for u in updates]
    history = await store.history("d")
    assert [h.seq for h in history] == seqs
    assert [h.size for h in history] == [len(u) for u in updates]
    assert rebuild(await store.load_until("d", seqs[2])) == "abc"
    await store.compact("d")
    with pytest.raises(StorageError, match="compacted"):
        await store.load_until("d", seqs[2])
    assert rebuild(await store.load_until("d", seqs[-1])) == "abcde"


async def test_concurrent_loads_of_different_documents(store: SQLiteStore) -> None:
    docs = {f"doc{i}": text_updates(i + 1) for i in range(8)}
    for name, (_, updates) in docs.items():
        await asyncio.gather(*(store.submit(name, u) for u in updates))
    loaded = await asyncio.gather(*(store.load(name) for name in docs))
    for (name, (doc, _)), updates in zip(docs.items(), loaded):
        assert rebuild(updates) == str(doc.get("t", type=Text)), name
