"""Real npm yjs + y-websocket clients against our server: convergence, offline edits, awareness."""

from __future__ import annotations

import asyncio

import pytest

from tests.jspeer import JsPeer

ROOM = "interop"


async def edit_everything(p: JsPeer, who: str) -> None:
    await p.call("map_set", key=who, value={"who": who, "nested": [1, 2, {"deep": True}]})
    await p.call("map_set", key="conflict", value=who)
    await p.call("text_insert", index=0, text=f"<{who}>")
    await p.call("array_push", values=[who, len(who)])


async def test_concurrent_edits_converge(server, peer):
    alice, bob = await asyncio.gather(peer("alice", server.ws_url, ROOM), peer("bob", server.ws_url, ROOM))

    await asyncio.gather(edit_everything(alice, "alice"), edit_everything(bob, "bob"))

    complete = "Object.keys(doc.map).length === 3 && doc.text.length === 12 && doc.array.length === 4"
    a, b = await asyncio.gather(alice.wait_for(complete), bob.wait_for(complete))
    assert a.doc == b.doc
    assert a.doc["map"]["alice"] == {"who": "alice", "nested": [1, 2, {"deep": True}]}
    assert a.doc["map"]["conflict"] in ("alice", "bob")
    assert sorted(a.doc["text"].replace(">", ">\n").split()) == ["<alice>", "<bob>"]
    assert sorted(map(str, a.doc["array"])) == ["3", "5", "alice", "bob"]
    assert await alice.state_vector() == await bob.state_vector()


async def test_offline_edits_merge_on_reconnect(server, peer):
    alice, bob = await asyncio.gather(peer("alice", server.ws_url, ROOM), peer("bob", server.ws_url, ROOM))
    await alice.call("text_insert", index=0, text="base")
    await bob.wait_for("doc.text === 'base'")

    await alice.call("disconnect")  # returns once the closing handshake is done
    await alice.call("text_insert", index=0, text="A:")
    await alice.call("map_set", key="offline", value="alice")
    await bob.call("text_insert", index=4, text=":B")
    await bob.call("map_set", key="online", value="bob")
    assert (await alice.state()).doc["text"] == "A:base"  # alice really is offline

    await alice.reconnect()
    merged = "doc.text === 'A:base:B' && doc.map.offline === 'alice' && doc.map.online === 'bob'"
    await asyncio.gather(alice.wait_for(merged), bob.wait_for(merged))

    carol = await peer("carol", server.ws_url, ROOM)  # the server holds the merged document
    assert (await carol.state()).doc == (await alice.state()).doc


async def test_query_string_is_not_part_of_the_room_name(server, peer):
    alice = await peer("alice")
    await alice.connect(server.ws_url, ROOM, params={"token": "anything"})
    bob = await peer("bob", server.ws_url, ROOM)
    await alice.call("map_set", key="k", value="v")
    await bob.wait_for("doc.map.k === 'v'")


async def test_late_joiner_receives_existing_awareness(server, peer):
    # a fresh client's state {} has clock 0, which y-protocols never applies: every state here is set explicitly
    olivia = await peer("olivia")
    await olivia.call("set_awareness", state={"user": "olivia"})
    await olivia.connect(server.ws_url, ROOM)
    alice = await peer("alice")
    await alice.call("set_awareness", state={"user": "alice"})
    await alice.connect(server.ws_url, ROOM)
    alice_id = (await alice.state()).client_id
    await olivia.wait_for(f"awareness[{alice_id}]?.user === 'alice'")  # the server holds alice's state now

    bob = await peer("bob", server.ws_url, ROOM)
    # alice renews her state only every 15 s: within 5 s it can only come from the server's join reply
    joined = await bob.wait_for(f"awareness[{alice_id}]?.user === 'alice'", timeout=5)
    everyone = {alice_id, joined.client_id, (await olivia.state()).client_id}
    assert set(joined.awareness) == everyone
    assert joined.awareness_seen == everyone  # no phantom server peer


async def test_a_crowded_room_keeps_every_joiner(server, peer):
    """y-websocket sends back every awareness state it receives: a client joining a room of 19 others sends
    their 19 states at once. Those change nothing and must not count toward a connection's client-id limit
    (16), or every joiner past the 17th is closed with 1008 and reconnects in a loop."""
    peers = []
    for i in range(20):  # one after another: each joins a room that holds every earlier presence
        p = await peer(f"p{i}")
        await p.call("set_awareness", state={"user": f"p{i}"})
        await p.connect(server.ws_url, ROOM)
        peers.append(p)
        ids = [(await q.state()).client_id for q in peers]
        await p.wait_for(f"[{', '.join(map(str, ids))}].every(id => awareness[id]?.user)")
    last = await peers[-1].state()
    assert len(last.awareness) == 20 and last.status == "connected"
    for p in peers:
        assert not [e for e in p.events if e["event"] == "connection-close"], p.events
    assert "awareness clients" not in server.log()


@pytest.mark.parametrize("how", ["kill_process", "drop_socket"])
async def test_awareness_removed_when_peer_vanishes(server, peer, how):
    alice = await peer("alice", server.ws_url, ROOM)
    bob = await peer("bob")
    await bob.call("set_awareness", state={"user": "bob"})
    await bob.connect(server.ws_url, ROOM)
    bob_id = (await bob.state()).client_id
    await alice.wait_for(f"awareness[{bob_id}]?.user === 'bob'")

    if how == "kill_process":
        await bob.kill()
    else:
        await bob.call("terminate", reconnect=False)
    # clients time remote states out only after 30 s: a removal within 5 s is the server's broadcast
    after = await alice.wait_for(f"!({bob_id} in awareness)", timeout=5)
    assert after.status == "connected"
    assert set(after.awareness) == {after.client_id}


@pytest.mark.slow
async def test_no_phantom_awareness_peer_across_a_renewal_period(server, peer):
    alice, bob = await asyncio.gather(peer("alice", server.ws_url, ROOM), peer("bob", server.ws_url, ROOM))
    await bob.call("set_awareness", state={"user": "bob"})
    bob_id = (await bob.state()).client_id
    # y-protocols renews a local state 15-18 s after its last change; the server had as long to show a phantom
    renewed = await alice.wait_for(f"awareness_clocks[{bob_id}] >= 2", timeout=25)
    assert renewed.awareness_seen == {renewed.client_id, bob_id}
    # bob hears of alice at her first renewal (y-protocols ignores a new client's state at clock 0, and alice never
    # set one), which may come a moment after his own: wait for it rather than race it
    heard = await bob.wait_for(f"awareness_clocks[{renewed.client_id}] >= 1", timeout=10)
    assert heard.awareness_seen == {renewed.client_id, bob_id}
