"""Durable storage: the Store interface and its implementations, chosen by config."""

from __future__ import annotations

from collab_server.config import Settings
from collab_server.storage.base import DeletedMeanwhile, DocInfo, HistoryCompacted, LogEntry, LogMark, StorageError, Store, VersionInfo

__all__ = ["DeletedMeanwhile", "DocInfo", "HistoryCompacted", "LogEntry", "LogMark", "StorageError", "Store", "VersionInfo", "create_store"]


def create_store(settings: Settings) -> Store:
    """The store `settings.store` names (Settings admits only "sqlite" and "postgres")."""
    if settings.store == "postgres":
        from collab_server.storage.postgres import PostgresStore

        return PostgresStore(settings.postgres_dsn, compact_threshold=settings.compact_threshold,
                             sole=settings.broker == "local")
    from collab_server.storage.sqlite import SQLiteStore

    return SQLiteStore(settings.db, synchronous=settings.sqlite_synchronous,
                       compact_threshold=settings.compact_threshold)
