"""Writes a client's updates to its local store without ever letting a store failure stop the client."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from pycrdt import merge_updates

from client_py.backoff import Backoff
from client_py.store import LocalStore

log = logging.getLogger(__name__)


class StoreWriter:
    """Appends updates to ``store`` in order; never raises sqlite3.Error (a full disk, a read-only file, I/O).

    After a failed write, ``error`` holds the failure and every update since is kept in memory (``pending``,
    merged into one at each failed attempt so that it grows no faster than the document) instead of being
    written one by one; a timer retries with ``backoff`` (each time after a WAL checkpoint, which gives back the
    space the log's earlier commits hold) until one commit stores them all, which clears ``error``. A failure is
    logged once, its end too; ``on_change`` is called whenever ``error`` is set or cleared.
    """

    def __init__(self, store: LocalStore, backoff: Backoff, on_change: Callable[[], None]) -> None:
        self.store = store
        self.backoff = backoff
        self.on_change = on_change
        self.error: sqlite3.Error | None = None
        self.pending: list[bytes] = []  # not yet stored, oldest first
        self._deletion_pending = False
        self._attempt = 0
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def compaction_due(self) -> bool:
        return self.error is None and self.store.compaction_due

    def append(self, update: bytes) -> None:
        """Store ``update`` now, or, while the store fails, at the next retry."""
        self.pending.append(update)
        if self.error is None:
            self._write()

    def mark_deleted(self) -> None:
        """Record that the server deleted the document, now or at the next retry."""
        self._deletion_pending = True
        if self.error is None:
            self._write()

    def _write(self) -> None:
        """Store what is pending in one commit (and the deletion mark after it)."""
        try:
            if self.error is not None:
                self.store.checkpoint()
            if self.pending:
                self.store.append(*self.pending)
                self.pending.clear()
            if self._deletion_pending:
                self.store.mark_deleted()
                self._deletion_pending = False
        except sqlite3.Error as exc:
            self._failed(exc)
        else:
            self._worked()

    def compact(self, snapshot: bytes) -> None:
        """Replace the log by ``snapshot``, the whole document: it holds every pending update too. A failed
        compaction loses nothing (the log stays as it was), so it is only logged."""
        try:
            self.store.compact(snapshot)
        except sqlite3.Error as exc:
            log.warning("local store %s: compaction failed: %s", self.store.path, exc)
            return
        self.pending.clear()
        if self._deletion_pending or self.error is not None:
            self._write()

    def close(self, snapshot: bytes) -> None:
        """Compact into ``snapshot`` (at least store what is pending), then close the store; if that fails,
        ``error`` stays set and what was not stored is lost locally (the server may have it)."""
        self._closed = True
        self.compact(snapshot)
        if self.error is not None:
            self._write()
        if self._retry is not None:
            self._retry.cancel()
        if self.error is not None:
            missed = " and ".join(what for what, lost in (("the updates it missed", self.pending),
                                                          ("the document's deletion", self._deletion_pending)) if lost)
            log.error("local store %s closed without %s: %s", self.store.path, missed, self.error)
        self.store.close()

    def _failed(self, exc: sqlite3.Error) -> None:
        if len(self.pending) > 1:
            self.pending[:] = [merge_updates(*self.pending)]
        if self.error is None:
            log.warning("local store %s cannot be written (%s): syncing goes on, updates are kept in memory "
                        "and stored once it works again", self.store.path, exc)
        self.error = exc
        self.on_change()
        if not self._closed and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self.backoff.delay(self._attempt), self._on_timer)
            self._attempt += 1

    def _worked(self) -> None:
        if self.error is None:
            return
        log.info("local store %s works again: what it missed is stored", self.store.path)
        self.error = None
        self._attempt = 0
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.on_change()

    def _on_timer(self) -> None:
        self._retry = None
        self._write()
