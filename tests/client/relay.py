"""A WebSocket relay in front of a server: records what clients send and can cut the network."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


class Relay:
    """Forwards ws://127.0.0.1:<port>/<room> to <upstream>/<room>, frame by frame, in order.

    ``sent`` lists every binary frame a client sent upstream. ``go_offline()`` drops all connections
    abruptly (no close handshake, like a lost network) and refuses new ones with 503 until ``go_online()``.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.sent: list[bytes] = []
        self.online = True
        self._server: Server | None = None
        self._clients: set[ServerConnection] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._gate, max_size=None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def go_offline(self) -> None:
        self.online = False
        for client in self._clients:
            client.transport.abort()

    def go_online(self) -> None:
        self.online = True

    def _gate(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.online:
            return None
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "offline\n")

    async def _handle(self, client: ServerConnection) -> None:
        self._clients.add(client)
        try:
            async with connect(self.upstream + client.request.path, max_size=None) as server:
                pumps = {asyncio.create_task(self._pump(client, server, record=True)),
                         asyncio.create_task(self._pump(server, client, record=False))}
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._clients.discard(client)

    async def _pump(self, source: ServerConnection | ClientConnection,
                    sink: ServerConnection | ClientConnection, record: bool) -> None:
        try:
            async for frame in source:
                if record and isinstance(frame, bytes):
                    self.sent.append(frame)
                await sink.send(frame)
        except ConnectionClosed:
            pass
