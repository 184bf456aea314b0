"""Local SQLite store of one room's document: every update the client sees, compacted now and then."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pycrdt import merge_updates

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);
"""


class StoreError(RuntimeError):
    """The store file cannot be used for this room."""


class LocalStore:
    """Append-only update log in a SQLite file (WAL), bound to one room.

    Each append is its own commit, so a process crash loses nothing already appended. Writes raise
    sqlite3.Error when the file cannot be written (disk full, read-only, I/O error); client_py.storewriter
    keeps the client going then. One client at a time per file: the file is locked while open (a second
    opener, in this process or another, gets StoreError; a compaction of one would drop the other's edits).
    """

    def __init__(self, path: str | Path, room: str, compact_every: int = 500) -> None:
        self.path = Path(path)
        self.compact_every = compact_every
        self._compact_after = compact_every  # compaction is due once the log holds more rows than this
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # held from the first write until closed
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("COMMIT")
            self._db.executescript(SCHEMA)
            self._bind_room(room)
            self._rows: int = self._db.execute("SELECT count(*) FROM updates").fetchone()[0]
        except (sqlite3.Error, StoreError) as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise StoreError(f"cannot use store {self.path}: another client has it open") from exc
            raise StoreError(f"cannot use store {self.path}: {exc}") from exc

    def _bind_room(self, room: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('room', ?)", (room,))
        stored = self._db.execute("SELECT value FROM meta WHERE key = 'room'").fetchone()[0]
        if stored != room:
            raise StoreError(f"it holds room {stored!r}, not {room!r}")

    @property
    def deleted(self) -> bool:
        """Whether the server deleted the room's document (`mark_deleted`)."""
        return self._db.execute("SELECT 1 FROM meta WHERE key = 'deleted'").fetchone() is not None

    def mark_deleted(self) -> None:
        """Remember that the server deleted the document, so that no client of this store uploads it again."""
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('deleted', '1')")

    def load(self) -> bytes | None:
        """All stored updates merged into one, or None if the store is empty."""
        rows = [bytes(row[0]) for row in self._db.execute("SELECT data FROM updates ORDER BY seq")]
        return merge_updates(*rows) if rows else None

    def append(self, *updates: bytes) -> None:
        """Store ``updates``, in order, in one commit: all or none."""
        with self._transaction():
            self._db.executemany("INSERT INTO updates (data) VALUES (?)", [(update,) for update in updates])
        self._rows += len(updates)

    @property
    def compaction_due(self) -> bool:
        return self._rows > self._compact_after

    def compact(self, snapshot: bytes) -> None:
        """Replace the whole log by ``snapshot`` (the full document state as one update), atomically. After a
        failure, compaction is not due again until ``compact_every`` more updates are stored."""
        try:
            with self._transaction():
                self._db.execute("DELETE FROM updates")
                self._db.execute("INSERT INTO updates (data) VALUES (?)", (snapshot,))
        except sqlite3.Error:
            self._compact_after = self._rows + self.compact_every
            raise
        self._rows = 1
        self._compact_after = self.compact_every

    def checkpoint(self) -> None:
        """Copy the WAL's commits into the main file and truncate the WAL: the space it holds (up to 1000 pages
        of small commits) is given back, for a write that failed for want of space."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """A write transaction, rolled back when it fails (a full disk or a read-only file fails it midway)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()
