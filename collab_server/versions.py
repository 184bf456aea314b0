"""Automatic versions: a document that changes gets a saved version at most every `interval` seconds.

The first commit to a document once `interval` has passed since its newest automatic version saves the
committed state as a version labelled "automatic" (so a document edited all day gets one an interval, and an
untouched one none). Only the newest `keep` automatic versions of each document are kept; versions saved on
request are never deleted by this. With several nodes each node saves for the commits it makes, unless another
node saved one within the interval (the store checks, nodes taking turns): one an interval in all.
"""

from __future__ import annotations

import asyncio
import logging
import time

from collab_server.metrics import Metrics
from collab_server.room import Room
from collab_server.storage import StorageError, Store

log = logging.getLogger(__name__)
LABEL = "automatic"


class AutoVersions:
    def __init__(self, store: Store, metrics: Metrics, *, interval: float, keep: int) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.keep = keep
        self._due: dict[str, float] = {}  # document: unix time its next automatic version is due
        self._saving: dict[str, asyncio.Task[None]] = {}

    def attach(self, room: Room) -> None:
        """Save versions of the room's document as it commits (call as each room loads)."""
        room.on_committed.append(lambda: self._committed(room))
        room.on_close.append(lambda: self._due.pop(room.name, None))

    def _committed(self, room: Room) -> None:
        if room.name in self._saving or time.time() < self._due.get(room.name, 0.0):
            return
        task = asyncio.get_running_loop().create_task(self._save(room), name=f"version:{room.name}")
        self._saving[room.name] = task
        task.add_done_callback(lambda _: self._saving.pop(room.name, None))

    async def _save(self, room: Room) -> None:
        try:
            if room.name not in self._due:  # the first commit since the room loaded: when was the last one?
                last = max((v.time for v in await self.store.versions(room.name) if v.auto), default=None)
                self._due[room.name] = time.time() if last is None else last + self.interval
                if time.time() < self._due[room.name]:
                    return
            if room.closed:
                return
            version = await self.store.save_auto_version(room.name, LABEL, await room.encode_state(),
                                                         time.time() - self.interval)
            if version is None:  # another node saved one within the interval
                last = max((v.time for v in await self.store.versions(room.name) if v.auto), default=time.time())
                self._due[room.name] = last + self.interval
                return
            self._due[room.name] = version.time + self.interval
            await self.store.prune_versions(room.name, self.keep)
            self.metrics.versions_saved.inc()
        except StorageError as exc:
            self.metrics.errors.labels("version").inc()
            log.warning("automatic version not saved doc=%s error=%s", room.name, exc)

    async def close(self) -> None:
        """Wait for the versions being saved."""
        await asyncio.gather(*self._saving.values(), return_exceptions=True)
