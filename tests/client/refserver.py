"""The y-websocket reference server (@y/websocket-server, in-memory only) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from tests.serverproc import ROOT, free_port

SCRIPT = ROOT / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"


class RefServer:
    """Same surface as tests.serverproc.ServerProcess: start/stop/kill/alive, ws_url; restartable on its port."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> RefServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["node", str(SCRIPT)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reference server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("reference server did not start")

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
