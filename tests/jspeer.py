"""Drive tests/js/peer.mjs — a real npm yjs + y-websocket client in Node — from asyncio tests.

    async with JsPeer("alice") as alice:
        await alice.connect(server.ws_url, "room")          # waits until synced
        await alice.call("text_insert", index=0, text="hi")
        state = await alice.wait_for("doc.text === 'hi'")   # evaluated in Node on every change

The command protocol is documented in tests/js/README.md.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

ROOT = Path(__file__).resolve().parent.parent
PEER_JS = ROOT / "tests" / "js" / "peer.mjs"
LINE_LIMIT = 64 * 1024 * 1024  # a get_state of a big document is one line


class PeerFactory(Protocol):
    """The `peer` fixture of tests/e2e: start a peer, optionally connected (and synced) to url/room."""

    async def __call__(self, name: str, url: str | None = None, room: str | None = None) -> JsPeer: ...


class PeerError(RuntimeError):
    """A peer command failed, timed out, or the Node process died."""


@dataclass(frozen=True)
class PeerState:
    doc: dict[str, Any]
    awareness: dict[int, Any]
    awareness_clocks: dict[int, int]  # latest clock of every clientID ever applied, removed ones included
    synced: bool
    status: str  # connected | connecting | disconnected
    client_id: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerState:
        return cls(doc=data["doc"], awareness={int(k): v for k, v in data["awareness"].items()},
                   awareness_clocks={int(k): v for k, v in data["awareness_clocks"].items()},
                   synced=data["synced"], status=data["status"], client_id=data["client_id"])

    @property
    def awareness_seen(self) -> set[int]:
        return set(self.awareness_clocks)


class JsPeer:
    """One Node process holding one Y.Doc and (after connect) one WebsocketProvider."""

    def __init__(self, name: str = "peer", env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = env  # added to the Node process's environment (NODE_EXTRA_CA_CERTS for a wss:// server)
        self.events: list[dict[str, Any]] = []  # status, synced, connection-close, ... in arrival order
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events_changed = asyncio.Condition()
        self._stderr: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Self:
        node = shutil.which("node")
        if node is None:
            raise PeerError("node is not on PATH")
        self._proc = await asyncio.create_subprocess_exec(
            node, str(PEER_JS), cwd=ROOT, limit=LINE_LIMIT, env={**os.environ, **(self.env or {})},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- commands

    async def call(self, cmd: str, *, timeout: float = 15.0, **args: Any) -> Any:
        """Send one command and return its result; raise PeerError if it fails."""
        proc = self._require_running()
        assert proc.stdin is not None
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        proc.stdin.write((json.dumps({"id": request_id, "cmd": cmd, **args}) + "\n").encode())
        try:
            await proc.stdin.drain()
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise PeerError(f"{self.name}: no reply to {cmd} within {timeout} s") from None
        finally:
            self._pending.pop(request_id, None)

    async def connect(self, url: str, room: str, *, wait_synced: bool = True, timeout: float = 10.0,
                      params: dict[str, str] | None = None, **options: Any) -> None:
        """Create the provider (or reconnect it); by default wait until it synced with the server."""
        await self.call("connect", url=url, room=room, params=params or {}, options=options)
        if wait_synced:
            await self.wait_for("synced", timeout=timeout)

    async def reconnect(self, *, wait_synced: bool = True, timeout: float = 10.0) -> None:
        await self.call("connect")
        if wait_synced:
            await self.wait_for("synced", timeout=timeout)

    async def state(self) -> PeerState:
        return PeerState.from_json(await self.call("get_state"))

    async def wait_for(self, expr: str, timeout: float = 10.0) -> PeerState:
        """Wait until the JS expression (over doc, awareness, awareness_clocks, synced, status, client_id) is truthy."""
        result = await self.call("wait_for", expr=expr, timeout_ms=int(timeout * 1000), timeout=timeout + 5.0)
        return PeerState.from_json(result)

    async def state_vector(self) -> dict[int, int]:
        result = await self.call("state_vector")
        return {int(client): clock for client, clock in result["clocks"].items()}

    async def encode_state_as_update(self) -> bytes:
        return base64.b64decode((await self.call("encode_state_as_update"))["update"])

    async def apply_update(self, update: bytes) -> None:
        await self.call("apply_update", update=base64.b64encode(update).decode())

    # ---- events

    async def wait_event(self, event: str, *, since: int = 0, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first event named `event` at index >= since whose fields match; waits for it if needed."""

        def find() -> dict[str, Any] | None:
            for item in self.events[since:]:
                if item["event"] == event and all(item.get(k) == v for k, v in fields.items()):
                    return item
            return None

        async with self._events_changed:
            try:
                await asyncio.wait_for(self._events_changed.wait_for(lambda: find() is not None or not self.alive()),
                                       timeout)
            except TimeoutError:
                raise PeerError(f"{self.name}: no {event} {fields} within {timeout} s; events: {self.events}") from None
        found = find()
        if found is None:
            raise PeerError(f"{self.name}: exited before {event} {fields}; stderr: {self.stderr}")
        return found

    # ---- process

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL the Node process: its sockets close without any closing handshake."""
        if self.alive():
            assert self._proc is not None
            self._proc.kill()
        await self._finish()

    async def close(self, timeout: float = 5.0) -> None:
        """Close stdin (the peer destroys its provider and exits); kill it if it does not exit in time."""
        if self.alive():
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                await asyncio.wait_for(self._proc.wait(), timeout)
            except TimeoutError:
                self._proc.kill()
        await self._finish()

    async def _finish(self) -> None:
        if self._proc is not None:
            await self._proc.wait()
        await asyncio.gather(*self._tasks)

    def _require_running(self) -> asyncio.subprocess.Process:
        if not self.alive():
            raise PeerError(f"{self.name}: not running; stderr: {self.stderr}")
        assert self._proc is not None
        return self._proc

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            message = json.loads(raw)
            if "event" in message:
                async with self._events_changed:
                    self.events.append(message)
                    self._events_changed.notify_all()
                continue
            future = self._pending.get(message["id"])
            if future is None or future.done():
                continue
            if message["ok"]:
                future.set_result(message["result"])
            else:
                future.set_exception(PeerError(f"{self.name}: {message['error']}"))
        await self._proc.wait()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerError(f"{self.name}: exited with {self._proc.returncode}; "
                                               f"stderr: {self.stderr}"))
        async with self._events_changed:
            self._events_changed.notify_all()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            self._stderr.append(raw.decode(errors="replace"))
