"""Pure multi-value-register semantics for index-entry statuses (mirrored in web_demo/src/model.js).

A write record is a plain mapping ``{"id", "status", "seen", "ts"}`` where ``seen`` lists the ids
of the frontier records its writer had seen. The frontier is every record whose id appears in no
other record's ``seen``; the resolved status is the highest-priority status on the frontier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

STATUS_PRIORITY: Mapping[str, int] = {"notStarted": 0, "processing": 1, "done": 2, "error": 3}

WriteRecord = Mapping[str, Any]


def priority(status: str) -> int:
    """Rank of a status; unknown statuses rank below every known one."""
    return STATUS_PRIORITY.get(status, -1)


def is_record(value: Any) -> bool:
    """Whether ``value`` has the shape of a write record (clients may write anything into a document)."""
    return (isinstance(value, Mapping) and isinstance(value.get("id"), str)
            and isinstance(value.get("status"), str) and isinstance(value.get("seen"), list)
            and all(isinstance(write_id, str) for write_id in value["seen"]))


def frontier(records: Sequence[WriteRecord]) -> list[WriteRecord]:
    """Records not superseded by (listed in the ``seen`` of) any other record."""
    seen = {write_id for record in records for write_id in record["seen"]}
    return [record for record in records if record["id"] not in seen]


def resolve_writes(records: Sequence[WriteRecord]) -> str | None:
    """Highest-priority frontier status (ties: greatest string, compared as JavaScript compares strings), or None
    without records."""
    statuses = [record["status"] for record in frontier(records)]
    return max(statuses, key=lambda status: (priority(status), _code_units(status)), default=None)


def _code_units(status: str) -> bytes:
    """A string's UTF-16 code units, as bytes that sort as JavaScript sorts strings: by code unit, where Python
    sorts by code point (U+FFFF before an emoji in Python, after it in JavaScript). A lone surrogate passes."""
    return status.encode("utf-16-be", "surrogatepass")
