"""In-process broker: one node, delivery is a direct call."""

from __future__ import annotations

from collab_server.broker.base import Handler, Kind


class LocalBroker:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._handlers.clear()

    async def ping(self) -> None:
        pass

    async def subscribe(self, room: str, handler: Handler) -> None:
        self._handlers[room] = handler

    async def unsubscribe(self, room: str) -> None:
        self._handlers.pop(room, None)

    def publish(self, room: str, kind: Kind, payload: bytes) -> None:
        handler = self._handlers.get(room)
        if handler is not None:
            handler(kind, payload, True)
