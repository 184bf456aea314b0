"""Anti-entropy between nodes: loaded rooms catch up with what other nodes committed but never published.

With a distributed broker a node commits, then publishes; one that dies in between (or events dropped while Redis
was down) leaves other nodes' loaded rooms without a committed change. Every `interval` seconds one query reads the
last-write time of every loaded room; a room whose time changed since the last look reads from storage what was
committed since that look (`Store.load_new`: its log entries only, unless a compaction replaced the checkpoint; the
first time, what came after the room's load) and is given what it lacks, which is broadcast to its local connections. So a busy
room's check costs a read of its few newest entries, and the interval can be short. A catch-up is logged as a
warning only when the document's latest commit is older than IN_FLIGHT (in a busy room a change is often caught up
from storage just before its broadcast arrives, which is no loss). A loaded room that holds committed changes while
storage holds no such document was deleted by another node: it is dropped, as the deletion event would have done.
"""

from __future__ import annotations

import logging
import time

from collab_server.connection import CloseCode
from collab_server.pacing import every
from collab_server.room import Room
from collab_server.rooms import Rooms
from collab_server.storage import LogMark, StorageError, Store

log = logging.getLogger(__name__)

IN_FLIGHT = 5.0  # seconds: another node's latest commit may still be on its way through the broker this long


class Resync:
    def __init__(self, rooms: Rooms, store: Store, interval: float) -> None:
        self.rooms = rooms
        self.store = store
        self.interval = interval
        # room name -> the room, its last-write time and what storage held, as of its last catch-up
        self._seen: dict[str, tuple[Room, float, LogMark | None]] = {}

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled (see pacing.every)."""
        await every(self.interval, self.once, "resync", expected=(StorageError,))

    async def refresh(self, room: Room) -> None:
        """Catch `room` up with everything committed so far, before an HTTP request reads it: what another node
        acknowledged may still be on its way through the broker (a read or a saved version through this node
        lacked it). StorageError if it cannot, or the room closed meanwhile."""
        seen = self._seen.get(room.name)
        if await self._catch_up(room.name, room, seen[1] if seen is not None and seen[0] is room else -1.0) is None:
            raise StorageError(f"{room.name!r} could not catch up with storage (closed meanwhile, or in doubt)")

    async def _catch_up(self, name: str, room: Room, stamp: float) -> bool | None:
        """Give `room` (of document `name`) what storage holds and it lacks, read since its previous catch-up (or its load), and note
        `stamp` (its last-write time) with the mark of this read; returns whether it lacked anything, None if the
        room went meanwhile or failed to catch up (its document in doubt, it is discarded: its clients reconnect to
        a fresh load, the others go on)."""
        seen = self._seen.get(name)
        since = seen[2] if seen is not None and seen[0] is room else room.mark
        updates, mark = await self.store.load_new(name, since)  # read after the stamp: all the stamp saw
        room.mark = None  # from now on the mark is kept here
        if self.rooms.loaded.get(name) is not room or room.failed:
            return None
        try:
            missing = room.catch_up(updates)
        except Exception:
            log.exception("room failed to catch up from storage name=%s", name)
            room.discard(CloseCode.INTERNAL_ERROR, "server error")
            return None
        self._seen[name] = (room, stamp, mark)
        return missing

    async def once(self) -> list[str]:
        """One check of every loaded room; returns the rooms that were missing something."""
        for name in set(self._seen) - set(self.rooms.loaded):
            del self._seen[name]
        # a room holding something, all of it committed before the query, must find its document stored
        stored_before = {name for name, room in self.rooms.loaded.items()
                         if room.settled and room.doc.get_state() != b"\x00"}
        stamps = await self.store.updated(list(self.rooms.loaded))
        for name in stored_before - set(stamps):
            room = self.rooms.loaded.get(name)
            if room is not None and not room.failed:
                log.warning("room deleted by another node, whose event never arrived name=%s", name)
                room.discard(CloseCode.DELETED, "document deleted")
        caught = []
        for name, stamp in stamps.items():
            room = self.rooms.loaded.get(name)
            seen = self._seen.get(name)
            if room is None or (seen is not None and seen[0] is room and seen[1] == stamp):
                continue
            if await self._catch_up(name, room, stamp):
                caught.append(name)
                self.rooms.metrics.resync_catch_ups.inc()
                if time.time() - stamp < IN_FLIGHT:  # a busy room: the change may just not have arrived yet
                    log.debug("room caught up from storage name=%s (its latest commit may still be in flight)", name)
                else:
                    log.warning("room caught up from storage name=%s (a committed change was never broadcast)", name)
        return caught
