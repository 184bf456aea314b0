"""Typed API over the block document (shape documented in docs/model.md and web_demo/src/model.js).

``doc.get("blocks", type=Map)``: block id -> Map {id, type, content: Text, indexingList: Array of
index-entry Maps {index_name, status, timestamp, statusWrites: Array of write records, metadata}}.
Every mutation runs in one transaction (joining the caller's if one is open).
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterator, Mapping
from itertools import islice
from typing import Any

from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from collab_server.model.status import WriteRecord, frontier, is_record, resolve_writes

MAX_SAFE_INTEGER = 2**53 - 1  # JavaScript's: yjs clients read numbers as doubles
RESERVED_ENTRY_KEYS = frozenset({"index_name", "status", "timestamp", "statusWrites"})


def blocks_map(doc: Doc) -> Map:
    """The root ``blocks`` Map."""
    return doc.get("blocks", type=Map)


def get_block(doc: Doc, block_id: str) -> Map | None:
    """The block Map, or None (also when something other than a Map is stored under that id)."""
    block = blocks_map(doc).get(block_id)
    return block if isinstance(block, Map) else None


def _require_block(doc: Doc, block_id: str) -> Map:
    block = get_block(doc, block_id)
    if block is None:
        raise KeyError(f"no block {block_id}")
    return block


def create_block(doc: Doc, block_id: str, type: str, content: str = "") -> Map:
    """Create a block (or return the existing one with that id)."""
    existing = get_block(doc, block_id)
    if existing is not None:
        return existing
    with doc.transaction():
        blocks_map(doc)[block_id] = Map(
            {"id": block_id, "type": type, "content": Text(content), "indexingList": Array()}
        )
    return blocks_map(doc)[block_id]


def delete_block(doc: Doc, block_id: str) -> bool:
    """Delete a block; returns whether it existed."""
    if block_id not in blocks_map(doc):
        return False
    del blocks_map(doc)[block_id]
    return True


def block_content(doc: Doc, block_id: str) -> Text:
    """The block's content Text (edit it with ``insert``/``del``/``+=``)."""
    return _require_block(doc, block_id)["content"]


def set_content(doc: Doc, block_id: str, content: str) -> None:
    """Make the block's content `content`, replacing only the span that differs (text around it, and other
    clients' concurrent edits there, stay as they are). The content is the text without its embeds (as `str` gives
    it); embeds keep their places, those inside the span too (its characters are deleted around them)."""
    text = block_content(doc, block_id)
    old = str(text)
    if old == content:
        return
    start = 0
    while start < min(len(old), len(content)) and old[start] == content[start]:
        start += 1
    end = 0  # common suffix, not overlapping the prefix
    while end < min(len(old), len(content)) - start and old[-1 - end] == content[-1 - end]:
        end += 1
    offsets, length = _offsets(text)
    with doc.transaction():
        for first, stop in reversed(_runs(old, offsets, start, len(old) - end)):
            del text[first:stop]
        if len(content) - end > start:
            text.insert(offsets[start] if start < len(old) else length, content[start:len(content) - end])


def _offsets(text: Text) -> tuple[list[int], int]:
    """pycrdt's index of each character of `str(text)` (it counts UTF-8 bytes, and 1 for each embed between
    them), and the text's length so counted."""
    offsets = []
    at = 0
    for piece, _ in text.diff():
        if not isinstance(piece, str):
            at += 1
            continue
        for char in piece:
            offsets.append(at)
            at += len(char.encode())
    return offsets, at


def _runs(old: str, offsets: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """The index ranges of the characters `old[start:stop]`, one per run with no embed inside."""
    runs: list[tuple[int, int]] = []
    for i in range(start, stop):
        after = offsets[i] + len(old[i].encode())
        if runs and runs[-1][1] == offsets[i]:
            runs[-1] = (runs[-1][0], after)
        else:
            runs.append((offsets[i], after))
    return runs


def _indexing_list(block: Any) -> Array | None:
    value = block.get("indexingList") if isinstance(block, Map) else None
    return value if isinstance(value, Array) else None


def entries(block: Map) -> Iterator[Map]:
    """The block's index entries in array order; anything not shaped like a block or an entry is skipped."""
    return entries_where(block, lambda item: True)


def entries_where(block: Any, wanted: Callable[[dict[str, Any]], bool]) -> Iterator[Map]:
    """The block's index entries whose plain JSON (`statusWrites` included) is `wanted`, in array order. The list
    is read as JSON in one pass and only those entries are fetched: pycrdt fetches an item of an Array by its
    position, with a transaction and a wrapper each, which made reading every entry of a block of thousands
    cost tens of milliseconds (a plain object in the list reads like an entry in JSON: it is fetched, skipped)."""
    indexing_list = _indexing_list(block)
    if indexing_list is None:
        return
    for position, item in enumerate(json.loads(str(indexing_list))):
        if isinstance(item, dict) and wanted(item):
            entry = indexing_list[position]
            if isinstance(entry, Map):
                yield entry


def status_records(entry: Map) -> list[tuple[int, WriteRecord]]:
    """(position, record) of the entry's well-formed status write records; malformed ones are ignored."""
    writes = entry.get("statusWrites")
    if not isinstance(writes, Array):
        return []
    return [(i, record) for i, record in enumerate(writes) if is_record(record)]


def entry_status(entry: Map) -> str | None:
    """Resolved status of an entry (falls back to its materialised ``status``)."""
    resolved = resolve_writes([record for _, record in status_records(entry)])
    status = entry.get("status")
    return resolved if resolved is not None else status if isinstance(status, str) else None


class EntryList:
    """A block's index entries for many lookups by name in one transaction: the list is read as JSON once, indexed by
    name, and kept current by the adds and removes made through this object (make a new one after other changes to
    the list). An item is known by its index in the list as read (or appended), and its position now is that index
    less the items removed before it."""

    def __init__(self, block: Any) -> None:
        self.array = _indexing_list(block)
        items = json.loads(str(self.array)) if self.array is not None else []
        self._named: dict[str, list[int]] = {}  # name -> indexes of the items (plain objects too) of that name
        for index, item in enumerate(items):
            if isinstance(item, dict) and isinstance(name := item.get("index_name"), str):
                self._named.setdefault(name, []).append(index)
        self._next = len(items)  # the index of the next item appended
        self._removed: list[int] = []  # indexes of the items removed, in order

    def _positions(self, index_name: str) -> Iterator[tuple[int, int]]:
        """(index, position) of the entries named `index_name` (a plain object of that name is no entry)."""
        for index in self._named.get(index_name, ()):
            position = index - bisect_left(self._removed, index)
            entry = self.array[position]  # type: ignore[index]
            if isinstance(entry, Map) and entry.get("index_name") == index_name:
                yield index, position

    def count(self, index_name: str) -> int:
        """How many entries are named `index_name`."""
        return sum(1 for _ in self._positions(index_name))

    def find(self, index_name: str, nth: int = 0) -> Map | None:
        """The `nth` entry named `index_name` in array order (the first by default), or None."""
        found = next(islice(self._positions(index_name), nth, None), None)
        return None if found is None else self.array[found[1]]  # type: ignore[index]

    def append(self, entry: Map) -> Map:
        """Append a new entry (a Map not yet in a document); returns it as the list holds it."""
        assert self.array is not None
        self.array.append(entry)
        appended = self.array[len(self.array) - 1]
        if isinstance(name := appended.get("index_name"), str):
            self._named.setdefault(name, []).append(self._next)
        self._next += 1
        return appended

    def remove(self, index_name: str) -> bool:
        """Remove the first entry named `index_name`; returns whether one existed."""
        found = next(self._positions(index_name), None)
        if found is None:
            return False
        index, position = found
        del self.array[position]  # type: ignore[union-attr]
        self._named[index_name].remove(index)
        insort(self._removed, index)
        return True


def find_index_entry(doc: Doc, block_id: str, index_name: str) -> Map | None:
    """First entry named ``index_name`` in array order, or None."""
    return EntryList(get_block(doc, block_id)).find(index_name)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_status(doc: Doc, entry: Map, status: str, ts: float) -> None:
    """Append a record superseding every current record and delete those records."""
    seen = [record["id"] for record in frontier([record for _, record in status_records(entry)])]
    writes = entry.get("statusWrites")
    if isinstance(writes, Array):
        writes.clear()
    else:
        writes = entry["statusWrites"] = Array()
    entry["status"] = status
    entry["timestamp"] = ts
    writes.append({"id": f"{doc.client_id}:{secrets.token_hex(8)}", "status": status,
                   "seen": seen, "ts": ts})


def add_index_entry(doc: Doc, block_id: str, index_name: str, status: str = "notStarted",
                    metadata: Mapping[str, Any] | None = None, ts: float | None = None) -> Map:
    """Add an index entry with an initial status write (or return the existing one)."""
    listed = EntryList(_require_block(doc, block_id))
    if listed.array is None:
        raise ValueError(f"block {block_id} has no indexingList array")
    return add_entry(doc, listed, index_name, status, metadata, ts)


def add_entry(doc: Doc, listed: EntryList, index_name: str, status: str = "notStarted",
              metadata: Mapping[str, Any] | None = None, ts: float | None = None) -> Map:
    """add_index_entry on a block's EntryList (which has an indexingList array)."""
    existing = listed.find(index_name)
    if existing is not None:
        return existing
    metadata = dict(metadata or {})
    if clash := RESERVED_ENTRY_KEYS & metadata.keys():
        raise ValueError(f"reserved entry keys {sorted(clash)}")
    with doc.transaction():
        entry = listed.append(Map({"index_name": index_name, **metadata, "statusWrites": Array()}))
        _write_status(doc, entry, status, _now_ms() if ts is None else ts)
    return entry


def _require_entry(doc: Doc, block_id: str, index_name: str) -> Map:
    entry = find_index_entry(doc, block_id, index_name)
    if entry is None:
        raise KeyError(f"no index entry {block_id}/{index_name}")
    return entry


def set_entry_metadata(doc: Doc, block_id: str, index_name: str, metadata: Mapping[str, Any],
                       remove: Collection[str] | None = None) -> None:
    """Set metadata keys of an index entry, and remove those in `remove`; without `remove`, a None value removes
    its key (with it, None is stored as null)."""
    update_metadata(doc, _require_entry(doc, block_id, index_name), metadata, remove)


def update_metadata(doc: Doc, entry: Map, metadata: Mapping[str, Any], remove: Collection[str] | None = None) -> None:
    """set_entry_metadata on an entry."""
    if clash := RESERVED_ENTRY_KEYS & {*metadata, *(remove or ())}:
        raise ValueError(f"reserved entry keys {sorted(clash)}")
    if remove is None:
        remove = [key for key, value in metadata.items() if value is None]
        metadata = {key: value for key, value in metadata.items() if value is not None}
    with doc.transaction():
        for key in remove:
            if key in entry:
                del entry[key]
        for key, value in metadata.items():
            entry[key] = value


def remove_index_entry(doc: Doc, block_id: str, index_name: str) -> bool:
    """Remove the first entry named ``index_name``; returns whether one existed."""
    return EntryList(get_block(doc, block_id)).remove(index_name)


def set_status(doc: Doc, block_id: str, index_name: str, status: str,
               ts: float | None = None) -> str:
    """Record a status write that has seen the current frontier; returns the resolved status."""
    return write_status(doc, _require_entry(doc, block_id, index_name), status, ts)


def write_status(doc: Doc, entry: Map, status: str, ts: float | None = None) -> str:
    """set_status on an entry."""
    with doc.transaction():
        _write_status(doc, entry, status, _now_ms() if ts is None else ts)
    return status  # the new write supersedes every record this replica has


def resolved_status(doc: Doc, block_id: str, index_name: str) -> str | None:
    """Resolved status of an entry, or None if the block or entry does not exist."""
    entry = find_index_entry(doc, block_id, index_name)
    return None if entry is None else entry_status(entry)


def _plain(value: Any) -> Any:
    """JSON value with integral floats as ints (pycrdt stores ints as floats) where JavaScript holds them exactly,
    NaN and infinities as None (as JSON.stringify does); shared types as plain data: texts and XML types as their
    strings, binary values (a Uint8Array) in base64, subdocuments as None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER else value
    if isinstance(value, (Map, dict)):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (Array, list)):
        return [_plain(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (Text, XmlFragment, XmlElement, XmlText)):
        return str(value)
    if isinstance(value, Doc):
        return None
    return value


def _entry_json(entry: Map) -> dict[str, Any]:
    data = {key: _plain(value) for key, value in entry.items() if key != "statusWrites"}
    return {**data, "status": entry_status(entry)}


def _content_text(content: Any) -> str:
    return str(content) if isinstance(content, Text) else ""


def block_to_json(block: Map) -> dict[str, Any]:
    """Plain JSON of one block with resolved statuses (write records omitted)."""
    return {
        "id": _plain(block.get("id")),
        "type": _plain(block.get("type")),
        "content": _content_text(block.get("content")),
        "indexingList": [_entry_json(entry) for entry in entries(block)],
    }


def blocks_to_json(doc: Doc) -> dict[str, dict[str, Any]]:
    """Plain JSON of all blocks (see block_to_json)."""
    return {block_id: block_to_json(block) for block_id, block in blocks_map(doc).items() if isinstance(block, Map)}
