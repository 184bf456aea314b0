"""StatusResolver: materialisation, compaction, idempotence and quiet runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pycrdt import Array, Doc, Map

from collab_server.model import (
    StatusChange,
    StatusResolver,
    add_index_entry,
    block_content,
    create_block,
    find_index_entry,
    get_block,
    resolved_status,
    set_status,
)
from tests.model.replicas import sync, sync_all


@pytest.fixture
def server() -> Iterator[tuple[Doc, StatusResolver, list[StatusChange], list[bytes]]]:
    """A server doc with a resolver, the changes it emitted and every update it produced."""
    doc = Doc(client_id=100)
    emitted: list[StatusChange] = []
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    resolver = StatusResolver(doc, on_change=emitted.append)
    yield doc, resolver, emitted, updates
    resolver.close()


def client(server_doc: Doc, client_id: int) -> Doc:
    doc = Doc(client_id=client_id)
    sync(server_doc, doc)
    return doc


def materialised(doc: Doc) -> str:
    return find_index_entry(doc, "b", "idx")["status"]


def test_resolver_materialises_concurrent_writes_then_goes_quiet(server) -> None:
    doc, resolver, emitted, updates = server
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "idx")
    assert resolver.run() == []
    a, b = client(doc, 1), client(doc, 2)
    set_status(a, "b", "idx", "error")
    set_status(b, "b", "idx", "done")
    sync(a, doc)
    sync(b, doc)  # `status` is last-writer-wins: b's "done" overwrote a's "error"
    assert materialised(doc) == "done"
    changes = resolver.run()
    assert changes == emitted == [StatusChange("b", "idx", "done", "error")]
    assert materialised(doc) == resolved_status(doc, "b", "idx") == "error"
    produced = len(updates)
    assert resolver.run() == []
    sync(a, doc)  # nothing new: no dirty block, no write
    block_content(a, "b").insert(0, "text")
    sync(a, doc)  # dirty block, nothing to resolve: no write either
    received = len(updates)
    assert resolver.run() == [] and len(updates) == received > produced


def test_resolver_change_reaches_clients_and_wins(server) -> None:
    doc, resolver, _, _ = server
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "idx")
    a, b = client(doc, 1), client(doc, 2)
    set_status(a, "b", "idx", "error")
    set_status(b, "b", "idx", "done")
    sync(a, doc)
    sync(b, doc)
    resolver.run()
    sync_all(doc, a, b)
    assert [materialised(d) for d in (doc, a, b)] == ["error"] * 3
    assert resolver.run() == []


def test_compaction_keeps_resolved_value(server) -> None:
    doc, resolver, _, _ = server
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "idx")
    writes = find_index_entry(doc, "b", "idx")["statusWrites"]
    first = writes[0]["id"]
    # a writer that does not compact: appends records superseding earlier ones without deleting them
    writes.append({"id": "x:1", "status": "error", "seen": [first], "ts": 1})
    writes.append({"id": "x:2", "status": "done", "seen": [first], "ts": 1})
    writes.append({"id": "x:3", "status": "processing", "seen": ["x:1"], "ts": 2})
    before = resolved_status(doc, "b", "idx")
    assert before == "done"
    resolver.run()
    assert sorted(w["id"] for w in writes) == ["x:2", "x:3"]
    assert resolved_status(doc, "b", "idx") == materialised(doc) == before


def test_resolver_without_compaction_keeps_records(server) -> None:
    doc, _, _, _ = server
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "idx")
    writes = find_index_entry(doc, "b", "idx")["statusWrites"]
    writes.append({"id": "x:1", "status": "done", "seen": [writes[0]["id"]], "ts": 1})
    resolver = StatusResolver(doc, compact=False)
    assert resolver.run() == [StatusChange("b", "idx", "notStarted", "done")]
    assert len(writes) == 2
    resolver.close()


def test_loaded_document_is_resolved_on_first_run() -> None:
    source = Doc(client_id=1)
    create_block(source, "b", "p")
    add_index_entry(source, "b", "idx")
    find_index_entry(source, "b", "idx")["status"] = "stale"
    doc = Doc(client_id=2)
    sync(source, doc)
    resolver = StatusResolver(doc)
    assert resolver.run() == [StatusChange("b", "idx", "stale", "notStarted")]
    resolver.close()


def test_closed_resolver_ignores_updates(server) -> None:
    doc, resolver, _, _ = server
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "idx")
    resolver.run()
    resolver.close()
    find_index_entry(doc, "b", "idx")["status"] = "stale"
    assert resolver.run() == []


def test_typing_in_a_block_resolves_nothing_but_a_status_write_beside_it_does(server, monkeypatch) -> None:
    """A keystroke in `content` cannot change a status, so it must not make the resolver re-read the block's
    entries (that cost ~75 µs per keystroke); a status write in the same transaction still gets resolved."""
    doc, resolver, emitted, _ = server
    create_block(doc, "b", "p", "hello")
    create_block(doc, "other", "p")
    add_index_entry(doc, "b", "idx")
    resolver.run()
    planned: list[set[str]] = []
    plan = resolver._plan
    monkeypatch.setattr(resolver, "_plan", lambda ids: planned.append(set(ids)) or plan(ids))
    a = client(doc, 1)
    block_content(a, "b").insert(5, " world")
    sync(a, doc)
    assert resolver.run() == [] and planned == []
    with a.transaction():
        block_content(a, "b").insert(0, ">")
        find_index_entry(a, "b", "idx")["status"] = "stale"  # a client overwrote the materialised status
        block_content(a, "other").insert(0, "x")
    sync(a, doc)
    assert resolver.run() == [StatusChange("b", "idx", "stale", "notStarted")] == emitted[-1:]
    assert planned == [{"b"}]
    assert str(block_content(doc, "b")) == ">hello world"


def test_a_change_the_resolver_cannot_read_is_still_stored_and_then_every_block_is_checked(server,
                                                                                         monkeypatch) -> None:
    """The resolver's marks run inside the commit: a failure there must not stop the document's other
    observers (the room's, which stores the update), and the next run checks every block instead."""
    doc, resolver, _, updates = server
    create_block(doc, "b", "p")
    create_block(doc, "c", "p")
    add_index_entry(doc, "b", "idx")
    resolver.run()

    class Unwritable(set):
        def add(self, item: object) -> None:
            raise RuntimeError("cannot record the mark")

    monkeypatch.setattr(resolver, "_dirty", Unwritable())
    planned: list[set[str]] = []
    plan = resolver._plan
    monkeypatch.setattr(resolver, "_plan", lambda ids: planned.append(set(ids)) or plan(ids))
    a = client(doc, 1)
    find_index_entry(a, "b", "idx")["status"] = "stale"
    stored = len(updates)
    sync(a, doc)
    assert len(updates) == stored + 1
    assert resolver.run() == [StatusChange("b", "idx", "stale", "notStarted")]
    assert planned == [{"b", "c"}]


def test_a_run_fetches_only_the_entries_it_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycrdt fetches an Array item by position, each with a transaction and a wrapper: a run that read every entry
    of a block of thousands took tens of milliseconds per status write, hundreds at 3,000 entries, for every room
    on the process. A run reads the block's entries as JSON and fetches only those whose status it must fix."""
    doc = Doc()
    create_block(doc, "b", "p")
    for i in range(300):
        add_index_entry(doc, "b", f"i{i}")
    resolver = StatusResolver(doc)
    resolver.run()
    writer = Doc()
    writer.apply_update(doc.get_update())
    set_status(writer, "b", "i150", "done")
    fetched: list[int] = []  # positions fetched from the block's list of 300 entries
    get = Array.__getitem__
    monkeypatch.setattr(Array, "__getitem__",
                        lambda array, key: (len(array) == 300 and fetched.append(key)) or get(array, key))
    with doc.transaction():  # as a client's update comes: `status` is set by the writer, so make it stale
        doc.apply_update(writer.get_update(doc.get_state()))
        find_index_entry(doc, "b", "i150")["status"] = "notStarted"
    fetched.clear()
    assert [(c.index_name, c.new) for c in resolver.run()] == [("i150", "done")]
    assert fetched == [150]


def test_an_entry_made_without_status_writes_gets_them_before_concurrent_writers_race(server) -> None:
    """An entry made without `statusWrites` (a client writing the shape by hand): two writers offline each created
    the Array for their record, and the map kept one of the two Arrays, so one write was lost ("done" won over
    "error" in 6 runs of 9). The server gives such an entry its Array as soon as it sees it."""
    doc, resolver, _, _ = server
    author = client(doc, 1)
    create_block(author, "b", "p")
    with author.transaction():
        get_block(author, "b")["indexingList"].append(Map({"index_name": "idx", "status": "notStarted"}))
    sync(author, doc)
    resolver.run()
    a, b = client(doc, 2), client(doc, 3)  # they go offline, and write
    set_status(a, "b", "idx", "error")
    set_status(b, "b", "idx", "done")
    sync_all(doc, a, b)
    resolver.run()
    sync_all(doc, a, b)
    assert {resolved_status(replica, "b", "idx") for replica in (doc, a, b)} == {"error"}
    assert materialised(doc) == "error"
