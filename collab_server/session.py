"""One websocket session: admit, join the room, read frames until the peer or the server ends it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from collab_server.auth import SUBPROTOCOL_PREFIX, AuthError, Grant, authorize, token_from
from collab_server.broker import BrokerError
from collab_server.config import Settings
from collab_server.connection import CloseCode, Connection
from collab_server.fairshare import LoopShare
from collab_server.logs import Throttled
from collab_server.names import room_name
from collab_server.protocol import ProtocolError, is_update
from collab_server.presence import LimitExceeded
from collab_server.room import Room, RoomClosed
from collab_server.rooms import RoomFull, Rooms
from collab_server.storage import StorageError
from collab_server.storage.health import RETRY_AFTER
from collab_server.surrogates import beyond_bmp
from collab_server.transport import Reading, frame_writer, log_dropped, reading

log = logging.getLogger(__name__)
_log_load_failure = Throttled(log, logging.ERROR)  # while storage or the broker is away, every client retries

FRAMES_PER_TURN = 16  # a client's queued frames handled before other connections and rooms get a turn


class RateLimiter:
    """Token bucket over incoming messages; rate 0 disables it."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


async def serve_websocket(scope: Scope, receive: Receive, send: Send, rooms: Rooms, settings: Settings) -> None:
    """Admit (room name, token), join the room and read frames with the raw ASGI receive/send."""
    admitted = await _admit(scope, receive, send, rooms, settings)
    if admitted is None:
        return
    name, grant = admitted
    frames = frame_writer(scope)
    conn = Connection(send, rooms.metrics, frames=frames, readonly=grant.readonly,
                      send_queue_limit=settings.send_queue_limit,
                      send_queue_bytes=settings.send_queue_bytes)
    rooms.metrics.connections.inc()
    try:
        room = await rooms.acquire(name, connection=True)
    except RoomFull:
        rooms.metrics.errors.labels("room_full").inc()
        conn.close(CloseCode.POLICY_VIOLATION, "room is full")
    except StorageError as exc:
        _log_load_failure("room load failed name=%s error=%s", name, exc)
        conn.close(CloseCode.INTERNAL_ERROR, "storage failure while loading the document", quiet=True)
    except BrokerError as exc:
        rooms.metrics.errors.labels("broker").inc()
        _log_load_failure("room load failed name=%s error=%s", name, exc)
        conn.close(CloseCode.INTERNAL_ERROR, "broker unavailable: cannot keep the document in sync with other nodes",
                   quiet=True)
    else:
        expiry = _close_when_expired(conn, grant, settings.auth_close_codes)
        try:
            room.join(conn)
            if frames is not None:
                frames.ignore(room.relayed_awareness)
            await _read_frames(receive, conn, room, settings, reading(scope))
        finally:
            if expiry is not None:
                expiry.cancel()
            room.leave(conn)
            rooms.release(room)
    conn.close(CloseCode.NORMAL, "")
    await conn.wait_closed()
    rooms.metrics.connections.dec()


def _close_when_expired(conn: Connection, grant: Grant, close_codes: bool) -> asyncio.TimerHandle | None:
    """Close `conn` when its token expires, with the reason "token expired": 4403 with auth_close_codes (y-websocket
    stops; the app refreshes the token), else 1008 (it reconnects, refused until it has a fresh token). None when
    the grant never expires (auth off)."""
    if grant.expires is None:
        return None
    code = CloseCode.FORBIDDEN if close_codes else CloseCode.POLICY_VIOLATION
    return asyncio.get_running_loop().call_later(max(0.0, grant.expires - time.time()), conn.close, code,
                                                 "token expired")


async def _admit(scope: Scope, receive: Receive, send: Send, rooms: Rooms,
                 settings: Settings) -> tuple[str, Grant] | None:
    """Check the room name and token, then accept (choosing the token subprotocol) or refuse: with 403, or
    with auth_close_codes by accepting and closing with 4401/4403 and the reason."""
    subprotocols: list[str] = scope.get("subprotocols") or []
    # browsers fail a connection whose requested subprotocols the server answers with none
    chosen = next((proto for proto in subprotocols if proto.startswith(SUBPROTOCOL_PREFIX)), None)

    async def refuse(code: CloseCode, reason: str) -> None:
        """403 before accepting, or with auth_close_codes, accepting and closing with `code` and `reason`."""
        if not settings.auth_close_codes:
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})  # before accept: 403
        elif (await receive())["type"] == "websocket.connect":  # accept, so the client gets code and reason
            await send({"type": "websocket.accept", "subprotocol": chosen})
            await send({"type": "websocket.close", "code": code, "reason": reason})

    name = room_name(scope)
    if name is None:
        log.info("refused websocket: bad room name path=%r", scope["path"])
        await refuse(CloseCode.BAD_REQUEST, "bad room name")
        return None
    query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    token = token_from(query, subprotocols, _header(scope, b"authorization"))
    try:
        grant = authorize(settings.auth_secret, settings.auth_required, name, token)
    except AuthError as exc:
        rooms.metrics.errors.labels("auth").inc()
        log.info("refused websocket room=%s reason=%s", name, exc)
        await refuse(CloseCode.FORBIDDEN if token else CloseCode.NO_TOKEN, str(exc))
        return None
    if (await receive())["type"] != "websocket.connect":  # the peer left during the handshake
        return None
    health = rooms.store.health
    if not health.admits():  # commits are failing (storage/health.py)
        rooms.metrics.errors.labels("storage_refused").inc()
        await _refuse(send, 503, f"storage failing, retry later: {health.failing}")
        return None
    await send({"type": "websocket.accept", "subprotocol": chosen})
    return name, grant


async def _refuse(send: Send, status: int, reason: str) -> None:
    """Answer the upgrade request with an HTTP error instead of accepting it."""
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", str(RETRY_AFTER).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": reason.encode()})


def _header(scope: Scope, name: bytes) -> str | None:
    """The first request header `name` (lower case, as ASGI gives header names)."""
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


async def _read_frames(receive: Receive, conn: Connection, room: Room, settings: Settings,
                       incoming: Reading) -> None:
    """Handle the connection's frames in order. Document updates queued behind one are handled with it (up to
    FRAMES_PER_TURN, as far as its share of the loop allows; `Room.handle_updates`); at shutdown, those left
    for after a pause are dropped with what is still queued (transport.py). A turn's last update that may type a
    character beyond the BMP begins the next turn's batch instead: a client typing emoji and cutting each in
    its next message, as fast as it can, had one in every few pairs split between two turns, and its room
    rebuilt for each (3 such clients for 6 s: 9-40 s until their room caught up, 0.03-0.53 s since)."""
    metrics = room.metrics
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    share = LoopShare(settings.loop_share)
    # copies of the room's relayed awareness; a direct connection's transport drops them already (see there)
    copies: Container[bytes] = () if conn.direct else room.relayed_awareness
    frames = 0
    batch: list[bytes] = []  # update frames taken and checked, not yet handled
    carried: bytes | None = None  # the last update frame of a turn, left to begin the next one's batch
    refusal: tuple[int, str] | None = None  # why the connection is closed once `batch` is handled
    while not conn.closed:
        if (batch or carried is not None) and incoming.dropping_received():
            log_dropped(len(batch) + (carried is not None))
            batch, carried = [], None
        if not batch:
            if refusal is not None:
                conn.close(*refusal)
                return
            if frames >= FRAMES_PER_TURN:  # receive() does not suspend while frames are queued
                frames = 0
                await asyncio.sleep(0)
            if carried is not None:
                batch, carried = [carried], None
                frames += 1
            else:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    if message.get("refused"):  # by websockets: a frame over the size limit, or malformed
                        metrics.errors.labels("too_big" if message["code"] == CloseCode.TOO_BIG else "frame").inc()
                        log.info("bad input room=%s connection=%d code=%d error=%s", room.name, conn.id,
                                 message["code"], message.get("reason"))
                    conn.close(CloseCode.GOING_AWAY, "peer gone")
                    return
                data = message.get("bytes")
                if data is None:
                    metrics.errors.labels("text_frame").inc()
                    conn.close(CloseCode.UNSUPPORTED_DATA,
                               "text frames are not supported; send binary y-websocket messages")
                    return
                frames += 1
                if data in copies:
                    continue
                refusal = _refusal(data, settings, limiter, room)
                if refusal is not None:
                    continue
                if is_update(data) and not conn.readonly:
                    batch.append(data)
            if batch:
                while (refusal is None and frames < FRAMES_PER_TURN
                       and (more := incoming.take_queued(is_update)) is not None):
                    frames += 1
                    refusal = _refusal(more, settings, limiter, room)
                    if refusal is None:
                        batch.append(more)
                if refusal is None and frames >= FRAMES_PER_TURN and len(batch) > 1 and beyond_bmp(batch[-1]):
                    carried = batch.pop()  # its next may cut the emoji it types: taken together, nothing is rebuilt
        try:
            if batch:
                spent, handled = await room.handle_updates(conn, batch, share.available())
                del batch[:handled]
            else:
                spent = await room.handle(conn, data)
            pause = share.spend(spent)
            if pause:  # not read meanwhile: TCP holds its next messages back (fairshare.py)
                metrics.share_pauses.inc()
                await incoming.pause(pause)
        except ProtocolError as exc:
            metrics.errors.labels("protocol").inc()
            log.info("bad input room=%s connection=%d error=%s", room.name, conn.id, exc)
            conn.close(CloseCode.INVALID_PAYLOAD, f"malformed message: {exc}")
            return
        except LimitExceeded as exc:
            metrics.errors.labels("limit").inc()
            log.info("limit exceeded room=%s connection=%d error=%s", room.name, conn.id, exc)
            conn.close(CloseCode.POLICY_VIOLATION, str(exc))
            return
        except RoomClosed:  # being deleted or discarded: the room closes this connection with the outcome
            batch, carried = [], None
            continue


def _refusal(data: bytes, settings: Settings, limiter: RateLimiter, room: Room) -> tuple[int, str] | None:
    """Count a received frame; the close code and reason if the connection may not send it (too big, too many)."""
    metrics = room.metrics
    metrics.bytes_received.inc(len(data))
    if len(data) > settings.max_message_size:
        metrics.errors.labels("too_big").inc()
        return CloseCode.TOO_BIG, f"message of {len(data)} bytes exceeds {settings.max_message_size}"
    if not limiter.allow():
        metrics.errors.labels("rate_limit").inc()
        return CloseCode.POLICY_VIOLATION, "rate limit exceeded"
    return None
