"""CollabClient: keeps a pycrdt Doc in sync with one y-websocket room, offline-first."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from pycrdt import Doc, Subscription, TransactionEvent
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from collab_server.protocol import (
    AuthMessage,
    AwarenessMessage,
    Message,
    ProtocolError,
    QueryAwarenessMessage,
    SyncMessage,
    SyncType,
    decode_message,
    sync_step1,
    sync_step2,
    sync_update,
)
from collab_server.heldback import Held
from collab_server.presence import MAX_AWARENESS_STATE
from collab_server.replay import apply, build
from collab_server.slicing import causal_parts
from collab_server.surrogates import Characters
from client_py.awareness import RENEW_EVERY, Awareness
from client_py.backoff import Backoff
from client_py.store import LocalStore
from client_py.storewriter import StoreWriter

log = logging.getLogger(__name__)

REMOTE = "client_py:remote"
"""Transaction origin of updates received from the server: stored, never sent back."""
STORE = "client_py:store"
"""Transaction origin of updates loaded from the local store: already stored, sent only via the handshake."""

_NETWORK_ERRORS = (OSError, TimeoutError, WebSocketException, ProtocolError)
DELETED_CODE = 4410  # collab_server closes a deleted document's connections with this code
TOO_BIG_CODE = 1009  # the server refuses a message of ours as too large (its --max-message-size)
REFUSED_STATUSES = (401, 403)  # a refused upgrade: the token is missing or not good for this room
REFUSED_CODES = (4401, 4403)  # the same as close codes (collab_server --auth-close-codes; 4403: token expired)
MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After from a refusing server is cut to this
PART_BYTES = 64 * 1024  # an update bigger than this is sent in parts (`parts`)


class ServerClosed(Exception):
    """The server ended the link for good: a close code in 4400-4499 (permanent, as y-websocket treats them),
    a refused upgrade (401/403), or 1009, a message of ours too large for the server (the handshake would send
    that edit again at every reconnect; y-websocket retries for ever, with nothing after it ever arriving).
    Retrying would get the same answer, so the client stops; edits stay in the local store."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if reason else str(code))
        self.code, self.reason = code, reason


class DocumentDeleted(ServerClosed):
    """The server deleted the document; reconnecting would upload our replica again."""


class _Link:
    """One live connection: the ordered outbox its writer drains, and its handshake progress."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: close after what precedes it
        self.awaiting: deque[int] = deque()  # sequence numbers of our unanswered SyncStep1s
        self.asked = False  # the handshake's SyncStep1 went out
        self.synced = False  # ... and the server's SyncStep2 answered it


def retry_after(exc: BaseException) -> float:
    """The seconds a server that refused the upgrade asked us to wait (its Retry-After; our server sends one
    while its storage fails), or 0."""
    if isinstance(exc, InvalidStatus):
        value = exc.response.headers.get("Retry-After", "").strip()
        if value.isdigit():
            return min(float(value), MAX_RETRY_AFTER)
    return 0.0


def parts(update: bytes) -> list[bytes]:
    """`update` as updates to send one after another: whole up to PART_BYTES, else in parts of about PART_BYTES, each
    edit after what it refers to (collab_server/slicing.py's `causal_parts`: the server closes a connection whose
    changes wait for later ones too often). Sent whole, many edits made offline made one handshake message over the
    server's --max-message-size: it closed with 1009, and every reconnect sent it again. A single edit (a struct)
    bigger than the server takes still is, and stops the client (ServerClosed)."""
    return [update] if len(update) <= PART_BYTES else causal_parts(update, PART_BYTES - 16)  # with the message head


class CollabClient:
    """Sync ``self.doc`` with ``<url>/<room>``; reconnects until closed, or until the server ends the link
    for good (``stopped`` is then a ServerClosed, a DocumentDeleted when the document was deleted; waiting
    methods raise it). ``token`` goes in an ``Authorization: Bearer`` header; set ``client.token`` to use a
    new one from the next connection attempt on (a client the server refused for its token connects again).
    ``ssl``: for a wss:// server whose certificate the system's
    trusted authorities do not cover (``ssl.create_default_context(cafile=...)``).

    Local edits (any transaction origin except REMOTE/STORE) are stored, then sent while connected;
    remote updates are applied under REMOTE and stored, never echoed. On every (re)connect we answer the
    server's SyncStep1 with a SyncStep2 (everything the server lacks, i.e. our offline edits) and only
    then send our SyncStep1, so once the server's SyncStep2 arrives both sides hold each other's edits.
    With ``store`` the document (including unsent edits) survives restarts of this process. While the store cannot
    be written (``store_error``), syncing goes on and what it missed is stored once it works again.
    """

    def __init__(self, url: str, room: str, *, store: str | Path | None = None, token: str | None = None,
                 backoff: Backoff | None = None, open_timeout: float = 5.0, compact_every: int = 500,
                 ssl: SSLContext | None = None) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if ssl is not None and scheme != "wss":
            raise ValueError(f"an ssl context needs a wss:// URL, not {url!r}")
        self.ssl = ssl
        self.url = f"{url.rstrip('/')}/{quote(room, safe='')}"
        self.room = room
        self.doc: Doc = Doc()  # replaced when a peer cuts a character in two (collab_server/surrogates.py)
        self._characters = Characters()
        self._held = Held()  # what the document holds back of the server's updates (collab_server/heldback.py)
        self._reported: list[bytes] = []  # what the document reported applying of the server's latest update
        self.awareness = Awareness(self.doc.client_id)
        self.backoff = backoff or Backoff()
        self.open_timeout = open_timeout
        self._token = token
        self.last_error: BaseException | None = None
        self.stopped: ServerClosed | None = None  # why the server ended the link for good
        self._store_path = store
        self._compact_every = compact_every
        self._store: StoreWriter | None = None
        self._link: _Link | None = None
        self._synced = asyncio.Event()
        self._closing = False
        self._changed = asyncio.Event()
        self._compaction_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._step1_sent = 0  # SyncStep1s sent so far, over all connections
        self._step1_answered = 0  # sequence number of the latest SyncStep1 the server answered
        self._denied: str | None = None  # why the server refused edits, until a flush raises it

    async def __aenter__(self) -> CollabClient:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- public API ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the local store (if any) and start connecting in the background; never waits for the server."""
        if self._store_path is not None:
            store = LocalStore(self._store_path, self.room, self._compact_every)
            if store.deleted:  # by an earlier client of this store: it must not upload the document again
                self.stopped = DocumentDeleted(DELETED_CODE, "document deleted (as the local store recorded)")
            snapshot = store.load()
            if snapshot is not None:
                self.doc = apply(self.doc, snapshot, self._characters)
            self._store = StoreWriter(store, self.backoff, self._notify)
        self._subscription = self.doc.observe(self._on_update)
        self._start()

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"collab-client {self.url}")

    async def close(self, timeout: float = 5.0) -> None:
        """Send queued edits and our awareness removal, close the socket, compact and close the store."""
        if self._task is None or self._closing:
            return
        self._closing = True
        link = self._link
        if link is not None:
            link.outbox.put_nowait(self.awareness.set_local_state(None))
            link.outbox.put_nowait(None)
        if link is None or not (await asyncio.wait({self._task}, timeout=timeout))[0]:
            self._task.cancel()
            await asyncio.wait({self._task})
        assert self._subscription is not None
        self.doc.unobserve(self._subscription)
        if self._store is not None:
            self._store.close(self.doc.get_update())
        if not self._task.cancelled() and (exc := self._task.exception()) is not None:
            raise RuntimeError("client stopped") from exc

    @property
    def token(self) -> str | None:
        return self._token

    @token.setter
    def token(self, token: str | None) -> None:
        """Used from the next connection attempt on; a client the server refused for its token (expired, or not
        good for this room) connects again with the new one."""
        self._token = token
        refused = self.stopped is not None and self.stopped.code in (*REFUSED_STATUSES, *REFUSED_CODES)
        if refused and self._task is not None and self._task.done() and not self._closing:
            self.stopped = None
            self._start()

    @property
    def deleted(self) -> bool:
        """The server deleted the document: the client no longer connects."""
        return isinstance(self.stopped, DocumentDeleted)

    @property
    def store_error(self) -> sqlite3.Error | None:
        """Why the local store cannot be written (a full disk, say), while it cannot; None otherwise. Meanwhile
        updates are sent and received as usual and kept in memory, and storing them is retried with the backoff;
        ``wait_until(lambda: client.store_error is None)`` waits until they are stored."""
        return self._store.error if self._store is not None else None

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def is_synced(self) -> bool:
        return self._synced.is_set()

    async def synced(self, timeout: float | None = 10.0) -> None:
        """Wait until the current connection finished the two-way handshake (TimeoutError otherwise)."""
        await self.wait_until(lambda: self.is_synced, timeout)

    async def flush(self, timeout: float | None = 10.0) -> None:
        """Wait until the server has processed every edit made before this call.

        Proof: the server answers a SyncStep1 we sent after those edits (it handles a connection's
        messages in order). Across reconnects, the next handshake's SyncStep1 serves. It does not wait for
        the local store: while ``store_error`` is set, those edits are on the server and in memory only.
        Raises PermissionError if the server refused edits (a read-only token) since the last flush that said so.
        """
        link = self._link
        if link is not None and link.asked and not self._closing:
            self._ask(link)
            target = self._step1_sent
        else:
            target = self._step1_sent + 1
        await self.wait_until(lambda: self._step1_answered >= target, timeout)
        if self._denied is not None:
            reason, self._denied = self._denied, None
            raise PermissionError(f"the server refused edits: {reason}")

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every doc, awareness or link change.

        Raises TimeoutError, or the error that stopped the client's background task.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                task = self._running_task()
                waiter = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()

    def _running_task(self) -> asyncio.Task[None]:
        if self._task is None:
            raise RuntimeError("client is not open")
        if self._task.done():
            if self.stopped is not None:
                raise self.stopped
            if not self._task.cancelled() and (exc := self._task.exception()) is not None:
                raise RuntimeError("client stopped") from exc
            raise RuntimeError("client is closed")
        return self._task

    def set_awareness(self, state: Any) -> None:
        """Publish our presence state (JSON-serialisable; None withdraws it). Raises ValueError for a state over
        the server's MAX_AWARENESS_STATE bytes of JSON: the server would close the connection (1008) at each
        reconnect, before the document synced."""
        if (size := len(json.dumps(state).encode())) > MAX_AWARENESS_STATE:
            raise ValueError(f"awareness state of {size} bytes: servers take at most {MAX_AWARENESS_STATE}")
        message = self.awareness.set_local_state(state)
        self._send(message)

    @property
    def peers(self) -> dict[int, Any]:
        """Awareness states of the other clients in the room."""
        return self.awareness.peers

    # -- document side ------------------------------------------------------------------------------

    def _prepare(self, update: bytes) -> bytes:
        """The update to apply instead of `update`, with `doc` rebuilt first where it cuts a character between
        its two UTF-16 units, as Yjs peers do (yrs alone would corrupt the document; collab_server/surrogates.py).
        Read `client.doc` afresh after awaiting: a rebuild replaces it."""
        cut = self._characters.plan(self.doc, update, self._held.updates)
        if cut.state is not None:
            doc = build(cut.state, self.doc.client_id, None)
            self._held.give(doc)  # a document built from a state holds nothing back
            if self._subscription is not None:
                self.doc.unobserve(self._subscription)
                self._subscription = doc.observe(self._on_update)
            self.doc.observe(self._on_retired_update)
            self.doc = doc
        return cut.update

    def _on_update(self, event: TransactionEvent) -> None:
        self._characters.add(event.update)
        origin = event.transaction.origin()
        if origin == hash(REMOTE):
            self._reported.append(event.update)
        if origin != hash(STORE):
            if self._store is not None:
                self._store.append(event.update)
                self._schedule_compaction()
            if origin != hash(REMOTE):
                for part in parts(event.update):
                    self._send(sync_update(part))
        self._notify()

    def _on_retired_update(self, event: TransactionEvent) -> None:
        """An edit to a document `_prepare` replaced, through a Text or Map taken from it before: never sent."""
        self.last_error = RuntimeError("an edit to a replaced client.doc was not sent: read client.doc afresh "
                                       "after awaiting")
        log.error("%s: %s", self.url, self.last_error)

    def _schedule_compaction(self) -> None:
        # The doc cannot be read inside its observer, so compact right after the transaction.
        if self._store is not None and self._store.compaction_due and not self._compaction_scheduled:
            self._compaction_scheduled = True
            asyncio.get_running_loop().call_soon(self._compact)

    def _compact(self) -> None:
        self._compaction_scheduled = False
        if self._store is not None and not self._closing:
            self._store.compact(self.doc.get_update())

    def _send(self, message: bytes) -> None:
        if self._link is not None and not self._closing:
            self._link.outbox.put_nowait(message)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- network side -------------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closing and self.stopped is None:
            link = _Link()
            ws: ClientConnection | None = None
            asked_to_wait = 0.0
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            try:
                tls = {"ssl": self.ssl} if self.ssl is not None else {}
                async with connect(self.url, open_timeout=self.open_timeout, max_size=None,
                                   additional_headers=headers, **tls) as ws:
                    await self._session(ws, link)
            except _NETWORK_ERRORS as exc:
                self.last_error = exc
                if isinstance(exc, InvalidStatus) and exc.response.status_code in REFUSED_STATUSES:
                    self.stopped = ServerClosed(exc.response.status_code, "connection refused")
                else:
                    log.info("%s: connection failed or lost: %s", self.url, exc)
                    asked_to_wait = retry_after(exc)
            finally:
                self._link = None
                self._synced.clear()
                self.awareness.forget_peers()
                if ws is not None and ws.close_code is not None and (
                        4400 <= ws.close_code < 4500 or ws.close_code == TOO_BIG_CODE):
                    kind = DocumentDeleted if ws.close_code == DELETED_CODE else ServerClosed
                    self.stopped = kind(ws.close_code, ws.close_reason or "")
                    if self.deleted and self._store is not None:
                        self._store.mark_deleted()
                if self.stopped is not None:
                    self.last_error = self.stopped
                    # raised to whoever waits on the client; a log line would repeat it
                    log.info("%s: the server ended the link for good (%s); not reconnecting", self.url, self.stopped)
                self._notify()
            if self.stopped is not None:
                return
            if link.synced:
                attempt = 0
            if self._closing:
                break
            await asyncio.sleep(max(self.backoff.delay(attempt), asked_to_wait))
            attempt += 1

    async def _session(self, ws: ClientConnection, link: _Link) -> None:
        self._link = link
        self._notify()
        if self.awareness.local_state is not None:  # with a new clock: peers that saw the last one (before a
            # server restart dropped it) would ignore it (y-protocols), until the renewal 15 s later
            link.outbox.put_nowait(self.awareness.set_local_state(self.awareness.local_state))
        # Servers open with SyncStep1; if ours stays silent, ask anyway.
        ask_anyway = asyncio.get_running_loop().call_later(self.open_timeout, self._handshake_ask, link)
        helpers = [asyncio.create_task(self._write(ws, link)), asyncio.create_task(self._housekeep())]
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    raise ProtocolError("text frame from server")
                try:
                    self._handle(decode_message(frame), link)
                except ValueError as exc:  # ProtocolError, or an update/state vector pycrdt cannot decode
                    log.warning("%s: dropped a malformed frame: %s", self.url, exc)
        finally:
            ask_anyway.cancel()
            for task in helpers:
                task.cancel()
            for result in await asyncio.gather(*helpers, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("%s: connection helper failed", self.url, exc_info=result)

    def _handshake_ask(self, link: _Link) -> None:
        if not link.asked:
            link.asked = True
            self._ask(link)

    def _ask(self, link: _Link) -> None:
        self._step1_sent += 1
        link.awaiting.append(self._step1_sent)
        link.outbox.put_nowait(sync_step1(self.doc.get_state()))

    def _handle(self, msg: Message, link: _Link) -> None:
        if isinstance(msg, SyncMessage):
            if msg.kind == SyncType.STEP1:
                for part in parts(self.doc.get_update(msg.payload)):
                    link.outbox.put_nowait(sync_step2(part))
                self._handshake_ask(link)
                return
            update = self._prepare(msg.payload)
            self._reported = []
            with self.doc.transaction(origin=REMOTE):
                self.doc.apply_update(update)
                self._held.give(self.doc)
            if not self._held.whole(self._reported, update) and self._held.note(self.doc, update) is not None:
                self._held.settle(self.doc, REMOTE)
            if msg.kind == SyncType.STEP2 and link.awaiting:
                self._step1_answered = link.awaiting.popleft()
                link.synced = True
                self._synced.set()
                self._notify()
        elif isinstance(msg, AwarenessMessage):
            if self.awareness.apply(msg.payload):
                self._notify()
        elif isinstance(msg, QueryAwarenessMessage):
            link.outbox.put_nowait(self.awareness.full_message())
        elif isinstance(msg, AuthMessage) and msg.denied:
            self.last_error = PermissionError(msg.reason)
            self._denied = msg.reason
            log.warning("%s: permission denied: %s", self.url, msg.reason)

    async def _write(self, ws: ClientConnection, link: _Link) -> None:
        try:
            while (message := await link.outbox.get()) is not None:
                await ws.send(message)
            await ws.close()
        except ConnectionClosed:
            pass

    async def _housekeep(self) -> None:
        """Renew our awareness state and expire silent peers, as y-protocols clients do."""
        while True:
            await asyncio.sleep(RENEW_EVERY / 3)
            if (renewal := self.awareness.renewal()) is not None:
                self._send(renewal)
            if self.awareness.expire():
                self._notify()
