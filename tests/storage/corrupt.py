"""A SQLite database with a damaged page, as a torn write or a truncated -wal leaves one."""

import asyncio
from pathlib import Path

from collab_server.storage.sqlite import SQLiteStore


async def a_database_with_a_corrupt_document(path: Path) -> None:
    """A database at `path` whose document "early" sits on a page whose header is garbage (as a torn write or a
    truncated -wal leaves one), with enough of "later" after it that opening the store does not read that page."""
    store = SQLiteStore(str(path), compact_threshold=10**9)  # its updates are no documents' to fold
    await store.open()
    await store.submit("early", b"EARLY-MARKER" + b"x" * 3000)
    await asyncio.gather(*(store.submit("later", bytes([i]) * 3000) for i in range(20)))
    await store.close()  # checkpointed into the database file
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    page = data.index(b"EARLY-MARKER") // page_size
    data[page * page_size:page * page_size + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))

