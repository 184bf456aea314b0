"""JSON edits of the block model over HTTP (POST /api/docs/{name}/blocks), against a real server process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from collab_server import protocol as p
from collab_server.auth import issue_token
from collab_server.model import (
    add_index_entry,
    block_content,
    blocks_to_json,
    create_block,
    resolved_status,
    set_status,
)
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


async def edit(http: httpx.AsyncClient, name: str, *ops: dict, expect: int = 200) -> dict:
    response = await http.post(f"/api/docs/{name}/blocks", json={"ops": list(ops)})
    assert response.status_code == expect, response.text
    return response.json()


async def test_a_worker_builds_and_updates_blocks_and_clients_see_each_change(server: ServerProcess, http) -> None:
    watcher = await RawPeer.connect(f"{server.ws_url}/team/doc")
    await watcher.sync()
    answer = await edit(http, "team/doc",
                        {"op": "create_block", "id": "b1", "type": "paragraph", "content": "hello"},
                        {"op": "add_index", "id": "b1", "index_name": "search", "metadata": {"model": "v2"}},
                        {"op": "create_block", "id": "b2", "type": "heading"})
    assert answer == {"name": "team/doc", "blocks": {
        "b1": {"id": "b1", "type": "paragraph", "content": "hello",
               "indexingList": [{"index_name": "search", "model": "v2", "status": "notStarted",
                                 "timestamp": answer["blocks"]["b1"]["indexingList"][0]["timestamp"]}]},
        "b2": {"id": "b2", "type": "heading", "content": "", "indexingList": []}}}
    await watcher.wait_for(lambda: set(blocks_to_json(watcher.doc)) == {"b1", "b2"})

    answer = await edit(http, "team/doc",
                        {"op": "set_status", "id": "b1", "index_name": "search", "status": "processing"},
                        {"op": "set_metadata", "id": "b1", "index_name": "search",
                         "metadata": {"model": None, "chunks": 12, "tags": ["a", {"b": 1.5}]}},
                        {"op": "set_content", "id": "b1", "content": "hello, world"},
                        {"op": "delete_block", "id": "b2"})
    entry = answer["blocks"]["b1"]["indexingList"][0]
    assert (entry["status"], entry["chunks"], entry["tags"], "model" in entry) == (
        "processing", 12, ["a", {"b": 1.5}], False)
    assert answer["blocks"]["b1"]["content"] == "hello, world" and answer["blocks"]["b2"] is None
    await watcher.wait_for(lambda: resolved_status(watcher.doc, "b1", "search") == "processing"
                           and set(blocks_to_json(watcher.doc)) == {"b1"})
    assert str(block_content(watcher.doc, "b1")) == "hello, world"
    assert (await http.get("/api/docs/team/doc/json")).json()["blocks"] == blocks_to_json(watcher.doc)


async def test_set_content_replaces_only_what_differs_so_a_concurrent_edit_survives(server, http) -> None:
    await edit(http, "d", {"op": "create_block", "id": "b", "type": "p", "content": "The quick fox 😀 jumps"})
    writer = await RawPeer.connect(f"{server.ws_url}/d")
    await writer.sync()
    # an edit inside the text, which the HTTP request below has not seen
    offline = writer.edit_offline(lambda doc: block_content(doc, "b").insert(len("The quick fox".encode()), "!"))
    await edit(http, "d", {"op": "set_content", "id": "b", "content": "The slow brown fox 😀 jumps"})
    await writer.send(p.sync_update(offline))
    await writer.wait_for(lambda: str(block_content(writer.doc, "b")) == "The slow brown fox! 😀 jumps")
    fresh = await RawPeer.connect(f"{server.ws_url}/d")
    await fresh.sync()
    assert str(block_content(fresh.doc, "b")) == "The slow brown fox! 😀 jumps"


async def test_set_content_with_expect_refuses_to_overwrite_what_the_caller_has_not_read(server, http) -> None:
    """A worker reads "hello world", a user types "TYPED " at the start, the worker sets "hello world!": the span
    that differs from what the server holds was replaced, and the typing lost. With `expect` (what it read) the
    batch is refused with 409 and changes nothing; read again, it appends safely."""
    await edit(http, "e", {"op": "create_block", "id": "b", "type": "p", "content": "hello world"})
    read = (await http.get("/api/docs/e/json")).json()["blocks"]["b"]["content"]
    typist = await RawPeer.connect(f"{server.ws_url}/e")
    await typist.sync()
    await typist.edit(lambda doc: block_content(doc, "b").insert(0, "TYPED "))
    await typist.sync()  # the server holds it
    answer = await edit(http, "e", {"op": "add_index", "id": "b", "index_name": "ix"},
                        {"op": "set_content", "id": "b", "content": read + "!", "expect": read}, expect=409)
    assert "changed since it was read" in answer["error"]
    blocks = (await http.get("/api/docs/e/json")).json()["blocks"]
    assert blocks["b"]["content"] == "TYPED hello world" and blocks["b"]["indexingList"] == []
    read = blocks["b"]["content"]
    await edit(http, "e", {"op": "set_content", "id": "b", "content": read + "!", "expect": read},
               {"op": "set_content", "id": "b", "content": read + "!!", "expect": read + "!"})
    await typist.wait_for(lambda: str(block_content(typist.doc, "b")) == "TYPED hello world!!")


async def test_set_status_with_expect_refuses_to_supersede_a_status_the_caller_has_not_read(server, http) -> None:
    """An HTTP write has seen every status the server holds: a worker that read "processing" and reports "done"
    after a client wrote "error" erased the error unseen. With `expect` (the status it read) the batch is refused
    with 409 and changes nothing; a retry that read the error supersedes it."""
    await edit(http, "x", {"op": "create_block", "id": "b", "type": "p"},
               {"op": "add_index", "id": "b", "index_name": "ix", "status": "processing"})
    read = (await http.get("/api/docs/x/json")).json()["blocks"]["b"]["indexingList"][0]["status"]
    client = await RawPeer.connect(f"{server.ws_url}/x")
    await client.sync()
    await client.edit(lambda doc: set_status(doc, "b", "ix", "error"))
    await client.sync()  # the server holds it
    answer = await edit(http, "x", {"op": "set_metadata", "id": "b", "index_name": "ix", "metadata": {"n": 1}},
                        {"op": "set_status", "id": "b", "index_name": "ix", "status": "done", "expect": read},
                        expect=409)
    assert "changed since it was read" in answer["error"]
    entry = (await http.get("/api/docs/x/json")).json()["blocks"]["b"]["indexingList"][0]
    assert entry["status"] == "error" and "n" not in entry
    answer = await edit(http, "x",
                        {"op": "set_status", "id": "b", "index_name": "ix", "status": "processing", "expect": "error"},
                        {"op": "set_status", "id": "b", "index_name": "ix", "status": "done", "expect": "processing"},
                        {"op": "add_index", "id": "b", "index_name": "new", "status": "done"},
                        {"op": "set_status", "id": "b", "index_name": "new", "status": "error", "expect": "done"})
    assert [e["status"] for e in answer["blocks"]["b"]["indexingList"]] == ["done", "error"]
    await edit(http, "x", {"op": "remove_index", "id": "b", "index_name": "new"},
               {"op": "add_index", "id": "b", "index_name": "new"},
               {"op": "set_status", "id": "b", "index_name": "new", "status": "done", "expect": "error"}, expect=409)
    await edit(http, "x", {"op": "set_status", "id": "b", "index_name": "ix", "status": "done", "expect": 3}, expect=400)


async def test_a_status_written_over_http_follows_the_resolver(server, http) -> None:
    """An HTTP write has seen the frontier the server holds: it supersedes that, and is concurrent with a
    write the server has not seen yet (resolved by priority)."""
    client = await RawPeer.connect(f"{server.ws_url}/s")
    await client.sync()
    await client.edit(lambda doc: (create_block(doc, "b", "p"), add_index_entry(doc, "b", "ix")))
    await client.edit(lambda doc: set_status(doc, "b", "ix", "error"))
    answer = await edit(http, "s", {"op": "set_status", "id": "b", "index_name": "ix", "status": "processing"})
    assert answer["blocks"]["b"]["indexingList"][0]["status"] == "processing"  # a retry after the error
    stale = client.edit_offline(lambda doc: set_status(doc, "b", "ix", "done"))  # made before seeing it
    await edit(http, "s", {"op": "set_status", "id": "b", "index_name": "ix", "status": "notStarted"})
    await client.send(p.sync_update(stale))
    await client.wait_for(lambda: resolved_status(client.doc, "b", "ix") == "done")
    blocks = (await http.get("/api/docs/s/json")).json()["blocks"]
    assert blocks["b"]["indexingList"][0]["status"] == "done"


DEEP: list = []
for _ in range(40):
    DEEP = [DEEP]


@pytest.mark.parametrize(("ops", "status", "error"), [
    ([{"op": "set_status", "id": "missing", "index_name": "ix", "status": "done"}], 404, "no block 'missing'"),
    ([{"op": "set_status", "id": "b", "index_name": "nope", "status": "done"}], 404, "no index entry 'nope'"),
    ([{"op": "set_status", "id": "b", "index_name": "ix", "status": "finished"}], 400, "status must be one of"),
    ([{"op": "add_index", "id": "b", "index_name": "j", "metadata": {"status": "x"}}], 400, "reserved entry keys"),
    ([{"op": "set_metadata", "id": "b", "index_name": "ix", "metadata": {"n": 2**60}}], 400, "integer beyond"),
    ([{"op": "set_metadata", "id": "b", "index_name": "ix", "metadata": {"n": DEEP}}], 400, "deeper than 32"),
    ([{"op": "rename", "id": "b"}], 400, "op must be one of"),
    ([{"op": {}, "id": "b"}], 400, "op must be one of"),
    ([{"op": "set_status", "id": "b", "index_name": "ix", "status": {}}], 400, "status must be one of"),
    ([{"op": "create_block", "id": "c"}], 400, "missing type"),
    ([{"op": "create_block", "id": "", "type": "p"}], 400, "must not be empty"),
    ([{"op": "delete_block", "id": "b", "force": True}], 400, "unknown fields ['force']"),
    ([], 400, "expected 1 to"),
])
async def test_a_batch_with_an_op_that_cannot_apply_changes_nothing(http, ops, status, error) -> None:
    await edit(http, "atomic", {"op": "create_block", "id": "b", "type": "p", "content": "kept"},
               {"op": "add_index", "id": "b", "index_name": "ix"})
    before = (await http.get("/api/docs/atomic/update")).content
    # earlier ops of the batch would apply; the failing one makes the whole batch refused
    answer = await edit(http, "atomic", {"op": "set_content", "id": "b", "content": "changed"},
                        {"op": "create_block", "id": "new", "type": "p"}, *ops, expect=status) if ops else \
        await edit(http, "atomic", expect=status)
    assert error in answer["error"]
    assert (await http.get("/api/docs/atomic/update")).content == before


@pytest.mark.parametrize(("body", "error"), [
    (b"{", "not JSON"), (b"[]", 'expected {"ops"'), (b'{"ops": 1}', 'expected {"ops"'),
    (b'{"ops": [], "x": 1}', 'expected {"ops"'), (b'{"ops": [{"op": "set_metadata", "id": "b", '
                                                  b'"index_name": "i", "metadata": {"n": NaN}}]}', "finite"),
    (b"[" * 100_000, "not JSON"), (b"", "empty body"),
    (b'{"ops": [{"op": "create_block", "id": "b\\ud800", "type": "p"}]}', "lone surrogate"),
    (b'{"ops": [{"op": "create_block", "id": "b", "type": "p", "content": "\\udc00"}]}', "lone surrogate"),
    (b'{"ops": [{"op": "add_index", "id": "b", "index_name": "i", "metadata": {"k\\ud800": 1}}]}', "lone surrogate"),
    (b'{"ops": [{"op": "add_index", "id": "b", "index_name": "i", "metadata": {"k": ["\\ud800"]}}]}',
     "lone surrogate"),
])
async def test_malformed_bodies_are_refused(http, body, error) -> None:
    response = await http.post("/api/docs/bad/blocks", content=body)
    assert response.status_code == 400 and error in response.json()["error"]
    assert (await http.get("/api/docs/bad/json")).status_code == 404  # nothing was stored


async def test_edits_need_a_read_write_token(server_factory) -> None:
    server = server_factory("--auth-required", "--auth-secret", "k")
    op = {"ops": [{"op": "create_block", "id": "b", "type": "p"}]}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        assert (await http.post("/api/docs/a/blocks", json=op)).status_code == 401
        ro = issue_token("k", doc="a", access="ro")
        response = await http.post("/api/docs/a/blocks", json=op, headers={"Authorization": f"Bearer {ro}"})
        assert response.status_code == 403 and "read-only" in response.json()["error"]
        rw = issue_token("k", doc="a")
        response = await http.post("/api/docs/a/blocks", json=op, headers={"Authorization": f"Bearer {rw}"})
        assert response.status_code == 200


async def test_edits_survive_a_restart(server: ServerProcess, http) -> None:
    await edit(http, "kept", {"op": "create_block", "id": "b", "type": "p", "content": "durable"},
               {"op": "add_index", "id": "b", "index_name": "ix", "status": "done"})
    server.stop()
    server.start()
    peer = await RawPeer.connect(f"{server.ws_url}/kept")
    await peer.sync()
    assert str(block_content(peer.doc, "b")) == "durable" and resolved_status(peer.doc, "b", "ix") == "done"

