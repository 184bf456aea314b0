#!/usr/bin/env python3
"""Side-by-side benchmark: our collab_server vs the y-websocket reference server, Hocuspocus and pycrdt-websocket.

    .venv/bin/python benchmarks/run.py                 # full run (about 10-15 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # smoke run, under a minute
    .venv/bin/python benchmarks/run.py --servers ours,yws --scenarios fanout,latency --repeat 5

Every server runs on a free 127.0.0.1 port in its own subprocess with its own scratch database. The live
scenarios (fan-out, latency, presence, rooms, flood) run with every server up and their repeats interleaved; cold
load and memory run one server at a time. Real yjs clients (benchmarks/driver.mjs, one Node process per scenario
run) drive them. Results go to benchmarks/results/latest.json and a table on stdout. Only the standard
library is used here.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DRIVER = HERE / "driver.mjs"
RESULTS = HERE / "results"
PYTHON = sys.executable  # run us with the project's venv python (make bench does)
NODE = shutil.which("node") or "node"
# The driver keeps 20+ Y.Docs busy in one process; with V8's default 16 MB young generation the scavenger
# dominates the driver's time and makes every figure noisy. A bigger nursery is a client-side setting
# only; every server is measured through the same driver with the same flags.
NODE_DRIVER_FLAGS = ["--max-semi-space-size=128"]
RSS_CAP_KB = int(os.environ.get("BENCH_RSS_CAP_MB", "4096")) * 1024  # per server process tree

# ------------------------------------------------------------------------------------------------
# scenario sizes

FULL = {
    "repeat": 5,
    "fanout": {"readers": 20, "updates": 2000},
    "latency": {"readers": 20, "rate": 100, "seconds": 5},
    "presence": {"clients": 20, "rate": 20, "seconds": 5},
    "rooms": {"rooms": 200, "updatesPerRoom": 20},
    "flood": {"flooders": 2, "seconds": 5, "interval": 20},
    "cold": {"sizes": [5000, 100000], "trials": 3, "chunk": 1000},
    "memory": {"rooms": 100, "extraConns": 200, "updatesPerRoom": 10, "settleMs": 2000},
    "timeout_ms": 120000,
}
QUICK = {
    "repeat": 1,
    "fanout": {"readers": 5, "updates": 300},
    "latency": {"readers": 5, "rate": 100, "seconds": 1},
    "presence": {"clients": 5, "rate": 20, "seconds": 1},
    "rooms": {"rooms": 10, "updatesPerRoom": 5},
    "flood": {"flooders": 1, "seconds": 1, "interval": 20},
    "cold": {"sizes": [1000], "trials": 1, "chunk": 500},
    "memory": {"rooms": 10, "extraConns": 10, "updatesPerRoom": 5, "settleMs": 200},
    "after_build_sleep_s": 0.3,
    "timeout_ms": 30000,
}
ALL_SCENARIOS = ["fanout", "latency", "presence", "rooms", "flood", "cold", "memory"]

# ------------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_node_package(name: str) -> Path | None:
    """Where Node would resolve `name` from benchmarks/ (nearest node_modules up the tree)."""
    for base in [HERE, *HERE.parents]:
        candidate = base / "node_modules" / name / "package.json"
        if candidate.is_file():
            return candidate.parent
    return None


def node_version_of(name: str) -> str | None:
    pkg = find_node_package(name)
    if pkg is None:
        return None
    return json.loads((pkg / "package.json").read_text()).get("version")


def py_version_of(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class ServerSpec:
    name: str
    label: str
    client: str  # driver client kind: "yws" or "hocus"
    command: Callable[[int, Path], tuple[list[str], dict[str, str]]]  # (port, data path) -> argv, env
    data_is_dir: bool = False
    available: Callable[[], str | None] = lambda: None  # None if runnable, else why not
    version: Callable[[], str] = lambda: "?"
    persisted_count: Callable[[Path, str], int | None] | None = None  # rows stored for a room, if known
    notes: str = ""


def _ours_available() -> str | None:
    try:
        subprocess.run([PYTHON, "-m", "collab_server", "--help"], cwd=ROOT, capture_output=True, check=True,
                       timeout=60)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`python -m collab_server --help` failed: {exc}"
    return None


def _ours_version() -> str:
    """git commit (if any) plus a hash of the collab_server sources actually measured."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "collab_server").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "collab_server"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        commit, dirty = "", ""
    state = commit or "no commit"
    if dirty:
        state += "+uncommitted"
    return f"collab_server {state} (sources sha256 {digest.hexdigest()[:12]})"


def _ours_count(db: Path, room: str) -> int | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            (n,) = conn.execute("SELECT COUNT(*) FROM updates WHERE doc = ?", (room,)).fetchone()
            return n
        except sqlite3.Error:
            return None


def _pycrdt_count(db: Path, room: str) -> int | None:
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            (n,) = conn.execute("SELECT COUNT(*) FROM yupdates WHERE path = ?", (room,)).fetchone()
            return n
        except sqlite3.Error:
            return None


def _need_node(*pkgs: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [p for p in pkgs if find_node_package(p) is None]
        return f"node packages not installed: {', '.join(missing)} (npm ci in the repo root)" if missing else None
    return check


def _need_py(module: str, dist: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            __import__(module)
        except ImportError:
            return f"python package {dist} not installed (pip install -e '.[bench]')"
        return None
    return check


def _ours_command(port: int, db: Path, *flags: str) -> tuple[list[str], dict[str, str]]:
    return ([PYTHON, "-m", "collab_server", "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(db),
             "--log-level", "warning", *flags], {})


SERVERS: dict[str, ServerSpec] = {
    "ours": ServerSpec(
        name="ours",
        label="ours",
        client="yws",
        command=_ours_command,
        available=_ours_available,
        version=_ours_version,
        persisted_count=_ours_count,
        notes="SQLite WAL, synchronous=FULL, commit before broadcast (group commit), compaction at 500 log rows",
    ),
    "ours-normal": ServerSpec(
        name="ours-normal",
        label="ours (synchronous=normal)",
        client="yws",
        command=lambda port, db: _ours_command(port, db, "--sqlite-synchronous", "normal"),
        available=_ours_available,
        version=_ours_version,
        persisted_count=_ours_count,
        notes="as ours, but commits are not fsynced (WAL, synchronous=NORMAL): a process crash loses nothing, "
              "a power loss can lose the last commits; not in the default set",
    ),
    "yws": ServerSpec(
        name="yws",
        label="y-websocket-server",
        client="yws",
        command=lambda port, d: ([NODE, str(find_node_package("@y/websocket-server") or "") + "/src/server.js"],
                                 {"HOST": "127.0.0.1", "PORT": str(port), "YPERSISTENCE": str(d)}),
        data_is_dir=True,
        available=_need_node("@y/websocket-server", "y-leveldb"),
        version=lambda: f"@y/websocket-server {node_version_of('@y/websocket-server')} + y-leveldb "
                        f"{node_version_of('y-leveldb')} (YPERSISTENCE)",
        notes="reference server with its LevelDB persistence (YPERSISTENCE): every update written, no fsync",
    ),
    "yws-mem": ServerSpec(
        name="yws-mem",
        label="y-websocket-server (memory)",
        client="yws",
        command=lambda port, d: ([NODE, str(find_node_package("@y/websocket-server") or "") + "/src/server.js"],
                                 {"HOST": "127.0.0.1", "PORT": str(port)}),
        data_is_dir=True,
        available=_need_node("@y/websocket-server"),
        version=lambda: f"@y/websocket-server {node_version_of('@y/websocket-server')} (no persistence)",
        notes="reference server without persistence: nothing survives a restart (cold load is skipped)",
    ),
    "hocuspocus": ServerSpec(
        name="hocuspocus",
        label="hocuspocus",
        client="hocus",
        command=lambda port, db: ([NODE, str(HERE / "servers" / "hocuspocus.mjs")],
                                  {"HOST": "127.0.0.1", "PORT": str(port), "DB": str(db)}),
        available=_need_node("@hocuspocus/server", "@hocuspocus/extension-sqlite", "@hocuspocus/provider"),
        version=lambda: f"@hocuspocus/server {node_version_of('@hocuspocus/server')} + extension-sqlite "
                        f"{node_version_of('@hocuspocus/extension-sqlite')}, provider "
                        f"{node_version_of('@hocuspocus/provider')}",
        notes="defaults: broadcast batching per event-loop turn, whole-doc store debounced 2 s (max 10 s)",
    ),
    "pycrdt": ServerSpec(
        name="pycrdt",
        label="pycrdt-websocket",
        client="yws",
        command=lambda port, db: ([PYTHON, str(HERE / "servers" / "pycrdt_ws.py"), "--host", "127.0.0.1",
                                   "--port", str(port), "--db", str(db)], {}),
        available=_need_py("pycrdt.websocket", "pycrdt-websocket==0.16.5"),
        version=lambda: f"pycrdt-websocket {py_version_of('pycrdt-websocket')} + pycrdt-store "
                        f"{py_version_of('pycrdt-store')} (SQLiteYStore), pycrdt {py_version_of('pycrdt')}",
        persisted_count=_pycrdt_count,
        notes="one commit per update after broadcast; our launcher loads the room before serving it",
    ),
}
DEFAULT_SERVERS = ["ours", "yws", "hocuspocus", "pycrdt"]

_RUNNING: list["ServerProc"] = []


class ServerProc:
    def __init__(self, spec: ServerSpec, data: Path, log_path: Path, wrap: list[str] | None = None) -> None:
        self.spec = spec
        self.data = data
        self.log_path = log_path
        self.wrap = wrap or []
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> "ServerProc":
        self.port = free_port()
        argv, env = self.spec.command(self.port, self.data)
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {' '.join(argv)} port={self.port}\n".encode())
        log.flush()
        self.proc = subprocess.Popen([*self.wrap, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **env},
                                     start_new_session=True)
        _RUNNING.append(self)
        self.killed_for_memory = False
        threading.Thread(target=self._watch_memory, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.spec.name} did not answer /health within {timeout} s; see {self.log_path}")

    def _watch_memory(self) -> None:
        """The machine is shared: kill the server if its RSS passes the cap (a runaway load once reached 23 GB)."""
        proc = self.proc
        while proc is not None and proc.poll() is None:
            if self.rss_kb() > RSS_CAP_KB:
                self.killed_for_memory = True
                self.kill()
                return
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: every server here flushes its store on it), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        tree = _tree(self.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            if self.wrap:  # a profiler wraps the server: stop the server, the profiler then writes its output
                for pid in _tree(self.pid)[1:]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in tree[1:]:  # e.g. a profiled server outliving its profiler
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)
        if self in _RUNNING:
            _RUNNING.remove(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None:
            pids = _tree(self.proc.pid) if self.proc.poll() is None else []
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what it started
            for pid in pids:  # and anything of its tree that left the group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def cpu_seconds(self) -> float:
        """utime+stime of the server process and its descendants (so a wrapper is included)."""
        total = 0
        clk = os.sysconf("SC_CLK_TCK")
        for pid in _tree(self.pid):
            try:
                fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields_[11]) + int(fields_[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / clk

    def rss_kb(self) -> int:
        total = 0
        for pid in _tree(self.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total


def _tree(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    stack.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return out


def _kill_all() -> None:
    for server in list(_RUNNING):
        server.kill()


atexit.register(_kill_all)


def _on_signal(signum: int, _frame: Any) -> None:
    _kill_all()
    sys.exit(128 + signum)


# ------------------------------------------------------------------------------------------------
# driver


def run_driver(scenario: str, opts: dict[str, Any], timeout_s: float,
               server: "ServerProc | None" = None) -> dict[str, Any]:
    """Run one driver scenario to completion and return its result event (stopped early if the server dies)."""
    cmd = [NODE, *NODE_DRIVER_FLAGS, str(DRIVER), scenario, json.dumps(opts)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        dead_since: float | None = None
        outcome = None
        while proc.poll() is None:
            if time.monotonic() > deadline:
                outcome = f"driver timed out after {timeout_s:.0f} s"
            if server is not None and not server.alive():
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > 3:
                    outcome = "server died during the scenario"
            if outcome:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if outcome:
        return {"error": outcome, "stderr": stderr[-2000:]}
    result: dict[str, Any] | None = None
    for line in stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line)
            if event.get("event") == "result":
                result = event
    if result is None:
        return {"error": f"driver exited {proc.returncode} without a result", "stderr": stderr[-2000:]}
    result.pop("event", None)
    return result


class DriverSession:
    """A driver process we talk to (build: wait for 'built', then release it via stdin)."""

    def __init__(self, scenario: str, opts: dict[str, Any]) -> None:
        cmd = [NODE, *NODE_DRIVER_FLAGS, str(DRIVER), scenario, json.dumps(opts)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put(json.loads(line))
        self.events.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-50]

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"timed out waiting for driver event {name!r}"}
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                return {"error": f"driver exited before {name!r}: {''.join(self.stderr)[-1500:]}"}
            if event.get("event") == name:
                event.pop("event", None)
                return event

    def release(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()

    def close(self, timeout_s: float = 30) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# ------------------------------------------------------------------------------------------------
# scenarios (each returns a dict; the runner stores it under results[server][scenario])


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _summarize(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in keys:
        out[key] = _median_of(runs, key)
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if len(values) > 1:
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
    errors = [r["error"] for r in runs if r.get("error")]
    out["error"] = "; ".join(dict.fromkeys(str(e)[:300] for e in errors)) or None
    return out


def _timed_driver(server: ServerProc, scenario: str, opts: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cpu0 = server.cpu_seconds()
    result = run_driver(scenario, opts, timeout_s, server)
    alive = server.alive()
    result["server_cpu_s"] = server.cpu_seconds() - cpu0 if alive else None
    result["server_rss_kb_after"] = server.rss_kb() if alive else None
    if not alive:
        why = (f"killed: RSS over {RSS_CAP_KB // 1024} MB cap" if server.killed_for_memory
               else f"exit {server.proc.returncode}")
        result["error"] = (result.get("error") or "") + f" [server died: {why}]"
    return result


def live_once(ctx: "Ctx", server: ServerProc, scenario: str, i: int) -> dict[str, Any]:
    """Repeat `i` of a live scenario (fan-out, latency, presence, rooms or flood) in fresh rooms of a running server."""
    opts = {**ctx.base_opts(server), **ctx.sizes[scenario], "room": f"{scenario}-{i}-{ctx.nonce}"}
    r = _timed_driver(server, scenario, opts, ctx.timeout_s)
    figures = {
        "fanout": lambda: f"{_fmt(r.get('deliveries_per_s'))} deliveries/s",
        "latency": lambda: f"p50 {_fmt(r.get('p50_ms'))} ms, p99 {_fmt(r.get('p99_ms'))} ms",
        "presence": lambda: f"p50 {_fmt(r.get('p50_ms'))} ms, p99 {_fmt(r.get('p99_ms'))} ms",
        "rooms": lambda: f"connect+sync {_fmt(r.get('connect_sync_ms'))} ms, {_fmt(r.get('updates_per_s'))} updates/s",
        "flood": lambda: f"p50 {_fmt(r.get('p50_ms'))} ms, p99 {_fmt(r.get('p99_ms'))} ms, "
                         f"{_fmt(r.get('flood_updates'))} flood updates",
    }[scenario]()
    ctx.progress(f"{scenario} run {i + 1}: {figures}{' ERROR ' + str(r['error'])[:200] if r.get('error') else ''}")
    return r


LIVE_KEYS = {
    "fanout": ["deliveries_per_s", "elapsed_ms", "server_cpu_s", "delivered", "expected"],
    "latency": ["p50_ms", "p99_ms", "max_ms", "server_cpu_s", "received", "expected"],
    "presence": ["p50_ms", "p99_ms", "max_ms", "server_cpu_s", "received", "sent"],
    "rooms": ["connect_sync_ms", "updates_per_s", "server_cpu_s", "delivered", "expected"],
    "flood": ["p50_ms", "p99_ms", "max_ms", "server_cpu_s", "received", "sent", "flood_updates"],
}


def scenario_cold(ctx: "Ctx", spec: ServerSpec) -> dict[str, Any]:
    """Build a doc of N updates through the server, restart it, time fresh clients' sync (per size)."""
    out: dict[str, Any] = {}
    if spec.name == "yws-mem":
        return {"skipped": "no persistence: a restarted server has no document"}
    cfg = ctx.sizes["cold"]
    for size in cfg["sizes"]:
        data = ctx.fresh_data(spec, f"cold{size}")
        server = ctx.start(spec, data)
        room = f"cold-{size}-{ctx.nonce}"
        entry: dict[str, Any] = {"updates": size}
        build_timeout = max(ctx.timeout_s, size / 200)  # pycrdt builds at a few hundred updates/s
        cpu0 = server.cpu_seconds()
        session = DriverSession("build", {**ctx.base_opts(server), "room": room, "updates": size,
                                          "chunk": cfg["chunk"], "timeoutMs": int(build_timeout * 1000)})
        built = session.wait_event("built", build_timeout + 30)
        entry["build_ms"] = built.get("build_ms")
        entry["build_updates_per_s"] = size / (built["build_ms"] / 1000) if built.get("build_ms") else None
        entry["build_error"] = built.get("error")
        # wait until the server has stored everything it is going to store while clients are connected
        entry["persist_wait_ms"] = _wait_persisted(spec, data, room, size, timeout_s=max(60, size / 100))
        session.release()
        result = session.wait_event("result", 60)
        session.close()
        entry["build_server_cpu_s"] = server.cpu_seconds() - cpu0
        entry["loaded_rss_kb_after_build"] = server.rss_kb()
        time.sleep(ctx.sizes.get("after_build_sleep_s", 1.0))  # hocuspocus stores on last disconnect
        entry["stop_exit_code"] = server.stop()
        entry["storage_bytes"] = _disk_usage(data)
        entry["log_rows"] = spec.persisted_count(data, room) if spec.persisted_count else None
        if result.get("error"):
            entry["build_error"] = entry["build_error"] or result["error"]
        trials = []
        for t in range(cfg["trials"]):
            server = ctx.start(spec, data)
            rss_before = server.rss_kb()
            cpu0 = server.cpu_seconds()
            r = _timed_driver(server, "sync", {**ctx.base_opts(server), "room": room, "expected": size},
                              ctx.timeout_s)
            if server.alive():
                r["server_cpu_s"] = server.cpu_seconds() - cpu0
                r["rss_loaded_delta_kb"] = server.rss_kb() - rss_before
            trials.append(r)
            server.stop()
            ctx.progress(f"cold {size}: trial {t + 1} sync {_fmt(r.get('cold_sync_ms'))} ms, "
                         f"all items {_fmt(r.get('cold_full_ms'))} ms, items "
                         f"{r.get('items')}/{size}, warm {_fmt(r.get('warm_sync_ms'))} ms"
                         f"{' ERROR ' + str(r['error'])[:200] if r.get('error') else ''}")
        entry.update(_summarize(trials, ["cold_sync_ms", "cold_full_ms", "warm_sync_ms", "items", "server_cpu_s",
                                         "rss_loaded_delta_kb"]))
        synced = [t for t in trials if t.get("cold_sync_ms") is not None]
        if synced and min(t.get("items") or 0 for t in synced) < size:
            entry["lost_or_missing"] = f"a synced client held {min(t.get('items') or 0 for t in synced)} of {size} items"
            entry["error"] = (entry.get("error") or "") + " " + entry["lost_or_missing"]
        if entry.get("build_error"):
            entry["error"] = (entry.get("error") or "") + f" build: {entry['build_error']}"
        out[str(size)] = entry
    return out


def _wait_persisted(spec: ServerSpec, data: Path, room: str, expected: int, timeout_s: float) -> float | None:
    """For servers whose store we can read: wait until the stored row count stops growing (max timeout)."""
    if spec.persisted_count is None or spec.name.startswith("ours"):  # ours commits before it broadcasts
        return None
    start = time.monotonic()
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - start < timeout_s:
        n = spec.persisted_count(data, room) or 0
        if n != last:
            last, stable_since = n, time.monotonic()
        elif n >= expected and time.monotonic() - stable_since > 0.5:
            break
        elif time.monotonic() - stable_since > 5:
            break  # stopped growing short of `expected`
        time.sleep(0.1)
    return (time.monotonic() - start) * 1000


def _disk_usage(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def scenario_memory(ctx: "Ctx", spec: ServerSpec) -> dict[str, Any]:
    server = ctx.start(spec, ctx.fresh_data(spec, "memory"))
    try:
        opts = {**ctx.base_opts(server), **ctx.sizes["memory"], "room": f"mem-{ctx.nonce}", "pid": server.pid}
        r = _timed_driver(server, "memory", opts, ctx.timeout_s)
    finally:
        server.stop()
    ctx.progress(f"memory: {_fmt(r.get('kb_per_room'))} KB/room, {_fmt(r.get('kb_per_conn'))} KB/connection")
    return r


# ------------------------------------------------------------------------------------------------
# orchestration


@dataclass
class Ctx:
    sizes: dict[str, Any]
    workdir: Path
    nonce: str
    wrap: Callable[[ServerSpec, str], list[str] | None] = lambda spec, tag: None
    current: str = ""
    counter: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def timeout_s(self) -> float:
        return self.sizes["timeout_ms"] / 1000 * 3

    def base_opts(self, server: ServerProc) -> dict[str, Any]:
        return {"url": server.url, "client": server.spec.client, "timeoutMs": self.sizes["timeout_ms"]}

    def fresh_data(self, spec: ServerSpec, tag: str) -> Path:
        self.counter += 1
        base = self.workdir / f"{spec.name}-{tag}-{self.counter}"
        if spec.data_is_dir:
            base.mkdir(parents=True)
            return base
        return base.with_suffix(".db")

    def start(self, spec: ServerSpec, data: Path) -> ServerProc:
        return ServerProc(spec, data, self.workdir / f"{spec.name}.log", self.wrap(spec, self.current)).start()

    def progress(self, msg: str) -> None:
        line = f"  [{self.current}] {msg}"
        print(line, flush=True)


def wait_quiet(servers: list[ServerProc], window_s: float = 0.3, limit_s: float = 30.0) -> None:
    """Wait until no server uses CPU (at most one clock tick over `window_s`), so work one server defers
    after its run (a debounced store, a commit backlog) does not land in another server's measurement."""
    deadline = time.monotonic() + limit_s
    before = [s.cpu_seconds() for s in servers]
    while time.monotonic() < deadline:
        time.sleep(window_s)
        after = [s.cpu_seconds() for s in servers]
        if all(b - a <= 0.011 for a, b in zip(before, after)):
            return
        before = after


def run_live(ctx: Ctx, specs: list[ServerSpec], live: list[str], results: dict[str, Any]) -> None:
    """Fan-out, latency, presence and rooms with every server up at once and the repeats interleaved: repeat i runs
    each server in turn (the order rotated every repeat), after all are idle, so a machine that speeds up or
    slows down during the run moves every server's figures alike and the per-repeat ratios stay paired."""
    servers: dict[str, ServerProc] = {}
    for spec in specs:
        ctx.current = spec.name
        try:
            servers[spec.name] = ctx.start(spec, ctx.fresh_data(spec, "live"))
        except (RuntimeError, TimeoutError) as exc:
            for s in live:
                results[spec.name][s] = {"error": str(exc)}
    names = list(servers)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {s: [] for s in live} for n in names}
    try:
        for s in live:
            for i in range(ctx.sizes["repeat"]):
                for name in names[i % len(names):] + names[:i % len(names)] if names else []:
                    ctx.current = name
                    if not servers[name].alive():
                        servers[name] = ctx.start(servers[name].spec, ctx.fresh_data(servers[name].spec, "live"))
                    wait_quiet(list(servers.values()))
                    try:
                        runs[name][s].append(live_once(ctx, servers[name], s, i))
                    except Exception as exc:  # keep going: one broken run must not hide the rest
                        runs[name][s].append({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        for server in servers.values():
            server.stop()
    for name in names:
        for s in live:
            results[name][s] = _summarize(runs[name][s], LIVE_KEYS[s])


def run_offline(ctx: Ctx, spec: ServerSpec, scenarios: list[str], res: dict[str, Any]) -> None:
    """Cold load and memory, one server at a time: each starts and restarts its own server processes."""
    ctx.current = spec.name
    for s in ("cold", "memory"):
        if s in scenarios:
            fn = scenario_cold if s == "cold" else scenario_memory
            try:
                res[s] = fn(ctx, spec)
            except Exception as exc:
                res[s] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                _kill_all()


# ------------------------------------------------------------------------------------------------
# table

# (label, getter, higher_is_better, unit formatter)
def _get(*path: str) -> Callable[[dict[str, Any]], Any]:
    def getter(res: dict[str, Any]) -> Any:
        cur: Any = res
        for key in path:
            if not isinstance(cur, dict):
                return None
            cur = cur.get(key)
        return cur
    getter.path = path  # type: ignore[attr-defined]
    return getter


def paired_ratios(ours: dict[str, Any], other: dict[str, Any], path: tuple[str, ...], higher: bool) -> list[float]:
    """Per-repeat ratios of a live figure (repeat i of every server ran back to back), > 1 when ours is better."""
    if len(path) != 2 or path[0] not in LIVE_KEYS:
        return []
    scenario, key = path
    pairs = zip(ours.get(scenario, {}).get("runs", []), other.get(scenario, {}).get("runs", []))
    values = [(a.get(key), b.get(key)) for a, b in pairs]
    return [a / b if higher else b / a for a, b in values
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0]


def metric_rows(sizes: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], Any], bool, str, list[str]]]:
    f, l_, a, r, m = sizes["fanout"], sizes["latency"], sizes["presence"], sizes["rooms"], sizes["memory"]
    fl = sizes["flood"]
    rows = [
        (f"fan-out 1→{f['readers']}, {f['updates']} upd: deliveries/s", _get("fanout", "deliveries_per_s"), True,
         "{:,.0f}", ["fanout"]),
        ("fan-out: server CPU s", _get("fanout", "server_cpu_s"), False, "{:.2f}", ["fanout"]),
        (f"latency {l_['readers']} readers @{l_['rate']}/s: p50 ms", _get("latency", "p50_ms"), False, "{:.1f}",
         ["latency"]),
        ("latency: p99 ms", _get("latency", "p99_ms"), False, "{:.1f}", ["latency"]),
        (f"presence {a['clients']} cursors @{a['rate']}/s each: p50 ms", _get("presence", "p50_ms"), False, "{:.1f}",
         ["presence"]),
        ("presence: p99 ms", _get("presence", "p99_ms"), False, "{:.1f}", ["presence"]),
        ("presence: server CPU s", _get("presence", "server_cpu_s"), False, "{:.2f}", ["presence"]),
        (f"{r['rooms']} rooms × 2: connect+sync ms", _get("rooms", "connect_sync_ms"), False, "{:,.0f}", ["rooms"]),
        (f"{r['rooms']} rooms: updates/s ({r['updatesPerRoom']}/room)", _get("rooms", "updates_per_s"), True,
         "{:,.0f}", ["rooms"]),
        (f"a room beside {fl['flooders']} flooding: p50 ms", _get("flood", "p50_ms"), False, "{:.1f}", ["flood"]),
        ("  beside flooding: p99 ms", _get("flood", "p99_ms"), False, "{:.1f}", ["flood"]),
    ]
    for size in sizes["cold"]["sizes"]:
        rows.append((f"cold load {size:,} upd: fresh client has all ms", _get("cold", str(size), "cold_full_ms"), False,
                     "{:,.1f}", ["cold", str(size)]))
        rows.append((f"  build {size:,} upd via server: upd/s", _get("cold", str(size), "build_updates_per_s"),
                     True, "{:,.0f}", ["cold", str(size), "build"]))
        rows.append((f"  storage after {size:,} upd: KB", lambda res, s=str(size): (
            (res.get("cold", {}).get(s, {}).get("storage_bytes") or 0) / 1024 or None), False, "{:,.0f}",
            ["cold", str(size), "build"]))
    rows += [
        (f"memory: KB per idle room ({m['rooms']} rooms)", _get("memory", "kb_per_room"), False, "{:,.1f}",
         ["memory"]),
        (f"memory: KB per connection (+{m['extraConns']})", _get("memory", "kb_per_conn"), False, "{:,.1f}",
         ["memory"]),
    ]
    return rows


def _fmt(v: Any, spec: str = "{:,.1f}") -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        return spec.format(v)
    return str(v)


def render_table(results: dict[str, Any], sizes: dict[str, Any], servers: list[str]) -> str:
    others = [s for s in servers if s != "ours"]
    has_ours = "ours" in servers
    header = ["metric", *[results[s]["label"] for s in servers]]
    if has_ours:
        header += [f"ours vs {results[s]['label']}" for s in others]
    lines = [header]
    flagged: list[str] = []
    for label, getter, higher, spec_fmt, err_path in metric_rows(sizes):
        if all(getter(results[s]) is None and not _get(*err_path, "error")(results[s]) for s in servers):
            continue  # scenario not run
        row = [label + (" ↑" if higher else " ↓")]
        values = {}
        for s in servers:
            v = getter(results[s])
            err = _get(*err_path, "error")(results[s])
            values[s] = v
            cell = _fmt(v, spec_fmt)
            if err:
                cell += " !"
                flagged.append(f"{results[s]['label']} / {label.strip()}: {str(err)[:300]}")
            row.append(cell)
        if has_ours:
            for s in others:
                a, b = values.get("ours"), values.get(s)
                paired = paired_ratios(results["ours"], results[s], getattr(getter, "path", ()), higher)
                if len(paired) > 1:
                    row.append(f"{statistics.median(paired):.2f}× ({min(paired):.2f}–{max(paired):.2f})")
                elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
                    ratio = a / b if higher else b / a
                    row.append(f"{ratio:.2f}×")
                else:
                    row.append("—")
        lines.append(row)
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
    out = []
    for i, r in enumerate(lines):
        out.append("| " + " | ".join(str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j])
                                     for j, c in enumerate(r)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) if j == 0 else "-" * (w + 1) + ":" for j, w in enumerate(widths))
                       + "|")
    out.append("")
    out.append("↑ higher is better, ↓ lower is better. Values are medians over the repeats. Ratio columns: > 1× "
               "means ours is better (ours÷other for ↑, other÷ours for ↓). For fan-out, latency, presence, rooms and "
               "flood, where repeat i of every server runs back to back, the ratio is the median of the per-repeat "
               "ratios, their range in brackets; elsewhere it is the ratio of the medians.")
    if flagged:
        out.append("")
        out.append("! = the run reported a problem:")
        out += [f"  - {f_}" for f_ in dict.fromkeys(flagged)]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    node_v = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "node": node_v,
        "kernel": platform.release(), "loadavg_start": os.getloadavg(),
        "yjs": node_version_of("yjs"), "y-websocket": node_version_of("y-websocket"),
        "ws": node_version_of("ws"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under a minute")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help=f"comma list from {', '.join(SERVERS)} (default: %(default)s)")
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help="comma list (default: %(default)s)")
    parser.add_argument("--repeat", type=int, help="runs per live scenario (median reported)")
    parser.add_argument("--sizes", help="JSON merged into the scenario sizes, e.g. '{\"fanout\": {\"readers\": 50}}'")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json",
                        help="where the results go, as JSON (default benchmarks/results/latest.json)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases and server logs")
    parser.add_argument("--profile-ours", type=Path, metavar="DIR",
                        help="run our server under py-spy (one raw collapsed-stack file per scenario group in DIR); "
                             "figures from such a run are slower and not comparable")
    args = parser.parse_args(argv)

    sizes = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.sizes:
        for key, value in json.loads(args.sizes).items():
            if isinstance(value, dict):
                sizes[key].update(value)
            else:
                sizes[key] = value
    if args.repeat:
        sizes["repeat"] = args.repeat
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r}")
    for s in scenarios:
        if s not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    if shutil.which(NODE) is None:
        parser.error("node is not on PATH")
    for pkg in ("yjs", "y-websocket", "ws"):
        if find_node_package(pkg) is None:
            parser.error(f"node package {pkg} not found from {HERE}: run `npm ci` in the repository root")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="collab-bench-"))
    wrap: Callable[[ServerSpec, str], list[str] | None] = lambda spec, tag: None
    if args.profile_ours:
        pyspy = Path(PYTHON).parent / "py-spy"
        if not pyspy.exists():
            parser.error("py-spy not found in the venv (pip install py-spy)")
        args.profile_ours.mkdir(parents=True, exist_ok=True)
        counter = iter(range(1000))

        def wrap(spec: ServerSpec, tag: str) -> list[str] | None:  # noqa: F811
            if spec.name != "ours":
                return None
            out = args.profile_ours / f"ours-{next(counter):02d}.txt"
            return [str(pyspy), "record", "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out), "--"]

    ctx = Ctx(sizes=sizes, workdir=workdir, nonce=hex(int(time.time()))[2:], wrap=wrap)
    started = time.monotonic()
    results: dict[str, Any] = {}
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "sizes": sizes,
        "machine": machine_info(), "node_driver_flags": NODE_DRIVER_FLAGS, "servers": results,
        "profiled": bool(args.profile_ours),
    }
    ran: list[str] = []
    try:
        for name in servers:
            spec = SERVERS[name]
            why = spec.available()
            if why:
                print(f"== {name}: skipped ({why})", flush=True)
                results[name] = {"label": spec.label, "version": "not available", "skipped": why, "notes": spec.notes}
                continue
            print(f"== {name}: {spec.version()}", flush=True)
            results[name] = {"label": spec.label, "version": spec.version(), "notes": spec.notes}
            ran.append(name)
        live = [s for s in scenarios if s in LIVE_KEYS]
        if live and ran:
            print(f"== live scenarios, every server up, repeats interleaved: {', '.join(live)}", flush=True)
            run_live(ctx, [SERVERS[name] for name in ran], live, results)
        for name in ran:
            if {"cold", "memory"} & set(scenarios):
                print(f"== {name}: cold load and memory", flush=True)
                run_offline(ctx, SERVERS[name], scenarios, results[name])
    finally:
        _kill_all()
        report["wall_s"] = time.monotonic() - started
        report["machine"]["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        if args.keep:
            print(f"scratch data and server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table_servers = [s for s in servers if s in ran]
    print()
    for s in table_servers:
        print(f"- {results[s]['label']}: {results[s]['version']}")
    m = report["machine"]
    print(f"- machine: {m['cpu']} × {m['cores']}, Python {m['python']}, Node {m['node']}, yjs {m['yjs']}, "
          f"y-websocket {m['y-websocket']}; load average {m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f}")
    print()
    if table_servers:
        table = render_table(results, sizes, table_servers)
        print(table)
        report["table"] = table
        args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
