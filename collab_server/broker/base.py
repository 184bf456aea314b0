"""The Broker interface: fan-out of committed updates and awareness changes between the rooms of all nodes."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Protocol


class Kind(str, Enum):
    UPDATE = "update"  # a committed document update (v1 encoding)
    AWARENESS = "awareness"  # an encoded awareness update (payload of a type-1 message)
    DELETED = "deleted"  # the document was deleted (empty payload): nodes serving it drop their copy


class BrokerError(RuntimeError):
    """The broker cannot reach the other nodes; a room that cannot be kept in sync with them is not opened."""


Handler = Callable[[Kind, bytes, bool], None]
"""handler(kind, payload, local): `local` is True when this node published it (already applied here)."""


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, room: str, handler: Handler) -> None:
        """Deliver `room`'s events published after this returns; raises BrokerError when unreachable."""

    async def ping(self) -> None:
        """Raise BrokerError when the broker is unreachable."""

    async def unsubscribe(self, room: str) -> None: ...

    def publish(self, room: str, kind: Kind, payload: bytes) -> None:
        """Deliver to every subscriber of `room` on every node, in publish order per room."""
