"""Run the real server in a subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GRACEFUL = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` (a server's metrics or files: nothing to wait on) until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m collab_server serve` on 127.0.0.1 with its own database file and port."""

    def __init__(self, db: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None,
                 preexec: Callable[[], None] | None = None, ca: Path | None = None) -> None:
        self.db = db
        self.ca = ca  # with TLS (--ssl-certfile in args): the authority that signed the server's certificate
        self.preexec = preexec  # runs in the child before the server starts (e.g. to set resource limits)
        self.args = list(args)
        self.env = env or {}
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = db.with_suffix(".log")

    @property
    def http_url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.ca else 'ws'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "collab_server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--db", str(self.db), *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, preexec_fn=self.preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.http_url}/health", timeout=1.0, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server did not become healthy:\n{self.log()}")

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx should verify this server's certificate with."""
        return ssl.create_default_context(cafile=self.ca) if self.ca else True

    def metric(self, sample: str) -> float:
        """The value of one /metrics sample, named with its labels (`collab_errors_total{kind="limit"}`);
        0 when it is not there yet, as for a labelled counter never incremented."""
        lines = httpx.get(f"{self.http_url}/metrics", verify=self.verify).text.splitlines()
        return next((float(line.split()[-1]) for line in lines if line.startswith(sample + " ")), 0.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM); raises unless the server shut down cleanly after flushing."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if code not in GRACEFUL or "everything committed" not in self.log().split("Started server process")[-1]:
            raise RuntimeError(f"unclean shutdown (exit {code}):\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
