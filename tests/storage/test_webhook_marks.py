"""Webhook marks (Store.keep_marks and the methods after it), against SQLite and a real PostgreSQL."""

from __future__ import annotations

import time

import pytest

from collab_server.storage import Store
from tests.rawclient import text_updates
from tests.storage.backends import Backend, PostgresBackend


async def commit(store: Store, doc: str) -> float:
    """Commit a change to `doc`; returns the document's `updated` after it."""
    await store.submit(doc, text_updates(1)[1][0])
    return (await store.updated([doc]))[doc]


async def all_unreported(store: Store, limit: int = 1000) -> list[str]:
    found, after = [], ""
    while after is not None:
        names, after = await store.unreported(after, time.time() + 60, limit)
        found += names
    return found


async def test_marks_start_at_what_is_stored_then_follow_commits(store: Store) -> None:
    old = await commit(store, "old")
    await store.keep_marks()
    await store.keep_marks()  # a second node, or a restart: the marks stay
    assert await all_unreported(store) == []  # turning webhooks on reports nothing older
    new = await commit(store, "new")
    changed = await commit(store, "old")
    assert changed > old
    assert await all_unreported(store) == ["new", "old"]
    names, _ = await store.unreported("", new - 0.001, 10)  # committed after `before`: not yet
    assert names == []
    await store.mark_reported({"new": new, "old": old}, [])  # "old" reported as read before its last commit
    assert await all_unreported(store) == ["old"]
    await store.mark_reported({"old": changed}, [])
    await store.mark_reported({"old": old}, [])  # an older event accepted later never moves a mark back
    assert await all_unreported(store) == []


async def test_the_scan_goes_a_batch_at_a_time(store: Store) -> None:
    await store.keep_marks()
    for i in range(7):
        await commit(store, f"d{i}")
    names, after = await store.unreported("", time.time() + 60, 3)
    assert (names, after) == (["d0", "d1", "d2"], "d2")
    assert await store.unreported("d5", time.time() + 60, 3) == (["d6"], None)
    assert await all_unreported(store, 3) == [f"d{i}" for i in range(7)]


async def test_a_deletion_is_to_report_until_its_event_is_recorded(store: Store) -> None:
    await commit(store, "kept")
    await commit(store, "gone")
    assert await store.delete("gone")  # before marks are kept: nothing to report
    await commit(store, "gone")
    await store.keep_marks()
    assert await store.deletions_to_report(10) == []
    assert await store.delete("gone")
    assert not await store.delete("never")
    assert await store.deletions_to_report(10) == ["gone"]
    await commit(store, "gone")  # started again: its change and its earlier deletion are both to report
    assert await all_unreported(store) == ["gone"]
    await store.mark_reported({}, ["gone"])
    assert await store.deletions_to_report(10) == []


async def test_a_deletion_to_report_outlives_the_store(backend: Backend) -> None:
    store = await backend.open()
    await commit(store, "doc")
    await store.keep_marks()
    await store.delete("doc")
    await store.close()
    store = await backend.open()  # marks are not kept by this one (no webhooks): still recorded and found
    try:
        assert await store.deletions_to_report(10) == ["doc"]
    finally:
        await store.close()


@pytest.mark.distributed
async def test_one_node_leads_the_sweep_until_it_closes(postgres_dsn: str, pg_schema: str) -> None:
    a, b = PostgresBackend(postgres_dsn, pg_schema), PostgresBackend(postgres_dsn, pg_schema)
    first, second = await a.open(), await b.open()
    try:
        assert await first.leads_sweep() and await first.leads_sweep()
        assert not await second.leads_sweep()
        await first.close()
        assert await second.leads_sweep()
    finally:
        await second.close()
