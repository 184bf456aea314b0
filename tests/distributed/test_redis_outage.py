"""A node whose Redis goes away: its own clients keep working, /ready says so, rooms it cannot keep in sync
with other nodes are refused cleanly, and everything recovers when Redis is back. Uses a private
redis-server (Debian's, as on this machine kind) so the test can stop and restart it."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from pycrdt import Text

from tests.rawclient import RawPeer
from tests.serverproc import free_port

pytestmark = pytest.mark.distributed


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited") from None
                time.sleep(0.05)
        raise TimeoutError("redis-server did not listen")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed (CI=true: distributed tests must run)", pytrace=False)
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis()
    redis.start()
    yield redis
    if redis.proc is not None and redis.proc.poll() is None:
        redis.stop()


async def until_status(url: str, status: int, timeout: float = 10.0) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        async with asyncio.timeout(timeout):
            while (response := await http.get(url)).status_code != status:
                await asyncio.sleep(0.05)
    return response


async def test_redis_outage_is_reported_refused_cleanly_and_recovered(postgres_dsn: str, pg_schema: str,
                                                                      private_redis, server_factory) -> None:
    # fixtures end in the reverse order: the server stops before its schema is dropped (a drop while it wrote
    # deadlocked once)
    dsn = f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}search_path={pg_schema}"
    server = server_factory("--store", "postgres", "--postgres-dsn", dsn,
                            "--broker", "redis", "--redis-url", f"redis://127.0.0.1:{private_redis.port}/0")
    await until_status(f"{server.http_url}/ready", 200)
    alice = await RawPeer.connect(f"{server.ws_url}/loaded")
    await alice.sync()

    private_redis.stop()
    down = await until_status(f"{server.http_url}/ready", 503)
    assert "redis" in down.json()["error"]
    await alice.edit(lambda d: d.get("t", type=Text).insert(0, "still served"))  # local clients keep working
    await alice.wait_for(lambda: str(alice.doc.get("t", type=Text)) == "still served")
    refused = await RawPeer.connect(f"{server.ws_url}/new-room")  # cannot be kept in sync with other nodes
    code, reason = await refused.wait_closed()
    assert code == 1011 and "broker unavailable" in reason
    assert server.metric("collab_connections") == 1  # the refused connection was cleaned up

    private_redis.start()
    await until_status(f"{server.http_url}/ready", 200)
    bob = await RawPeer.connect(f"{server.ws_url}/new-room")
    await bob.sync()
    await bob.edit(lambda d: d.get("t", type=Text).insert(0, "back"))
    await bob.wait_for(lambda: str(bob.doc.get("t", type=Text)) == "back")
    fresh = await RawPeer.connect(f"{server.ws_url}/loaded")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == "still served"
    assert server.alive() and "Traceback" not in server.log() and "Exception in ASGI" not in server.log()
