"""Property: clients that go offline at random points, edit, and restart from their local stores
all converge, once reconnected, to exactly the merge of every edit anyone made."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text, TransactionEvent, merge_updates

from client_py import Backoff, CollabClient
from tests.client.refserver import RefServer
from tests.client.relay import Relay
from tests.serverproc import ServerProcess

CLIENTS = 3
EDIT = "test-edit"  # transaction origin of the edits the reference merge is built from

client_ix = st.integers(0, CLIENTS - 1)
operations = st.one_of(
    st.tuples(st.just("insert"), client_ix, st.integers(0, 50), st.text("abc", min_size=1, max_size=3)),
    st.tuples(st.just("delete"), client_ix, st.integers(0, 50), st.integers(1, 3)),
    st.tuples(st.just("set"), client_ix, st.sampled_from("xyz"), st.text("pq", max_size=2)),
    st.tuples(st.just("offline"), client_ix),
    st.tuples(st.just("online"), client_ix),
    st.tuples(st.just("restart"), client_ix),
)


def content(doc: Doc) -> tuple[str, dict[str, Any]]:
    return str(doc.get("t", type=Text)), doc.get("m", type=Map).to_py()


@dataclass
class Peer:
    relay: Relay
    store: Path
    client: CollabClient | None = None


class Scenario:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.room = f"merge-{uuid.uuid4().hex[:8]}"
        self.edits: list[bytes] = []

    def _record(self, event: TransactionEvent) -> None:
        if event.transaction.origin() == hash(EDIT):
            self.edits.append(event.update)

    async def _start(self, peer: Peer) -> CollabClient:
        peer.client = CollabClient(peer.relay.url, self.room, store=peer.store, backoff=Backoff(0.01, 0.1))
        await peer.client.open()
        peer.client.doc.observe(self._record)
        if peer.relay.online:  # online means live: edits from here on travel as updates
            await peer.client.synced(timeout=10)
        return peer.client

    async def run(self, initially_online: list[bool], ops: list[tuple[Any, ...]]) -> None:
        async with AsyncExitStack() as stack:
            peers = []
            for i, online in enumerate(initially_online):
                relay = await stack.enter_async_context(Relay(self.url))
                if not online:
                    relay.go_offline()
                peers.append(Peer(relay, self.tmp / f"{self.room}-{i}.db"))
            clients = [await self._start(peer) for peer in peers]
            for kind, i, *params in ops:
                await self._apply(peers[i], kind, *params)
                clients[i] = peers[i].client
            for peer in peers:
                peer.relay.go_online()
            for client in clients:
                await client.synced(timeout=10)
            expected = Doc()
            if self.edits:
                expected.apply_update(merge_updates(*self.edits))
            for client in clients:
                with suppress(TimeoutError):  # the assertion below shows the difference
                    await client.wait_until(lambda c=client: content(c.doc) == content(expected))
                assert content(client.doc) == content(expected)
            for client in clients:
                await client.close()
        async with CollabClient(self.url, self.room) as fresh:
            await fresh.synced()
            assert content(fresh.doc) == content(expected)

    async def _apply(self, peer: Peer, kind: str, *params: Any) -> None:
        client = peer.client
        assert client is not None
        doc = client.doc
        if kind in ("insert", "delete", "set"):
            with doc.transaction(origin=EDIT):
                text, entries = doc.get("t", type=Text), doc.get("m", type=Map)
                if kind == "insert":
                    pos, chars = params
                    text.insert(pos % (len(text) + 1), chars)
                elif kind == "delete" and len(text) > 0:
                    pos, count = params
                    start = pos % len(text)
                    del text[start:min(len(text), start + count)]
                elif kind == "set":
                    key, value = params
                    entries[key] = value
        elif kind == "offline":
            peer.relay.go_offline()
        elif kind == "online" and not peer.relay.online:
            peer.relay.go_online()
            await client.synced(timeout=10)
        elif kind == "restart":
            await client.close()
            await self._start(peer)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initially_online=st.lists(st.booleans(), min_size=CLIENTS, max_size=CLIENTS),
       ops=st.lists(operations, min_size=1, max_size=25))
def test_offline_edits_restarts_and_reconnects_converge(upstream: RefServer | ServerProcess, tmp_path: Path,
                                                         initially_online: list[bool],
                                                         ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(Scenario(upstream.ws_url, tmp_path).run(initially_online, ops))
