"""Durability seen through real clients: restarts, crashes mid-burst, clients leaving or vanishing mid-burst."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.jspeer import PeerError, PeerFactory, PeerState

ROOM = "persist"


async def fresh_view(peer: PeerFactory, url: str, room: str = ROOM) -> tuple[PeerState, dict[int, int]]:
    """What a brand-new client gets from the server: its synced state and state vector."""
    reader = await peer(f"reader-{room}", url, room)
    state, vector = await reader.state(), await reader.state_vector()
    await reader.close()
    return state, vector


def missing(stored: dict[int, int], seen: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Clients whose updates were seen but are not (all) stored: clientID -> (stored clock, seen clock)."""
    return {client: (stored.get(client, 0), clock) for client, clock in seen.items() if stored.get(client, 0) < clock}


def tokens(text: str) -> int:
    return text.count(";")


async def test_graceful_restart_restores_documents(server, peer):
    rooms = ["doc-one", "doc-two"]
    expected = {}
    for room in rooms:
        alice, bob = await asyncio.gather(peer("alice", server.ws_url, room), peer("bob", server.ws_url, room))
        await alice.call("text_insert", index=0, text=f"héllo wörld 🌍 in {room}")
        await bob.call("map_set", key="nested", value={"list": [1, "two", {"three": 3.5}], "flag": True})
        await bob.call("array_push", values=["a", "b", "c", "d"])
        await alice.call("map_set", key="gone", value="soon")
        both = "doc.map.gone === 'soon' && doc.array.length === 4 && doc.text.includes('🌍')"
        await asyncio.gather(alice.wait_for(both), bob.wait_for(both))
        await alice.call("text_delete", index=0, length=6)  # deletions must survive too
        await bob.call("array_delete", index=1, length=2)
        await alice.call("map_delete", key="gone")
        done = "!('gone' in doc.map) && doc.array.length === 2 && doc.text.startsWith('wörld')"
        settled, _ = await asyncio.gather(alice.wait_for(done), bob.wait_for(done))
        expected[room] = (settled.doc, await alice.state_vector())
        await asyncio.gather(alice.close(), bob.close())  # nobody may re-upload the document after the restart

    server.stop()
    server.start()

    for room in rooms:
        state, vector = await fresh_view(peer, server.ws_url, room)
        assert (state.doc, vector) == expected[room]


@pytest.mark.slow
async def test_crash_mid_burst_keeps_every_update_an_observer_saw(server, peer):
    writer, observer = await asyncio.gather(peer("writer", server.ws_url, ROOM),
                                            peer("observer", server.ws_url, ROOM))
    burst = asyncio.create_task(writer.call("burst", n=20000, kind="text", timeout=120))
    await observer.wait_for("doc.text.split(';').length > 500", timeout=30)

    server.kill()
    closes = await asyncio.gather(writer.wait_event("connection-close"), observer.wait_event("connection-close"))
    assert [close["code"] for close in closes] == [1006, 1006]  # abnormal closure: no closing handshake
    seen_state, seen_vector = await observer.state(), await observer.state_vector()
    await observer.close()
    sent = (await burst)["sent"]
    await writer.close()  # before the restart: its offline copy must not repair the server's
    assert tokens(seen_state.doc["text"]) < sent < 20000, "the crash must hit the middle of the burst"

    server.start()
    stored_state, stored_vector = await fresh_view(peer, server.ws_url)
    assert missing(stored_vector, seen_vector) == {}
    assert stored_state.doc["text"].startswith(seen_state.doc["text"])


async def test_updates_sent_before_the_last_client_leaves_are_stored(server, peer):
    writer = await peer("writer", server.ws_url, ROOM)
    # all 1000 updates are queued on the socket at once, then the client leaves: the server is still busy
    result = await writer.call("burst", n=1000, kind="text", yield_every=0, then_disconnect=True)
    assert result["sent"] == 1000
    sent_vector = await writer.state_vector()
    await writer.close()

    reloaded = await peer("reloaded", server.ws_url, ROOM)  # the room may be unloading or gone by now
    await reloaded.wait_for("doc.text.split(';').length > 1000")
    await reloaded.close()
    server.stop()
    server.start()
    stored_state, stored_vector = await fresh_view(peer, server.ws_url)
    assert missing(stored_vector, sent_vector) == {}
    assert tokens(stored_state.doc["text"]) == 1000


@pytest.mark.slow
async def test_clients_vanishing_mid_burst_do_not_break_the_room(server, peer):
    observer = await peer("observer", server.ws_url, ROOM)
    writers = await asyncio.gather(*(peer(f"writer{i}", server.ws_url, ROOM) for i in range(3)))
    killed, dropped, survivor = writers
    # the two that vanish would need seconds to finish their bursts: they surely vanish in the middle
    sizes = [20000, 20000, 5000]
    bursts = [asyncio.create_task(w.call("burst", n=n, kind="map", tag=f"w{i}-", timeout=120))
              for i, (w, n) in enumerate(zip(writers, sizes, strict=True))]
    everyone_started = " && ".join(f"Object.keys(doc.map).some(k => k.startsWith('w{i}-'))" for i in range(3))
    await observer.wait_for(everyone_started, timeout=30)

    await killed.kill()  # the process dies: its socket closes without a closing handshake
    await dropped.call("terminate", reconnect=False)  # the socket is destroyed mid-stream
    with pytest.raises(PeerError):
        await bursts[0]
    assert (await bursts[1])["sent"] < 20000
    assert (await bursts[2])["sent"] == 5000
    await survivor.call("map_set", key="after", value="still syncing")
    await observer.wait_for("doc.map.after === 'still syncing' && "
                            "Object.keys(doc.map).filter(k => k.startsWith('w2-')).length === 5000", timeout=30)
    assert server.alive()
    latecomer = await peer("latecomer", server.ws_url, ROOM)
    await latecomer.wait_for("doc.map.after === 'still syncing'")

    seen_vector = await observer.state_vector()
    for p in (observer, latecomer, survivor, dropped):
        await p.close()
    server.stop()
    server.start()
    _, stored_vector = await fresh_view(peer, server.ws_url)
    assert missing(stored_vector, seen_vector) == {}


@pytest.mark.slow
async def test_repeated_crashes_across_rooms_lose_nothing_and_every_client_converges(server_factory, peer):
    """Three rooms, three y-websocket clients writing in each, a fold every 50 log rows; the server is
    SIGKILLed four times while they write and restarted on the same port, and the clients reconnect on their
    own, replaying what they wrote while it was down. The clients write until the last restart, however long
    the crashes take on a busy machine."""
    server = server_factory("--compact-threshold", "50")
    rooms = [f"chaos-{r}" for r in range(3)]
    writers = {room: await asyncio.gather(*(peer(f"{room}-w{i}", server.ws_url, room) for i in range(3)))
               for room in rooms}
    bursts = {room: [asyncio.create_task(w.call("burst", n=10**6, kind="map", tag=f"w{i}-", pause_ms=4, timeout=600))
                     for i, w in enumerate(ws)] for room, ws in writers.items()}
    others = "Object.keys(doc.map).filter(k => k.startsWith('w1-')).length"
    for _ in range(4):
        # before each crash, every room carries fresh edits from one client to another through this server
        for first, _, _ in writers.values():
            seen = sum(key.startswith("w1-") for key in (await first.state()).doc["map"])
            await first.wait_for(f"{others} >= {seen + 50}", timeout=30)
        server.kill()
        server.start()
    await asyncio.gather(*(w.call("stop_burst") for ws in writers.values() for w in ws))

    results = {room: await asyncio.gather(*tasks) for room, tasks in bursts.items()}
    assert any(r["sent"] < r["n"] for made in results.values() for r in made), "some edits must have been made offline"
    made = {room: sum(r["n"] for r in results[room]) for room in rooms}
    for room, ws in writers.items():
        await asyncio.gather(*(w.wait_for(f"Object.keys(doc.map).length === {made[room]}", timeout=60) for w in ws))
    vectors = {room: await ws[0].state_vector() for room, ws in writers.items()}
    server.kill()  # once more, after every client has everything
    await asyncio.gather(*(w.close() for ws in writers.values() for w in ws))  # none may repair the server

    server.start()
    for room in rooms:
        state, vector = await fresh_view(peer, server.ws_url, room)
        assert (len(state.doc["map"]), vector) == (made[room], vectors[room])
    with sqlite3.connect(server.db) as db:
        folded = {name for (name,) in db.execute("SELECT name FROM checkpoints")}
    assert folded == set(rooms)
    assert "Traceback" not in server.log() and "level=ERROR" not in server.log()


async def test_characters_cut_between_their_utf16_units_are_stored_as_yjs_holds_them(server_factory, peer):
    # Yjs counts text in UTF-16 units: a client may cut an emoji in two, and every Yjs replica then holds two
    # U+FFFD where it was. yrs alone kept the emoji and encoded the document without the cut and all after it.
    server = server_factory("--compact-threshold", "3")
    alice, bob = await asyncio.gather(peer("alice", server.ws_url, ROOM), peer("bob", server.ws_url, ROOM))
    await alice.call("text_insert", index=0, text="a😀b👍c")
    await bob.wait_for("doc.text === 'a😀b👍c'")
    await bob.call("text_delete", index=2, length=1)  # the second unit of 😀
    await alice.wait_for("doc.text === 'a\\ufffdb👍c'")
    await alice.call("text_insert", index=4, text="Z")  # between the two units of 👍
    for i in range(6):  # more log entries than the compaction threshold
        await bob.wait_for(f"doc.text.length === {7 + i}")
        await bob.call("text_insert", index=0, text=str(i))
    expected = "543210a\ufffdb\ufffdZ\ufffdc"
    a, b = await asyncio.gather(alice.wait_for(f"doc.text === {expected!r}"), bob.wait_for(f"doc.text === {expected!r}"))
    vector = await alice.state_vector()
    assert a.doc == b.doc and vector == await bob.state_vector()

    server.kill()
    await asyncio.gather(alice.close(), bob.close())  # nothing of theirs can repair the server's copy
    server.start()
    stored_state, stored_vector = await fresh_view(peer, server.ws_url)
    assert stored_state.doc["text"] == expected
    assert stored_vector == vector


def content_client(phase: str, url: str, file: Path) -> None:
    """Run tests/js/content.mjs: real y-websocket clients writing every kind of Yjs content, or checking it."""
    script = Path(__file__).parents[1] / "js" / "content.mjs"
    proc = subprocess.run(["node", str(script), phase, url, ROOM, str(file)], capture_output=True, text=True,
                          timeout=120, cwd=script.parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]


async def test_every_kind_of_content_yjs_apps_write_is_relayed_and_stored(server, tmp_path):
    # rich text, ProseMirror-style XML, binary, nested types, a subdocument, undo, a 1 MB paste, emoji cut in two
    content_client("edit", server.ws_url, tmp_path / "doc.bin")
    server.kill()
    server.start()
    content_client("check", server.ws_url, tmp_path / "doc.bin")
