"""A node whose PostgreSQL goes away (a real server behind a network cut): /ready says so, a change it cannot
commit is never broadcast, the room is dropped cleanly, and real y-websocket clients that kept retrying
re-send what they hold once the database is back, so nothing is lost."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.distributed.tcpcut import TcpCut
from tests.distributed.test_redis_outage import until_status
from tests.e2e.conftest import peer  # noqa: F401
from tests.e2e.test_persistence import fresh_view

pytestmark = pytest.mark.distributed


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


async def test_postgres_outage_loses_nothing_and_broadcasts_nothing_uncommitted(
        server_factory, postgres_dsn, pg_schema, peer) -> None:  # noqa: F811
    upstream = urlsplit(postgres_dsn)
    with TcpCut(upstream.hostname or "127.0.0.1", upstream.port or 5432) as network:
        dsn = through(postgres_dsn, network.port) + f"?search_path={pg_schema}"
        server = server_factory("--store", "postgres", "--postgres-dsn", dsn)
        await until_status(f"{server.http_url}/ready", 200)
        alice, bob = await asyncio.gather(peer("alice", server.ws_url, "doc"), peer("bob", server.ws_url, "doc"))
        await alice.call("map_set", key="before", value=1)
        await bob.wait_for("doc.map.before === 1")

        network.cut()
        down = await until_status(f"{server.http_url}/ready", 503)
        assert "postgres" in down.json()["error"]
        since = len(bob.events)
        await alice.call("map_set", key="during", value=2)  # cannot be committed
        close = await bob.wait_event("connection-close", since=since, timeout=15)
        assert close["code"] == 1011
        assert "during" not in (await bob.state()).doc["map"], "an uncommitted change was broadcast"
        assert server.metric('collab_errors_total{kind="storage"}') == 1
        # the clients retry on their own; while the database is away the room cannot be loaded
        await bob.wait_event("connection-close", since=since + 1, timeout=15, code=1011,
                             reason="storage failure while loading the document")
        await alice.call("map_set", key="offline", value=3)

        network.restore()
        await until_status(f"{server.http_url}/ready", 200, timeout=15)
        # alice re-sends both when she reconnects
        await bob.wait_for("doc.map.during === 2 && doc.map.offline === 3 && synced", timeout=30)
        await alice.call("map_set", key="after", value=4)
        await bob.wait_for("doc.map.after === 4")
        expected = (await bob.state()).doc, await bob.state_vector()
        await asyncio.gather(alice.close(), bob.close())  # neither may repair the server after the restart

        server.stop()
        server.start()
        state, vector = await fresh_view(peer, server.ws_url, "doc")
        assert (state.doc, vector) == expected
        log = server.log()
        assert "room failed name=doc" in log and "Traceback" not in log
