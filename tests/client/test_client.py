"""CollabClient end to end, against the y-websocket reference server and ours (fixture ``upstream``)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pycrdt import Doc, Text, merge_updates
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from client_py import Backoff, CollabClient, DocumentDeleted, ServerClosed
from client_py.client import PART_BYTES, parts
from collab_server.auth import issue_token
from collab_server.model import add_index_entry, blocks_to_json, create_block, set_status
from collab_server.protocol import (AwarenessMessage, SyncMessage, SyncType, decode_awareness, decode_message,
                                    sync_step1, sync_step2, sync_update)
from tests.client.refserver import RefServer
from tests.client.relay import Relay
from tests.jspeer import JsPeer
from tests.rawclient import RawPeer, cut_before_it_came, deletion, second_unit, two_waiting_on_one
from tests.serverproc import ROOT, ServerProcess, free_port

FAST = Backoff(base=0.02, max=0.2)


def room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


def text(client: CollabClient) -> str:
    return str(client.doc.get("t", type=Text))


async def test_two_clients_sync_both_ways(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with CollabClient(upstream.ws_url, name) as a, CollabClient(upstream.ws_url, name) as b:
        await a.synced()
        await b.synced()
        a.doc.get("t", type=Text).insert(0, "hello")
        await b.wait_until(lambda: text(b) == "hello")
        b.doc.get("t", type=Text).insert(5, " world")
        await a.wait_until(lambda: text(a) == "hello world")


async def server_text(url: str, name: str) -> str:
    async with CollabClient(url, name) as reader:
        await reader.synced()
        return text(reader)


async def test_flush_waits_until_the_server_has_the_edits(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with Relay(upstream.ws_url) as relay:
        async with CollabClient(relay.url, name, backoff=FAST) as client:
            await client.synced()
            client.doc.get("t", type=Text).insert(0, "a")
            await client.flush()
            assert await server_text(upstream.ws_url, name) == "a"
            relay.go_offline()
            await client.wait_until(lambda: not client.connected)
            client.doc.get("t", type=Text).insert(1, "b")
            with pytest.raises(TimeoutError):
                await client.flush(timeout=0.3)  # cannot be confirmed while the network is down
            relay.go_online()
            await client.flush()
            assert await server_text(upstream.ws_url, name) == "ab"


def _sync_frames(frames: list[bytes], kind: SyncType) -> list[bytes]:
    messages = [decode_message(frame) for frame in frames]
    return [m.payload for m in messages if isinstance(m, SyncMessage) and m.kind == kind]


async def test_remote_updates_are_never_sent_back(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with Relay(upstream.ws_url) as relay_a, Relay(upstream.ws_url) as relay_b:
        async with CollabClient(relay_a.url, name) as a, CollabClient(relay_b.url, name) as b:
            await a.synced()
            await b.synced()
            ta, tb = a.doc.get("t", type=Text), b.doc.get("t", type=Text)
            for i in range(20):
                ta += f"{i},"
            expected = "".join(f"{i}," for i in range(20))
            await b.wait_until(lambda: str(tb) == expected)
            tb += "!"
            await a.wait_until(lambda: str(ta) == expected + "!")
    # One update frame per local transaction; nothing received (nor the reference server's echo) goes back.
    sent_by_a = _sync_frames(relay_a.sent, SyncType.UPDATE)
    sent_by_b = _sync_frames(relay_b.sent, SyncType.UPDATE)
    assert (len(sent_by_a), len(sent_by_b)) == (20, 1)
    assert not set(sent_by_a) & set(sent_by_b)
    assert len(_sync_frames(relay_a.sent, SyncType.STEP2)) == 1  # one handshake, one connection


async def test_awareness_join_update_and_leave(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with CollabClient(upstream.ws_url, name) as a:
        a.set_awareness({"user": "a"})  # before connecting: announced once the link is up
        await a.synced()
        async with Relay(upstream.ws_url) as relay:
            async with CollabClient(relay.url, name) as b:
                await b.wait_until(lambda: b.peers == {a.doc.client_id: {"user": "a"}})
                b.set_awareness({"user": "b"})
                await a.wait_until(lambda: a.peers == {b.doc.client_id: {"user": "b"}})
                a.set_awareness({"user": "a", "cursor": 3})
                await b.wait_until(lambda: b.peers == {a.doc.client_id: {"user": "a", "cursor": 3}})
            await a.wait_until(lambda: a.peers == {})
        # b withdrew its own state on clean close (not only the server noticing the disconnect).
        last = [decode_message(f) for f in relay.sent][-1]
        assert isinstance(last, AwarenessMessage)
        [entry] = decode_awareness(last.payload)
        assert (entry.client_id, entry.removed) == (b.doc.client_id, True)


async def test_peers_are_forgotten_when_the_link_drops(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with Relay(upstream.ws_url) as relay:
        async with CollabClient(upstream.ws_url, name) as a, CollabClient(relay.url, name, backoff=FAST) as b:
            a.set_awareness({"user": "a"})
            await b.wait_until(lambda: b.peers == {a.doc.client_id: {"user": "a"}})
            relay.go_offline()
            await b.wait_until(lambda: not b.connected and b.peers == {})
            relay.go_online()
            await b.wait_until(lambda: b.peers == {a.doc.client_id: {"user": "a"}})


@dataclass(frozen=True)
class RecordingBackoff(Backoff):
    delays: list[float] = field(default_factory=list)

    def delay(self, attempt: int) -> float:
        self.delays.append(super().delay(attempt))
        return self.delays[-1]


async def test_reconnects_with_backoff_after_server_restart(upstream: RefServer | ServerProcess) -> None:
    name = room()
    backoff = RecordingBackoff(base=0.05, max=0.4, jitter=0)
    async with CollabClient(upstream.ws_url, name, backoff=backoff) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "before")
        upstream.kill()
        await client.wait_until(lambda: len(backoff.delays) >= 5)
        assert not client.connected
        client.doc.get("t", type=Text).insert(6, " during")
        assert backoff.delays[:5] == [0.05, 0.1, 0.2, 0.4, 0.4]
        await asyncio.to_thread(upstream.start)
        await client.synced(timeout=15)
    # The client re-uploaded what the server lacks (for the in-memory reference server: everything).
    async with CollabClient(upstream.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == "before during"


async def test_a_server_whose_commits_fail_is_left_alone_for_its_retry_after(server: ServerProcess) -> None:
    """Our server refuses websockets with 503 and Retry-After: 5 while its commits fail; the client waits that
    long instead of its (here 10 ms) backoff, then re-sends its edit once storage works again."""
    name = room()
    async with CollabClient(server.ws_url, name, backoff=Backoff(base=0.01, max=0.01, jitter=0)) as client:
        await client.synced()
        with sqlite3.connect(server.db) as ext:
            ext.execute("CREATE TRIGGER fail BEFORE INSERT ON updates BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        client.doc.get("t", type=Text).insert(0, "kept")
        await client.wait_until(lambda: isinstance(client.last_error, InvalidStatus))  # the 1011, then a 503
        with sqlite3.connect(server.db) as ext:
            ext.execute("DROP TRIGGER fail")
        await client.flush(timeout=15)  # the server has the edit: it came back after 5 s
    assert server.metric('collab_errors_total{kind="storage_refused"}') == 1  # not one every 10 ms
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        stored = Doc()
        stored.apply_update((await http.get(f"/api/docs/{name}/update")).content)
    assert str(stored.get("t", type=Text)) == "kept"


async def test_a_deleted_document_is_not_uploaded_again(server: ServerProcess, tmp_path: Path) -> None:
    """Reconnecting after the server deleted the document would send the whole replica back: the client stops,
    and its store remembers, so a client started again on it does not connect either."""
    name, store = room(), tmp_path / "client.db"
    backoff = RecordingBackoff(base=0.02, max=0.2, jitter=0)
    async with CollabClient(server.ws_url, name, backoff=backoff, store=store) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "doomed")
        await client.flush()
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.delete(f"/api/docs/{name}")).status_code == 204
            # the client reconnecting would have asked its backoff for a delay before this wait returns
            await client.wait_until(lambda: client.deleted)
            assert isinstance(client.last_error, DocumentDeleted) and not client.connected
            assert backoff.delays == []
            assert (await http.get(f"/api/docs/{name}/json")).status_code == 404
        client.doc.get("t", type=Text).insert(0, "offline ")  # still a local document; nothing is sent
    assert text(client) == "offline doomed"
    async with CollabClient(server.ws_url, name, backoff=backoff, store=store) as again:
        assert text(again) == "offline doomed"  # the local copy is kept
        with pytest.raises(DocumentDeleted):
            await again.synced()
        assert again.deleted and backoff.delays == []
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get(f"/api/docs/{name}/json")).status_code == 404


@pytest.mark.parametrize("size", [5000, 3_000_000])
async def test_an_edit_too_large_for_the_server_stops_the_client(server_factory, tmp_path: Path, size: int) -> None:
    """The server closes with 1009 a message over its --max-message-size; the handshake would send that edit again
    at every reconnect, so the client stops and says why (it kept retrying, with nothing after it arriving). The
    edit stays in the store, to upload once the server takes messages that large. A large one arrived after the
    server had closed its socket, which reset the connection before the client read the close: it sent it again."""
    server = server_factory("--max-message-size", "2000")
    name, store = room(), tmp_path / "client.db"
    backoff = RecordingBackoff(base=0.02, max=0.2, jitter=0)
    async with CollabClient(server.ws_url, name, backoff=backoff, store=store) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "x" * size)
        with pytest.raises(ServerClosed) as stopped:
            await client.flush()
        assert stopped.value.code == 1009 and "exceeds limit of 2000" in stopped.value.reason
        assert client.stopped is stopped.value and backoff.delays == []
    server.stop()
    if size > 5000:
        return
    bigger = server_factory("--max-message-size", "20000", db=server.db)
    async with CollabClient(bigger.ws_url, name, store=store) as client:
        await client.flush()
    async with CollabClient(bigger.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == "x" * 5000


async def test_many_edits_made_offline_are_sent_in_parts_the_server_takes(server_factory, tmp_path: Path) -> None:
    """300 edits of 1 kB made offline went out as one handshake message of 307 kB, which a server taking 200 kB
    messages closed with 1009 at every reconnect: none of them arrived. They go in parts of PART_BYTES."""
    store = tmp_path / "client.db"
    name = room()
    async with CollabClient(f"ws://127.0.0.1:{free_port()}", name, store=store, backoff=FAST) as offline:
        for i in range(300):
            offline.doc.get("t", type=Text).insert(0, f"{i:04}" + "x" * 1000)
        expected = text(offline)
    server = server_factory("--max-message-size", "200000")
    async with CollabClient(server.ws_url, name, store=store) as client:
        await client.flush()
    async with CollabClient(server.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == expected
    assert all(len(sync_step2(part)) <= PART_BYTES for part in parts(offline.doc.get_update()))


async def test_many_deletions_made_offline_are_sent_in_parts_the_server_takes(server_factory, tmp_path: Path) -> None:
    """Every other character of a text deleted offline: the deletions went whole in one message, which the server
    closed with 1009, and the text stayed as it was."""
    server = server_factory("--max-message-size", "100000")
    name, store = room(), tmp_path / "client.db"
    async with CollabClient(server.ws_url, name, store=store) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "ab" * 30_000)
        await client.flush()
    async with CollabClient(f"ws://127.0.0.1:{free_port()}", name, store=store, backoff=FAST) as offline:
        content = offline.doc.get("t", type=Text)
        with offline.doc.transaction():
            for at in range(30_000):
                del content[at:at + 1]  # each "a", the "b" after it moving up
        assert str(content) == "b" * 30_000
    async with CollabClient(server.ws_url, name, store=store) as client:
        await client.flush()
        assert client.stopped is None
    async with CollabClient(server.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == "b" * 30_000


async def test_a_backlog_of_several_clients_edits_is_sent_in_parts_none_of_which_waits(server: ServerProcess,
                                                                                       tmp_path: Path) -> None:
    """Three sessions, one after another, each typing at the start of the text, offline: cut into parts by client,
    a later session's parts waited for the earlier session's last one, and the server closed the connection (1008:
    too many changes waiting) at every reconnect. Parts now come in causal order."""
    name = room()
    sessions = [Doc(client_id=100 + i) for i in range(3)]
    for i, writer in enumerate(sessions):
        if i:
            writer.apply_update(sessions[i - 1].get_update())
        text_ = writer.get("t", type=Text)
        for n in range(80_000):
            text_.insert(0, "abcdefghij"[n % 10])
    backlog = sessions[-1].get_update()
    store = tmp_path / "client.db"
    async with CollabClient(f"ws://127.0.0.1:{free_port()}", name, store=store, backoff=FAST) as offline:
        offline.doc.apply_update(backlog)
    assert len(parts(backlog)) > 16  # more than the server holds back for one connection
    async with CollabClient(server.ws_url, name, store=store) as client:
        await client.flush()
        assert client.last_error is None
    async with CollabClient(server.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == str(sessions[-1].get("t", type=Text))


async def test_presence_too_large_for_servers_is_refused_locally(server: ServerProcess) -> None:
    """The server closes (1008) a connection sending a state over 64 KB, before the document syncs, and the client
    sent it again first at every reconnect: nothing synced again, silently."""
    async with CollabClient(server.ws_url, room()) as client:
        with pytest.raises(ValueError, match="awareness state of 70011 bytes"):
            client.set_awareness({"big": "x" * 70_000})
        client.set_awareness({"user": "small"})
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "synced")
        await client.flush()


async def test_presence_is_announced_anew_after_the_server_restarts(server: ServerProcess) -> None:
    """A Yjs peer keeps the clock of a state it saw; after the server restarts, a state sent with that clock again
    is ignored (y-protocols) until the next renewal, 15 s later: the client announces its state with a new clock
    on every connection."""
    name = room()
    async with JsPeer("yjs") as peer, CollabClient(server.ws_url, name, backoff=FAST) as client:
        await peer.connect(server.ws_url, name)
        client.set_awareness({"user": "py"})
        seen = f"awareness[{client.doc.client_id}]?.user === 'py'"
        await peer.wait_for(seen)
        server.kill()
        await peer.wait_for(f"status !== 'connected' && !awareness[{client.doc.client_id}]")
        await asyncio.to_thread(server.start)
        await client.synced(timeout=15)
        await peer.wait_for(f"status === 'connected' && {seen}", timeout=8)


@pytest.mark.parametrize("close_codes", [False, True], ids=["refused-upgrade", "close-code"])
async def test_tokens_and_a_refusal_that_stops_the_client(server_factory, close_codes: bool) -> None:
    """A token reaches an auth-on server; without one the server's answer is final (a 403 refusal, or 4401
    with --auth-close-codes): the client stops, and waiting raises at once instead of timing out."""
    flags = ["--auth-required", "--auth-secret", "k"] + (["--auth-close-codes"] if close_codes else [])
    server = server_factory(*flags)
    name = room()
    async with CollabClient(server.ws_url, name, token=issue_token("k", prefix="")) as writer:
        await writer.synced()
        writer.doc.get("t", type=Text).insert(0, "with a token")
        await writer.flush()
    backoff = RecordingBackoff(base=0.02, max=0.2, jitter=0)
    async with CollabClient(server.ws_url, name, backoff=backoff) as anonymous:
        with pytest.raises(ServerClosed) as stopped:
            await anonymous.synced(timeout=10)
        expected = (4401, "missing token") if close_codes else (403, "connection refused")
        assert (stopped.value.code, stopped.value.reason) == expected
        assert anonymous.stopped is stopped.value and backoff.delays == [] and text(anonymous) == ""


@pytest.mark.parametrize("close_codes", [False, True], ids=["refused-upgrade", "close-code"])
async def test_a_client_whose_token_expired_goes_on_with_a_new_one(server_factory, close_codes: bool) -> None:
    """The server closes a connection whose token expires (then refuses it, or closes with 4403): the client stops,
    as for any refusal, and setting `client.token` connects it again, with what it wrote meanwhile."""
    server = server_factory("--auth-required", "--auth-secret", "k", *(["--auth-close-codes"] if close_codes else []))
    name = room()
    async with CollabClient(server.ws_url, name, token=issue_token("k", doc=name, ttl=2), backoff=FAST) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "before")
        await client.flush()
        with pytest.raises(ServerClosed):
            await client.wait_until(lambda: False, timeout=15)
        assert client.stopped is not None and client.stopped.code == (4403 if close_codes else 403)
        client.doc.get("t", type=Text).insert(6, " after")
        client.token = issue_token("k", doc=name)
        await client.flush()
    async with CollabClient(server.ws_url, name, token=issue_token("k", doc=name)) as fresh:
        await fresh.synced()
        assert text(fresh) == "before after"


async def test_block_model_works_on_client_doc(upstream: RefServer | ServerProcess) -> None:
    name = room()
    async with CollabClient(upstream.ws_url, name) as a, CollabClient(upstream.ws_url, name) as b:
        await a.synced()
        await b.synced()
        create_block(a.doc, "b1", "paragraph", "hello")
        add_index_entry(a.doc, "b1", "search", metadata={"lang": "en"})
        await b.wait_until(lambda: "b1" in blocks_to_json(b.doc)
                           and blocks_to_json(b.doc)["b1"]["indexingList"] != [])
        set_status(b.doc, "b1", "search", "done")
        await a.wait_until(lambda: blocks_to_json(a.doc) == blocks_to_json(b.doc))
        assert blocks_to_json(a.doc)["b1"]["indexingList"][0]["status"] == "done"


async def test_offline_edits_survive_restart_and_upload(upstream: RefServer | ServerProcess,
                                                        tmp_path: Path) -> None:
    name, store = room(), tmp_path / "client.db"
    async with Relay(upstream.ws_url) as relay:
        relay.go_offline()  # never connected before the first edits
        async with CollabClient(relay.url, name, store=store, backoff=FAST) as client:
            client.doc.get("t", type=Text).insert(0, "offline")
            assert not client.connected
        async with CollabClient(upstream.ws_url, name) as other:  # meanwhile, someone else edits
            await other.synced()
            other.doc.get("m", type=Text).insert(0, "remote")
        relay.go_online()
        async with CollabClient(relay.url, name, store=store, backoff=FAST) as client:
            assert text(client) == "offline"  # restored from the store before any connection
            await client.synced()
            await client.wait_until(lambda: str(client.doc.get("m", type=Text)) == "remote")
    async with CollabClient(upstream.ws_url, name) as fresh:
        await fresh.synced()
        assert (text(fresh), str(fresh.doc.get("m", type=Text))) == ("offline", "remote")


CRASHING_CLIENT = """
import asyncio, sys
from pycrdt import Text
from client_py import CollabClient

async def main():
    client = CollabClient(sys.argv[1], sys.argv[2], store=sys.argv[3])
    await client.open()
    for word in ("unsent ", "edits"):
        client.doc.get("t", type=Text).insert(len(str(client.doc.get("t", type=Text))), word)
    print("edited", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_unsent_edits_survive_sigkill(upstream: RefServer | ServerProcess, tmp_path: Path) -> None:
    name, store = room(), tmp_path / "client.db"
    dead_url = f"ws://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CLIENT, dead_url, name, str(store)],
                            cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line == b"edited\n"
    finally:
        proc.kill()
        proc.wait(10)
    async with CollabClient(upstream.ws_url, name, store=store) as client:
        assert text(client) == "unsent edits"
        await client.synced()
    async with CollabClient(upstream.ws_url, name) as fresh:
        await fresh.synced()
        assert text(fresh) == "unsent edits"


async def test_a_character_a_peer_cuts_in_two_is_cut_here_as_yjs_cuts_it(upstream: RefServer | ServerProcess,
                                                                          tmp_path: Path) -> None:
    # A Yjs peer deleting the second UTF-16 unit of an emoji: the client's document must become what Yjs
    # holds (two U+FFFD, one deleted), encode whole, keep taking edits and reload the same from its store.
    name, store = room(), tmp_path / "client.db"
    async with CollabClient(upstream.ws_url, name, store=store) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "a😀b")
        await client.flush()
        kept = client.doc.get("t", type=Text)
        cutter = await RawPeer.connect(f"{upstream.ws_url}/{name}")
        await cutter.send(sync_update(deletion(*second_unit(client.doc))))
        await client.wait_until(lambda: text(client) == "a\ufffdb")
        assert client.last_error is None
        kept.insert(0, "lost")  # through the document replaced: never sent, but said
        assert "an edit to a replaced client.doc was not sent" in str(client.last_error)
        again = Doc()
        again.apply_update(client.doc.get_update())
        assert str(again.get("t", type=Text)) == "a\ufffdb"
        client.doc.get("t", type=Text).insert(0, "x")
        await client.flush()
        await cutter.close()
    async with CollabClient(upstream.ws_url, name) as reader:
        await reader.synced()
        await reader.wait_until(lambda: text(reader) == "xa\ufffdb")
    offline = CollabClient(f"ws://127.0.0.1:{free_port()}", name, store=store, backoff=FAST)
    await offline.open()
    assert text(offline) == "xa\ufffdb"
    await offline.close()


@pytest.mark.parametrize("history", [two_waiting_on_one, cut_before_it_came], ids=["two-waiting", "cut"])
async def test_changes_sent_before_the_change_they_wait_on_all_integrate(
        history: Callable[[], tuple[list[bytes], list[bytes], bytes, str]]) -> None:
    """A server that relays peers' changes as they come, some before a change they build on. yrs alone, given
    two that wait on the same change, integrates one of them when it comes and drops the other
    (collab_server/heldback.py); given a change typing "X😀Y" and two that cut its emoji, it keeps the emoji whole
    and loses the "Y" (collab_server/surrogates.py)."""
    before, waiting, awaited, want = history()

    async def scripted(ws: ServerConnection) -> None:
        await ws.send(sync_step1(b"\x00"))
        async for frame in ws:
            msg = decode_message(frame)
            if isinstance(msg, SyncMessage) and msg.kind == SyncType.STEP1:
                await ws.send(sync_step2(merge_updates(*before) if before else b"\x00\x00"))
                for update in [*waiting, awaited]:
                    await ws.send(sync_update(update))

    async with serve(scripted, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with CollabClient(f"ws://127.0.0.1:{port}", room()) as client:
            await client.wait_until(lambda: text(client) == want)
            again = Doc()
            again.apply_update(client.doc.get_update())
            assert str(again.get("t", type=Text)) == want
