"""One document in memory: load, apply under the sender's origin, commit before broadcast, awareness."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Container
from functools import partial
from typing import TypeVar

from pycrdt import Doc, TransactionEvent, get_update

from collab_server import protocol as p
from collab_server.broker import Broker, Kind
from collab_server.connection import CloseCode, Connection
from collab_server.heldback import Held, clocks, waits
from collab_server.logs import Throttled
from collab_server.merge import merge_all
from collab_server.metrics import Metrics
from collab_server.pacing import Turns, in_thread
from collab_server.presence import LimitExceeded, Presence, Relayed
from collab_server.replay import READ_APART, Replay, apply_paced, build, build_paced, precut_apart
from collab_server.slicing import slow_documents
from collab_server.storage import DeletedMeanwhile, LogMark, StorageError, Store
from collab_server.surrogates import Characters, Cut, Scan, beyond_bmp, merge_safely, precut
from collab_server.transport import binary_frame
from collab_server.updatecheck import (
    MAX_TYPE_DEPTH,
    check_state_vector,
    check_text_parents,
    check_type_depth,
    check_update,
)

log = logging.getLogger(__name__)
# a client cutting emoji as fast as it can rebuilds its room for each (hundreds a second): one line per 10 s
_log_rebuild = Throttled(log, logging.INFO)
_log_failure = Throttled(log, logging.ERROR)  # while storage fails, every room with a writer fails again and again
T = TypeVar("T")

# changes held back, waiting for changes never sent, before a client's next such one is refused: each is given
# again at every change (heldback.Held), so a client sending thousands slowed every edit of the room to 150 ms and
# more, and kept them in memory until the room unloaded. A connection may have MAX_HELD_EACH held (clients
# reconnecting together each have one or two), and a room MAX_HELD from all of them.
MAX_HELD_EACH = 16
MAX_HELD = 1000


class _Answer:
    """A sync answer the room keeps until its document changes: the state vector asked with, the update it lacked
    and, once a connection asked, the message holding it (one copy in every send queue it waits in)."""

    __slots__ = ("state_vector", "update", "_message", "asked")

    def __init__(self, state_vector: bytes, update: bytes) -> None:
        self.state_vector, self.update = state_vector, update
        self._message: bytes | None = None
        self.asked = True  # since the last sweep

    @property
    def message(self) -> bytes:
        if self._message is None:
            self._message = p.sync_step2(self.update)
        return self._message


def _precut(updates: list[bytes]) -> list[tuple[bytes, Scan | None]]:
    """`surrogates.precut(updates)`; `updates` as they are, each planned on its own, if there is one or one's
    delete set is truncated (refused then when it is planned, once those before it are applied)."""
    if len(updates) > 1:
        try:
            return precut(updates)
        except p.ProtocolError:
            pass
    return [(update, None) for update in updates]


# bytes of a read-only connection's handshake answer read to tell whether it brings anything; a larger one is refused
# unread (a viewer's holds what it has that the server lacks, nothing but deletions unless it edited): four viewers
# sending 15 MB each held the loop 6-9 s while they were checked
VIEWER_READ_LIMIT = 256 * 1024


def _check(update: bytes) -> None:
    """Raise ProtocolError for an update yrs must not read (updatecheck.py): what could crash, stall or hang it."""
    if check_update(update) > MAX_TYPE_DEPTH:
        check_type_depth(update)
    if beyond_bmp(update):
        check_text_parents(update)


def _brings_structs(update: bytes, doc: Doc) -> bool:
    """Whether `update` holds an item `doc` lacks. A Yjs client's handshake answer (SyncStep2) holds what it has
    beyond the server's state and all its deletions: from a read-only viewer that made no edit, nothing new, and
    it is not refused (every such page logged "permission denied" at each connect). Malformed: True (refused)."""
    try:
        return p.Reader(get_update(update, doc.get_state())).varuint() != 0
    except BaseException as exc:
        if isinstance(exc, p.ProtocolError) or _refusal(exc):
            return True
        raise


def _refusal(exc: BaseException) -> bool:
    """Whether pycrdt refused an update: ValueError (cannot decode it), RuntimeError (cannot integrate it, maybe
    after integrating a part) or a panic inside yrs, raised as pyo3's PanicException, which is not an Exception."""
    return isinstance(exc, (ValueError, RuntimeError)) or type(exc).__name__ == "PanicException"


class RefusedChange(Exception):
    """Raised by a hook: the change just applied must not be stored, and the document not be read again (the room
    is reset: its clients reconnect to a room loaded from storage)."""


class RoomClosed(Exception):
    """The room was closed (unloaded, dropped after a failure, deleted, or the server is stopping): it applies
    and stores nothing more."""


class _Write:
    """The changes one log entry will hold: more join it until the store takes it into a group commit, so a
    burst becomes one row and one broadcast instead of one per message."""

    __slots__ = ("parts", "changes", "senders", "update", "sealed")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        # holds what the document held back of a change, which yrs's merge must not meet when it integrates later
        # (it slices the two copies at each other's boundaries, and one may hold a character cut that the other
        # holds whole): nothing joins it after that
        self.sealed = False
        self.changes = 0  # calls of Room._persist that joined it
        self.senders: list[Connection] = []
        self.update: bytes | None = None  # set once the store has taken it

    def take(self) -> bytes:
        parts, self.parts = self.parts, []
        self.update = merge_all(parts)
        return self.update


class Room:
    """A loaded document and its connections.

    Every change to the document, whoever makes it, is captured by one observer, committed to the store and
    only then published to the broker, which fans it out to every connection (the sender included, as the
    reference server does). Nothing is applied or answered before `load` finishes.
    """

    def __init__(self, name: str, store: Store, broker: Broker, metrics: Metrics, *,
                 awareness_timeout: float = 30.0,
                 on_discard: Callable[["Room"], None] | None = None) -> None:
        self.name = name
        self.awareness_timeout = awareness_timeout
        self.metrics = metrics
        self.store = store
        self.broker = broker
        self.doc = Doc()
        self.connections: set[Connection] = set()
        self.holders = 0  # connections and API calls currently using the room
        self.failed = False  # discarded (storage failure, deleted): connections closed, dropped unflushed
        self.closed = False  # applies and stores nothing more
        self.unload_handle: asyncio.TimerHandle | None = None
        self.hooks: list[Callable[[Room], None]] = []  # run after every applied change (e.g. the resolver)
        self.on_close: list[Callable[[], None]] = []
        self.on_committed: list[Callable[[], None]] = []  # after each commit of a change made here
        self.on_new_doc: list[Callable[[Doc], None]] = []  # when `doc` is replaced (see _prepare)
        self._on_discard = on_discard
        self._observed: list[bytes] = []
        self._characters = Characters()
        self._held = Held()  # what the document holds back of applied updates
        self._subscription = None
        self._inflight: asyncio.Future[int] | None = None  # latest submitted write; commits are FIFO
        self._write: _Write | None = None  # the latest submitted write, open while the store has not taken it
        self._hold: asyncio.Future[None] | None = None  # closed while a sync reply waits for commits
        self._rebuild: asyncio.Task[None] | None = None  # builds the document again in parts (see _prepare)
        self._deferred: list[bytes] = []  # other nodes' changes that came during the rebuild
        self._outbox: list[bytes] = []
        self._awareness_outbox: list[bytes] = []
        self._relayed = Relayed()
        self._answer_kept: _Answer | None = None  # the latest sync answer, while the document is unchanged
        self._presence = Presence()
        self._early: list[tuple[Kind, bytes, bool]] | None = []  # broker events that arrive while loading
        self.mark: LogMark | None = None  # what the load read from storage, until resync.py takes it

    def __repr__(self) -> str:
        return f"Room({self.name!r})"

    # --- lifecycle -----------------------------------------------------------------------------------

    async def load(self) -> None:
        """Subscribe first, then read storage: a change another node commits meanwhile is never missed
        (it may arrive twice, which a CRDT update tolerates). Broker events wait until the load is done."""
        await self.broker.subscribe(self.name, self._on_broker)
        updates, self.mark = await self.store.load_new(self.name, None)
        replay = Replay(self.doc, self._characters, self._held, name=self.name)
        turns = Turns()  # nothing else can reach the room until it is in the registry
        # one by one: applying a merge of many is far slower; precut: a log of cuts rebuilt the document at each
        for number, (update, scan) in enumerate(await precut_apart(updates), 1):
            try:
                await apply_paced(replay, update, turns, scan)
            except BaseException as exc:
                if not _refusal(exc):
                    raise
                replay.close()
                raise StorageError(f"stored update {number} of {len(updates)} cannot be applied: {exc}") from None
        self.doc = replay.close()
        self._subscription = self.doc.observe(self._observe)
        early, self._early = self._early, None
        for event in early or ():
            self._on_broker(*event)
        log.info("room loaded name=%s updates=%d", self.name, len(updates))

    def after_load(self) -> None:
        """Run hooks once on the loaded document (they may write, e.g. to materialise resolved statuses)."""
        self._run_hooks()
        self._persist(None)

    @property
    def settled(self) -> bool:
        """Whether every change applied here so far has been committed (or has failed)."""
        return self._inflight is None or self._inflight.done()

    async def flush(self) -> None:
        """Wait until everything applied so far is committed (errors are handled by the commit callback), and
        until the document is no longer being rebuilt."""
        while self._rebuild is not None:
            await asyncio.wait([self._rebuild])
        while self._inflight is not None and not self._inflight.done():
            await asyncio.wait([self._inflight])

    def stop_rebuilding(self) -> None:
        """Server shutdown: cancel a rebuild of the document and take no more writes (the change it was for, and
        those waiting on it, were never applied, so never acknowledged: their clients send them again)."""
        if self._rebuild is not None:
            self.closed = True
            self._rebuild.cancel()

    async def close(self) -> None:
        self.closed = True
        if self.unload_handle is not None:
            self.unload_handle.cancel()
        if self._rebuild is not None:  # what it would apply is stored already, or by another node
            self._rebuild.cancel()
        if self._subscription is not None:
            self.doc.unobserve(self._subscription)
            self._subscription = None
        for callback in self.on_close:
            callback()
        # hooks (the resolver) refer back to the room: dropped, so the room and its document are freed as soon
        # as the registry lets go, not at the next full collection of the cyclic GC
        self.hooks.clear()
        self.on_close.clear()
        self.on_committed.clear()
        self.on_new_doc.clear()
        await self.broker.unsubscribe(self.name)

    # --- connections ---------------------------------------------------------------------------------

    def join(self, conn: Connection) -> None:
        self.connections.add(conn)
        conn.send(p.sync_step1(self.doc.get_state()))
        if self._presence.states:
            conn.send(self._presence.message())

    def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        gone = [self._presence.bump(cid) for cid in conn.awareness_ids if cid in self._presence.states]
        conn.awareness_ids.clear()
        if gone:
            self.broker.publish(self.name, Kind.AWARENESS, p.encode_awareness_update(gone))

    async def handle(self, conn: Connection, data: bytes) -> float:
        """Handle one frame from `conn`; return the seconds of the event loop's time its document work took
        (fairshare.py); awareness work is counted too. Raises ProtocolError on malformed input."""
        started = time.perf_counter()
        msg = p.decode_message(data)
        if isinstance(msg, p.SyncMessage):
            if msg.kind == p.SyncType.STEP1:
                check_state_vector(msg.payload)
                if conn.send_failed:  # the peer is gone: nothing to answer (finding 58)
                    return 0.0
                await self._settle()
                started = time.perf_counter()
                conn.send(self._answer(msg.payload).message)
                return time.perf_counter() - started
            if not conn.readonly:
                return await self.apply(msg.payload, origin=conn)
            if msg.kind == p.SyncType.STEP2 and len(msg.payload) <= VIEWER_READ_LIMIT:
                _check(msg.payload)  # refused as a writer's would be, before yrs reads it
                if not _brings_structs(msg.payload, self.doc):
                    return time.perf_counter() - started
            conn.send(p.auth_denied("read-only connection: document changes are not accepted"))
            return time.perf_counter() - started
        elif isinstance(msg, p.AwarenessMessage):
            self.apply_awareness(msg.payload, conn)
            return time.perf_counter() - started
        elif isinstance(msg, p.QueryAwarenessMessage):
            answer = self._presence.message()
            if not conn.waiting(answer):  # asked again before the previous answer left: that one still holds it all
                conn.send(answer)
            return time.perf_counter() - started
        # AuthMessage from a client carries nothing for the server.
        return 0.0

    async def handle_updates(self, conn: Connection, frames: list[bytes], budget: float = math.inf
                             ) -> tuple[float, int]:
        """Handle document update frames (`p.is_update`) that `conn`, which may write, sent one after another, as
        `handle` would one by one, but applied together (`apply_all`, with `budget`); return the seconds that took
        and how many were handled. Raises ProtocolError for the first that is malformed, once those before it are
        applied."""
        updates: list[bytes] = []
        malformed: p.ProtocolError | None = None
        for frame in frames:
            try:
                msg = p.decode_message(frame)
            except p.ProtocolError as exc:
                malformed = exc
                break
            assert isinstance(msg, p.SyncMessage)
            updates.append(msg.payload)
        spent, applied = await self.apply_all(updates, conn, budget)
        if malformed is not None and applied == len(updates):
            raise malformed
        return spent, applied

    # --- document ------------------------------------------------------------------------------------

    async def apply(self, update: bytes, origin: object = None) -> float:
        """Apply an update under `origin`, then persist (and later broadcast) what it changed; return the seconds
        of the event loop's time that took (waits for others left out, a rebuild for it counted whole).

        Waits while a sync answer is being prepared, so that answer holds committed changes only, and while the
        document is rebuilt (see _prepare). Raises
        RoomClosed once the room is closed: a deleted document must not be written again by a late message.
        Raises ProtocolError for an update pycrdt refuses, once what it integrated before refusing is stored."""
        return (await self.apply_all([update], origin))[0]

    async def apply_all(self, updates: list[bytes], origin: object = None, budget: float = math.inf
                        ) -> tuple[float, int]:
        """`apply` `updates` (one connection's, sent one after another) in turn, until they took more than `budget`
        seconds; return the seconds they took and how many were applied. A character one of them cuts that an
        earlier one wrote is replaced in that one before either is applied (surrogates.precut), so the document
        need not be rebuilt for it: a client typing an emoji and cutting it in its next message, as fast as it
        can, rebuilt its room for each (finding 57). Raises ProtocolError for the first that is invalid or refused,
        once those before it are applied; LimitExceeded for one that would wait for changes never sent while too
        many such changes wait already (`_check_held`)."""
        await self._writable()
        started = time.perf_counter()
        valid, invalid = updates, None
        for i, update in enumerate(updates):
            try:
                _check(update)
            except p.ProtocolError as exc:
                valid, invalid = updates[:i], exc
                break
        applied = 0
        for update, scan in _precut(valid):
            self._check_held(update, origin)
            while (prepared := self._prepare(update, scan)) is None:  # the document is rebuilt first, for this
                await self._writable()  # update: the rebuild's time is counted as the update's (in threads, in
            self._apply_one(prepared, origin)  # parts, it is most)
            applied += 1
            if applied < len(updates) and time.perf_counter() - started > budget:
                break
        else:
            if invalid is not None:
                raise invalid
        return time.perf_counter() - started, applied

    def _check_held(self, update: bytes, origin: object) -> None:
        """LimitExceeded if `update` would wait for changes never sent while its connection has MAX_HELD_EACH such
        changes held since the room last held none, or the room MAX_HELD."""
        if isinstance(origin, Connection) and not self._held.updates:
            origin.held = 0
        each = isinstance(origin, Connection) and origin.held >= MAX_HELD_EACH
        if (each or len(self._held.updates) >= MAX_HELD) and waits(update, clocks(self.doc.get_state())):
            held = f"{MAX_HELD_EACH} of this connection's changes" if each else f"{MAX_HELD} changes"
            raise LimitExceeded(f"{held} wait in this document for changes never sent: no more such changes are "
                                "taken")

    def _apply_one(self, update: bytes, origin: object) -> None:
        refused: BaseException | None = None
        try:
            with self.doc.transaction(origin=origin):
                try:
                    self.doc.apply_update(update)
                    self._held.give(self.doc)
                except BaseException as exc:
                    if not _refusal(exc):
                        raise
                    refused = exc
        except Exception:  # an observer failed after the update was applied: keep going, it must be stored
            self.metrics.errors.labels("observer").inc()
            log.exception("observer failed room=%s", self.name)
        rest = None
        if refused is None and not self._held.whole(self._observed, update):
            rest = self._held.note(self.doc, update)
            if rest is not None and (refused := self._unloadable(rest)) is not None:
                self._held.forget(rest)  # held back, yrs took it; applied after what integrated, it fails
                rest = None
            if rest is not None:  # stored and relayed with the rest: this document alone would lose it
                self._observed.append(rest)
                self._held.settle(self.doc, origin)
                if isinstance(origin, Connection):
                    origin.held += 1
        try:
            self._run_hooks()
        except RefusedChange as exc:
            log.warning("change refused room=%s error=%s", self.name, exc)
            self.discard(CloseCode.INVALID_PAYLOAD, f"a change was refused ({exc}); the room is reset")
            raise p.ProtocolError(f"refused: {exc}") from None
        # whatever yrs integrated before refusing the rest is in the document: stored and broadcast like any change
        self._persist(origin if isinstance(origin, Connection) else None, sealed=rest is not None)
        if refused is not None:
            raise p.ProtocolError(f"invalid update: {refused}") from None

    def _unloadable(self, rest: bytes) -> BaseException | None:
        """Why yrs refuses `rest`, what the document holds back of a change, applied to the document's state, as a
        load applies it after what integrated of the change; None if it does not. yrs takes some structs it cannot
        integrate (a parent that is no type) while their clock has a gap and only fails once it is filled: stored,
        they made the document unloadable. Costs a copy of the document, for changes held back in part only."""
        copy = Doc()
        copy.apply_update(self.doc.get_update())
        try:
            copy.apply_update(rest)
        except BaseException as exc:
            if not _refusal(exc):
                raise
            return exc
        return None

    async def edit(self, change: Callable[[Doc], T], origin: object = "http") -> T:
        """Run `change` on the document in one transaction under `origin`, then persist what it changed, as
        `apply` does; returns what `change` returns. A change that raises keeps what it did before raising
        (stored like any other change), so it should check first (see edits.py). Raises RoomClosed as
        `apply` does."""
        await self._writable()
        try:
            with self.doc.transaction(origin=origin):
                return change(self.doc)
        finally:
            self._run_hooks()
            self._persist(None)

    async def _writable(self) -> None:
        """Wait while a sync answer is being prepared or the document rebuilt; RoomClosed once the room is closed."""
        while self._hold is not None or self._rebuild is not None:
            if self._hold is not None:
                await asyncio.shield(self._hold)
            else:
                await asyncio.wait([self._rebuild])
        if self.closed:
            raise RoomClosed(self.name)

    async def encode_state(self, state_vector: bytes = b"\x00") -> bytes:
        """The update a peer with `state_vector` lacks, containing committed changes only."""
        check_state_vector(state_vector)
        await self._settle()
        return self._answer(state_vector).update

    async def _settle(self) -> None:
        """Wait until the document holds committed changes only, holding writes meanwhile; the caller encodes
        it before its next await (writes resume only then)."""
        try:
            while self._inflight is not None and not self._inflight.done():
                if self._hold is None:
                    self._hold = asyncio.get_running_loop().create_future()
                await asyncio.wait([self._inflight])
        finally:
            if self._hold is not None:
                self._hold.set_result(None)
                self._hold = None

    def _answer(self, state_vector: bytes) -> _Answer:
        """What a peer at `state_vector` lacks. The latest answer is kept until the document changes (or a sweep
        finds nobody asked for it since the one before), so peers asking alike share one encoding and one message:
        fresh clients opening the document, a client asking again and again (a 100,000-edit text takes ~17 ms)."""
        answer = self._answer_kept
        if answer is None or answer.state_vector != state_vector:
            try:
                answer = _Answer(state_vector, self.doc.get_update(state_vector))
            except ValueError as exc:
                raise p.ProtocolError(f"invalid state vector: {exc}") from exc
            self._answer_kept = answer
        answer.asked = True
        return answer

    def _prepare(self, update: bytes, scan: Scan | None = None) -> bytes | None:
        """The update to apply instead of `update`, with the document rebuilt first where it cuts a character
        between its two UTF-16 units (see surrogates.py). None while the document is being rebuilt: where the cut
        clients' structs are large, the cut is made in a worker thread; a document known to be slow to apply
        (slicing.py) is rebuilt in parts, with the loop's turns between them; meanwhile writes wait, other nodes'
        changes are deferred, and the caller prepares the update again after. `scan`: `update` read already."""
        if self._rebuild is not None:
            return None
        cut = self._characters.plan(self.doc, update, self._held.updates, scan, apart=True)
        if cut.fix is not None:
            if len(cut.fix.part) >= READ_APART:
                self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_apart(cut))
                self._rebuild.add_done_callback(self._rebuilt)
                return None
            cut = self._characters.settle(cut, *cut.fix.run())
        if cut.state is None:
            return cut.update
        if slow_documents.cut(self.name, cut.state):
            self._rebuild = asyncio.get_running_loop().create_task(self._rebuild_in_parts(cut.state))
            self._rebuild.add_done_callback(self._rebuilt)  # before any waiter's: they find it cleared
            return None
        _log_rebuild("room rebuilt to cut a character as Yjs does name=%s", self.name)
        self._replace_doc(build(cut.state, self.doc.client_id, self.name))
        return cut.update

    async def _rebuild_apart(self, cut: Cut) -> None:
        """Cut a large document's characters in a worker thread, then build it again (see _prepare): reading all
        of a client's text in Python took the loop from every room for as long (~0.1 s per 50,000 items)."""
        assert cut.fix is not None
        _log_rebuild("room rebuilding to cut a character as Yjs does, read apart name=%s", self.name)
        cut = self._characters.settle(cut, *await in_thread(cut.fix.run))
        if cut.state is not None:
            self._replace_doc(await build_paced(cut.state, self.doc.client_id, self.name, Turns()))

    async def _rebuild_in_parts(self, state: bytes) -> None:
        """Build the document again from `state` in parts (see _prepare)."""
        _log_rebuild("room rebuilding in parts to cut a character as Yjs does name=%s", self.name)
        self._replace_doc(await build_paced(state, self.doc.client_id, self.name, Turns()))

    def _rebuilt(self, rebuild: asyncio.Task[None]) -> None:
        """The rebuild ended (or was cancelled with the room, maybe before it began): apply what was deferred
        meanwhile. One that failed leaves the document in doubt: its clients reconnect to a fresh load."""
        self._rebuild, deferred, self._deferred = None, self._deferred, []
        if not rebuild.cancelled() and rebuild.exception() is not None:
            log.error("room failed to rebuild name=%s", self.name, exc_info=rebuild.exception())
            self.discard(CloseCode.INTERNAL_ERROR, "server error")
        if not self.closed:
            for update in deferred:
                self._on_broker(Kind.UPDATE, update, False)

    def _replace_doc(self, doc: Doc) -> None:
        """Make `doc`, built from this document's state with characters cut, the room's document."""
        self.metrics.rebuilds.inc()
        self._held.give(doc)  # a document built from a state holds nothing back
        if self._subscription is not None:
            self.doc.unobserve(self._subscription)
            self._subscription = doc.observe(self._observe)
        self.doc = doc
        self._answer_kept = None
        for callback in self.on_new_doc:
            callback(doc)

    def _observe(self, event: TransactionEvent) -> None:
        self._answer_kept = None
        update = event.update
        self._observed.append(update)
        self._characters.add(update)

    def _run_hooks(self) -> None:
        """Run hooks; one that fails is logged and counted, never allowed to stop the change being stored (but
        RefusedChange, which refuses it)."""
        for hook in self.hooks:
            try:
                hook(self)
            except RefusedChange:
                raise
            except Exception:
                self.metrics.errors.labels("hook").inc()
                log.exception("room hook failed room=%s", self.name)

    def _persist(self, sender: Connection | None, sealed: bool = False) -> None:
        """Submit what the document recorded since the last call: joined to the room's latest write if the store
        has not taken it yet (it commits no earlier than a new one would), otherwise as a new write. `sealed`: it
        ends with what the document held back of a change (see _Write)."""
        if not self._observed:
            return
        write = self._write
        if (write is None or write.sealed or write.update is not None or self._inflight is None
                or self._inflight.done()):
            write = self._write = _Write()
            fut = self.store.submit(self.name, write.take)
            self._inflight = fut
            fut.add_done_callback(partial(self._committed, write))
        write.parts += self._observed
        write.sealed = sealed
        write.changes += 1
        self._observed = []
        if sender is not None:
            write.senders.append(sender)

    def _committed(self, write: _Write, fut: asyncio.Future[int]) -> None:
        senders, write.senders = write.senders, []  # the store may hold a taken write a while: no connections
        exc = fut.exception() if not fut.cancelled() else StorageError("write cancelled")
        if isinstance(exc, DeletedMeanwhile):  # by another node, whose broadcast of it has not come yet
            self.discard(CloseCode.DELETED, "document deleted")
            return
        if exc is not None:
            self._fail(exc, senders)
            return
        self.metrics.updates_applied.inc(write.changes)
        self.broker.publish(self.name, Kind.UPDATE, write.update)
        for callback in self.on_committed:
            callback()

    def _fail(self, exc: BaseException, senders: list[Connection]) -> None:
        """A write failed: the in-memory document is ahead of storage, so drop it and every connection.

        Clients reconnect, the room reloads what is durable, and their sync handshake re-sends the rest.
        """
        for sender in senders:
            sender.close(CloseCode.INTERNAL_ERROR, "storage failure: update not saved", quiet=True)
        if self.failed:
            return
        self.metrics.errors.labels("storage").inc()
        _log_failure("room failed name=%s error=%s", self.name, exc)
        self.discard(CloseCode.INTERNAL_ERROR, "storage failure")

    def discard(self, code: int, reason: str) -> None:
        """Close every connection and have the registry drop this room without flushing it."""
        if self.failed:
            return
        self.failed = True
        self.closed = True  # from now on, nothing is applied or stored
        for conn in list(self.connections):
            conn.close(code, reason, quiet=True)
        if self._on_discard is not None:
            self._on_discard(self)

    # --- fan-out -------------------------------------------------------------------------------------

    def catch_up(self, updates: list[bytes]) -> bool:
        """Apply what storage holds and this document lacks (committed by another node whose broadcast never
        arrived) and broadcast it here; returns whether anything was missing. The room has loaded."""
        if not updates:
            return False
        deferred = False
        for update in merge_safely(updates):
            missing = self._prepare(get_update(update, self.doc.get_state()))
            if missing is None:  # the document is being rebuilt: applied and relayed after, as other nodes' are
                self._deferred.append(update)
                deferred = True
                continue
            with self.doc.transaction(origin="broker"):
                self.doc.apply_update(missing)
                self._held.give(self.doc)
            if self._held.note(self.doc, missing) is not None:
                self._held.settle(self.doc, "broker")
        changed, self._observed = self._observed, []
        for update in changed:
            self._relay(update)
        return bool(changed) or deferred

    def _on_broker(self, kind: Kind, payload: bytes, local: bool) -> None:
        if self._early is not None:
            self._early.append((kind, payload, local))
            return
        if kind is Kind.DELETED:
            if not local:  # the deleting node discarded its own room already
                log.info("room deleted by another node name=%s", self.name)
                self.discard(CloseCode.DELETED, "document deleted")
        elif kind is Kind.UPDATE:
            if not local:  # committed by another node: apply here without persisting again
                update = self._prepare(payload)
                if update is None:  # the document is being rebuilt
                    self._deferred.append(payload)
                    return
                with self.doc.transaction(origin="broker"):
                    self.doc.apply_update(update)
                    self._held.give(self.doc)
                integrated, self._observed = self._observed, []
                if not self._held.whole(integrated, update):  # more or less than it: relay what clients may lack
                    rest = self._held.note(self.doc, update)
                    if rest is not None:
                        self._held.settle(self.doc, "broker")
                        integrated, self._observed = [*integrated, *self._observed, rest], []
                    for part in integrated:
                        self._relay(part)
                    return
            self._relay(payload)
        else:
            if not local:
                try:
                    entries = p.decode_awareness(payload)
                except p.ProtocolError as exc:  # a node of an older version took it (a NaN state): not relayed
                    log.warning("awareness from another node refused room=%s error=%s", self.name, exc)
                    return
                self._presence.merge(entries, None)
            if not self._awareness_outbox:
                asyncio.get_running_loop().call_soon(self._flush_awareness)
            self._awareness_outbox.append(payload)

    def _relay(self, update: bytes) -> None:
        """Queue a committed update for this room's connections; one merged broadcast per loop turn."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        self._outbox.append(update)

    def _flush_outbox(self) -> None:
        updates, self._outbox = self._outbox, []
        for update in merge_safely(updates):
            self._fan_out(p.sync_update(update))
            self.metrics.updates_broadcast.inc(len(self.connections))

    def _flush_awareness(self) -> None:
        """Relay the awareness changes of one loop turn as one message: each client's newest state."""
        updates, self._awareness_outbox = self._awareness_outbox, []
        if not updates:
            return
        message = p.awareness_message(updates[0] if len(updates) == 1 else p.merge_awareness_updates(updates))
        # every entry in it is now held at its clock or a newer one, so a copy of it can never change anything
        self._relayed.add(message)
        self._fan_out(message)

    def _fan_out(self, message: bytes) -> None:
        frame = binary_frame(message)  # framed once for every connection that can take it directly
        for conn in self.connections:
            conn.send(message, frame)

    # --- awareness -----------------------------------------------------------------------------------

    @property
    def relayed_awareness(self) -> Container[bytes]:
        """The latest awareness messages this room relayed: a y-websocket client sends back every one it receives,
        and such a copy never changes anything (see _flush_awareness)."""
        return self._relayed

    def presence(self) -> list[p.AwarenessEntry]:
        """The awareness states the room holds now (from every node's clients), one per client id."""
        return list(self._presence.states.values())

    def apply_awareness(self, payload: bytes, conn: Connection) -> None:
        """Merge an awareness update from a connection (see Presence.accept) and publish what it changed."""
        accepted = self._presence.accept(payload, conn, self.doc)
        if accepted:
            relayed = payload if len(accepted) == p.awareness_size(payload) else p.encode_awareness_update(accepted)
            self.broker.publish(self.name, Kind.AWARENESS, relayed)

    def sweep(self) -> None:
        """Periodic upkeep: remove the presence of peers not heard from for `awareness_timeout` seconds, and forget
        a sync answer nobody asked for since the previous sweep and the clocks of clients removed long enough."""
        if self._answer_kept is not None:
            if not self._answer_kept.asked:
                self._answer_kept = None
            else:
                self._answer_kept.asked = False
        stale = self._presence.sweep(time.monotonic() - self.awareness_timeout)
        if stale:
            for conn in self.connections:
                conn.awareness_ids.difference_update(e.client_id for e in stale)
            self.broker.publish(self.name, Kind.AWARENESS, p.encode_awareness_update(stale))
