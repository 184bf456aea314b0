"""The status resolver runs on the server: concurrent writes resolve everywhere, a retry still wins."""

import httpx
from pycrdt import Array, Map

from collab_server import protocol as p
from collab_server.model import add_index_entry, create_block, resolved_status, set_status
from tests.rawclient import RawPeer, deletion, second_unit


def materialised(peer: RawPeer) -> str | None:
    entry = peer.doc.get("blocks", type=Map)["b1"]["indexingList"][0]
    return entry["status"]


async def test_concurrent_statuses_resolve_on_every_replica_and_a_retry_wins(server) -> None:
    # the higher client id wins a plain map key: alice's "done" lands in `status`, so the server must fix it
    alice = await RawPeer.connect(f"{server.ws_url}/room", client_id=2000)
    bob = await RawPeer.connect(f"{server.ws_url}/room", client_id=1000)
    await alice.edit(lambda d: (create_block(d, "b1", "paragraph", "hello"), add_index_entry(d, "b1", "search")))
    await bob.wait_for(lambda: resolved_status(bob.doc, "b1", "search") == "notStarted")
    # both work offline and write concurrently: neither has seen the other's write
    done = alice.edit_offline(lambda d: set_status(d, "b1", "search", "done"))
    error = bob.edit_offline(lambda d: set_status(d, "b1", "search", "error"))
    await alice.send(p.sync_update(done))
    await bob.send(p.sync_update(error))
    for peer in (alice, bob):
        await peer.wait_for(lambda peer=peer: materialised(peer) == "error"
                            and resolved_status(peer.doc, "b1", "search") == "error")
    # a retry made after seeing the error supersedes it
    await alice.edit(lambda d: set_status(d, "b1", "search", "processing"))
    for peer in (alice, bob):
        await peer.wait_for(lambda peer=peer: materialised(peer) == "processing"
                            and resolved_status(peer.doc, "b1", "search") == "processing")
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert materialised(fresh) == "processing"
    metrics = httpx.get(f"{server.http_url}/metrics").text
    assert "collab_resolver_actions_total 1.0" in metrics  # only the conflict needed the server to write


async def test_documents_outside_the_block_model_are_served_and_stored(server) -> None:
    odd = await RawPeer.connect(f"{server.ws_url}/odd")
    await odd.edit(lambda d: d.get("blocks", type=Map).__setitem__("x", "not a block"))
    other = await RawPeer.connect(f"{server.ws_url}/odd2")
    await other.edit(lambda d: d.get("blocks", type=Array).append("not a map either"))
    for peer in (odd, other):
        await peer.wait_for(lambda peer=peer: any(
            isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE for m in peer.messages))
    server.stop()
    server.start()
    again = await RawPeer.connect(f"{server.ws_url}/odd")
    await again.sync()
    assert again.doc.get("blocks", type=Map)["x"] == "not a block"


async def test_statuses_still_resolve_after_the_room_rebuilds_its_document(server) -> None:
    # A Yjs client deleting the second UTF-16 unit of an emoji makes the room rebuild its document
    # (surrogates.py); the resolver must follow it to the new one.
    alice = await RawPeer.connect(f"{server.ws_url}/emoji", client_id=2000)
    bob = await RawPeer.connect(f"{server.ws_url}/emoji", client_id=1000)
    await alice.edit(lambda d: (create_block(d, "b1", "paragraph", "a😀b"), add_index_entry(d, "b1", "search")))
    await bob.wait_for(lambda: resolved_status(bob.doc, "b1", "search") == "notStarted")
    carol = await RawPeer.connect(f"{server.ws_url}/emoji")
    await carol.send(p.sync_update(deletion(*second_unit(alice.doc))))

    done = alice.edit_offline(lambda d: set_status(d, "b1", "search", "done"))
    error = bob.edit_offline(lambda d: set_status(d, "b1", "search", "error"))
    await alice.send(p.sync_update(done))
    await bob.send(p.sync_update(error))
    for peer in (alice, bob):
        await peer.wait_for(lambda peer=peer: materialised(peer) == "error")
    fresh = await RawPeer.connect(f"{server.ws_url}/emoji")
    await fresh.sync()
    assert materialised(fresh) == "error"
    assert str(fresh.doc.get("blocks", type=Map)["b1"]["content"]) == "a\ufffdb"
    assert "room rebuilt" in server.log()
