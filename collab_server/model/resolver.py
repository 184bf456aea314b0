"""Server-side status resolver: materialises resolved statuses and compacts superseded writes.

Resolution itself is the pure :func:`resolve_writes` (re-exported here); clients use it locally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pycrdt import Array, Doc, Map, Subscription

from collab_server.model.blocks import blocks_map, entries_where, status_records
from collab_server.model.status import frontier, is_record, resolve_writes

__all__ = ["StatusChange", "StatusResolver", "frontier", "resolve_writes"]

log = logging.getLogger(__name__)

RESOLVER_ORIGIN = "resolver"


@dataclass(frozen=True)
class StatusChange:
    """A materialised status that the resolver changed."""

    block_id: str
    index_name: str | None
    old: str | None
    new: str


@dataclass(frozen=True)
class _Fix:
    block_id: str
    entry: Map
    old: str | None
    new: str | None
    stale: list[int]  # indices of superseded write records, to delete
    give_writes: bool  # the entry has no statusWrites: it gets its Array


class StatusResolver:
    """Tracks blocks touched by updates and resolves their entries on :meth:`run`.

    Dirtiness is tracked per block (index positions shift under concurrent edits); a block's
    entries are all re-checked when anything inside it changes except its `content` text, so typing
    costs no resolution.
    """

    def __init__(self, doc: Doc, on_change: Callable[[StatusChange], None] | None = None,
                 compact: bool = True) -> None:
        self._on_change = on_change
        self._compact = compact
        self._everything = False  # set if events could not be read: the next run checks every block
        self.unreadable = False  # set when a change put in an array what yrs cannot read back (see _mark_dirty)
        self._subscription: Subscription | None = None
        self.rebind(doc)

    def rebind(self, doc: Doc) -> None:
        """Resolve `doc` from now on (a room rebuilt its document); every block is checked at the next run."""
        self.close()
        self._doc = doc
        self._blocks = blocks_map(doc)
        self._dirty: set[str] = set(self._blocks.keys())
        # The events yrs raises, not pycrdt's observe_deep: that wraps each event and computes its delta and
        # target up front (~8 µs per keystroke), where only the path is read here.
        self._subscription = self._blocks.integrated.observe_deep(self._mark_dirty)

    def _mark_dirty(self, events: list) -> None:
        # runs inside the transaction's commit: an exception raised here would stop the commit's other
        # observers (the room's, which stores the update), so none may escape
        try:
            for event in events:
                if type(event).__name__ == "ArrayEvent" and any(op.get("insert") == [] for op in event.delta):
                    # string content in an array (Yjs puts strings only in texts): yrs shows it as an empty
                    # insert, and reading the array (to_json, or an item by position) loops for ever
                    self.unreadable = True
                path = event.path
                if path:
                    if len(path) < 2 or path[1] != "content":  # typing in a block's text changes no status
                        self._dirty.add(path[0])
                else:
                    self._dirty.update(
                        key for key, change in event.keys.items() if change["action"] != "delete"
                    )
        except Exception:
            log.exception("status resolver could not read a change; checking every block")
            self._everything = True

    def _unresolved(self, item: dict[str, Any]) -> bool:
        """Whether an entry, read as JSON, may need a fix: it has no statusWrites, its status is not the resolved
        one, or (compacting) it holds superseded records."""
        if "statusWrites" not in item:
            return True
        writes = item["statusWrites"]
        records = [record for record in writes if is_record(record)] if isinstance(writes, list) else []
        new = resolve_writes(records)
        return (new is not None and new != item.get("status")) or (
            self._compact and len(frontier(records)) < len(records))

    def _plan(self, block_ids: set[str]) -> list[_Fix]:
        fixes = []
        for block_id in sorted(block_ids):
            for entry in entries_where(self._blocks.get(block_id), self._unresolved):
                positioned = status_records(entry)
                records = [record for _, record in positioned]
                new = resolve_writes(records)
                keep = {record["id"] for record in frontier(records)}
                stale = [i for i, record in positioned if record["id"] not in keep] if self._compact else []
                old = entry.get("status")
                give_writes = "statusWrites" not in entry
                if (new is not None and new != old) or stale or give_writes:
                    fixes.append(_Fix(block_id, entry, old, new, stale, give_writes))
        return fixes

    def run(self) -> list[StatusChange]:
        """Resolve dirty entries in one ``resolver`` transaction; returns the status changes."""
        if self._everything:
            self._dirty, self._everything = set(self._blocks.keys()), False
        if not self._dirty:
            return []
        fixes = self._plan(self._dirty)
        self._dirty = set()
        if not fixes:
            return []
        changes = []
        with self._doc.transaction(origin=RESOLVER_ORIGIN):
            for fix in fixes:
                if fix.give_writes:  # before writers do: two creating it at once would keep one's record only
                    fix.entry["statusWrites"] = Array()
                for index in reversed(fix.stale):
                    del fix.entry["statusWrites"][index]
                if fix.new is not None and fix.new != fix.old:
                    fix.entry["status"] = fix.new
                    name = fix.entry.get("index_name")
                    changes.append(StatusChange(fix.block_id, name, fix.old, fix.new))
        self._dirty = set()  # drop the marks made by our own transaction
        for change in changes:
            if self._on_change is not None:
                self._on_change(change)
        return changes

    def close(self) -> None:
        """Stop observing the document (idempotent)."""
        if self._subscription is not None:
            self._subscription.drop()
            self._subscription = None
