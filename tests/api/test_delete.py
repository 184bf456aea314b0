"""Deleting a document over the HTTP API: its connections closed, its rows erased, other documents untouched."""

from __future__ import annotations

import sqlite3

import httpx
from pycrdt import Doc, Text

from collab_server.auth import issue_token
from tests.jspeer import JsPeer
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess, wait_until

SECRET = "s3cret"


def text(peer: RawPeer) -> str:
    return str(peer.doc.get("t", type=Text))


def stored_rows(db, name: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {table: conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (name,)).fetchone()[0]
                for table, column in (("updates", "doc"), ("checkpoints", "name"), ("documents", "name"))}


async def test_deleting_a_document_closes_its_connections_and_erases_it(server_factory) -> None:
    server: ServerProcess = server_factory("--compact-threshold", "5")
    name = "team/gone"
    writer = await RawPeer.connect(f"{server.ws_url}/{name}")
    await writer.sync()
    for word in "one two three four five six seven".split():  # a checkpoint and a log
        await writer.edit(lambda d, w=word: d.get("t", type=Text).insert(0, w))
        await writer.sync()  # committed before the next, so each is a log entry of its own
    await writer.wait_for(lambda: text(writer).startswith("seven"))
    await wait_until(lambda: stored_rows(server.db, name)["checkpoints"] == 1)
    bystander = await RawPeer.connect(f"{server.ws_url}/kept")
    await bystander.sync()
    await bystander.edit(lambda d: d.get("t", type=Text).insert(0, "kept"))
    await bystander.wait_for(lambda: text(bystander) == "kept")

    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        assert (await http.delete(f"/api/docs/{name}")).status_code == 204
        assert await writer.wait_closed() == (4410, "document deleted")
        assert stored_rows(server.db, name) == {"updates": 0, "checkpoints": 0, "documents": 0}
        assert (await http.get(f"/api/docs/{name}/json")).status_code == 404
        assert [d["name"] for d in (await http.get("/api/docs")).json()["docs"]] == ["kept"]
        again = await http.delete(f"/api/docs/{name}")
        assert again.status_code == 404 and again.json() == {"error": "no such document"}

        await bystander.edit(lambda d: d.get("t", type=Text).insert(4, "!"))  # another room never noticed
        await bystander.wait_for(lambda: text(bystander) == "kept!")
        assert not bystander.closed.is_set()

        fresh = await RawPeer.connect(f"{server.ws_url}/{name}")  # the name starts over, empty
        await fresh.sync()
        assert text(fresh) == "" and fresh.doc.get_state() == b"\x00"
        await fresh.edit(lambda d: d.get("t", type=Text).insert(0, "anew"))
        await fresh.wait_for(lambda: text(fresh) == "anew")
        await fresh.close()
    await bystander.close()
    server.stop()
    server.start()
    after_restart = await RawPeer.connect(f"{server.ws_url}/{name}")
    await after_restart.sync()
    assert text(after_restart) == "anew"  # nothing of the deleted document came back from storage
    await after_restart.close()


async def test_a_name_ending_in_an_operation_is_deleted_whole(server) -> None:
    doc = Doc()
    doc.get("t", type=Text).insert(0, "x")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        for name in ("notes", "notes/json"):
            assert (await http.post(f"/api/docs/{name}/update", content=doc.get_update())).status_code == 204
        assert (await http.delete("/api/docs/notes/json")).status_code == 204
        assert [d["name"] for d in (await http.get("/api/docs")).json()["docs"]] == ["notes"]
        assert (await http.get("/api/docs/notes/json")).status_code == 200


async def test_deleting_needs_a_read_write_token(server_factory) -> None:
    server = server_factory("--auth-required", "--auth-secret", SECRET)
    doc = Doc()
    doc.get("t", type=Text).insert(0, "x")
    rw, ro = issue_token(SECRET, doc="d"), issue_token(SECRET, doc="d", access="ro")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        await http.post("/api/docs/d/update", params={"token": rw}, content=doc.get_update())
        assert (await http.delete("/api/docs/d")).status_code == 401
        for token in (ro, issue_token(SECRET, doc="other")):
            refused = await http.delete("/api/docs/d", params={"token": token})
            assert refused.status_code == 403 and refused.json()["error"]
        assert (await http.get("/api/docs/d/json", params={"token": ro})).status_code == 200
        assert (await http.delete("/api/docs/d", headers={"authorization": f"Bearer {rw}"})).status_code == 204
        assert (await http.get("/api/docs/d/json", params={"token": ro})).status_code == 404


async def test_y_websocket_clients_stop_for_good_and_do_not_bring_it_back(server) -> None:
    """y-websocket treats close codes 4400-4499 as permanent: the provider stops reconnecting (its `closed`
    event), so the replicas it holds are not sent back to the empty document."""
    async with JsPeer("alice") as alice, JsPeer("bob") as bob:
        for peer in (alice, bob):
            await peer.connect(server.ws_url, "shared/notes")
        await alice.call("text_insert", index=0, text="written before the delete")
        await bob.wait_for("doc.text === 'written before the delete'")
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            assert (await http.delete("/api/docs/shared/notes")).status_code == 204
            for peer in (alice, bob):
                closed = await peer.wait_event("closed")
                assert (closed["code"], closed["reason"]) == (4410, "document deleted")
            await alice.call("text_insert", index=0, text="after ")  # stays local
            assert (await alice.state()).status == "disconnected"
            assert (await http.get("/api/docs/shared/notes/json")).status_code == 404
            assert (await http.get("/api/docs")).json()["docs"] == []


async def test_a_delete_that_storage_refuses_deletes_nothing(server_factory) -> None:
    """The outcome reaches the clients only once storage has answered: a failed delete closes them with
    1011, which clients retry, and the document is still there when they do."""
    server = server_factory()
    peer = await RawPeer.connect(f"{server.ws_url}/kept")
    await peer.sync()
    await peer.edit(lambda d: d.get("t", type=Text).insert(0, "still here"))
    await peer.wait_for(lambda: text(peer) == "still here")
    with sqlite3.connect(server.db) as ext:
        ext.execute("CREATE TRIGGER no_delete BEFORE DELETE ON documents BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        refused = await http.delete("/api/docs/kept")
        assert refused.status_code == 503 and "disk says no" in refused.json()["error"]
    assert await peer.wait_closed() == (1011, "storage failure: document not deleted")
    with sqlite3.connect(server.db) as ext:
        ext.execute("DROP TRIGGER no_delete")
    again = await RawPeer.connect(f"{server.ws_url}/kept")
    await again.sync()
    assert text(again) == "still here"
    await again.close()
