"""Commit before broadcast, write errors that surface, and nothing lost on leave, burst or shutdown."""

import asyncio
import resource
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pycrdt import Doc, Text
from websockets.exceptions import InvalidStatus

from collab_server import protocol as p
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import RawPeer, deletion, text_updates
from tests.storage.corrupt import a_database_with_a_corrupt_document
from tests.serverproc import GRACEFUL, ServerProcess, wait_until


def stored_doc(db, room: str = "room") -> Doc:
    """Rebuild a room straight from the SQLite file, as a restarted server would."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT data FROM checkpoints WHERE name = ?", (room,)).fetchone()
        rows = conn.execute("SELECT data FROM updates WHERE doc = ? ORDER BY id", (room,)).fetchall()
    doc = Doc()
    for (data,) in ([row] if row and row[0] else []) + rows:
        doc.apply_update(data)
    return doc


def stored_text(db, room: str = "room") -> str:
    return str(stored_doc(db, room).get("t", type=Text))


def assert_contains(stored: Doc, received: Doc) -> None:
    """Everything `received` holds is in `stored`: applying it changes nothing."""
    before = stored.get_state()
    stored.apply_update(received.get_update())
    assert stored.get_state() == before, "a client received an update that was never stored"


def fail_commits(db: Path, failing: bool = True) -> None:
    """Make every commit to the server's log fail, as a full disk would (or stop doing so)."""
    with sqlite3.connect(db) as ext:
        ext.execute("CREATE TRIGGER fail BEFORE INSERT ON updates BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                    if failing else "DROP TRIGGER fail")


async def a_failed_commit(server: ServerProcess) -> Doc:
    """Make commits fail, then send a change to "room" and see it refused (1011); returns the changed doc."""
    fail_commits(server.db)
    doc, _ = text_updates(3)
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    await writer.send(p.sync_update(doc.get_update()))
    assert (await writer.wait_closed())[0] == 1011
    return doc


async def test_write_error_closes_sender_and_nothing_is_broadcast(server) -> None:
    """Defect 3: a failed write is not swallowed; nobody receives the update."""
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(2)
    await writer.send(p.sync_update(updates[0]))
    await watcher.wait_for(lambda: str(watcher.doc.get("t", type=Text)) == "a")
    fail_commits(server.db)
    await writer.send(p.sync_update(updates[1]))
    code, reason = await writer.wait_closed()
    assert code == 1011 and "storage" in reason
    await watcher.wait_closed()  # the room is reset so no peer keeps an unsaved state
    assert str(watcher.doc.get("t", type=Text)) == "a"
    fail_commits(server.db, False)
    # the client reconnects with its edit (let in within a second: see the test below); the sync handshake
    # delivers it and now it is stored
    retry = await admitted(f"{server.ws_url}/room")
    retry.doc.apply_update(doc.get_update())
    await retry.send(p.sync_step2(doc.get_update()))
    await retry.wait_for(lambda: any(isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE
                                     for m in retry.messages))  # the echo comes after the commit
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == "ab"
    assert stored_text(server.db) == "ab"


async def test_while_commits_fail_clients_are_held_off_and_the_log_stays_short(server) -> None:
    """A full disk fails every commit, and each failure resets its room, whose clients reconnect, sync and re-send
    at once. While commits fail, new websockets are refused with 503 (y-websocket's backoff then grows) except
    one a second, whose commit tells whether storage works again; /ready says so; the log gets a line per 10 s
    rather than one per failure, room and connection; the first commit that succeeds again clears it all."""
    assert httpx.get(f"{server.http_url}/ready").status_code == 200
    doc = await a_failed_commit(server)

    with pytest.raises(InvalidStatus) as refused:
        await RawPeer.connect(f"{server.ws_url}/room")
    response = refused.value.response
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.body == b"storage failing, retry later: disk full"
    unready = httpx.get(f"{server.http_url}/ready")
    assert unready.status_code == 503 and unready.json()["error"] == "commits failing: disk full"
    edit = httpx.post(f"{server.http_url}/api/docs/room/update", content=doc.get_update())
    assert edit.status_code == 503 and edit.headers["Retry-After"] == "5"
    assert edit.json()["error"] == "storage failure: update not saved (disk full)"

    probe = await admitted(f"{server.ws_url}/room")  # within a second
    await probe.send(p.sync_update(doc.get_update()))
    assert (await probe.wait_closed())[0] == 1011
    log = server.log()
    assert log.count("storage commit failed") == 1 and log.count("room failed") == 1, log
    assert "closing connection" not in log  # the room's line covers the connections it closed
    assert "without completing handshake" not in log  # uvicorn's complaint about a refusal it sent itself
    assert server.metric('collab_errors_total{kind="storage"}') == 3  # the metric counts every one
    assert server.metric('collab_errors_total{kind="storage_refused"}') >= 1

    fail_commits(server.db, False)
    retry = await admitted(f"{server.ws_url}/room")
    await retry.send(p.sync_step2(doc.get_update()))
    await retry.wait_for(lambda: any(isinstance(m, p.SyncMessage) and m.kind == p.SyncType.UPDATE
                                     for m in retry.messages))  # the echo comes after the commit
    assert httpx.get(f"{server.http_url}/ready").status_code == 200
    assert "storage commits succeed again after 3 failed" in server.log()
    assert stored_text(server.db) == str(doc.get("t", type=Text))
    await RawPeer.connect(f"{server.ws_url}/room")  # everyone is let in again


async def test_a_stop_while_commits_fail_does_not_claim_everything_was_committed(server) -> None:
    await a_failed_commit(server)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) in GRACEFUL
    assert "collab server stopped; the latest commits failed: disk full" in server.log()
    assert "everything committed" not in server.log()


async def admitted(url: str, timeout: float = 5.0) -> RawPeer:
    """Connect, retrying while the server refuses with 503 (it lets one connection a second in)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await RawPeer.connect(url)
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            assert asyncio.get_running_loop().time() < deadline, "never let in"
            await asyncio.sleep(0.05)


async def test_last_client_leaving_mid_burst_loses_nothing(server_factory) -> None:
    """Defect 4: the room must not drop pending writes when the last client leaves."""
    server = server_factory("--idle-unload-seconds", "0")
    doc, updates = text_updates(500)
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    for update in updates:
        await peer.send(p.sync_update(update))
    await peer.close()
    server.stop()
    assert stored_text(server.db) == str(doc.get("t", type=Text))


async def test_clients_dropping_mid_burst_do_not_hurt_the_room(server) -> None:
    """Defect 5: abrupt disconnects during bursts neither crash the process nor drop the room's buffer."""
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    docs = []
    for i in range(8):
        doc, updates = text_updates(250, name="t")
        docs.append(doc)
        peer = await RawPeer.connect(f"{server.ws_url}/room")
        for update in updates:
            await peer.send(p.sync_update(update))
        peer.ws.transport.abort()
    expected = Doc()
    for doc in docs:
        expected.apply_update(doc.get_update())
    want = str(expected.get("t", type=Text))
    # the process survives, the room keeps serving, and whatever the watcher saw is stored
    await watcher.sync()
    assert server.alive()
    got = str(watcher.doc.get("t", type=Text))
    assert got and set(got) <= set(want)
    server.stop()
    await watcher.wait_closed()
    assert_contains(stored_doc(server.db), watcher.doc)


async def test_sigterm_mid_burst_keeps_everything_acknowledged(server) -> None:
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(2000)
    for update in updates[:1000]:
        await writer.send(p.sync_update(update))
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) > 0)
    sender = asyncio.create_task(_send_all(writer, updates[1000:]))
    await asyncio.to_thread(server.stop)
    sender.cancel()
    seen = str(watcher.doc.get("t", type=Text))
    stored = stored_text(server.db)
    assert stored.startswith(seen) and len(stored) >= len(seen)


async def test_sigterm_with_a_backlog_of_costly_messages_stops_cleanly_within_its_timeout(server_factory) -> None:
    """At shutdown a connection's queued messages are handled without pauses for its share of the loop, and those
    still queued once half of the graceful timeout is up are dropped (never applied, so never acknowledged;
    test_transport has the queue's part), rather than handled, paced, until uvicorn cancels the session, which
    logged errors and tracebacks. Here each message cuts an emoji of a large document, so the room rebuilds it
    for each, and the connection's share of the loop is small, so it pauses for a while after each."""
    server = server_factory("--shutdown-timeout", "1", "--loop-share", "0.01")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    source = Doc(client_id=5)
    source.get("t", type=Text).insert(0, "😀x" * 300 + "y" * 200_000)  # emoji i holds clocks 3i and 3i + 1
    await writer.send(p.sync_update(source.get_update()))
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) > 0, 20)
    whole = watcher.doc.get_state()
    for i in range(300):
        await writer.send(p.sync_update(deletion(5, 3 * i + 1)))
    await watcher.wait_for(lambda: watcher.doc.get_update(whole) != source.get_update(whole), 20)  # a cut came
    await asyncio.to_thread(server.stop)  # raises unless clean and everything committed
    log = server.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert_contains(stored_doc(server.db), watcher.doc)


@pytest.mark.parametrize("writer_left", [False, True], ids=["connected", "left"])
async def test_sigterm_ends_a_connection_s_pause_for_its_share_of_the_loop(server_factory, writer_left: bool
                                                                           ) -> None:
    """A connection paused after a costly message (for its share of the loop, fairshare.py) reads on at once when
    the server shuts down, rather than sleeping until uvicorn cancels its session with a traceback; so does one
    whose peer left, which uvicorn no longer counts among its connections. Here the share is so small that one
    small update pauses its connection for seconds."""
    server = server_factory("--loop-share", "0.00001", "--shutdown-timeout", "2")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(2)
    await writer.send(p.sync_update(updates[0]))
    await writer.send(p.sync_update(updates[1]))
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) == 1)
    if writer_left:
        await writer.close()  # once the closing handshake is done, the server has closed its socket
    await asyncio.to_thread(server.stop)  # raises unless clean and everything committed
    log = server.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert stored_text(server.db) == str(doc.get("t", type=Text))  # the second came before the shutdown


async def _send_all(peer: RawPeer, updates: list[bytes]) -> None:
    try:
        for update in updates:
            await peer.send(p.sync_update(update))
    except Exception:
        pass


async def test_sigkill_mid_burst_keeps_every_update_anyone_received(server) -> None:
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(3000)
    sender = asyncio.create_task(_send_all(writer, updates))
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) >= 500, 20)
    server.kill()
    sender.cancel()
    seen = str(watcher.doc.get("t", type=Text))
    stored = stored_text(server.db)
    assert len(seen) >= 500
    assert stored.startswith(seen), "an update was broadcast before it was committed"
    server.start()
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == stored


async def test_a_second_server_on_the_same_database_waits_until_the_first_is_gone(server_factory) -> None:
    """Rooms live in one process's memory: a second server on the same SQLite file would not reach the first
    one's clients, so it waits (a restart whose predecessor is still shutting down) and serves once the first is
    gone. The lock goes with the first process, even on SIGKILL."""
    first = server_factory()
    writer = await RawPeer.connect(f"{first.ws_url}/room")
    await writer.sync()
    doc, updates = text_updates(1)
    await writer.send(p.sync_update(updates[0]))
    await writer.wait_for(lambda: str(writer.doc.get("t", type=Text)) == str(doc.get("t", type=Text)))
    second = ServerProcess(first.db)
    starting = asyncio.create_task(asyncio.to_thread(second.start, 30))
    try:
        await wait_until(lambda: f"in use by pid {first.proc.pid}; waiting" in second.log(), 20)
        assert not starting.done() and first.alive()
        first.kill()
        await starting
        reader = await RawPeer.connect(f"{second.ws_url}/room")
        await reader.sync()
        assert str(reader.doc.get("t", type=Text)) == str(doc.get("t", type=Text))
        await reader.close()
    finally:
        if second.alive():
            second.kill()


async def test_a_burst_shares_log_entries_and_each_is_committed_before_anyone_receives_it(server) -> None:
    """Changes that arrive while a commit is in flight join one log entry (one row, one broadcast): a burst
    costs far fewer rows than messages, and whatever a watcher holds at any moment is already stored."""
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(400)
    sender = asyncio.create_task(_send_all(writer, updates))
    held: list[Doc] = []
    while len(str(watcher.doc.get("t", type=Text))) < len(updates):
        await watcher.wait_for(lambda: len(watcher.messages) > len(held))
        snapshot = Doc()
        snapshot.apply_update(watcher.doc.get_update())
        held.append(snapshot)
        assert_contains(stored_doc(server.db), snapshot)
    await sender
    with sqlite3.connect(server.db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM updates WHERE doc = 'room'").fetchone()
    assert rows < len(updates) // 2, f"{rows} log entries for {len(updates)} updates"
    assert stored_text(server.db) == str(doc.get("t", type=Text))


async def test_compaction_through_the_server_keeps_documents(server_factory) -> None:
    server = server_factory("--compact-threshold", "20")
    doc, updates = text_updates(300)
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    for update in updates:
        await peer.send(p.sync_update(update))
    expected = str(doc.get("t", type=Text))
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == expected)
    server.stop()
    with sqlite3.connect(server.db) as conn:
        (log_rows,) = conn.execute("SELECT COUNT(*) FROM updates").fetchone()
    assert log_rows < 20
    assert stored_text(server.db) == expected
    server.start()
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == expected


async def run_backup(db: Path, dest: Path, preexec: Callable[[], None] | None = None
                     ) -> tuple[int | None, bytes, bytes]:
    """`collab-server backup --db DB DEST` in a subprocess (running `preexec` first): exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collab_server", "backup", "--db", str(db), str(dest),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec)
    out, err = await proc.communicate()
    return proc.returncode, out, err


async def test_a_backup_taken_mid_burst_is_a_consistent_copy_a_server_can_serve(server_factory, tmp_path) -> None:
    """`collab-server backup` copies the database while a client writes and folds run: the copy holds what
    was seen before it began, is one snapshot (a prefix of the writer's text), and a server serves it."""
    server = server_factory("--compact-threshold", "50")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    await watcher.sync()
    doc, updates = text_updates(20000)
    done = asyncio.Event()

    async def write_until_done() -> int:
        for i, update in enumerate(updates):
            if done.is_set():
                return i
            await writer.send(p.sync_update(update))
            if i % 20 == 19:
                await asyncio.sleep(0.005)
        return len(updates)

    sender = asyncio.create_task(write_until_done())
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) >= 500, 20)
    seen = str(watcher.doc.get("t", type=Text))
    dest = tmp_path / "backup.db"
    code, out, err = await run_backup(server.db, dest)
    assert (code, err) == (0, b"") and b": 1 documents" in out
    after = len(str(watcher.doc.get("t", type=Text)))
    await watcher.wait_for(lambda: len(str(watcher.doc.get("t", type=Text))) >= after + 200, 20)
    done.set()
    sent = await sender
    assert sent < len(updates), "the writer must still be writing after the backup"

    copied = stored_text(dest)
    assert copied.startswith(seen) and str(doc.get("t", type=Text))[:sent].startswith(copied)
    assert len(copied) < sent
    restored = server_factory(db=dest)
    fresh = await RawPeer.connect(f"{restored.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == copied

    code, _, err = await run_backup(server.db, dest)
    assert code == 2 and b"exists" in err  # never overwrites
    code, _, err = await run_backup(tmp_path / "none.db", tmp_path / "b2.db")
    assert code == 2 and b"no database at" in err and not (tmp_path / "none.db").exists()


async def test_a_stored_document_yrs_cannot_read_is_refused_cleanly(server) -> None:
    # e.g. one stored by an earlier version that yrs had left inconsistent: a clean 1011 and a log line, not an
    # exception escaping into the ASGI server and an abnormal closure (1006)
    server.stop()  # the store numbers log entries itself
    with sqlite3.connect(server.db) as ext:
        ext.execute("INSERT INTO updates (doc, ts, data) VALUES ('broken', 0, ?)", (b"\x01\x05\x07",))
    server.start()
    reader = await RawPeer.connect(f"{server.ws_url}/broken")
    assert await reader.wait_closed() == (1011, "storage failure while loading the document")
    assert "stored update 1 of 1 cannot be applied" in server.log()
    assert "Exception in ASGI application" not in server.log()
    answer = httpx.get(f"{server.http_url}/api/docs/broken/json")
    assert answer.status_code == 503 and "cannot be applied" in answer.json()["error"]
    other = await RawPeer.connect(f"{server.ws_url}/room")
    await other.edit(lambda d: d.get("t", type=Text).insert(0, "fine"))
    await other.sync()


async def test_a_corrupt_database_makes_the_server_unready_and_its_stop_says_so(server_factory, tmp_path) -> None:
    """A load that finds the database malformed is a storage failure like a failed commit: /ready answers 503
    with the error, the metric counts it, the log gets one line without a traceback, and the stop does not
    claim that everything was committed (it was, into a file that may not open again)."""
    db = tmp_path / "collab.db"
    await a_database_with_a_corrupt_document(db)
    server = server_factory(db=db)
    assert httpx.get(f"{server.http_url}/ready").status_code == 200
    reader = await RawPeer.connect(f"{server.ws_url}/early")
    assert await reader.wait_closed() == (1011, "storage failure while loading the document")
    unready = httpx.get(f"{server.http_url}/ready")
    assert unready.status_code == 503
    assert unready.json()["error"] == "database corrupt: loading 'early' failed: database disk image is malformed"
    assert server.metric('collab_errors_total{kind="storage"}') == 1
    assert "storage: the database is corrupt; restore it from a backup: loading 'early'" in server.log()
    assert "Traceback" not in server.log()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) in GRACEFUL
    assert "collab server stopped; the database is corrupt, so commits may be lost: loading 'early'" in server.log()
    assert "everything committed" not in server.log()


async def test_commits_stuck_in_storage_make_the_server_unready_and_a_stop_gives_up_on_them(server_factory) -> None:
    """A commit that does not come back (a frozen file system; here another connection's write lock holds the
    writer thread, short of its 5 s busy timeout) turns /ready 503 after a second, although `SELECT 1` still
    answers; a stop waits for it until --shutdown-timeout, then says it gave up and exits (status 1) instead of
    waiting for the file system."""
    server = server_factory("--shutdown-timeout", "1")
    writer = await RawPeer.connect(f"{server.ws_url}/room")
    await writer.sync()
    _, updates = text_updates(1)
    blocker = sqlite3.connect(server.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await writer.send(p.sync_update(updates[0]))
        await wait_until(lambda: httpx.get(f"{server.http_url}/ready").status_code == 503, 4)
        assert httpx.get(f"{server.http_url}/ready").json()["error"].startswith("commits stuck for ")
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, 20)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    log = server.log()
    assert code == 1, log
    assert "collab server stopped; gave up at --shutdown-timeout on commits stuck for" in log
    assert "everything committed" not in log and "commits failed" not in log


async def test_deleting_the_lock_file_does_not_let_a_second_server_open_the_database(server_factory) -> None:
    """The README says `-lock` is not data; deleted under a running server, it let a second server open the same
    database, and rooms split between them. The lock is on the database file: the second waits as for any
    predecessor."""
    first = server_factory()
    for leftover in first.db.parent.glob(f"{first.db.name}-*"):
        if not leftover.name.endswith(("-wal", "-shm")):
            leftover.unlink()
    second = ServerProcess(first.db)
    starting = asyncio.create_task(asyncio.to_thread(second.start, 30))
    try:
        await wait_until(lambda: f"in use by pid {first.proc.pid}; waiting" in second.log(), 20)
        assert not starting.done() and first.alive()
    finally:
        await wait_until(lambda: second.alive(), 5)
        second.kill()
        with pytest.raises(RuntimeError):
            await starting


async def test_a_backup_that_fails_part_way_leaves_no_file_behind(tmp_path) -> None:
    """A backup to a disk that fills up (here, a file size limit the copy outgrows) left its partial copy at the
    destination, which a server then opened as a database holding part of the documents, and a second attempt
    was refused as the file existed. Now the copy is renamed into place only once whole."""
    db = tmp_path / "src.db"
    store = SQLiteStore(str(db), compact_threshold=10**9)
    await store.open()
    await asyncio.gather(*(store.submit(f"doc{i}", bytes([i]) * 20_000) for i in range(20)))
    await store.close()
    backups = tmp_path / "backups"
    backups.mkdir()

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # Python ignores SIGXFSZ: writes fail

    code, _, err = await run_backup(db, backups / "b.db", small_disk)
    assert code == 2 and err.startswith(b"collab-server: backup of ") and err.count(b"\n") == 1, err
    assert list(backups.iterdir()) == []
    code, out, err = await run_backup(db, backups / "b.db")
    assert (code, err) == (0, b"") and b": 20 documents" in out
    assert [f.name for f in backups.iterdir()] == ["b.db"]
