"""The app run by plain uvicorn (`--factory collab_server.app:create_app`), as in a deployment's own command."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pycrdt import Doc, Text
from websockets.exceptions import InvalidStatus

from collab_server import protocol as p
from collab_server.auth import issue_token
from tests.rawclient import RawPeer
from tests.serverproc import free_port, wait_until


@pytest.fixture
def uvicorn_app(tmp_path: Path):
    """uvicorn serving create_app() with its settings in COLLAB_* variables only."""
    port = free_port()
    env = {**os.environ, "COLLAB_DB": str(tmp_path / "env.db"), "COLLAB_AUTH_REQUIRED": "true",
           "COLLAB_AUTH_SECRET": "from-the-environment"}
    log = open(tmp_path / "uvicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "collab_server.app:create_app",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    yield port, tmp_path / "env.db", healthy
    proc.terminate()
    proc.wait(20)
    log.close()


async def test_the_factory_takes_its_settings_from_the_environment(uvicorn_app) -> None:
    port, db, healthy = uvicorn_app
    await wait_until(healthy, 20)
    with pytest.raises(InvalidStatus) as refused:  # COLLAB_AUTH_REQUIRED holds
        await RawPeer.connect(f"ws://127.0.0.1:{port}/doc")
    assert refused.value.response.status_code == 403
    token = issue_token("from-the-environment", doc="doc")  # signed with COLLAB_AUTH_SECRET
    peer = await RawPeer.connect(f"ws://127.0.0.1:{port}/doc?token={token}")
    await peer.sync()
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    doc.get("t", type=Text).insert(0, "hello")
    await peer.send(p.sync_update(updates[0]))
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == "hello")
    with sqlite3.connect(db) as stored:  # written to COLLAB_DB, not to ./collab.db
        assert stored.execute("SELECT COUNT(*) FROM updates WHERE doc = 'doc'").fetchone()[0] >= 1
    assert not (db.parent / "collab.db").exists()
    await peer.close()
