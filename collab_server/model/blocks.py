"""Typed API over the block document (shape documented in docs/model.md and web_demo/src/model.js).

``doc.get("blocks", type=Map)``: block id -> Map {id, type, content: Text, indexingList: Array of
index-entry Maps {index_name, status, timestamp, statusWrites: Array of write records, metadata}}.
Every mutation runs in one transaction (joining the caller's if one is open).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping
from typing import Any

from pycrdt import Array, Doc, Map, Text

from collab_server.model.status import frontier, resolve_writes

RESERVED_ENTRY_KEYS = frozenset({"index_name", "status", "timestamp", "statusWrites"})


def blocks_map(doc: Doc) -> Map:
    """The root ``blocks`` Map."""
    return doc.get("blocks", type=Map)


def get_block(doc: Doc, block_id: str) -> Map | None:
    """The block Map, or None."""
    return blocks_map(doc).get(block_id)


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


def entries(block: Map) -> Iterator[Map]:
    """The block's index entries in array order."""
    return iter(block["indexingList"])


def entry_status(entry: Map) -> str | None:
    """Resolved status of an entry (falls back to its materialised ``status``)."""
    writes = entry.get("statusWrites")
    resolved = resolve_writes(list(writes)) if writes is not None else None
    return resolved if resolved is not None else entry.get("status")


def find_index_entry(doc: Doc, block_id: str, index_name: str) -> Map | None:
    """First entry named ``index_name`` in array order, or None."""
    block = get_block(doc, block_id)
    if block is None:
        return None
    return next((e for e in entries(block) if e.get("index_name") == index_name), None)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_status(doc: Doc, entry: Map, status: str, ts: float) -> None:
    """Append a record superseding every current record and delete those records."""
    writes: Array = entry["statusWrites"]
    seen = [record["id"] for record in frontier(list(writes))]
    writes.clear()
    entry["status"] = status
    entry["timestamp"] = ts
    writes.append({"id": f"{doc.client_id}:{secrets.token_hex(8)}", "status": status,
                   "seen": seen, "ts": ts})


def add_index_entry(doc: Doc, block_id: str, index_name: str, status: str = "notStarted",
                    metadata: Mapping[str, Any] | None = None, ts: float | None = None) -> Map:
    """Add an index entry with an initial status write (or return the existing one)."""
    indexing_list: Array = _require_block(doc, block_id)["indexingList"]
    existing = find_index_entry(doc, block_id, index_name)
    if existing is not None:
        return existing
    metadata = dict(metadata or {})
    if clash := RESERVED_ENTRY_KEYS & metadata.keys():
        raise ValueError(f"reserved entry keys {sorted(clash)}")
    with doc.transaction():
        indexing_list.append(Map({"index_name": index_name, **metadata, "statusWrites": Array()}))
        entry = indexing_list[len(indexing_list) - 1]
        _write_status(doc, entry, status, _now_ms() if ts is None else ts)
    return entry


def remove_index_entry(doc: Doc, block_id: str, index_name: str) -> bool:
    """Remove the first entry named ``index_name``; returns whether one existed."""
    block = get_block(doc, block_id)
    if block is None:
        return False
    names = [e.get("index_name") for e in entries(block)]
    if index_name not in names:
        return False
    del block["indexingList"][names.index(index_name)]
    return True


def set_status(doc: Doc, block_id: str, index_name: str, status: str,
               ts: float | None = None) -> str:
    """Record a status write that has seen the current frontier; returns the resolved status."""
    entry = find_index_entry(doc, block_id, index_name)
    if entry is None:
        raise KeyError(f"no index entry {block_id}/{index_name}")
    with doc.transaction():
        _write_status(doc, entry, status, _now_ms() if ts is None else ts)
    return status  # the new write supersedes every record this replica has


def resolved_status(doc: Doc, block_id: str, index_name: str) -> str | None:
    """Resolved status of an entry, or None if the block or entry does not exist."""
    entry = find_index_entry(doc, block_id, index_name)
    return None if entry is None else entry_status(entry)


def _plain(value: Any) -> Any:
    """JSON value with integral floats as ints (pycrdt stores ints as floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _entry_json(entry: Map) -> dict[str, Any]:
    data = {key: _plain(value) for key, value in entry.items() if key != "statusWrites"}
    return {**data, "status": entry_status(entry)}


def blocks_to_json(doc: Doc) -> dict[str, dict[str, Any]]:
    """Plain JSON of all blocks with resolved statuses (write records omitted)."""
    return {
        block_id: {
            "id": block.get("id"),
            "type": block.get("type"),
            "content": str(block["content"]),
            "indexingList": [_entry_json(entry) for entry in entries(block)],
        }
        for block_id, block in blocks_map(doc).items()
    }
