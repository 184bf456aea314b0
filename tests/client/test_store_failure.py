"""A client whose local store cannot be written (disk full, read-only) goes on syncing and stores what it missed
once the store works again. The failures are SQLite's own: the store's connection is given a page limit it has
reached (writes fail with SQLITE_FULL, "database or disk is full", as on a full disk) or made read-only."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import httpx
import pytest
from pycrdt import Doc, Text, merge_updates

from client_py import CollabClient, DocumentDeleted
from tests.client.test_client import FAST, room, text
from tests.serverproc import ServerProcess


def _connection(client: CollabClient) -> sqlite3.Connection:
    """The store's own connection: it holds the file's exclusive lock, so no other connection can break it."""
    return client._store.store._db


def _fill(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")


def _read_only(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA query_only = 1")


def _repair(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA query_only = 0")
    db.execute("PRAGMA max_page_count = 1073741823")


FAILURES: dict[str, Callable[[sqlite3.Connection], None]] = {"disk-full": _fill, "read-only": _read_only}


def _stored(db: sqlite3.Connection) -> Doc:
    """What the store holds, read row by row as a restart would."""
    doc = Doc()
    doc.apply_update(merge_updates(*(bytes(row[0]) for row in db.execute("SELECT data FROM updates ORDER BY seq"))))
    return doc


def _texts(doc: Doc) -> tuple[str, str]:
    return str(doc.get("t", type=Text)), str(doc.get("m", type=Text))


@pytest.mark.parametrize("failure", FAILURES)
async def test_syncing_goes_on_while_the_store_fails_and_what_it_missed_is_stored_after(
        server: ServerProcess, tmp_path, caplog: pytest.LogCaptureFixture, failure: str) -> None:
    name, store = room(), tmp_path / "client.db"
    caplog.set_level(logging.WARNING, logger="client_py")
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as client, \
            CollabClient(server.ws_url, name) as peer:
        await client.synced()
        await peer.synced()
        client.doc.get("t", type=Text).insert(0, "stored;")
        await client.flush()
        FAILURES[failure](_connection(client))

        peer.doc.get("m", type=Text).insert(0, "remote:" + "r" * 20_000)  # needs new pages to be stored
        await client.wait_until(lambda: str(client.doc.get("m", type=Text)).startswith("remote:"))
        for i in range(20):  # nothing escapes the edit
            ours = client.doc.get("t", type=Text)
            ours += f"<{i}>" + "x" * 2_000
        await client.flush()
        await peer.wait_until(lambda: text(peer) == text(client))
        assert client.connected and client.store_error is not None
        peer.doc.get("m", type=Text).insert(0, "more ")
        await client.wait_until(lambda: str(client.doc.get("m", type=Text)).startswith("more remote:"))

        _repair(_connection(client))
        await client.wait_until(lambda: client.store_error is None)
        assert _texts(_stored(_connection(client))) == _texts(client.doc)  # before close compacts the store
        expected = _texts(client.doc)
    store_warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and str(store) in r.getMessage()]
    assert len(store_warnings) == 1  # reported once, however many updates failed
    server.stop()
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as restarted:
        assert _texts(restarted.doc) == expected and expected[0].startswith("stored;<0>")


async def test_a_client_closed_while_its_store_fails_closes_it_and_the_server_has_its_edits(
        server: ServerProcess, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    name, store = room(), tmp_path / "client.db"
    caplog.set_level(logging.WARNING, logger="client_py")
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "stored;")
        await client.flush()
        _read_only(_connection(client))
        client.doc.get("t", type=Text).insert(7, "not stored")
        await client.flush()
    assert client.store_error is not None  # close could not store it either, and says so
    assert [r.levelno for r in caplog.records if "closed without the updates it missed" in r.getMessage()] == \
        [logging.ERROR]
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as again:  # the lock was released
        assert text(again) == "stored;"
        await again.synced()
        assert text(again) == "stored;not stored"


async def test_a_deletion_seen_while_the_store_fails_is_recorded_once_it_works_again(server: ServerProcess,
                                                                                tmp_path) -> None:
    name, store = room(), tmp_path / "client.db"
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as client:
        await client.synced()
        client.doc.get("t", type=Text).insert(0, "doomed")
        await client.flush()
        _read_only(_connection(client))
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.delete(f"/api/docs/{name}")).status_code == 204
        await client.wait_until(lambda: client.deleted and client.store_error is not None)
        _repair(_connection(client))  # a stopped client cannot be waited on: its close stores the mark at last
    assert client.store_error is None
    async with CollabClient(server.ws_url, name, store=store, backoff=FAST) as again:
        with pytest.raises(DocumentDeleted):
            await again.synced()
