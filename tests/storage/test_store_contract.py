"""The Store contract, run against every implementation: SQLite and PostgreSQL (a real server).

Anchor defects 1-3 (squash wipes the document, a compressed checkpoint is not read back, SQL errors are
swallowed) are checked here for every backend."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict

import pytest
from pycrdt import Doc, Text, merge_updates

from collab_server import slicing
from collab_server.storage import HistoryCompacted, StorageError, Store
from collab_server.storage import postgres as postgres_store
from collab_server.storage import sqlite as sqlite_store
from collab_server.storage.base import fold_updates, log_weight
from tests.rawclient import text_updates
from tests.storage.backends import Backend


def rebuild(updates: list[bytes]) -> str:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("t", type=Text))


def text_of(doc: Doc) -> str:
    return str(doc.get("t", type=Text))


def held_folds(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make every store's fold wait for `release` (the second event) once it has set `folding` (the first)."""
    folding, release = threading.Event(), threading.Event()

    def held_fold(parts: list[bytes], doc: str | None = None) -> bytes:
        folding.set()
        assert release.wait(10), "the fold was never released"
        return fold_updates(parts, doc)

    for module in (sqlite_store, postgres_store):
        monkeypatch.setattr(module, "fold_updates", held_fold)
    return folding, release


async def test_append_then_load_in_order(store: Store) -> None:
    doc, updates = text_updates(50)
    seqs = await asyncio.gather(*(store.submit("d", u) for u in updates))
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert await store.load("d") == updates
    assert rebuild(await store.load("d")) == text_of(doc)
    assert await store.load("other") == []


async def test_group_commit_batches_concurrent_submits(store: Store) -> None:
    commits: list[int] = []
    store.on_commit = lambda size, seconds: commits.append(size)
    _, updates = text_updates(300)
    await asyncio.gather(*(store.submit("d", u) for u in updates))
    assert sum(commits) == 300
    assert len(commits) < 300 / 10, f"expected batching, got {len(commits)} commits"


async def test_one_batch_spans_documents(store: Store) -> None:
    docs = {f"doc{i}": text_updates(i + 1) for i in range(8)}
    await asyncio.gather(*(store.submit(name, u) for name, (_, updates) in docs.items() for u in updates))
    loaded = await asyncio.gather(*(store.load(name) for name in docs))
    for (name, (doc, updates)), got in zip(docs.items(), loaded):
        assert got == updates, name
    assert [(d.name, d.log_entries) for d in await store.list_docs()] == [(n, i + 1) for i, n in enumerate(docs)]


async def test_a_deferred_update_is_taken_when_its_commit_begins(store: Store) -> None:
    """`submit` accepts a function: the store calls it as the commit that writes it begins, so changes made
    until then join that log entry; a function that fails fails only its own submission."""
    _, updates = text_updates(4)
    parts = [updates[0]]
    taken: list[int] = []

    def deferred() -> bytes:
        taken.append(len(parts))
        return fold_updates(parts)

    def broken() -> bytes:
        raise ValueError("cannot encode")

    first = store.submit("d", deferred)
    failing = store.submit("e", broken)
    plain = store.submit("d", updates[3])
    parts += updates[1:3]  # joins before the commit begins: the store has not run since
    assert taken == []
    seq, seq_plain = await asyncio.gather(first, plain)
    assert taken == [3] and seq < seq_plain
    with pytest.raises(StorageError, match="cannot encode"):
        await failing
    assert [entry.seq for entry in await store.history("d")] == [seq, seq_plain]
    assert rebuild(await store.load("d")) == rebuild(updates)
    assert await store.load("e") == []


async def test_compaction_keeps_the_document(store: Store) -> None:
    """Defects 1 and 2: squashing never wipes the document, and a reload reads the checkpoint."""
    doc, updates = text_updates(130)
    await asyncio.gather(*(store.submit("d", u) for u in updates[:120]))
    await store.compact("d")
    loaded = await store.load("d")
    assert len(loaded) == 1
    assert rebuild(loaded) == text_of(doc)[:120]
    assert len(loaded[0]) < sum(map(len, updates[:120])) / 5  # a compact checkpoint, not a concatenation
    assert (await store.list_docs())[0].log_entries == 0
    await asyncio.gather(*(store.submit("d", u) for u in updates[120:]))
    await store.compact("d")  # folds the new log into the existing checkpoint
    assert rebuild(await store.load("d")) == text_of(doc)


async def test_automatic_compaction_past_threshold(backend: Backend) -> None:
    s = await backend.open(compact_threshold=25)
    doc, updates = text_updates(100)
    for u in updates:
        await s.submit("d", u)
    loaded = await s.load("d")
    await s.close()
    assert len(loaded) <= 1 + 25  # the checkpoint plus at most one threshold of log
    assert rebuild(loaded) == text_of(doc)


async def test_large_log_entries_count_by_size_toward_the_threshold(backend: Backend) -> None:
    """An entry holding many changes (a burst joined while a commit was in flight) counts as one per
    ENTRY_BYTES, so a log of a few large entries is folded like a long log of small ones."""
    s = await backend.open(compact_threshold=25)
    try:
        doc, updates = text_updates(1200)
        entries = [merge_updates(*updates[i:i + 100]) for i in range(0, len(updates), 100)]
        assert all(log_weight(entry) >= 25 for entry in entries)
        for entry in entries:
            await s.submit("d", entry)
        async with asyncio.timeout(10):  # folded in the background after the commits
            while await s.history("d"):
                await asyncio.sleep(0.02)
        assert rebuild(await s.load("d")) == text_of(doc)
    finally:
        await s.close()


async def test_an_unloaded_document_gets_its_log_folded(backend: Backend) -> None:
    """Below the threshold nothing folds on commit; once the document is no longer served, a log of a tenth of
    the threshold or more is folded, so its next load is one checkpoint. A shorter log is left alone."""
    s = await backend.open(compact_threshold=100)
    try:
        doc, updates = text_updates(30)
        for u in updates:
            await s.submit("long", u)
        for u in updates[:5]:
            await s.submit("short", u)
        s.unloaded("long")
        s.unloaded("short")
        for _ in range(200):
            if len(await s.load("long")) == 1:
                break
            await asyncio.sleep(0.02)
        loaded = await s.load("long")
        assert len(loaded) == 1 and rebuild(loaded) == text_of(doc)
        logs = {d.name: d.log_entries for d in await s.list_docs()}
        assert logs == {"long": 0, "short": 5}
    finally:
        await s.close()


async def test_close_commits_pending_and_reopen_keeps_everything(backend: Backend) -> None:
    s = await backend.open()
    doc, updates = text_updates(30)
    await asyncio.gather(*(s.submit("d", u) for u in updates[:20]))
    await s.compact("d")
    pending = [s.submit("d", u) for u in updates[20:]]
    await s.close()
    assert all(f.done() and not f.exception() for f in pending)
    with pytest.raises(StorageError, match="closing"):
        await s.submit("d", updates[0])
    s2 = await backend.open()
    assert rebuild(await s2.load("d")) == text_of(doc)
    seq = await s2.submit("d", b"\x00\x00")
    assert seq > max(f.result() for f in pending)
    await s2.close()


async def test_write_error_surfaces_and_nothing_is_stored(store: Store, backend: Backend) -> None:
    """Defect 3: a failed write fails its future; it never looks successful."""
    _, updates = text_updates(3)
    await store.submit("d", updates[0])
    await backend.break_op("INSERT", "updates", "disk on fire")
    with pytest.raises(StorageError, match="disk on fire"):
        await store.submit("d", updates[1])
    await backend.repair("updates")
    assert await store.load("d") == [updates[0]]
    await store.submit("d", updates[1])
    assert await store.load("d") == updates[:2]


async def test_failed_compaction_loses_nothing(store: Store, backend: Backend) -> None:
    doc, updates = text_updates(40)
    await asyncio.gather(*(store.submit("d", u) for u in updates))
    await backend.break_op("DELETE", "updates", "crash")
    with pytest.raises(StorageError, match="crash"):
        await store.compact("d")
    loaded = await store.load("d")
    assert loaded == updates  # the checkpoint write was rolled back together with the failed delete
    await backend.repair("updates")
    await store.compact("d")
    assert rebuild(await store.load("d")) == text_of(doc)


async def test_history_and_past_versions(store: Store) -> None:
    _, updates = text_updates(5)
    seqs = [await store.submit("d", u) for u in updates]
    history = await store.history("d")
    assert [h.seq for h in history] == seqs
    assert [h.size for h in history] == [len(u) for u in updates]
    assert rebuild(await store.load_until("d", seqs[2])) == "abc"
    await store.compact("d")
    assert await store.history("d") == []
    with pytest.raises(HistoryCompacted):
        await store.load_until("d", seqs[2])
    assert rebuild(await store.load_until("d", seqs[-1])) == "abcde"


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_updated_moves_with_every_commit(store: Store) -> None:
    _, updates = text_updates(2)
    assert await store.updated(["d", "never-written"]) == {}
    await store.submit("d", updates[0])
    first = (await store.updated(["d", "never-written"]))["d"]
    await store.submit("d", updates[1])
    assert (await store.updated(["d"]))["d"] != first
    assert list(await store.updated([f"x{i}" for i in range(1200)] + ["d"])) == ["d"]  # many names at once


async def test_load_new_returns_what_was_committed_since_a_read(store: Store) -> None:
    """What resync reads: everything the first time, then at least what was committed since its last read (with a
    mark: exactly that), across a compaction too."""
    doc, updates = text_updates(30)
    replica = Doc()
    await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))
    got, mark = await store.load_new("d", None)
    assert got == updates[:10]
    for part, until in ((updates[10:20], None), (updates[20:], "compacted")):
        for update in got:
            replica.apply_update(update)
        await asyncio.gather(*(store.submit("d", u) for u in part))
        if until:
            await store.compact("d")
        got, later = await store.load_new("d", mark)
        if mark is not None and not until:
            assert got == part  # the log entries read last time are not sent again
        mark = later
    for update in got:
        replica.apply_update(update)
    assert text_of(replica) == text_of(doc)
    if mark is not None:  # nothing committed since: nothing read
        assert await store.load_new("d", mark) == ([], mark)


async def test_delete_erases_checkpoint_and_log(store: Store) -> None:
    _, updates = text_updates(30)
    await asyncio.gather(*(store.submit("d", u) for u in updates[:20]))
    await store.compact("d")
    await asyncio.gather(*(store.submit("d", u) for u in updates[20:]))  # a checkpoint and ten log rows
    _, others = text_updates(3)
    await asyncio.gather(*(store.submit("other", u) for u in others))
    assert await store.delete("d") is True
    assert await store.load("d") == [] and await store.history("d") == []
    assert [d.name for d in await store.list_docs()] == ["other"]
    assert await store.updated(["d"]) == {}
    assert await store.delete("d") is False and await store.delete("never-written") is False
    assert await store.load("other") == others
    assert await store.submit("d", updates[0]) and await store.load("d") == [updates[0]]  # the name starts over


async def test_saved_versions_outlive_compaction_and_go_with_the_document(backend: Backend) -> None:
    store = await backend.open()
    doc, updates = text_updates(30)
    await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))
    first = await store.save_version("d", "draft", fold_updates(updates[:10]))
    await asyncio.gather(*(store.submit("d", u) for u in updates[10:]))
    await store.compact("d")
    second = await store.save_version("d", "", fold_updates(updates))
    other = await store.save_version("other", "x", updates[0])
    assert first.id < second.id < other.id and first.label == "draft" and first.size > 0
    assert await store.versions("d") == [first, second] and await store.versions("never") == []
    assert rebuild([await store.load_version("d", first.id)]) == rebuild(updates[:10])
    assert rebuild([await store.load_version("d", second.id)]) == text_of(doc)
    assert await store.load_version("d", other.id) is None and await store.load_version("d", 10**9) is None
    await store.close()
    store = await backend.open()
    assert await store.versions("d") == [first, second]
    await store.delete("d")
    assert await store.versions("d") == [] and await store.load_version("d", first.id) is None
    assert await store.versions("other") == [other]
    await store.close()


async def test_pruning_keeps_the_newest_automatic_versions_and_every_requested_one(store: Store) -> None:
    _, updates = text_updates(8)
    saved = [await store.save_version("d", f"v{i}", u, auto=i % 2 == 0) for i, u in enumerate(updates)]
    await store.save_version("other", "auto", updates[0], auto=True)
    assert [v.auto for v in saved] == [True, False] * 4 and await store.versions("d") == saved
    assert await store.prune_versions("d", 2) == 2
    assert [v.label for v in await store.versions("d")] == ["v1", "v3", "v4", "v5", "v6", "v7"]
    assert await store.prune_versions("d", 2) == 0 and await store.prune_versions("d", 0) == 2
    assert [v.label for v in await store.versions("d")] == ["v1", "v3", "v5", "v7"]
    assert len(await store.versions("other")) == 1


@pytest.mark.parametrize("compacted_before", [False, True])
async def test_a_compaction_that_ends_after_a_delete_brings_nothing_back(
        store: Store, monkeypatch: pytest.MonkeyPatch, compacted_before: bool) -> None:
    """The fold works on a snapshot taken before the delete; its swap must not write a checkpoint back."""
    _, updates = text_updates(20)
    await asyncio.gather(*(store.submit("d", u) for u in updates[:10]))
    if compacted_before:
        await store.compact("d")
    await asyncio.gather(*(store.submit("d", u) for u in updates[10:]))
    folding, release = held_folds(monkeypatch)
    compaction = asyncio.create_task(store.compact("d"))
    assert await asyncio.to_thread(folding.wait, 10)
    assert await store.delete("d") is True
    release.set()
    try:
        await compaction
    except StorageError:
        pass  # a store may report that the log changed under the fold; it must not write anything
    assert await store.load("d") == [] and await store.list_docs() == []


async def test_listing_by_prefix_in_pages(store: Store) -> None:
    names = [f"team/{i:02d}" for i in range(7)] + ["other", "team", "teams/x", "tëam/ü"]
    _, updates = text_updates(1)
    await asyncio.gather(*(store.submit(name, updates[0]) for name in names))
    assert [d.name for d in await store.list_docs()] == sorted(names)
    assert [d.name for d in await store.list_docs(prefix="team/")] == [f"team/{i:02d}" for i in range(7)]
    pages, after = [], ""
    while page := await store.list_docs(prefix="team/", after=after, limit=3):
        pages.append([d.name for d in page])
        after = page[-1].name
    assert pages == [["team/00", "team/01", "team/02"], ["team/03", "team/04", "team/05"], ["team/06"]]
    assert [d.name for d in await store.list_docs(prefix="tëam/")] == ["tëam/ü"]
    assert await store.list_docs(prefix="nobody") == [] and await store.list_docs(limit=0) == []
    wild = ["a*b", "a*c", "axb", "a?", "a[1]", "a%_", "a_b"]  # pattern characters of GLOB and LIKE
    await asyncio.gather(*(store.submit(name, updates[0]) for name in wild))
    for prefix, expected in (("a*", ["a*b", "a*c"]), ("a?", ["a?"]), ("a[", ["a[1]"]), ("a%", ["a%_"]),
                             ("a_", ["a_b"])):
        assert [d.name for d in await store.list_docs(prefix=prefix)] == expected, prefix


@pytest.mark.parametrize("found_by", ["load", "fold"])
async def test_a_document_found_slow_to_apply_is_recalled_slow_by_the_next_process(
        backend: Backend, monkeypatch: pytest.MonkeyPatch, found_by: str) -> None:
    """What a process learned by applying a document slowly (on the event loop at a load, in a worker thread in a
    fold) the next one knows before it applies anything: the store keeps the mark with the document."""
    _, updates = text_updates(20)
    monkeypatch.setattr(slicing.slow_documents, "_names", OrderedDict())  # a process that has not seen them
    store = await backend.open()
    try:
        for doc in ("slow", "quick"):
            await asyncio.gather(*(store.submit(doc, u) for u in updates))
        if found_by == "load":
            slicing.slow_documents.timed("slow", lambda _: _spin(slicing.SLOW_APPLY), b"")
        else:
            with monkeypatch.context() as patch:
                patch.setattr(slicing, "SLOW_APPLY", -1.0)  # every application counts as slow
                await store.compact("slow")
            assert await store.load("slow") == [fold_updates(updates)]
        assert "slow" in slicing.slow_documents
    finally:
        await store.close()  # writes what was found before it, as it commits what was submitted
    monkeypatch.setattr(slicing.slow_documents, "_names", OrderedDict())  # as in a new process
    store = await backend.open()
    try:
        assert rebuild(await store.load("quick")) == rebuild(updates) and "quick" not in slicing.slow_documents
        assert rebuild(await store.load("slow")) == rebuild(updates) and "slow" in slicing.slow_documents
        assert await store.delete("slow")
        await store.submit("slow", updates[0])
    finally:
        await store.close()
    monkeypatch.setattr(slicing.slow_documents, "_names", OrderedDict())
    store = await backend.open()
    try:
        assert await store.load("slow") == [updates[0]] and "slow" not in slicing.slow_documents  # deleted with it
    finally:
        await store.close()


def _spin(seconds: float) -> None:
    """Use `seconds` of the thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() <= end:
        pass


async def test_a_document_found_slow_by_a_fold_that_ends_as_the_store_closes_is_marked(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing waits for the running folds, and writes what they found."""
    _, updates = text_updates(20)
    monkeypatch.setattr(slicing.slow_documents, "_names", OrderedDict())
    folding, release = held_folds(monkeypatch)
    store = await backend.open(compact_threshold=10)
    await asyncio.gather(*(store.submit("slow", u) for u in updates))  # past the threshold: a fold starts
    assert await asyncio.to_thread(folding.wait, 10)
    with monkeypatch.context() as patch:
        patch.setattr(slicing, "SLOW_APPLY", -1.0)  # every application counts as slow
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)  # one turn: close() runs up to its first wait, so the fold ends after it began
        release.set()
        await closing
    monkeypatch.setattr(slicing.slow_documents, "_names", OrderedDict())  # as in a new process
    store = await backend.open()
    try:
        assert rebuild(await store.load("slow")) == rebuild(updates) and "slow" in slicing.slow_documents
    finally:
        await store.close()


async def test_an_automatic_version_is_not_saved_when_one_was_since(store: Store) -> None:
    """Each node saved automatic versions for the commits it made: two writing nodes saved one each per interval.
    The store now saves one only if none (of any node) was saved since the given time."""
    _, updates = text_updates(3)
    first = await store.save_auto_version("d", "automatic", updates[0], since=time.time() - 60)
    assert first is not None and first.auto
    assert await store.save_auto_version("d", "automatic", updates[1], since=time.time() - 60) is None
    assert await store.save_auto_version("other", "automatic", updates[1], since=time.time() - 60) is not None
    later = await store.save_auto_version("d", "automatic", updates[2], since=first.time + 0.000001)
    assert later is not None and [v.id for v in await store.versions("d")] == [first.id, later.id]
