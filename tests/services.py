"""Real PostgreSQL and Redis for tests: reachability (fail under CI, skip locally) and per-test isolation.

Import the fixtures into a test module or conftest. Addresses: COLLAB_TEST_POSTGRES_DSN, COLLAB_TEST_REDIS_URL.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest
import redis.asyncio

POSTGRES_DSN = os.environ.get("COLLAB_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("COLLAB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require(service: str, probe: Callable[[], Awaitable[object]]) -> None:
    """Fail loudly under CI (CI=true) when `service` is unreachable; skip with the reason otherwise."""
    try:  # in a thread of its own: the caller may already be inside an event loop
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: asyncio.run(asyncio.wait_for(probe(), 5.0))).result()
    except Exception as exc:  # noqa: BLE001  whatever the failure, the service is unusable: say why
        reason = f"{service} unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: distributed tests must run)", pytrace=False)
        pytest.skip(reason)


async def _probe_postgres() -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def _probe_redis() -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    require("PostgreSQL", _probe_postgres)
    return POSTGRES_DSN


@pytest.fixture(scope="session")
def redis_url() -> str:
    require("Redis", _probe_redis)
    return REDIS_URL


@pytest.fixture
async def pg_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty schema for this test; dropped with everything in it afterwards."""
    schema = f"collab_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A fresh key prefix for this test; every key under it is deleted afterwards."""
    prefix = f"collab-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
