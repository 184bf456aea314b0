"""Operational endpoints: /health, /ready and Prometheus /metrics."""

import httpx
import pytest
from pycrdt import Text

from collab_server import protocol as p
from tests.rawclient import RawPeer, text_updates
from tests.serverproc import wait_until


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
