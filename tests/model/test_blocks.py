"""Block model API and the status examples from the spec, on real pycrdt replicas."""

from __future__ import annotations

import pytest
from pycrdt import Doc

from collab_server.model import (
    add_index_entry,
    block_content,
    blocks_to_json,
    create_block,
    delete_block,
    find_index_entry,
    get_block,
    remove_index_entry,
    resolved_status,
    set_status,
)
from tests.model.replicas import sync, sync_all


def replicas(n: int) -> list[Doc]:
    """``n`` synced replicas sharing block ``b`` with entry ``idx``."""
    docs = [Doc(client_id=i + 1) for i in range(n)]
    create_block(docs[0], "b", "paragraph", "hello")
    add_index_entry(docs[0], "b", "idx", ts=1)
    sync_all(*docs)
    return docs


def writes(doc: Doc) -> list[dict]:
    return list(find_index_entry(doc, "b", "idx")["statusWrites"])


def test_block_crud_and_json_export() -> None:
    doc = Doc()
    create_block(doc, "b", "paragraph", "hi")
    create_block(doc, "b", "other")  # existing block is returned unchanged
    assert get_block(doc, "b")["type"] == "paragraph"
    block_content(doc, "b").insert(2, " there")
    add_index_entry(doc, "b", "search", metadata={"model": "m1", "dims": 3}, ts=5)
    add_index_entry(doc, "b", "search", status="done")  # existing entry is returned unchanged
    assert blocks_to_json(doc) == {"b": {
        "id": "b", "type": "paragraph", "content": "hi there",
        "indexingList": [{"index_name": "search", "model": "m1", "dims": 3,
                          "status": "notStarted", "timestamp": 5}],
    }}
    assert remove_index_entry(doc, "b", "search") and not remove_index_entry(doc, "b", "search")
    assert resolved_status(doc, "b", "search") is None
    assert delete_block(doc, "b") and not delete_block(doc, "b")
    assert blocks_to_json(doc) == {}


def test_reserved_metadata_and_missing_targets_are_rejected() -> None:
    doc = Doc()
    create_block(doc, "b", "p")
    with pytest.raises(ValueError):
        add_index_entry(doc, "b", "i", metadata={"status": "done"})
    with pytest.raises(KeyError):
        set_status(doc, "b", "nope", "done")
    with pytest.raises(KeyError):
        add_index_entry(doc, "missing", "i")


def test_concurrent_done_and_error_resolve_to_error() -> None:
    a, b = replicas(2)
    set_status(a, "b", "idx", "done")
    set_status(b, "b", "idx", "error")
    sync_all(a, b)
    assert resolved_status(a, "b", "idx") == resolved_status(b, "b", "idx") == "error"
    assert sorted(w["status"] for w in writes(a)) == ["done", "error"]


def test_retry_that_saw_error_moves_to_processing() -> None:
    a, b = replicas(2)
    set_status(a, "b", "idx", "error")
    sync(a, b)
    set_status(b, "b", "idx", "processing")
    sync_all(a, b)
    assert resolved_status(a, "b", "idx") == resolved_status(b, "b", "idx") == "processing"
    assert [w["status"] for w in writes(a)] == ["processing"]


def test_stale_processing_arriving_after_done_stays_done() -> None:
    worker, offline = replicas(2)
    set_status(offline, "b", "idx", "processing")  # made offline, never saw the later writes
    set_status(worker, "b", "idx", "processing")
    set_status(worker, "b", "idx", "done")
    assert resolved_status(offline, "b", "idx") == "processing"
    sync_all(worker, offline)
    assert resolved_status(worker, "b", "idx") == resolved_status(offline, "b", "idx") == "done"


def test_template_entries_and_content_edits_merge() -> None:
    template, workflow = replicas(2)
    add_index_entry(template, "b", "vector", metadata={"model": "m"})
    add_index_entry(template, "b", "keyword")
    block_content(workflow, "b").insert(5, " world")
    set_status(workflow, "b", "idx", "processing")
    sync_all(template, workflow)
    assert blocks_to_json(template) == blocks_to_json(workflow)
    block = blocks_to_json(template)["b"]
    assert block["content"] == "hello world"
    assert [e["index_name"] for e in block["indexingList"]] == ["idx", "vector", "keyword"]
    assert block["indexingList"][0]["status"] == "processing"


def test_write_records_the_frontier_it_saw_and_compacts_it() -> None:
    a, b = replicas(2)
    set_status(a, "b", "idx", "done")
    set_status(b, "b", "idx", "error")
    sync_all(a, b)
    concurrent = sorted(w["id"] for w in writes(a))
    set_status(a, "b", "idx", "processing")
    (retry,) = writes(a)
    assert sorted(retry["seen"]) == concurrent and retry["status"] == "processing"
    assert retry["id"].startswith(f"{a.client_id}:")
