"""Unit tests of the client's pure parts: backoff, local store, awareness bookkeeping."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from client_py import Awareness, Backoff, LocalStore, StoreError
from client_py.awareness import OUTDATED_AFTER
from collab_server.protocol import AwarenessEntry, decode_awareness, decode_message, encode_awareness


def test_backoff_doubles_up_to_max_without_jitter() -> None:
    backoff = Backoff(base=0.1, max=1.0, jitter=0)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(10_000) == 1.0


def test_backoff_jitter_stays_within_its_band() -> None:
    backoff = Backoff(base=0.1, max=1.0, jitter=0.5, rng=random.Random(7))
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(0.4 <= d <= 0.8 for d in delays)
    assert len(set(delays)) > 100  # actually randomised


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": 2, "max": 1}, {"jitter": 1.5}])
def test_backoff_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def _edits(n: int) -> tuple[Doc, list[bytes]]:
    doc, updates = Doc(), []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("t", type=Text)
    for i in range(n):
        text += str(i)
    return doc, updates


def test_store_roundtrip_and_compaction(tmp_path: Path) -> None:
    doc, updates = _edits(5)
    store = LocalStore(tmp_path / "s.db", "room", compact_every=3)
    assert store.load() is None
    for update in updates[:4]:
        store.append(update)
    assert store.compaction_due
    store.compact(_merged(updates[:4]))
    assert not store.compaction_due
    store.append(updates[4])
    store.close()

    reopened = LocalStore(tmp_path / "s.db", "room")
    restored = Doc()
    restored.apply_update(reopened.load())
    assert str(restored.get("t", type=Text)) == str(doc.get("t", type=Text)) == "01234"
    assert reopened._db.execute("SELECT count(*) FROM updates").fetchone()[0] == 2
    reopened.close()


def _merged(updates: list[bytes]) -> bytes:
    doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc.get_update()


def test_a_write_the_store_cannot_take_stores_nothing_and_delays_compaction(tmp_path: Path) -> None:
    """Appends commit all or none; a failed compaction is not due again until as many more rows are stored."""
    doc, updates = Doc(), []
    doc.observe(lambda event: updates.append(event.update))
    for chunk in ("a", "b" * 20_000, "c"):
        doc.get("t", type=Text).insert(len(str(doc.get("t", type=Text))), chunk)
    store = LocalStore(tmp_path / "s.db", "room", compact_every=2)
    store.append(updates[0])
    store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.append(updates[2], updates[1])  # the small one fits, the large one does not
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.compact(doc.get_update())
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.append(updates[1], updates[2])
    assert not store.compaction_due  # three rows, but the failed compaction put it off until five
    store.append(b"\x00\x00", b"\x00\x00")
    assert store.compaction_due
    assert [bytes(row[0]) for row in store._db.execute("SELECT data FROM updates ORDER BY seq")][:3] == updates
    store.close()


def test_a_checkpoint_gives_the_space_of_the_stores_wal_back(tmp_path: Path) -> None:
    doc, updates = _edits(50)
    store = LocalStore(tmp_path / "s.db", "room")
    for update in updates:
        store.append(update)
    wal = tmp_path / "s.db-wal"
    assert wal.stat().st_size >= 50 * 4096  # a page or more per commit, kept until 1000 pages are reached
    store.checkpoint()
    assert wal.stat().st_size == 0
    restored = Doc()
    restored.apply_update(store.load())
    assert str(restored.get("t", type=Text)) == str(doc.get("t", type=Text))
    store.close()


def test_store_is_bound_to_its_room(tmp_path: Path) -> None:
    LocalStore(tmp_path / "s.db", "room-a").close()
    with pytest.raises(StoreError, match="room-a"):
        LocalStore(tmp_path / "s.db", "room-b")


def test_awareness_applies_newer_clocks_and_removals() -> None:
    now = [0.0]
    awareness = Awareness(1, now=lambda: now[0])

    def update(*entries: tuple[int, int, str]) -> set[int]:
        message = decode_message(encode_awareness([AwarenessEntry(*entry) for entry in entries]))
        return awareness.apply(message.payload)

    assert update((2, 1, '{"n": 1}'), (1, 9, '{"me": true}')) == {2}  # entries about ourselves are ignored
    assert update((2, 1, '{"n": 0}')) == set()  # same clock, not newer
    assert update((2, 2, '{"n": 2}')) == {2}
    assert awareness.peers == {2: {"n": 2}}
    assert update((2, 3, "null")) == {2}
    assert update((2, 2, '{"n": 2}')) == set()  # a stale state cannot resurrect a removed peer
    assert awareness.peers == {}

    update((3, 1, "{}"))
    now[0] = OUTDATED_AFTER + 1
    assert awareness.expire() == {3}
    assert awareness.peers == {}


def test_awareness_renews_local_state_before_it_expires() -> None:
    now = [0.0]
    awareness = Awareness(1, now=lambda: now[0])
    assert awareness.renewal() is None  # nothing to renew
    awareness.set_local_state({"name": "x"})
    assert awareness.renewal() is None  # still fresh
    now[0] = OUTDATED_AFTER / 2
    renewed = awareness.renewal()
    assert renewed is not None
    [entry] = decode_awareness(decode_message(renewed).payload)
    assert (entry.client_id, entry.clock, entry.state) == (1, 2, '{"name": "x"}')
    assert awareness.renewal() is None


def test_a_refusal_asks_for_the_wait_its_retry_after_header_gives() -> None:
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    from client_py.client import MAX_RETRY_AFTER, retry_after

    def refusal(**headers: str) -> InvalidStatus:
        return InvalidStatus(Response(503, "Service Unavailable", Headers(headers), b""))

    assert retry_after(refusal(**{"Retry-After": "5"})) == 5.0
    assert retry_after(refusal(**{"Retry-After": "86400"})) == MAX_RETRY_AFTER
    assert retry_after(refusal(**{"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"})) == 0.0  # dates: backoff only
    assert retry_after(refusal()) == 0.0
    assert retry_after(OSError("connection refused")) == 0.0


def test_a_store_is_used_by_one_client_at_a_time(tmp_path: Path) -> None:
    """Two clients on one store: one's compaction would drop what the other appended since it loaded. The second
    opener, in this process or another, is refused while the first has it open."""
    store = LocalStore(tmp_path / "s.db", "room")
    store.append(b"\x00\x00")
    with pytest.raises(StoreError, match="another client has it open"):
        LocalStore(tmp_path / "s.db", "room")
    other = subprocess.run([sys.executable, "-c", "import sys; from client_py import LocalStore; "
                            "LocalStore(sys.argv[1], 'room')", str(tmp_path / "s.db")],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "another client has it open" in other.stderr
    store.close()
    reopened = LocalStore(tmp_path / "s.db", "room")
    assert reopened.load() == b"\x00\x00" and not reopened.deleted
    reopened.mark_deleted()
    reopened.close()
    final = LocalStore(tmp_path / "s.db", "room")
    assert final.deleted
    final.close()
