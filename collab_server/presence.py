"""A room's awareness: the states its clients show, the clocks that order them, and who may set which.

States are merged as y-protocols merges them (a higher clock wins; a removal at the held clock or a higher one
removes). The clock of a removed client is remembered for a while, so that a stale state arriving late cannot
bring it back. Connections are held to limits (client ids one may introduce, bytes per state), and a read-only
connection may not speak for clients it did not introduce (see `Presence.claimable`).
"""

from __future__ import annotations

import time

from pycrdt import Doc

from collab_server import protocol as p
from collab_server.connection import Connection
from collab_server.heldback import clocks

MAX_AWARENESS_IDS = 16  # awareness client ids new to the room one connection may introduce (y-websocket: one)
MAX_AWARENESS_STATE = 64 * 1024  # bytes of JSON (UTF-8) in one awareness state
MAX_CLOCK_TAKEN = 2**52  # the highest awareness clock taken at once; above it, only a step at a time (`_taken`)
CLOCK_STEP = 1024  # by how much a client's clock may rise at once above MAX_CLOCK_TAKEN
WRITERS_KEPT = 1024  # client ids a room remembers having had a state for from a read-write connection
RELAYED_KEPT = 32  # awareness messages a room remembers relaying, to drop clients' copies of them unread
_AWARENESS_TYPE = bytes((p.MessageType.AWARENESS,))


class LimitExceeded(Exception):
    """A message within the protocol but beyond what one connection may ask of the room (policy violation)."""


class Relayed(dict[bytes, None]):
    """The latest awareness messages a room relayed, oldest first. Only an awareness message can be one: others
    are told apart by their first byte, without hashing them (a 16 MB update would take ~10 ms)."""

    __slots__ = ()

    def __contains__(self, message: object) -> bool:
        return (isinstance(message, bytes) and message[:1] == _AWARENESS_TYPE
                and dict.__contains__(self, message))

    def add(self, message: bytes) -> None:
        self[message] = None
        if len(self) > RELAYED_KEPT:
            del self[next(iter(self))]


def _too_big(state: str) -> bool:
    """Whether an awareness state is over MAX_AWARENESS_STATE bytes of UTF-8 (encoded only if not ASCII)."""
    return len(state) > MAX_AWARENESS_STATE or (not state.isascii() and len(state.encode()) > MAX_AWARENESS_STATE)


class Presence:
    """The awareness states of one room, from every node's clients, one per client id."""

    def __init__(self) -> None:
        self.states: dict[int, p.AwarenessEntry] = {}
        self._kept: bytes | None = None  # the message holding every state, once encoded
        self._clock: dict[int, int] = {}  # of each client id with a state or removed lately (forget_removed)
        self._seen: dict[int, float] = {}
        self._removed: set[int] = set()  # client ids whose state was removed since the last sweep
        self._removed_before: set[int] = set()  # those removed in the sweep interval before that
        self._viewers: set[int] = set()  # client ids whose latest state came from a read-only connection
        self._writers: dict[int, None] = {}  # the latest WRITERS_KEPT ids with a state from a read-write one

    def message(self) -> bytes:
        """The message holding every state (for joiners and QueryAwareness), encoded once until one changes (it
        takes as much memory as the states, and lives no longer than they stay unchanged)."""
        if self._kept is None:
            self._kept = p.encode_awareness(list(self.states.values()))
        return self._kept

    def accept(self, payload: bytes, conn: Connection, doc: Doc) -> list[p.AwarenessEntry]:
        """Merge an awareness update from a connection; return the entries that changed something. Entries that
        change nothing are dropped unchecked: a y-websocket client sends back every state it receives, so most
        entries are such echoes. An update whose newer entries break the limits is refused whole (LimitExceeded),
        and so is one of more entries than the room knows client ids plus MAX_AWARENESS_IDS, before it is decoded
        (a y-websocket client's update holds its own client and those the room sent it). From a read-only
        connection, entries for a client it did not introduce are dropped unless the client is `claimable` (in
        `doc`, the room's document)."""
        if (size := p.awareness_size(payload)) > len(self._clock) + MAX_AWARENESS_IDS:
            raise LimitExceeded(f"awareness update of {size} entries, for {len(self._clock)} client ids "
                                f"the room knows: more than {MAX_AWARENESS_IDS} awareness clients new to it")
        entries = p.decode_awareness(payload, check_json=False)
        stated = {e.client_id for e in entries if not e.removed}  # a removal may follow its state in the update
        newer = [e for e in entries if self._is_newer(e) or e.removed and e.client_id in stated]
        newer = [e for e in newer if self._taken(e)]
        if conn.readonly:  # a viewer neither takes over nor removes another client's presence
            newer = [e for e in newer if e.client_id in conn.awareness_ids or self.claimable(e.client_id, doc)]
        if not newer:
            return []
        p.check_awareness_json(newer)
        new_ids = {e.client_id for e in newer if not e.removed and e.client_id not in self.states}
        new_ids -= conn.awareness_ids
        if len(conn.awareness_ids) + len(new_ids) > MAX_AWARENESS_IDS:
            raise LimitExceeded(f"more than {MAX_AWARENESS_IDS} awareness clients on one connection")
        if any(_too_big(e.state) for e in newer):
            raise LimitExceeded(f"awareness state over {MAX_AWARENESS_STATE} bytes")
        return self.merge(newer, conn)

    def _taken(self, entry: p.AwarenessEntry) -> bool:
        """Whether `entry`'s clock may be taken: up to MAX_CLOCK_TAKEN, and beyond only CLOCK_STEP above the clock the
        room holds for the client. A y-protocols client takes a higher clock for its own id from anyone and sends its
        next state one above it: a peer sending a user's client id at clock 2^53 - 1 made the user's next state
        2^53, which no yjs peer can decode, so that user was closed (1007) at each reconnect and could never save an
        edit. A client counts one per change and never gets near; one a peer pushed to MAX_CLOCK_TAKEN goes on from
        there, on any connection (a reconnect), while the room remembers its clock."""
        if entry.clock <= MAX_CLOCK_TAKEN:
            return True
        held = self._clock.get(entry.client_id)
        return held is not None and entry.clock <= held + CLOCK_STEP

    def _is_newer(self, entry: p.AwarenessEntry) -> bool:
        """Whether `entry` changes the room's awareness: a state at a higher clock, or the removal of a held state
        at its clock or a higher one (as in y-protocols). The removal of a client the room holds no state for
        changes nothing for the peers it relays to either, which hold none (y-protocols only notes its clock):
        not newer, so it is neither remembered nor relayed."""
        if entry.removed:
            held = self.states.get(entry.client_id)
            return held is not None and entry.clock >= held.clock
        return entry.clock > self._clock.get(entry.client_id, -1)

    def merge(self, entries: list[p.AwarenessEntry], conn: Connection | None) -> list[p.AwarenessEntry]:
        """Keep the entries that are newer (`_is_newer`), in order, noting on `conn` (None: from another node)
        the client ids it introduced; return them."""
        accepted = []
        now = time.monotonic()
        for entry in entries:
            cid = entry.client_id
            if self._is_newer(entry):
                self._kept = None
                self._clock[cid] = entry.clock
                if entry.removed:
                    self.states.pop(cid, None)
                    self._seen.pop(cid, None)
                    self._removed.add(cid)
                    if conn is not None:
                        conn.awareness_ids.discard(cid)
                else:
                    self.states[cid] = entry
                    self._seen[cid] = now
                    if conn is not None:
                        conn.awareness_ids.add(cid)
                        if conn.readonly:
                            self._viewers.add(cid)
                        else:
                            self._viewers.discard(cid)
                            self._writers.pop(cid, None)
                            self._writers[cid] = None
                            if len(self._writers) > WRITERS_KEPT:
                                del self._writers[next(iter(self._writers))]
                accepted.append(entry)
        return accepted

    def claimable(self, client_id: int, doc: Doc) -> bool:
        """Whether a read-only connection may set the presence of `client_id`, which it did not introduce: one the
        room holds no state for, and last had from a viewer (one reconnecting) or never saw, if it is not the id of
        someone who wrote to the document or showed presence from a read-write connection (among the latest
        WRITERS_KEPT). A writer's id without a state (cleared, timed out, or not announced yet after a restart) is
        not: at a high clock, the viewer's state would hold off the writer's next ones, and a y-protocols client
        takes a state for its own id as its own (a user who showed presence but never edited, offline long enough
        for the room to forget the clock, got the viewer's state on reconnecting)."""
        if client_id in self.states or client_id in self._writers:
            return False
        if client_id in self._clock:
            return client_id in self._viewers
        return client_id not in clocks(doc.get_state())

    def bump(self, client_id: int) -> p.AwarenessEntry:
        """Remove a client's presence locally and return the removal entry to broadcast."""
        clock = self._clock.get(client_id, 0) + 1
        self._clock[client_id] = clock
        self._kept = None
        self.states.pop(client_id, None)
        self._seen.pop(client_id, None)
        self._removed.add(client_id)
        return p.AwarenessEntry(client_id, clock, "null")

    def sweep(self, deadline: float) -> list[p.AwarenessEntry]:
        """Remove the states not renewed since `deadline` (time.monotonic()) and return their removal entries;
        forget the clocks of client ids removed before the previous sweep and without a state since. Kept a whole
        sweep interval at least, a clock still refuses a stale state arriving late; never forgotten, those of a
        room's client churn would grow without bound (and loosen the bound on entries in `accept`)."""
        stale = [self.bump(cid) for cid, seen in list(self._seen.items()) if seen < deadline]
        for cid in self._removed_before - self._removed:
            if cid not in self.states:
                self._clock.pop(cid, None)
                self._viewers.discard(cid)
        self._removed_before, self._removed = self._removed, set()
        return stale
