"""The store suites run against both stores: SQLite, and the real PostgreSQL (marked distributed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collab_server.storage import Store
from tests.services import pg_schema, postgres_dsn  # noqa: F401  (real PostgreSQL for the store suites)
from tests.storage.backends import Backend, PostgresBackend, SQLiteBackend


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.distributed)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "s.db")
    return PostgresBackend(request.getfixturevalue("postgres_dsn"), request.getfixturevalue("pg_schema"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = await backend.open()
    yield s
    await s.close()
