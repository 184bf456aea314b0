"""Room lifecycle: nothing served before load, idle unload, keepalive drops silent peers, room names."""

import asyncio
import base64
import gc
import os
import resource
import socket
import sqlite3
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import uvicorn
from pycrdt import Text

from collab_server import protocol as p
from collab_server.app import create_app
from collab_server.cli import Server, build_parser, uvicorn_config
from collab_server.config import Settings
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import RawPeer, non_reader, text_updates, text_writer
from tests.serverproc import ServerProcess, free_port, wait_until
from tests.services import pg_schema, postgres_dsn  # noqa: F401  (the redis case needs PostgreSQL)


class GatedStore(SQLiteStore):
    """A real SQLite store whose loads wait until the test opens the gate."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.loading = asyncio.Event()

    async def load(self, doc: str) -> list[bytes]:
        self.loading.set()
        await self.gate.wait()
        return await super().load(doc)


async def test_no_client_is_served_before_the_room_loads(tmp_path: Path) -> None:
    """Defect 8: edits sent while the room loads are applied after the load and stored."""
    store = GatedStore(str(tmp_path / "g.db"))
    port = free_port()
    settings = Settings(db=store.path, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn_config(settings, create_app(settings, store=store)))
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):  # fail rather than hang if the server never starts
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        peer = await RawPeer.connect(f"ws://127.0.0.1:{port}/room")
        doc, updates = text_updates(10)
        for update in updates:
            await peer.send(p.sync_update(update))
        await peer.send(p.sync_step1(b"\x00"))
        await asyncio.wait_for(store.loading.wait(), 5)
        assert await store.history("room") == []  # nothing applied or stored while loading
        assert peer.messages == []  # nothing answered while loading
        store.gate.set()
        await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == str(doc.get("t", type=Text)))
        assert isinstance(peer.messages[0], p.SyncMessage) and peer.messages[0].kind == p.SyncType.STEP1
        assert len(await store.history("room")) >= 1
        await peer.close()
    finally:
        server.should_exit = True
        await serving
    reopened = SQLiteStore(store.path)
    await reopened.open()
    assert _text(await reopened.load("room")) == str(doc.get("t", type=Text))
    await reopened.close()


def _text(updates: list[bytes]) -> str:
    from pycrdt import Doc

    d = Doc()
    for u in updates:
        d.apply_update(u)
    return str(d.get("t", type=Text))


async def _rooms_loaded(server) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{server.http_url}/ready")).json()["rooms_loaded"]


async def test_idle_room_is_flushed_and_unloaded(server_factory) -> None:
    server = server_factory("--idle-unload-seconds", "0.3")
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    doc, updates = text_updates(50)
    for update in updates:  # each committed before the next is sent: 50 log entries
        await peer.send(p.sync_update(update))
        await peer.sync()
    await peer.close()
    assert await _rooms_loaded(server) == 1
    for _ in range(100):
        if await _rooms_loaded(server) == 0:
            break
        await asyncio.sleep(0.05)
    assert await _rooms_loaded(server) == 0
    async with httpx.AsyncClient() as client:  # unloaded with 50 log entries (a tenth of the threshold): folded
        for _ in range(100):
            (entry,) = (await client.get(f"{server.http_url}/api/docs")).json()["docs"]
            if entry["log_entries"] == 0:
                break
            await asyncio.sleep(0.05)
    assert entry["log_entries"] == 0
    again = await RawPeer.connect(f"{server.ws_url}/room")
    await again.sync()
    assert str(again.doc.get("t", type=Text)) == str(doc.get("t", type=Text))


@pytest.mark.parametrize("grace", ["10", "0"])
async def test_a_shutdown_folds_the_logs_worth_folding_so_the_next_start_loads_checkpoints(server_factory,
                                                                                           grace: str) -> None:
    """A room loaded at shutdown is unloaded as an idle one is: a log of a tenth of the threshold or more is folded
    before the store closes (a 100,000-update document left ~2,500 entries to replay at the next start). No fold
    starts past the graceful timeout (folding every room's log once took seconds more): with none, nothing is
    folded, and the next start replays the logs."""
    server = server_factory("--shutdown-timeout", grace)
    short = await RawPeer.connect(f"{server.ws_url}/short")
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    doc, updates = text_updates(50)
    for update in updates:  # each committed before the next is sent: 50 log entries
        await peer.send(p.sync_update(update))
        await peer.sync()
    _, few = text_updates(3)
    for update in few:
        await short.send(p.sync_update(update))
        await short.sync()
    server.stop()
    with sqlite3.connect(server.db) as db:
        logs = dict(db.execute("SELECT doc, count(*) FROM updates GROUP BY doc").fetchall())
    # "room" folded; 3 entries are not worth rewriting a checkpoint for
    assert logs == ({"short": 3} if grace != "0" else {"short": 3, "room": 50})
    server.start()
    again = await RawPeer.connect(f"{server.ws_url}/room")
    await again.sync()
    assert str(again.doc.get("t", type=Text)) == str(doc.get("t", type=Text))


async def test_room_stays_loaded_while_connected(server_factory) -> None:
    server = server_factory("--idle-unload-seconds", "0.1", "--keepalive-interval", "0.1")
    peer = await RawPeer.connect(f"{server.ws_url}/room")
    await peer.wait_for(lambda: sum(isinstance(m, p.AwarenessMessage) for m in peer.messages) >= 5)
    assert await _rooms_loaded(server) == 1


async def test_keepalives_go_only_to_peers_that_got_nothing_lately(server_factory) -> None:
    """A peer receiving broadcasts gets no keepalive; an idle peer in another room keeps getting them."""
    server = server_factory("--keepalive-interval", "1")
    busy = await RawPeer.connect(f"{server.ws_url}/busy")
    idle = await RawPeer.connect(f"{server.ws_url}/idle")
    await busy.sync()
    await idle.sync()
    keepalives = lambda peer: sum(m == p.decode_message(p.KEEPALIVE) for m in peer.messages)
    stop = asyncio.Event()

    async def type_along() -> None:
        while not stop.is_set():  # every broadcast reaches the sender too, so `busy` is never silent
            await busy.edit(lambda doc: doc.get("t", type=Text).insert(0, "x"))
            await asyncio.sleep(0.05)

    typing = asyncio.create_task(type_along())
    await idle.wait_for(lambda: keepalives(idle) >= 2)
    stop.set()
    await typing
    assert keepalives(busy) == 0


async def test_peer_that_stops_answering_pings_is_dropped(server_factory) -> None:
    server = server_factory("--ping-interval", "0.3", "--ping-timeout", "0.3")
    watcher = await RawPeer.connect(f"{server.ws_url}/room")
    sock = socket.create_connection(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /room HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    sock.settimeout(10)

    def read_until_eof() -> bytes:  # never answers a ping
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data

    data = await asyncio.to_thread(read_until_eof)
    sock.close()
    assert data.startswith(b"HTTP/1.1 101")
    assert b"\x89" in data  # it was pinged before being dropped
    assert not watcher.closed.is_set()


async def test_room_name_is_the_decoded_path_without_query(server) -> None:
    a = await RawPeer.connect(f"{server.ws_url}/team%2Fnotes?token=abc")
    doc, updates = text_updates(3)
    await a.send(p.sync_update(updates[0]))
    b = await RawPeer.connect(f"{server.ws_url}/team/notes")
    await b.wait_for(lambda: str(b.doc.get("t", type=Text)) == "a")
    c = await RawPeer.connect(f"{server.ws_url}/team/other")
    await c.sync()
    assert str(c.doc.get("t", type=Text)) == ""


async def test_paths_whose_escapes_are_not_utf8_name_no_room(server) -> None:
    """uvicorn decodes each bad sequence as U+FFFD, so /x%FF and /x%FE would share one room, with a third path
    that spells U+FFFD out: the first two are refused, the third is a room of its own."""
    from websockets.exceptions import InvalidStatus

    for path in ("x%FF", "x%FE", "x%C3%28"):
        with pytest.raises(InvalidStatus) as info:
            await RawPeer.connect(f"{server.ws_url}/{path}")
        assert info.value.response.status_code == 403
    spelled = await RawPeer.connect(f"{server.ws_url}/x%EF%BF%BD")
    doc, updates = text_updates(1)
    await spelled.send(p.sync_update(updates[0]))
    again = await RawPeer.connect(f"{server.ws_url}/x\ufffd")
    await again.wait_for(lambda: str(again.doc.get("t", type=Text)) == "a")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/api/docs/x%FF/json")).json() == {"error": "invalid document name"}
        assert (await http.get("/api/docs/x%EF%BF%BD/update")).content == again.doc.get_update()
    assert server.alive()


async def test_the_server_lifts_a_low_open_file_limit_to_serve_more_clients(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 1024, "this test needs a hard limit of at least 1024 open files"
    server = ServerProcess(tmp_path / "collab.db",
                           preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))).start()
    peers: list[RawPeer] = []
    try:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text().splitlines()
        soft = next(line.split()[3] for line in limits if line.startswith("Max open files"))
        assert int(soft) == hard
        for _ in range(200):  # each one a descriptor in the server: more than the 128 it was started with
            peers.append(await RawPeer.connect(f"{server.ws_url}/crowd"))
        await asyncio.gather(*(peer.sync() for peer in peers))
        assert "open file limit raised from 128" in server.log()
    finally:
        await asyncio.gather(*(peer.close() for peer in peers))
        server.stop()


async def test_once_started_the_server_keeps_what_exists_out_of_full_collections(tmp_path: Path) -> None:
    """Modules, the app and its store live as long as the process: once the server has started they are frozen,
    so the cyclic collector's full collections walk only what came later."""
    cfg = Settings(db=str(tmp_path / "t.db"), host="127.0.0.1", port=free_port())
    server = Server(uvicorn_config(cfg, create_app(cfg)))
    gc.unfreeze()
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 10_000
        assert not any(isinstance(o, Server) for o in gc.get_objects())  # the server itself is frozen too
    finally:
        server.should_exit = True
        await task
        gc.unfreeze()


async def test_the_server_says_it_is_ready_once_listening_only(tmp_path: Path, server: ServerProcess) -> None:
    """Storage opens before the socket is bound, and binding may still fail (a port in use)."""
    await wait_until(lambda: "collab server ready" in server.log())
    assert server.log().index("Uvicorn running on") < server.log().index("collab server ready")
    done = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(server.port),
                           "--db", str(tmp_path / "second.db")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "address already in use" in done.stderr, done.stderr
    assert "collab server ready" not in done.stderr


@pytest.mark.parametrize(("args", "reason"), [
    (["--db", "{tmp}/no-such-dir/x.db"], "cannot open {tmp}/no-such-dir/x.db: [Errno 2]"),
    (["--db", "{tmp}/garbage.db"], "opening {tmp}/garbage.db failed: file is not a database"),
    (["--store", "postgres", "--postgres-dsn", "postgresql://127.0.0.1:1/test"], "opening postgres store failed"),
], ids=["unwritable-dir", "not-a-database", "no-postgres"])
def test_a_server_that_cannot_reach_its_storage_or_broker_says_why_in_one_line(
        tmp_path: Path, args: list[str], reason: str) -> None:
    (tmp_path / "garbage.db").write_bytes(b"this is not a SQLite database, only some bytes" * 100)
    done = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()),
                           *(arg.format(tmp=tmp_path) for arg in args)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"cannot start: {reason.format(tmp=tmp_path)}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.distributed
async def test_a_server_that_cannot_reach_redis_says_why_in_one_line(postgres_dsn: str, pg_schema: str) -> None:
    """The store opens first (broker redis needs PostgreSQL), then the broker fails."""
    dsn = f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}search_path={pg_schema}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()), "--store", "postgres",
        "--postgres-dsn", dsn, "--broker", "redis", "--redis-url", "redis://127.0.0.1:1/0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, stderr.decode()
    assert "cannot start: redis unreachable at start" in stderr.decode()
    assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize(("args", "env", "reason"), [
    (["--auth-required"], {}, "auth_required needs auth_secret (COLLAB_AUTH_SECRET)"),
    (["--version-interval", "60", "--versions-keep", "0"], {}, "version_interval needs versions_keep of at least 1"),
    ([], {"COLLAB_BROKER": "redis"},
     "broker redis needs store postgres: nodes on SQLite files do not share their documents"),
    (["--store", "postgres", "--postgres-dsn", "postgresql://127.0.0.1:1/test", "--broker", "redis",
      "--redis-url", "http://x"], {},
     "redis_url: Redis URL must specify one of the following schemes (redis://, rediss://, unix://)"),
    (["--webhook-url", "not a url"], {}, "webhook_url must be an http:// or https:// URL with a host"),
    ([], {"COLLAB_WEBHOOK_URL": "ftp://x/y"}, "webhook_url must be an http:// or https:// URL with a host"),
    (["--webhook-url", "http://x:abc/hook"], {}, "webhook_url: Invalid port: 'abc'"),
    ([], {"COLLAB_PING_INTERVAL": "often"}, "ping_interval: expected float, got 'often'"),
    (["--log-level", "loud"], {}, "log_level must be one of debug, info, warning, error, critical, not 'loud'"),
    (["--compact-threshold", "0"], {}, "compact_threshold must be at least 1, not 0"),
    (["--port", "70000"], {}, "port must be at most 65535, not 70000"),
    ([], {"COLLAB_KEEPALIVE_INTERVAL": "0"}, "keepalive_interval must be more than 0, not 0.0"),
    (["--request-header-timeout", "nan"], {}, "request_header_timeout must be a finite number, not nan"),
    ([], {"COLLAB_SHUTDOWN_TIMEOUT": "inf"}, "shutdown_timeout must be a finite number, not inf"),
], ids=["auth-without-secret", "versions-kept-none", "redis-without-postgres", "not-a-redis-url", "webhook-not-a-url",
        "webhook-not-http", "webhook-bad-port", "not-a-number", "unknown-choice", "below-least", "above-most",
        "zero-interval", "nan", "infinite"])
def test_settings_the_server_cannot_use_stop_it_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                                              reason: str) -> None:
    assert_refused(tmp_path, args, env, reason)


@pytest.mark.parametrize(("toml", "reason"), [
    ("loop_share = nan", "loop_share must be a finite number, not nan"),
    ("idle_unload_seconds = -inf", "idle_unload_seconds must be a finite number, not -inf"),
    ("compact_threshold = inf", "compact_threshold: expected int, got inf"),
    ("compact_threshold = 1.5", "compact_threshold: expected int, got 1.5"),  # int() took it as 1
    ("log_level: debug", "{file}: Expected '=' after a key in a key/value pair (at line 1, column 10)"),
])
def test_a_settings_file_the_server_cannot_use_stops_it_with_one_line(tmp_path: Path, toml: str,
                                                                      reason: str) -> None:
    """TOML writes nan and inf as floats of their own; a file that is not TOML is named."""
    file = tmp_path / "settings.toml"
    file.write_text(toml + "\n")
    assert_refused(tmp_path, ["--config", str(file)], {}, reason.format(file=file))


def test_settings_come_from_the_file_named_by_collab_config_and_lists_may_be_toml_arrays(tmp_path: Path) -> None:
    """`COLLAB_CONFIG` names the file as `--config` does (every other setting has its variable), and
    `cors_origins` may be an array there: it was refused as '"['https://a.example']" is not an origin'."""
    file = tmp_path / "settings.toml"
    file.write_text('cors_origins = ["https://a.example", "https://b.example:8443"]\n')
    settings = Settings.load(str(file))
    assert settings.cors_origins == "https://a.example,https://b.example:8443"
    file.write_text("compact_threshold = 0\n")
    assert_refused(tmp_path, [], {"COLLAB_CONFIG": str(file)}, "compact_threshold must be at least 1, not 0")


def assert_refused(tmp_path: Path, args: list[str], env: dict[str, str], reason: str) -> None:
    done = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()),
                           "--db", str(tmp_path / "x.db"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"collab-server: {reason}\n"
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened


def test_every_setting_is_explained_in_help_and_choices_take_any_case(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = "".join(capsys.readouterr().out.split())  # lines wrap where the terminal's width says
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text and f"envCOLLAB_{f.name.upper()})" in text
        assert len(f.metadata["help"]) > 10 and "".join(f.metadata["help"].split()) in text, f.name
    settings = Settings.load(None, log_level="DEBUG", store="SQLite")
    assert (settings.log_level, settings.store) == ("debug", "sqlite")
    with pytest.raises(ValueError, match="ping_timeout must be more than 0"):
        Settings(ping_timeout=0)


async def test_the_server_gives_freed_heap_memory_back_every_interval(server_factory) -> None:
    server = server_factory("--heap-trim-interval", "0.1", "--log-level", "debug")
    await wait_until(lambda: server.log().count("heap trimmed: resident") >= 2)


async def test_names_with_a_dot_segment_name_no_room(server) -> None:
    """A browser resolves "." and ".." segments of a URL, escaped or not: a page for the room ".." connected to "/"
    (refused) and retried for ever, and no page could reach such a room. They name none, here or in the API."""
    from websockets.exceptions import InvalidStatus

    for path in ("%2E", "%2E%2E", "a/%2E%2E/b", "a%2F.%2Fb", "x/.."):
        with pytest.raises(InvalidStatus) as info:
            await RawPeer.connect(f"{server.ws_url}/{path}")
        assert info.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/api/docs/a%2F..%2Fb/json")).json() == {"error": "invalid document name"}
    fine = await RawPeer.connect(f"{server.ws_url}/a.b/..c/...")  # dots within a part, and "...", are names
    await fine.sync()


def test_a_server_that_cannot_write_its_files_at_start_says_why_in_one_line(tmp_path: Path) -> None:
    """A full disk at start (here, a file size limit of 0: every write that grows a file fails): `cannot start:
    <reason>` and status 3, as for any storage that cannot be opened, not a traceback."""
    def no_file_growth() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # Python ignores SIGXFSZ: the write fails with EFBIG

    done = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()),
                           "--db", str(tmp_path / "new.db")], capture_output=True, text=True, timeout=60,
                          preexec_fn=no_file_growth)
    assert done.returncode == 3, done.stderr
    assert "cannot start: " in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []  # no empty database left, which the next start would take as one
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "target.db")  # a link to a database to be made there: the user's, kept
    done = subprocess.run([sys.executable, "-m", "collab_server", "serve", "--port", str(free_port()),
                           "--db", str(link)], capture_output=True, text=True, timeout=60, preexec_fn=no_file_growth)
    assert done.returncode == 3 and link.is_symlink(), done.stderr


async def test_sigterm_with_peers_that_read_nothing_stops_soon_and_cleanly(server_factory) -> None:
    """Peers frozen with megabytes buffered for them: the shutdown waited its whole timeout for their sockets to
    drain, then cancelled their sessions with a traceback. Their sockets are aborted a quarter of the timeout in."""
    server = server_factory("--shutdown-timeout", "8")
    await text_writer(f"{server.ws_url}/room", 8_000_000)
    socks = [await non_reader(server.ws_url, "/room") for _ in range(3)]
    await wait_until(lambda: server.metric("collab_connections") == 4)
    started = asyncio.get_running_loop().time()
    await asyncio.to_thread(server.stop)  # raises unless "everything committed" and a graceful exit
    assert asyncio.get_running_loop().time() - started < 6
    assert "Traceback" not in server.log() and "aborting a connection" in server.log()
    for sock in socks:
        sock.close()
