"""The room registry: lazy load under a per-name lock, idle eviction after a grace period, and the timers
every loaded room needs (keepalives, awareness expiry): one of each for all rooms, not one per room."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from collab_server.broker import Broker, Kind
from collab_server.connection import CloseCode
from collab_server.metrics import Metrics
from collab_server.pacing import in_slices
from collab_server.room import Room
from collab_server.storage import Store

log = logging.getLogger(__name__)


class RoomFull(Exception):
    """The room has reached its connection limit."""


class _NameLocks:
    """A lock per room name, kept while anyone holds or waits for it. (Dropped when it was released, while the
    waiter it woke had not run yet, it let a later caller take a new lock and load a second copy of the room.)"""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> the lock, [holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[name]


class Rooms:
    def __init__(self, store: Store, broker: Broker, metrics: Metrics, *, idle_unload_seconds: float = 30.0,
                 max_connections_per_room: int = 10_000, awareness_timeout: float = 30.0,
                 keepalive_interval: float = 10.0, on_load: Callable[[Room], None] | None = None,
                 on_delete: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.broker = broker
        self.metrics = metrics
        metrics.rooms_loaded.set_function(lambda: len(self.loaded))
        self.idle_unload_seconds = idle_unload_seconds
        self.max_connections_per_room = max_connections_per_room
        self.awareness_timeout = awareness_timeout
        self.keepalive_interval = keepalive_interval
        self.on_load = on_load  # installs per-room hooks (resolver, webhooks) before the first hook run
        self.on_delete = on_delete  # told the name of each document deleted here
        self.loaded: dict[str, Room] = {}
        self._locks = _NameLocks()
        self._unloads: set[asyncio.Task[None]] = set()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def acquire(self, name: str, *, connection: bool = False) -> Room:
        """The loaded room `name`, loading it first if needed; pair every call with `release`."""
        async with self._locks.hold(name):
            room = self.loaded.get(name)
            if room is None:
                room = Room(name, self.store, self.broker, self.metrics, awareness_timeout=self.awareness_timeout,
                            on_discard=self._evict)
                try:
                    await room.load()
                except BaseException:
                    await room.close()  # drop a broker subscription the failed load may have made
                    raise
                if self.on_load is not None:
                    self.on_load(room)
                room.after_load()
                self.loaded[name] = room
                self._start_timers()
            if connection and len(room.connections) >= self.max_connections_per_room:
                raise RoomFull(name)
            if room.unload_handle is not None:
                room.unload_handle.cancel()
                room.unload_handle = None
            room.holders += 1
            return room

    def release(self, room: Room) -> None:
        room.holders -= 1
        if room.holders == 0 and not room.failed and self.loaded.get(room.name) is room:
            room.unload_handle = asyncio.get_running_loop().call_later(
                self.idle_unload_seconds, self._start_unload, room)

    def _start_unload(self, room: Room) -> None:
        task = asyncio.create_task(self._unload(room), name=f"unload:{room.name}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload(self, room: Room) -> None:
        async with self._locks.hold(room.name):
            if room.holders or self.loaded.get(room.name) is not room:
                return
            await room.flush()
            await room.close()
            del self.loaded[room.name]
            self.store.unloaded(room.name)
            log.info("room unloaded name=%s", room.name)

    async def delete(self, name: str) -> bool:
        """Delete document `name`: stop its room applying changes, erase what storage holds, close the room's
        connections (4410; 1011 if storage refused, and nothing is deleted) and tell other nodes to drop their
        copy. Returns False if there was nothing: not stored, not loaded.

        Clients hold replicas: one that reconnected would send its copy back, as to any empty document. 4410
        is in the range y-websocket's provider treats as permanent (4400-4499): it stops reconnecting."""
        async with self._locks.hold(name):
            room = self.loaded.pop(name, None)
            in_use = room is not None and (bool(room.connections) or room.doc.get_state() != b"\x00")
            try:
                if room is not None:
                    room.closed = True  # applies nothing more; its connections hear the outcome below
                    await room.flush()  # what it committed before is erased below, not after
                existed = await self.store.delete(name)
            except BaseException:
                if room is not None:  # clients reconnect and find the document as storage holds it
                    room.discard(CloseCode.INTERNAL_ERROR, "storage failure: document not deleted")
                raise
            if room is not None:
                room.discard(CloseCode.DELETED, "document deleted")
            self.broker.publish(name, Kind.DELETED, b"")
            log.info("document deleted name=%s", name)
            if self.on_delete is not None and (existed or in_use):
                self.on_delete(name)
        return existed or in_use

    def _start_timers(self) -> None:
        """Arm whichever of the two timers is not armed, while any room is loaded (the only place they are)."""
        if not self.loaded:
            return
        loop = asyncio.get_running_loop()
        if self._keepalive_timer is None:
            self._keepalive_timer = loop.call_later(self.keepalive_interval, self._keep_alive)
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_later(self.awareness_timeout / 2, self._sweep)

    def _keep_alive(self) -> None:
        """Each interval, a keepalive to every connection sent nothing for half an interval: clients'
        inactivity timers never fire (silence lasts at most 1.5 intervals)."""
        self._keepalive_timer = None
        since = asyncio.get_running_loop().time() - self.keepalive_interval / 2
        connections = [conn for room in self.loaded.values() for conn in room.connections]
        in_slices(connections, lambda conn: conn.keep_alive(since), what="keepalive")
        self._start_timers()

    def _sweep(self) -> None:
        """Every half awareness timeout, each room's upkeep (`Room.sweep`): silent peers' presence expires after at
        most 1.5 timeouts."""
        self._sweep_timer = None
        in_slices(list(self.loaded.values()), self._sweep_room, what="room sweep")
        self._start_timers()

    def _sweep_room(self, room: Room) -> None:
        if self.loaded.get(room.name) is room:  # not unloaded since the pass began
            room.sweep()

    def _evict(self, room: Room) -> None:
        """Drop a discarded room without flushing; the next connection reloads what is durable."""
        if self.loaded.get(room.name) is room:
            del self.loaded[room.name]
        self._start_close(room)

    def _start_close(self, room: Room) -> None:
        task = asyncio.create_task(room.close(), name=f"close:{room.name}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    def stop_at(self, when: float) -> None:
        """Server shutdown: rooms still rebuilding their document at `when` (loop time; when the connections drop
        the messages they have not handled, transport.py) stop (`Room.stop_rebuilding`), so no session waits for
        a rebuild until uvicorn cancels it."""
        asyncio.get_running_loop().call_at(when, self._stop_rebuilding)

    def _stop_rebuilding(self) -> None:
        for room in self.loaded.values():
            room.stop_rebuilding()

    async def close(self) -> None:
        """Graceful shutdown: tell clients we are going away, stop rebuilds, commit everything, unload every room
        (the store folds the logs worth folding before it closes, so the next start loads each from its
        checkpoint)."""
        for room in list(self.loaded.values()):
            for conn in list(room.connections):
                conn.close(CloseCode.GOING_AWAY, "server shutting down")
        self._stop_rebuilding()
        for room in list(self.loaded.values()):
            await room.flush()
            await room.close()
            self.store.unloaded(room.name)
        self.loaded.clear()
        for timer in (self._keepalive_timer, self._sweep_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive_timer = self._sweep_timer = None
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
