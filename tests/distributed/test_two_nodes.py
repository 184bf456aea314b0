"""Two real server processes sharing one PostgreSQL and one Redis: clients on either node see one document."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx

import pytest
from pycrdt import Doc, Text
from websockets.exceptions import ConnectionClosed

from collab_server import protocol as p
from collab_server.model import blocks_to_json
from collab_server.replay import apply
from collab_server.surrogates import Characters
from tests.distributed.cluster import Cluster
from tests.rawclient import RawPeer, deletion, second_unit, text_updates, two_changes
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.distributed


def text(doc: Doc) -> str:
    return str(doc.get("t", type=Text))


def rebuild(updates: list[bytes]) -> Doc:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def assert_contains(stored: Doc, received: Doc) -> None:
    """Everything `received` holds is in `stored`: applying it changes nothing."""
    before = stored.get_state()
    stored.apply_update(received.get_update())
    assert stored.get_state() == before, "a client received an update that was never stored"


async def send_all(peer: RawPeer, updates: list[bytes]) -> None:
    try:
        for update in updates:
            await peer.send(p.sync_update(update))
    except ConnectionClosed:  # the node was killed mid-burst
        return


def updates_received(peer: RawPeer) -> list[p.SyncMessage]:
    return [m for m in peer.messages if isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE]


async def peer_on_each(cluster: Cluster, a: ServerProcess, b: ServerProcess) -> tuple[RawPeer, RawPeer]:
    """A peer on node `a` and one on node `b`, both in the test's room and synced."""
    on_a = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    on_b = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")
    await asyncio.gather(on_a.sync(), on_b.sync())
    return on_a, on_b


async def kill_mid_burst(cluster: Cluster, a: ServerProcess, b: ServerProcess) -> RawPeer:
    """A writer on node `a` bursts 3,000 updates; `a` is SIGKILLed once a watcher on `b` holds 500 of them.
    Returns the watcher, still connected to `b`."""
    writer, watcher = await peer_on_each(cluster, a, b)
    _, updates = text_updates(3000)
    sender = asyncio.create_task(send_all(writer, updates))
    await watcher.wait_for(lambda: len(text(watcher.doc)) >= 500, 30)
    a.kill()
    await sender
    return watcher


async def test_clients_on_two_nodes_converge(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    alice, bob = await peer_on_each(cluster, a, b)
    doc_a, updates_a = text_updates(200)
    doc_b, updates_b = text_updates(200)
    await asyncio.gather(send_all(alice, updates_a), send_all(bob, updates_b))
    expected = text(rebuild([doc_a.get_update(), doc_b.get_update()]))
    await alice.wait_for(lambda: text(alice.doc) == expected, 20)
    await bob.wait_for(lambda: text(bob.doc) == expected, 20)
    assert text(rebuild(await cluster.stored_updates())) == expected
    # each update was committed once, by the node that received it
    assert len(await cluster.stored_updates()) <= len(updates_a) + len(updates_b)


async def test_awareness_crosses_nodes(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    alice, bob = await peer_on_each(cluster, a, b)
    state = json.dumps({"user": "alice"})
    await alice.send(p.encode_awareness([p.AwarenessEntry(111, 1, state)]))
    await bob.wait_for(lambda: bob.awareness.get(111) == state)
    await bob.send(p.encode_awareness([p.AwarenessEntry(222, 1, json.dumps({"user": "bob"}))]))
    await alice.wait_for(lambda: 222 in alice.awareness)
    await bob.send(p.encode_awareness([p.AwarenessEntry(222, 2, "null")]))  # bob's own removal, as on close
    await alice.wait_for(lambda: 222 not in alice.awareness)
    alice.ws.transport.abort()  # node a removes alice's presence, and node b hears of it
    await bob.wait_for(lambda: 111 not in bob.awareness)


async def test_late_joiner_on_other_node_gets_everything_committed(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    writer = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    doc, updates = text_updates(300)
    await send_all(writer, updates)
    await writer.wait_for(lambda: text(writer.doc) == text(doc), 20)  # echoed, so committed
    late = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")
    await late.sync()
    assert text(late.doc) == text(doc)


async def test_sigkill_mid_burst_keeps_everything_the_other_node_served(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    watcher = await kill_mid_burst(cluster, a, b)
    stored = rebuild(await cluster.stored_updates())
    assert len(text(watcher.doc)) >= 500
    assert_contains(stored, watcher.doc)  # b never served an update that is not in PostgreSQL
    assert text(stored).startswith(text(watcher.doc))
    a.start()
    fresh_a = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    await fresh_a.sync()
    assert text(fresh_a.doc) == text(stored)
    # until its next resync, b's loaded room may lack what a committed but never published; a fresh load has it all
    await watcher.close()
    b.stop()
    b.start()
    fresh_b = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")
    await fresh_b.sync()
    assert text(fresh_b.doc) == text(stored)


async def test_loaded_room_on_other_node_catches_up_after_a_crash(cluster: Cluster) -> None:
    """A node killed between commit and publish: the other node's loaded room catches up from storage (resync),
    and its clients receive what they missed without reconnecting."""
    a, b = cluster.start_node("a"), cluster.start_node("b", "--resync-interval", "0.5")
    watcher = await kill_mid_burst(cluster, a, b)
    stored = text(rebuild(await cluster.stored_updates()))
    await watcher.wait_for(lambda: text(watcher.doc) == stored, 10)


async def test_a_document_deleted_on_one_node_is_dropped_by_the_other(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    on_a, on_b = await peer_on_each(cluster, a, b)
    doc, updates = text_updates(50)
    await send_all(on_a, updates)
    await on_b.wait_for(lambda: text(on_b.doc) == text(doc), 20)
    async with httpx.AsyncClient(base_url=a.http_url, timeout=10) as http:
        assert (await http.delete(f"/api/docs/{cluster.room}")).status_code == 204
    assert await on_a.wait_closed() == (4410, "document deleted")
    assert await on_b.wait_closed() == (4410, "document deleted")  # node b heard of it through the broker
    assert await cluster.stored_updates() == []
    fresh = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")  # node b reloads the document: empty
    await fresh.sync()
    assert text(fresh.doc) == "" and fresh.doc.get_state() == b"\x00"
    await fresh.close()


async def test_a_deletion_whose_event_was_lost_is_found_by_resync(cluster: Cluster) -> None:
    """The deleting node's broker event never arrived (Redis was away): the periodic resync sees the stored
    document gone and drops the loaded room as the event would have."""
    b = cluster.start_node("b", "--resync-interval", "0.3")
    peer = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")
    await peer.sync()
    doc, updates = text_updates(20)
    await send_all(peer, updates)
    await peer.wait_for(lambda: text(peer.doc) == text(doc), 20)  # echoed, so stored
    conn = await asyncpg.connect(cluster.dsn)
    try:  # what another node's delete does, without its event
        await conn.execute("DELETE FROM documents WHERE name = $1", cluster.room)
        await conn.execute("DELETE FROM updates WHERE doc = $1", cluster.room)
    finally:
        await conn.close()
    assert await peer.wait_closed() == (4410, "document deleted")


async def test_a_version_saved_on_one_node_is_restored_from_the_other(cluster: Cluster) -> None:
    """Versions live in the shared store; a restore on node b reaches a client of node a through the broker."""
    a, b = cluster.start_node("a"), cluster.start_node("b")
    watcher = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    await watcher.sync()
    ops = {"ops": [{"op": "create_block", "id": "b1", "type": "p", "content": "saved"}]}
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.post(f"{a.http_url}/api/docs/{cluster.room}/blocks", json=ops)).status_code == 200
        saved = (await http.post(f"{a.http_url}/api/docs/{cluster.room}/versions")).json()
        ops = {"ops": [{"op": "set_content", "id": "b1", "content": "changed"}, {"op": "create_block", "id": "b2",
                                                                                  "type": "p"}]}
        assert (await http.post(f"{a.http_url}/api/docs/{cluster.room}/blocks", json=ops)).status_code == 200
        listed = (await http.get(f"{b.http_url}/api/docs/{cluster.room}/versions")).json()["versions"]
        assert listed == [saved]
        restored = await http.post(f"{b.http_url}/api/docs/{cluster.room}/versions/{saved['id']}/restore")
        assert restored.status_code == 200 and set(restored.json()["blocks"]) == {"b1"}
    await watcher.wait_for(lambda: set(blocks_to_json(watcher.doc)) == {"b1"}
                           and blocks_to_json(watcher.doc)["b1"]["content"] == "saved", 20)


async def test_a_character_cut_on_one_node_is_cut_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.start_node("a"), cluster.start_node("b")
    alice, bob = await peer_on_each(cluster, a, b)
    await alice.edit(lambda d: d.get("t", type=Text).insert(0, "a😀b"))
    await bob.wait_for(lambda: text(bob.doc) == "a😀b")  # node b has the room loaded
    await alice.send(p.sync_update(deletion(*second_unit(alice.doc))))  # the emoji's second UTF-16 unit
    await bob.wait_for(lambda: text(bob.doc) != "a😀b", 20)  # node b relayed the deletion
    late = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")
    await late.sync()
    assert text(late.doc) == "a\ufffdb"
    doc, characters = Doc(), Characters()
    for update in await cluster.stored_updates():
        doc = apply(doc, update, characters)
    assert text(doc) == "a\ufffdb"


async def test_a_change_that_waits_for_another_nodes_change_is_stored_and_reaches_everyone(cluster: Cluster) -> None:
    """A client's change whose causal dependency node a does not have yet (it was made on top of a change that
    reaches node b later): yrs holds it back, emits nothing, and integrates it when the dependency comes through
    the broker. It must still be stored, and relayed to every client of both nodes."""
    a, b = cluster.start_node("a"), cluster.start_node("b")
    alice, bob = await peer_on_each(cluster, a, b)
    first, later = two_changes("ab", 1, "X")
    carol = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    await carol.sync()
    relayed = len(updates_received(alice))
    await carol.send(p.sync_update(later))  # node a cannot integrate it yet
    await alice.wait_for(lambda: len(updates_received(alice)) > relayed)  # committed and relayed as it is
    dave = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")  # syncs a document that holds it back
    await dave.sync()
    await bob.send(p.sync_update(first))
    for peer in (alice, bob, carol, dave):
        await peer.wait_for(lambda peer=peer: text(peer.doc) == "aXb", 20)
    assert text(rebuild(await cluster.stored_updates())) == "aXb"
    for node in (a, b):
        late = await RawPeer.connect(f"{node.ws_url}/{cluster.room}")
        await late.sync()
        assert text(late.doc) == "aXb"


async def test_a_read_through_another_node_holds_what_one_node_acknowledged(cluster: Cluster) -> None:
    """A change acknowledged on node A (committed, echoed), read at once through node B, whose room is loaded: it
    was missing while A's broadcast was on its way (8 reads in 40, a tester). B now catches the room up with storage
    before a request reads it. Here the nodes share no Redis and B runs no periodic resync, so only that does."""
    a = cluster.start_node("a")
    b = cluster.start_node("b", "--redis-url", cluster.redis_url.rsplit("/", 1)[0] + "/15", "--resync-interval", "0")
    on_b = await RawPeer.connect(f"{b.ws_url}/{cluster.room}")  # keeps the room loaded on B
    await on_b.sync()
    on_a = await RawPeer.connect(f"{a.ws_url}/{cluster.room}")
    await on_a.sync()
    async with httpx.AsyncClient(base_url=a.http_url) as http_a, httpx.AsyncClient(base_url=b.http_url) as http_b:
        for i in range(3):
            content = f"v{i}"
            ops = [{"op": "create_block", "id": "b", "type": "p"}, {"op": "set_content", "id": "b", "content": content}]
            assert (await http_a.post(f"/api/docs/{cluster.room}/blocks", json={"ops": ops})).status_code == 200
            assert (await http_b.get(f"/api/docs/{cluster.room}/json")).json()["blocks"]["b"]["content"] == content
        saved = (await http_b.post(f"/api/docs/{cluster.room}/versions")).json()
        version = await http_b.get(f"/api/docs/{cluster.room}/versions/{saved['id']}")
        assert version.json()["blocks"]["b"]["content"] == "v2"
    await on_b.wait_for(lambda: "b" in blocks_to_json(on_b.doc))  # B's clients got it with the catch-up
    await on_a.close()
    await on_b.close()


async def test_two_restores_through_two_nodes_at_once_leave_one_of_the_versions(cluster: Cluster) -> None:
    """Each restore computed its edits from its node's document, which lacked the other's: the document ended with
    the blocks of both versions (5 runs in 9, a tester). Restores now take turns across nodes, the second reading
    what the first wrote."""
    a, b = cluster.start_node("a"), cluster.start_node("b")
    async with httpx.AsyncClient(timeout=20) as http:
        url = f"/api/docs/{cluster.room}"
        versions = []
        for only in ("v1only", "v2only"):
            ops = [{"op": "delete_block", "id": "v1only"}, {"op": "create_block", "id": only, "type": "p"}]
            assert (await http.post(f"{a.http_url}{url}/blocks", json={"ops": ops})).status_code == 200
            versions.append((await http.post(f"{a.http_url}{url}/versions")).json()["id"])
        for _ in range(4):
            ops = [{"op": "delete_block", "id": "v1only"}, {"op": "delete_block", "id": "v2only"},
                   {"op": "create_block", "id": "x", "type": "p"}]  # neither version
            assert (await http.post(f"{a.http_url}{url}/blocks", json={"ops": ops})).status_code == 200
            await http.get(f"{b.http_url}{url}/json")  # loaded on both nodes, each holding "x"
            answers = await asyncio.gather(http.post(f"{a.http_url}{url}/versions/{versions[0]}/restore"),
                                           http.post(f"{b.http_url}{url}/versions/{versions[1]}/restore"))
            assert [answer.status_code for answer in answers] == [200, 200]
            blocks = set((await http.get(f"{a.http_url}{url}/json")).json()["blocks"])
            assert blocks in ({"v1only"}, {"v2only"})
