"""Block document model shared by the server, the Python client and the browser demo."""

from collab_server.model.blocks import (
    add_index_entry,
    block_content,
    block_to_json,
    blocks_map,
    blocks_to_json,
    create_block,
    delete_block,
    entries,
    entry_status,
    find_index_entry,
    get_block,
    remove_index_entry,
    resolved_status,
    set_content,
    set_entry_metadata,
    set_status,
)
from collab_server.model.resolver import StatusChange, StatusResolver
from collab_server.model.status import (
    STATUS_PRIORITY,
    frontier,
    priority,
    resolve_writes,
)

__all__ = [
    "STATUS_PRIORITY",
    "StatusChange",
    "StatusResolver",
    "add_index_entry",
    "block_content",
    "block_to_json",
    "blocks_map",
    "blocks_to_json",
    "create_block",
    "delete_block",
    "entries",
    "entry_status",
    "find_index_entry",
    "frontier",
    "get_block",
    "priority",
    "remove_index_entry",
    "resolve_writes",
    "resolved_status",
    "set_content",
    "set_entry_metadata",
    "set_status",
]
