"""Operational endpoints: /health, /ready and Prometheus /metrics."""

import asyncio
from pathlib import Path

import httpx
import pytest
from pycrdt import Text
from websockets.exceptions import InvalidStatus

from collab_server import protocol as p
from collab_server.app import create_app
from collab_server.broker.local import LocalBroker
from collab_server.config import Settings
from collab_server.readiness import CHECK_TIMEOUT
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import RawPeer, text_updates
from tests.serverproc import wait_until
from tests.webhookreceiver import Receiver


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


async def test_health_ready_and_metrics(server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        peer = await RawPeer.connect(f"{server.ws_url}/room")
        doc, updates = text_updates(25)
        for update in updates:
            await peer.send(p.sync_update(update))
        await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == str(doc.get("t", type=Text)))
        await peer.send("not binary")
        await peer.wait_closed()
        ready = (await http.get("/ready")).json()
        assert ready == {"status": "ready", "rooms_loaded": 1}
        text = (await http.get("/metrics")).text
        (doc_info,) = (await http.get("/api/docs")).json()["docs"]
    assert metric(text, "collab_updates_applied_total") == 25
    assert metric(text, "collab_commit_seconds_count") >= 1
    # changes that arrive while a commit is in flight share a log entry
    assert 1 <= metric(text, "collab_commit_batch_size_sum") == doc_info["log_entries"] <= 25
    assert metric(text, "collab_rooms_loaded") == 1
    assert metric(text, "collab_updates_broadcast_total") >= 1
    assert metric(text, "collab_bytes_received_total") > sum(len(u) for u in updates)
    assert 'collab_errors_total{kind="text_frame"} 1.0' in text


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_client_addresses_are_logged_only_with_proxy_headers(server_factory, trusted: bool) -> None:
    """uvicorn's proxy-headers middleware costs every connection a coroutine frame and serves only its log
    lines: off by default, on with --proxy-headers for a proxy on 127.0.0.1."""
    server = server_factory(*(["--proxy-headers"] if trusted else []))
    peer = await RawPeer.connect(f"{server.ws_url}/room", additional_headers={"X-Forwarded-For": "203.0.113.7"})
    await peer.sync()
    await peer.close()
    await wait_until(lambda: '"WebSocket /room" [accepted]' in server.log())
    accepted = next(line for line in server.log().splitlines() if '"WebSocket /room" [accepted]' in line)
    assert ("203.0.113.7" in accepted) == trusted, accepted


async def test_a_connection_logs_one_line_at_info(server) -> None:
    """uvicorn's "[accepted]" line names the peer and the room; websockets' own "connection open" line, which
    names neither, is below the default level."""
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    await peer.sync()
    await peer.close()
    await wait_until(lambda: '"WebSocket /room" [accepted]' in server.log())
    assert "connection open" not in server.log()


async def test_tokens_in_a_query_string_are_not_logged(server_factory) -> None:
    """y-websocket sends its params in the URL: uvicorn's "[accepted]" line held every `?token=`, a credential
    until it expires, for anyone reading the log."""
    from collab_server.auth import issue_token

    server = server_factory("--auth-required", "--auth-secret", "s")
    token = issue_token("s", doc="room")
    peer = await RawPeer.connect(f"{server.ws_url}/room?x=1&token={token}")
    await peer.sync()
    await peer.close()
    await wait_until(lambda: "[accepted]" in server.log())
    accepted = next(line for line in server.log().splitlines() if "[accepted]" in line)
    assert '"WebSocket /room?x=1&token=…" [accepted]' in accepted and token not in server.log()
    # the server reads a percent-encoded name as `token` too, so the log masks it as well
    peer = await RawPeer.connect(f"{server.ws_url}/room?%74ok%65n={token}")
    await peer.sync()
    await peer.close()
    await wait_until(lambda: "/room?%74ok%65n=…" in server.log())
    assert token not in server.log()
    for query in (f"a=b;token={token}", f"TOKEN={token}"):  # not read as tokens, but likely mistyped ones
        with pytest.raises(InvalidStatus):
            await RawPeer.connect(f"{server.ws_url}/room?{query}")
    await wait_until(lambda: "/room?TOKEN=…" in server.log() and "a=b;token=…" in server.log())
    assert token not in server.log()


class Frozen:
    """A ping that does not answer, like one to a blackholed PostgreSQL or Redis, until the test thaws it."""

    def __init__(self) -> None:
        self.calls = 0
        self.thawed = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        await self.thawed.wait()


@pytest.mark.parametrize("frozen", ["storage", "broker"])
async def test_ready_answers_at_once_that_a_backend_which_does_not_answer_timed_out(tmp_path: Path,
                                                                                     frozen: str) -> None:
    store, broker, ping = SQLiteStore(str(tmp_path / "r.db")), LocalBroker(), Frozen()
    if frozen == "storage":
        store.ping = ping  # type: ignore[method-assign]
    else:
        broker.ping = ping  # type: ignore[method-assign]
    app = create_app(Settings(db=store.path), store=store, broker=broker)
    await store.open()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ready") as http:
            for _ in range(2):  # a prober asking again while the first ping hangs
                response = await asyncio.wait_for(http.get("/ready"), 5 * CHECK_TIMEOUT)
                assert response.status_code == 503
                assert response.json() == {"status": "unavailable",
                                           "error": f"{frozen} timed out: no answer within {CHECK_TIMEOUT:g} s"}
        assert ping.calls == 1  # the second check waited on the ping in flight rather than start another
    finally:
        ping.thawed.set()
        await store.close()


async def test_webhook_deliveries_do_not_log_the_receiver_s_url(server_factory) -> None:
    """httpx logged every webhook POST at INFO with the receiver's URL, which may hold a credential in its query
    string, for anyone reading the log."""
    receiver = Receiver()
    try:
        server = server_factory("--webhook-url", f"{receiver.url}?key=credential-in-url", "--webhook-debounce", "0.1")
        peer = await RawPeer.connect(f"{server.ws_url}/room")
        await peer.sync()
        await peer.edit(lambda doc: doc.get("t", type=Text).insert(0, "x"))
        await wait_until(lambda: server.metric("collab_webhooks_delivered_total") == 1)
        await peer.close()
        assert receiver.events("room") and "credential-in-url" not in server.log()
    finally:
        receiver.close()
