"""JSON edits of the block model, as `POST /api/docs/{name}/blocks` takes them: checked, then applied.

A request is ``{"ops": [op, ...]}``; each op is an object with an ``op`` name and its fields (see FIELDS). Ops
run in order, in one transaction, all or nothing: they are checked first against what the document holds and
what the ops before them do, so an op that cannot apply (no such block: 404; a malformed field: 400) leaves
the document untouched. Checking reads only the blocks the ops name, never a copy of the document.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, Doc, Text

from collab_server.model import (
    STATUS_PRIORITY,
    blocks_to_json,
    create_block,
    delete_block,
    entry_status,
    get_block,
    set_content,
)
from collab_server.model.blocks import (
    MAX_SAFE_INTEGER,
    RESERVED_ENTRY_KEYS,
    EntryList,
    add_entry,
    update_metadata,
    write_status,
)

MAX_OPS = 1000
MAX_DEPTH = 32  # nesting of metadata values


class EditError(ValueError):
    """An edit request that cannot apply; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise EditError(400, f"{name} must be a string")
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # JSON can escape a lone surrogate; no Yjs document can hold one
        raise EditError(400, f"{name}: not valid Unicode (a lone surrogate)") from exc
    return value


def _id(value: Any, name: str) -> str:
    if not _str(value, name):
        raise EditError(400, f"{name} must not be empty")
    return value


def _status(value: Any, name: str) -> str:
    if not isinstance(value, str) or value not in STATUS_PRIORITY:
        raise EditError(400, f"{name} must be one of {', '.join(STATUS_PRIORITY)}")
    return value


def _read_status(value: Any, name: str) -> str | None:
    """A status as a reader saw it: any string a client wrote, or null (an entry without one)."""
    if value is not None and not isinstance(value, str):
        raise EditError(400, f"{name} must be a string or null")
    return value


def _json_value(value: Any, name: str, depth: int = 0) -> None:
    """Refuse what Yjs clients cannot hold: integers beyond 2^53, non-finite numbers, deep nesting."""
    if depth > MAX_DEPTH:
        raise EditError(400, f"{name}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, str):
        _str(value, name)
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise EditError(400, f"{name}: integer beyond 2^53")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EditError(400, f"{name}: number must be finite")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _json_value(item, f"{name}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _json_value(item, f"{name}.{_str(key, f'{name} key')}", depth + 1)
    else:
        raise EditError(400, f"{name}: not a JSON value")


def _metadata(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EditError(400, f"{name} must be an object")
    if clash := RESERVED_ENTRY_KEYS & value.keys():
        raise EditError(400, f"{name}: reserved entry keys {sorted(clash)}")
    _json_value(value, name)
    return value


# op name -> {field: (checker, required)}; "id" is the block id
FIELDS: dict[str, dict[str, tuple[Callable[[Any, str], Any], bool]]] = {
    "create_block": {"id": (_id, True), "type": (_str, True), "content": (_str, False)},
    "delete_block": {"id": (_id, True)},
    "set_content": {"id": (_id, True), "content": (_str, True), "expect": (_str, False)},
    "add_index": {"id": (_id, True), "index_name": (_id, True), "status": (_status, False),
                  "metadata": (_metadata, False)},
    "remove_index": {"id": (_id, True), "index_name": (_id, True)},
    "set_status": {"id": (_id, True), "index_name": (_id, True), "status": (_status, True),
                   "expect": (_read_status, False)},
    "set_metadata": {"id": (_id, True), "index_name": (_id, True), "metadata": (_metadata, True)},
}


def parse_ops(body: Any) -> list[dict[str, Any]]:
    """The ops of a request body, each checked against its fields; raises EditError(400)."""
    if not isinstance(body, dict) or set(body) != {"ops"} or not isinstance(body["ops"], list):
        raise EditError(400, 'expected {"ops": [...]}')
    ops = body["ops"]
    if not 1 <= len(ops) <= MAX_OPS:
        raise EditError(400, f"expected 1 to {MAX_OPS} ops")
    parsed = []
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or op["op"] not in FIELDS:
            raise EditError(400, f"ops[{i}]: op must be one of {', '.join(FIELDS)}")
        fields = FIELDS[op["op"]]
        if unknown := set(op) - set(fields) - {"op"}:
            raise EditError(400, f"ops[{i}] ({op['op']}): unknown fields {sorted(unknown)}")
        checked = {"op": op["op"]}
        for name, (check, required) in fields.items():
            if name in op:
                checked[name] = check(op[name], f"ops[{i}].{name}")
            elif required:
                raise EditError(400, f"ops[{i}] ({op['op']}): missing {name}")
        parsed.append(checked)
    return parsed


@dataclass
class _Block:
    """What checking needs to know of a block: whether it can hold text and entries, its entries (None for a block
    the ops create), its text and, for the names the ops touch, entry counts and statuses (after the ops before)."""

    has_text: bool
    has_list: bool
    listed: EntryList | None
    text: str = ""
    names: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)  # entries of the document the ops before removed
    added: set[str] = field(default_factory=set)  # names whose first entry the ops before added
    statuses: dict[str, str | None] = field(default_factory=dict)  # of the first entry, as the ops before set it

    def count(self, name: str) -> int:
        """How many entries are named `name`, after the ops before."""
        if name not in self.names:
            self.names[name] = self.listed.count(name) if self.listed else 0
        return self.names[name]


def _view(doc: Doc, block_id: str) -> _Block | None:
    block = get_block(doc, block_id)
    if block is None:
        return None
    content, listed = block.get("content"), EntryList(block)
    return _Block(isinstance(content, Text), listed.array is not None, listed,
                  str(content) if isinstance(content, Text) else "")


def check_ops(doc: Doc, ops: list[dict[str, Any]]) -> dict[str, EntryList]:
    """Raise EditError if an op would not apply after the ops before it; reads `doc`, changes nothing. Returns the
    entry lists of the blocks the ops name (those that exist), by block id."""
    blocks: dict[str, _Block | None] = {}
    lists: dict[str, EntryList] = {}
    for i, op in enumerate(ops):
        kind, block_id = op["op"], op["id"]
        if block_id not in blocks:
            blocks[block_id] = _view(doc, block_id)
            if (view := blocks[block_id]) and view.listed:
                lists[block_id] = view.listed
        block = blocks[block_id]
        if kind == "create_block":
            blocks[block_id] = block or _Block(True, True, None, op.get("content", ""))
            continue
        if kind == "delete_block":
            blocks[block_id] = None
            continue
        where = f"ops[{i}] ({kind})"
        if block is None:
            raise EditError(404, f"{where}: no block {block_id!r}")
        name = op.get("index_name", "")
        if kind == "set_content":
            if not block.has_text:
                raise EditError(400, f"{where}: block {block_id!r} has no content text")
            if "expect" in op and op["expect"] != block.text:
                raise EditError(409, f"{where}: the content of block {block_id!r} is not the expected one "
                                     "(it changed since it was read); nothing was changed")
            block.text = op["content"]
        if kind == "add_index":
            if not block.has_list:
                raise EditError(400, f"{where}: block {block_id!r} has no indexingList array")
            if not block.count(name):
                block.statuses[name] = op.get("status", "notStarted")
                block.names[name] = 1
                block.added.add(name)
        elif kind == "remove_index":
            if block.count(name):
                block.names[name] -= 1
                if name in block.added:  # the only one of that name (an entry is added only where there is none)
                    block.added.discard(name)
                else:
                    block.removed[name] = block.removed.get(name, 0) + 1
                block.statuses.pop(name, None)  # the first entry now is the next of the document's, if any
        elif kind in ("set_status", "set_metadata") and not block.count(name):
            raise EditError(404, f"{where}: no index entry {name!r} in block {block_id!r}")
        if kind == "set_status":
            if "expect" in op:
                if name in block.statuses:
                    status = block.statuses[name]
                else:  # one of the document's, untouched by the ops before
                    entry = block.listed.find(name, block.removed.get(name, 0))  # type: ignore[union-attr]
                    status = entry_status(entry)  # type: ignore[arg-type]
                if status != op["expect"]:
                    raise EditError(409, f"{where}: the status of {name!r} in block {block_id!r} is not the expected "
                                         "one (it changed since it was read); nothing was changed")
            block.statuses[name] = op["status"]
    return lists


def apply_ops(doc: Doc, ops: list[dict[str, Any]]) -> list[str]:
    """Check parsed ops, then apply them to `doc` (call it inside one transaction); returns the ids of the
    blocks they touch. When one cannot apply EditError is raised with `doc` untouched."""
    lists = check_ops(doc, ops)  # each block's entries read once, and kept current by the ops through it

    def listed(block_id: str) -> EntryList:
        if block_id not in lists:
            lists[block_id] = EntryList(get_block(doc, block_id))
        return lists[block_id]

    for op in ops:
        kind, block_id = op["op"], op["id"]
        if kind == "create_block":
            create_block(doc, block_id, op["type"], op.get("content", ""))
            lists.pop(block_id, None)
        elif kind == "delete_block":
            delete_block(doc, block_id)
            lists.pop(block_id, None)
        elif kind == "set_content":
            set_content(doc, block_id, op["content"])
        elif kind == "add_index":
            add_entry(doc, listed(block_id), op["index_name"], op.get("status", "notStarted"), op.get("metadata"))
        elif kind == "remove_index":
            listed(block_id).remove(op["index_name"])
        elif kind == "set_status":
            write_status(doc, listed(block_id).find(op["index_name"]), op["status"])  # type: ignore[arg-type]
        else:
            update_metadata(doc, listed(block_id).find(op["index_name"]), op["metadata"],  # type: ignore[arg-type]
                            op.get("remove"))
    return list(dict.fromkeys(op["id"] for op in ops))


def restore_ops(doc: Doc, target: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Ops that make the blocks of `doc` those of `target` (``blocks_to_json`` of a saved version): blocks
    created, deleted or edited, index entries added, removed or given the saved status and metadata.
    A block whose type changed, or that lacks its content text or entry list, is created anew. Entries are
    matched by name; duplicates, and entries without a name, are left alone."""
    current = blocks_to_json(doc)
    ops: list[dict[str, Any]] = [{"op": "delete_block", "id": bid} for bid in current.keys() - target.keys()]
    for bid, block in target.items():
        have, shape = current.get(bid), _view(doc, bid)
        if have is None or have["type"] != block["type"] or not (shape and shape.has_text and shape.has_list):
            if have is not None:
                ops.append({"op": "delete_block", "id": bid})
            ops.append({"op": "create_block", "id": bid, "type": block["type"] or "", "content": block["content"]})
            have = {"indexingList": []}
        elif have["content"] != block["content"]:
            ops.append({"op": "set_content", "id": bid, "content": block["content"]})
        ops += _entry_ops(bid, have["indexingList"], block["indexingList"])
    return ops


def _entry_ops(bid: str, have: list[dict[str, Any]], want: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    had, wanted = _by_name(have), _by_name(want)
    for entry in have:
        if isinstance(entry.get("index_name"), str) and entry["index_name"] not in wanted:
            ops.append({"op": "remove_index", "id": bid, "index_name": entry["index_name"]})
    for name, entry in wanted.items():
        metadata = {k: v for k, v in entry.items() if k not in RESERVED_ENTRY_KEYS}
        status = entry["status"]
        if name not in had:
            ops.append({"op": "add_index", "id": bid, "index_name": name, "metadata": metadata,
                        **({"status": status} if status is not None else {})})
            continue
        old = had[name]
        if status is not None and old["status"] != status:
            ops.append({"op": "set_status", "id": bid, "index_name": name, "status": status})
        changed = {k: v for k, v in metadata.items() if k not in old or old[k] != v}
        removed = sorted(old.keys() - metadata.keys() - RESERVED_ENTRY_KEYS)
        if changed or removed:  # with `remove` (not an op field of the API), a None value is stored as null
            ops.append({"op": "set_metadata", "id": bid, "index_name": name, "metadata": changed, "remove": removed})
    return ops


def _by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first entry of each name, as lookups by name find them; entries without a name are left out."""
    named: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(name := entry.get("index_name"), str):
            named.setdefault(name, entry)
    return named
