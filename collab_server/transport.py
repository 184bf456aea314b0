"""The websocket transport: uvicorn's sans-I/O websocket protocol, plus direct writes of encoded frames.

A broadcast goes to every connection of a room with the same bytes. Through ASGI, each `websocket.send`
re-frames the message per connection and needs a task per connection to await it. Server frames are never
masked, so the room frames a message once (`binary_frame`) and each connection whose socket is open and
not backed up writes those bytes straight to its transport (`FrameWriter.write_frame`). Anything else
(a peer that is backed up, permessage-deflate, the close handshake) falls back to the ASGI send.

The writer reaches the application as the ASGI scope extension `collab.frames`; under another server, or
a uvicorn that does not load this class, it is absent and every send goes through ASGI.
"""

from __future__ import annotations

import struct
from typing import Protocol

from starlette.types import Scope

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State

SCOPE_EXTENSION = "collab.frames"


class FrameWriter(Protocol):
    def write_frame(self, frame: bytes) -> bool:
        """Write a complete encoded frame now and return True, or return False if the socket cannot take it
        without queueing (not open, closing or backed up)."""


def frame_writer(scope: Scope) -> FrameWriter | None:
    """The accepted connection's FrameWriter, or None if there is none or frames need per-connection
    encoding (a negotiated extension such as permessage-deflate)."""
    writer = (scope.get("extensions") or {}).get(SCOPE_EXTENSION)
    if isinstance(writer, CollabWebSocketProtocol) and writer.handshake_complete and not writer.conn.extensions:
        return writer
    return None


def binary_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented binary websocket frame (RFC 6455 §5.2) carrying `payload`."""
    size = len(payload)
    first = 0x80 | Opcode.BINARY  # FIN
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


class CollabWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol that offers itself as the `collab.frames` FrameWriter."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the upgrade was rejected
        if scope is not None:
            scope["extensions"][SCOPE_EXTENSION] = self

    def write_frame(self, frame: bytes) -> bool:
        if (self.close_sent or self.disconnected or not self.writable.is_set() or self.conn.state is not State.OPEN
                or self.transport.is_closing()):
            return False
        self.transport.write(frame)
        return True
