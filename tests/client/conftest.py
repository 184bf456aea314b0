from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.client.refserver import RefServer
from tests.serverproc import ServerProcess


@pytest.fixture
def ref_factory(tmp_path: Path) -> Iterator[Callable[..., RefServer]]:
    """Start reference servers (`factory(port=None)`); all are killed at the end of the test."""
    started: list[RefServer] = []

    def factory(port: int | None = None) -> RefServer:
        proc = RefServer(tmp_path / f"ref-{len(started)}.log", port=port).start()
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        if proc.alive():
            proc.kill()


@pytest.fixture(params=["reference", "ours"])
def upstream(request: pytest.FixtureRequest) -> RefServer | ServerProcess:
    """A running server of either kind: the y-websocket reference server, or ours."""
    if request.param == "reference":
        return request.getfixturevalue("ref_factory")()
    return request.getfixturevalue("server")
