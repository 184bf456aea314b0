"""Runs the status resolver on every loaded room and publishes resolved-status changes to subscribers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from collab_server.model import StatusChange, StatusResolver
from collab_server.room import RefusedChange, Room

log = logging.getLogger(__name__)

Subscriber = Callable[[str, StatusChange], None]


class StatusEvents:
    """`attach` a resolver to each room as it loads; `subscribe` to hear (room name, change) events."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def attach(self, room: Room) -> None:
        def emit(change: StatusChange) -> None:
            log.info("status resolved room=%s block=%s index=%s old=%s new=%s",
                     room.name, change.block_id, change.index_name, change.old, change.new)
            for subscriber in list(self._subscribers):
                subscriber(room.name, change)

        resolver = StatusResolver(room.doc, on_change=emit)

        def resolve(_room: Room) -> None:
            if resolver.unreadable:  # nothing may read the document again: the room refuses the change
                raise RefusedChange("string content in an array of the blocks, which the server cannot read back")
            resolver.run()

        room.hooks.append(resolve)
        room.on_new_doc.append(resolver.rebind)
        room.on_close.append(resolver.close)
