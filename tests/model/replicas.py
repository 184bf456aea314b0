"""Test helpers: syncing pycrdt replicas and reading state vectors."""

from __future__ import annotations

from pycrdt import Doc


def sync(source: Doc, target: Doc) -> None:
    """Send everything ``target`` lacks from ``source``."""
    target.apply_update(source.get_update(target.get_state()))


def sync_all(*docs: Doc) -> None:
    """Full pairwise sync."""
    for source in docs:
        for target in docs:
            if source is not target:
                sync(source, target)


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def state_vector(doc: Doc) -> dict[int, int]:
    """Decoded (v1) state vector: client id -> next clock."""
    data = doc.get_state()
    count, pos = _read_varuint(data, 0)
    clocks = {}
    for _ in range(count):
        client, pos = _read_varuint(data, pos)
        clocks[client], pos = _read_varuint(data, pos)
    return clocks
