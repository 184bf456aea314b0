"""Saved versions over HTTP: save, list, read, restore, and what deletion and compaction do to them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from collab_server.auth import issue_token
from collab_server.model import blocks_to_json, resolved_status
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess, wait_until


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


async def edit(http: httpx.AsyncClient, name: str, *ops: dict) -> dict:
    response = await http.post(f"/api/docs/{name}/blocks", json={"ops": list(ops)})
    assert response.status_code == 200, response.text
    return response.json()["blocks"]


def without_timestamps(blocks: dict) -> dict:
    """Blocks JSON with entries keyed by name and no timestamps (a restore writes statuses anew)."""
    return {bid: {**block, "indexingList": {e["index_name"]: {k: v for k, v in e.items() if k != "timestamp"}
                                            for e in block["indexingList"]}} for bid, block in blocks.items()}


async def test_a_saved_version_is_read_back_and_restored_while_a_client_watches(server: ServerProcess, http) -> None:
    await edit(http, "doc",
               {"op": "create_block", "id": "keep", "type": "paragraph", "content": "The quick fox"},
               {"op": "add_index", "id": "keep", "index_name": "search", "metadata": {"model": "v1"}},
               {"op": "add_index", "id": "keep", "index_name": "embed", "status": "done"},
               {"op": "create_block", "id": "gone", "type": "heading", "content": "Title"})
    saved = (await http.post("/api/docs/doc/versions", json={"label": "before the rewrite"})).json()
    assert saved["label"] == "before the rewrite" and saved["size"] > 0
    version_json = (await http.get("/api/docs/doc/json")).json()["blocks"]

    await edit(http, "doc",
               {"op": "set_content", "id": "keep", "content": "The slow fox"},
               {"op": "set_status", "id": "keep", "index_name": "search", "status": "error"},
               {"op": "set_metadata", "id": "keep", "index_name": "search", "metadata": {"model": "v2", "n": 1}},
               {"op": "remove_index", "id": "keep", "index_name": "embed"},
               {"op": "add_index", "id": "keep", "index_name": "new"},
               {"op": "delete_block", "id": "gone"},
               {"op": "create_block", "id": "extra", "type": "p"})
    second = (await http.post("/api/docs/doc/versions")).json()
    listed = (await http.get("/api/docs/doc/versions")).json()
    assert listed == {"name": "doc", "versions": [saved, second]} and second["label"] == ""

    read = (await http.get(f"/api/docs/doc/versions/{saved['id']}")).json()
    assert read == {"name": "doc", "version": saved["id"], "blocks": version_json}
    as_update = await http.get(f"/api/docs/doc/versions/{saved['id']}", params={"format": "update"})
    assert as_update.headers["content-type"] == "application/octet-stream"

    watcher = await RawPeer.connect(f"{server.ws_url}/doc")
    await watcher.sync()
    restored = await http.post(f"/api/docs/doc/versions/{saved['id']}/restore")
    assert restored.status_code == 200, restored.text
    assert without_timestamps(restored.json()["blocks"]) == without_timestamps(version_json)
    await watcher.wait_for(lambda: without_timestamps(blocks_to_json(watcher.doc)) == without_timestamps(version_json))
    assert resolved_status(watcher.doc, "keep", "search") == "notStarted"
    # the state before was saved first, so the restore can be undone
    before = restored.json()["saved_before"]
    assert before["label"] == f"before restoring version {saved['id']}"
    assert (await http.get("/api/docs/doc/versions")).json()["versions"] == [saved, second, before]
    undone = await http.post(f"/api/docs/doc/versions/{before['id']}/restore")
    assert without_timestamps(undone.json()["blocks"]) == without_timestamps(
        (await http.get(f"/api/docs/doc/versions/{second['id']}")).json()["blocks"])


async def test_versions_outlive_compaction_and_restarts_and_go_with_the_document(server_factory) -> None:
    server = server_factory("--compact-threshold", "5")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        await edit(http, "d", {"op": "create_block", "id": "b", "type": "p", "content": "v1"})
        saved = (await http.post("/api/docs/d/versions", json={"label": "one"})).json()
        for i in range(12):  # several compactions fold the log the version was taken from
            await edit(http, "d", {"op": "set_content", "id": "b", "content": f"v{i + 2}"})
        server.stop()
        server.start()
        read = (await http.get(f"/api/docs/d/versions/{saved['id']}")).json()
        assert read["blocks"]["b"]["content"] == "v1"
        assert (await http.delete("/api/docs/d")).status_code == 204
        await edit(http, "d", {"op": "create_block", "id": "b", "type": "p", "content": "new life"})
        assert (await http.get("/api/docs/d/versions")).json()["versions"] == []
        assert (await http.get(f"/api/docs/d/versions/{saved['id']}")).status_code == 404


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [
    ("POST", "/api/docs/never/versions", b"", 404, "no such document"),
    ("GET", "/api/docs/never/versions", None, 404, "no such document"),
    ("GET", "/api/docs/v/versions/999999", None, 404, "no such version"),
    ("GET", f"/api/docs/v/versions/{2**65}", None, 404, "no such version"),
    ("POST", "/api/docs/v/versions/999999/restore", None, 404, "no such version"),
    ("GET", "/api/docs/v/versions/1", {"format": "xml"}, 400, "format must be"),
    ("POST", "/api/docs/v/versions", b'{"label": 3}', 400, "expected {"),
    ("POST", "/api/docs/v/versions", b'{"label": "' + b"x" * 201 + b'"}', 400, "longer than 200"),
    ("POST", "/api/docs/v/versions", b"not json", 400, "not JSON"),
    ("POST", "/api/docs/v/versions", b'{"label": "\\ud800"}', 400, "lone surrogate"),
    ("POST", "/api/docs/v/versions", b'{"label": "a\\u0000b"}', 400, "control character"),
    ("POST", "/api/docs/v/versions", b"x" * 70_000, 413, "exceeds"),
])
async def test_bad_version_requests(http, method, path, body, status, error) -> None:
    await edit(http, "v", {"op": "create_block", "id": "b", "type": "p"})
    if method == "GET":
        response = await http.get(path, params=body or {})
    else:
        response = await http.post(path, content=body or b"")
    assert response.status_code == status and error in response.json()["error"], response.text


async def test_saving_and_restoring_need_a_read_write_token(server_factory) -> None:
    server = server_factory("--auth-required", "--auth-secret", "k")
    rw = {"Authorization": f"Bearer {issue_token('k', doc='a')}"}
    ro = {"Authorization": f"Bearer {issue_token('k', doc='a', access='ro')}"}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        ops = {"ops": [{"op": "create_block", "id": "b", "type": "p"}]}
        assert (await http.post("/api/docs/a/blocks", json=ops, headers=rw)).status_code == 200
        assert (await http.post("/api/docs/a/versions", headers=ro)).status_code == 403
        version = (await http.post("/api/docs/a/versions", headers=rw)).json()
        assert (await http.get("/api/docs/a/versions", headers=ro)).status_code == 200
        assert (await http.get(f"/api/docs/a/versions/{version['id']}", headers=ro)).status_code == 200
        assert (await http.post(f"/api/docs/a/versions/{version['id']}/restore", headers=ro)).status_code == 403
        assert (await http.post(f"/api/docs/a/versions/{version['id']}/restore", headers=rw)).status_code == 200
        assert (await http.get("/api/docs/a/versions")).status_code == 401


async def test_automatic_versions_come_an_interval_apart_and_only_the_newest_are_kept(server_factory) -> None:
    server = server_factory("--version-interval", "1", "--versions-keep", "2")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        async def versions() -> list[dict]:
            return (await http.get("/api/docs/auto/versions")).json()["versions"]

        await edit(http, "auto", {"op": "create_block", "id": "b", "type": "p", "content": "0"})
        mine = (await http.post("/api/docs/auto/versions", json={"label": "mine"})).json()
        started = time.time()
        for i in range(35):  # ~3.5 s of changes, 0.1 s apart
            await edit(http, "auto", {"op": "set_content", "id": "b", "content": str(i + 1)})
            await asyncio.sleep(0.1)
        await edit(http, "auto", {"op": "set_content", "id": "b", "content": "last"})
        elapsed = time.time() - started
        await wait_until(lambda: server.metric("collab_versions_saved_total") >= 3)
        saved = server.metric("collab_versions_saved_total")
        assert saved <= 2 + elapsed  # the first at the first change, then at most one a second
        listed = await versions()
        automatic = [v for v in listed if v["auto"]]
        assert mine in listed and len(automatic) == 2 and {v["label"] for v in automatic} == {"automatic"}
        assert automatic[1]["time"] - automatic[0]["time"] >= 1
        newest = (await http.get(f"/api/docs/auto/versions/{automatic[1]['id']}")).json()
        assert newest["blocks"]["b"]["content"] != "0"


async def test_the_interval_counts_from_the_stored_versions_across_restarts(server_factory) -> None:
    server = server_factory("--version-interval", "3600")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        await edit(http, "kept", {"op": "create_block", "id": "b", "type": "p", "content": "first"})
        await wait_until(lambda: server.metric("collab_versions_saved_total") == 1)
        server.stop()
        server.start()
        await edit(http, "kept", {"op": "set_content", "id": "b", "content": "second"})
        await edit(http, "other", {"op": "create_block", "id": "b", "type": "p"})  # a new document: saved
        await wait_until(lambda: server.metric("collab_versions_saved_total") == 1)
        versions = (await http.get("/api/docs/kept/versions")).json()["versions"]
        assert [v["auto"] for v in versions] == [True]
        assert (await http.get("/api/docs/other/versions")).json()["versions"][0]["auto"]


async def test_a_document_or_one_of_its_versions_is_copied_to_a_new_document(server: ServerProcess, http) -> None:
    await edit(http, "template", {"op": "create_block", "id": "b", "type": "p", "content": "v1"},
               {"op": "add_index", "id": "b", "index_name": "search", "status": "done"})
    first = (await http.post("/api/docs/template/versions")).json()
    await edit(http, "template", {"op": "set_content", "id": "b", "content": "v2"})
    watcher = await RawPeer.connect(f"{server.ws_url}/team/copy")
    await watcher.sync()

    copied = await http.post("/api/docs/template/copy", json={"to": "team/copy"})
    assert copied.status_code == 201 and copied.json() == {"name": "team/copy", "from": "template"}
    source = (await http.get("/api/docs/template/json")).json()["blocks"]
    assert (await http.get("/api/docs/team/copy/json")).json()["blocks"] == source
    await watcher.wait_for(lambda: blocks_to_json(watcher.doc) == source)
    # the copy is a document of its own
    await edit(http, "team/copy", {"op": "set_content", "id": "b", "content": "changed in the copy"})
    assert (await http.get("/api/docs/template/json")).json()["blocks"] == source

    old = await http.post("/api/docs/template/copy", json={"to": "from-v1", "version": first["id"]})
    assert old.status_code == 201
    assert (await http.get("/api/docs/from-v1/json")).json()["blocks"]["b"]["content"] == "v1"


@pytest.mark.parametrize(("source", "body", "status", "error"), [
    ("template", {"to": "taken"}, 409, "exists"),
    ("never", {"to": "new"}, 404, "no such document"),
    ("template", {"to": "new", "version": 999999}, 404, "no such version"),
    ("template", {"to": "new", "version": -(2**70)}, 404, "no such version"),
    ("template", {"to": "template"}, 409, "exists"),
    ("template", {}, 400, "expected"),
    ("template", {"to": 3}, 400, "invalid document name"),
    ("template", {"to": "c\ud83d"}, 400, "invalid document name"),  # a lone surrogate: no UTF-8 form
    ("template", {"to": "new", "version": "1"}, 400, "expected"),
    ("template", {"to": "new", "extra": 1}, 400, "expected"),
])
async def test_bad_copies(http, source, body, status, error) -> None:
    await edit(http, "template", {"op": "create_block", "id": "b", "type": "p"})
    await edit(http, "taken", {"op": "create_block", "id": "t", "type": "p"})
    response = await http.post(f"/api/docs/{source}/copy", content=json.dumps(body),  # lone surrogates escaped
                               headers={"content-type": "application/json"})
    assert response.status_code == status and error in response.json()["error"], response.text
    assert (await http.get("/api/docs/new/json")).status_code == 404
    assert set((await http.get("/api/docs/taken/json")).json()["blocks"]) == {"t"}


async def test_a_copy_needs_read_access_to_the_source_and_write_access_to_the_target(server_factory) -> None:
    server = server_factory("--auth-required", "--auth-secret", "k")
    team = {"Authorization": f"Bearer {issue_token('k', prefix='team/')}"}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        ops = {"ops": [{"op": "create_block", "id": "b", "type": "p"}]}
        assert (await http.post("/api/docs/team/a/blocks", json=ops, headers=team)).status_code == 200
        outside = await http.post("/api/docs/team/a/copy", json={"to": "elsewhere/a"}, headers=team)
        assert outside.status_code == 403
        viewer = {"Authorization": f"Bearer {issue_token('k', prefix='team/', access='ro')}"}
        assert (await http.post("/api/docs/team/a/copy", json={"to": "team/b"}, headers=viewer)).status_code == 403
        assert (await http.post("/api/docs/team/a/copy", json={"to": "team/b"}, headers=team)).status_code == 201
