"""A cluster for two-node tests: server processes sharing this test's PostgreSQL schema and one Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

from tests.serverproc import ServerProcess


@dataclass(frozen=True)
class Cluster:
    dsn: str  # the server DSN: this test's schema first on the search_path
    schema: str
    redis_url: str
    room: str  # unique per test, so room streams never mix with other runs
    start_node: Callable[..., ServerProcess]  # start_node("a", *flags): a server sharing the services

    async def stored_updates(self, room: str | None = None) -> list[bytes]:
        """The room's checkpoint and log as a restarted node would load them."""
        conn = await asyncpg.connect(self.dsn)
        try:
            row = await conn.fetchrow("SELECT checkpoint FROM documents WHERE name = $1", room or self.room)
            rows = await conn.fetch("SELECT data FROM updates WHERE doc = $1 ORDER BY id", room or self.room)
        finally:
            await conn.close()
        return ([row["checkpoint"]] if row and row["checkpoint"] else []) + [r["data"] for r in rows]


@pytest.fixture
async def cluster(postgres_dsn: str, pg_schema: str, redis_url: str, server_factory,
                  tmp_path: Path) -> AsyncIterator[Cluster]:
    dsn = f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}search_path={pg_schema}"
    room = f"room-{uuid.uuid4().hex[:12]}"

    def start_node(name: str, *flags: str) -> ServerProcess:
        return server_factory("--store", "postgres", "--broker", "redis", "--postgres-dsn", dsn,
                              "--redis-url", redis_url, *flags, db=tmp_path / f"node-{name}.db")

    yield Cluster(dsn, pg_schema, redis_url, room, start_node)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.delete(f"collab:room:{room}")
    finally:
        await client.aclose()
