"""SQLite-specific store behaviour (the shared contract, anchor defects 1-3 included, is in
test_store_contract.py)."""

import asyncio
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import text_updates


def rebuild(updates: list[bytes]) -> str:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return str(doc.get("t", type=Text))


@pytest.fixture
async def store(tmp_path: Path):
    s = SQLiteStore(str(tmp_path / "s.db"), compact_threshold=10_000)
    await s.open()
    yield s
    await s.close()


async def test_concurrent_loads_of_different_documents(store: SQLiteStore) -> None:
    """Loads share one reader connection: concurrent snapshots must not interleave their transactions."""
    docs = {f"doc{i}": text_updates(i + 1) for i in range(8)}
    for name, (_, updates) in docs.items():
        await asyncio.gather(*(store.submit(name, u) for u in updates))
    loaded = await asyncio.gather(*(store.load(name) for name in docs))
    for (name, (doc, _)), updates in zip(docs.items(), loaded):
        assert rebuild(updates) == str(doc.get("t", type=Text)), name


def test_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        SQLiteStore(str(tmp_path / "x.db"), synchronous="off")
