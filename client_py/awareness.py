"""Awareness (presence) bookkeeping with y-protocols semantics; builds messages, does no I/O."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collab_server.protocol import AwarenessEntry, decode_awareness, encode_awareness

OUTDATED_AFTER = 30.0  # seconds without renewal after which a peer's state is dropped
RENEW_EVERY = OUTDATED_AFTER / 2


@dataclass(slots=True)
class _Meta:
    clock: int
    state: Any  # None once the client is removed (the clock is kept so stale states cannot come back)
    seen: float


class Awareness:
    """Our own awareness state plus the latest state of every peer."""

    def __init__(self, client_id: int, now: Callable[[], float] = time.monotonic) -> None:
        self.client_id = client_id
        self._now = now
        self._clock = 0
        self._local: Any = None
        self._renewed = now()
        self._peers: dict[int, _Meta] = {}

    @property
    def local_state(self) -> Any:
        return self._local

    @property
    def peers(self) -> dict[int, Any]:
        """Live states of the other clients, by client id."""
        return {cid: meta.state for cid, meta in self._peers.items() if meta.state is not None}

    def set_local_state(self, state: Any) -> bytes:
        """Replace our state (None removes us) and return the message announcing it."""
        self._clock += 1
        self._local = state
        self._renewed = self._now()
        return self.local_message()

    def local_message(self) -> bytes:
        return encode_awareness([self._local_entry()])

    def full_message(self) -> bytes:
        """Every state we know of, ours included (the answer to QueryAwareness)."""
        entries = [self._local_entry()] if self._local is not None else []
        entries += [AwarenessEntry(cid, meta.clock, json.dumps(meta.state))
                    for cid, meta in self._peers.items() if meta.state is not None]
        return encode_awareness(entries)

    def _local_entry(self) -> AwarenessEntry:
        return AwarenessEntry(self.client_id, self._clock, json.dumps(self._local))

    def apply(self, payload: bytes) -> set[int]:
        """Apply a peer's awareness update (raises ProtocolError); return the client ids that changed."""
        changed = set()
        now = self._now()
        for entry in decode_awareness(payload):
            if entry.client_id == self.client_id:
                continue
            meta = self._peers.get(entry.client_id)
            known = meta is not None and meta.state is not None
            if meta is None or meta.clock < entry.clock or (meta.clock == entry.clock and entry.removed and known):
                state = None if entry.removed else json.loads(entry.state)
                if known or state is not None:
                    changed.add(entry.client_id)
                self._peers[entry.client_id] = _Meta(entry.clock, state, now)
        return changed

    def renewal(self) -> bytes | None:
        """Our state re-announced with a new clock once it is half-way to expiring, else None."""
        if self._local is None or self._now() - self._renewed < RENEW_EVERY:
            return None
        return self.set_local_state(self._local)

    def expire(self) -> set[int]:
        """Drop peers not renewed for OUTDATED_AFTER seconds; return their ids."""
        cutoff = self._now() - OUTDATED_AFTER
        gone = {cid for cid, meta in self._peers.items() if meta.state is not None and meta.seen < cutoff}
        for cid in gone:
            self._peers[cid].state = None
        return gone

    def forget_peers(self) -> set[int]:
        """Drop every peer state (we lost the connection that vouched for them); return their ids."""
        gone = set(self.peers)
        self._peers.clear()
        return gone
