"""A TCP forwarder in front of a real service whose network can be cut: `cut()` drops every connection
without a goodbye and refuses new ones until `restore()`. It runs its own event loop in a thread, so it
keeps forwarding while a test blocks its own loop (starting or stopping a server process)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TcpCut:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._online = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcpcut", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpCut:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        self._run(self._set_online(False))

    def restore(self) -> None:
        self._run(self._set_online(True))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the forwarder's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)

    async def _close(self) -> None:
        """Close the listener on its own loop: asyncio's Server is not thread-safe (closed from another thread
        while a cut connection detached, both woke its waiters and the second call failed)."""
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _set_online(self, online: bool) -> None:
        self._online = online
        if not online:
            for writer in list(self._writers):
                writer.transport.abort()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._online:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer))
        finally:
            self._writers -= {client_writer, server_writer}

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
