from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start servers (`factory(*cli_args, db=..., env=...)`); all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def factory(*args: str, db: Path | None = None, env: dict[str, str] | None = None,
                port: int | None = None, ca: Path | None = None) -> ServerProcess:
        proc = ServerProcess(db or tmp_path / "collab.db", *args, env=env, port=port, ca=ca).start()
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        if proc.alive():
            proc.kill()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """A real server on a free port with a fresh SQLite database."""
    return server_factory()
