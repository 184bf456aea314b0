"""Store backends under test, each with a way to make a table operation fail from outside (a trigger)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Protocol

import asyncpg

from collab_server.storage import Store
from collab_server.storage.postgres import PostgresStore
from collab_server.storage.sqlite import SQLiteStore


class Backend(Protocol):
    async def open(self, compact_threshold: int = 10_000) -> Store:
        """A new, opened store over this backend's database (the same data every call)."""

    async def break_op(self, op: str, table: str, message: str) -> None:
        """Make every `op` (INSERT or DELETE) on `table` fail with `message`."""

    async def repair(self, table: str) -> None:
        """Undo `break_op` on `table`."""


class SQLiteBackend:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    async def open(self, compact_threshold: int = 10_000) -> Store:
        store = SQLiteStore(self.path, compact_threshold=compact_threshold)
        await store.open()
        return store

    async def break_op(self, op: str, table: str, message: str) -> None:
        with sqlite3.connect(self.path) as ext:
            ext.execute(f"CREATE TRIGGER fail_{table} BEFORE {op} ON {table} "
                        f"BEGIN SELECT RAISE(ABORT, '{message}'); END")

    async def repair(self, table: str) -> None:
        with sqlite3.connect(self.path) as ext:
            ext.execute(f"DROP TRIGGER fail_{table}")


class PostgresBackend:
    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    async def open(self, compact_threshold: int = 10_000) -> Store:
        store = PostgresStore(self.dsn, schema=self.schema, compact_threshold=compact_threshold)
        await store.open()
        return store

    async def break_op(self, op: str, table: str, message: str) -> None:
        await self.execute(
            f"CREATE FUNCTION fail_{table}() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN RAISE EXCEPTION '{message}'; END $$",
            f"CREATE TRIGGER fail_{table} BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION fail_{table}()")

    async def repair(self, table: str) -> None:
        await self.execute(f"DROP FUNCTION fail_{table}() CASCADE")

    async def execute(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()
