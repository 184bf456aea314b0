"""Webhooks: tell another service, by an HTTP POST, that a document changed or was deleted.

``document.changed`` goes out once a document has been quiet for `debounce` seconds after a commit here, and at
least every `max_wait` seconds while it keeps changing; ``document.deleted`` at once. The body is JSON
``{"event", "document", "time"}``; with a secret, ``X-Collab-Signature: sha256=<hex>`` is the HMAC-SHA256
of the body. A POST that fails (network error, timeout, a status other than 2xx) is retried with backoff.

Delivery is at least once, across crashes and receiver outages, through marks the store keeps (Store.keep_marks;
nothing on the commit path): a change event reads the document's last commit time before it is POSTed, and once
the receiver accepts it that time is recorded as reported; a deletion records a deletion to report in its own
transaction, cleared once the receiver accepts its event. A sweep, at start and then every `sweep_interval`
seconds, sends what the marks say is unreported: deletions (before the change events of a document made again
since, which it cancels and sends again after), and changes last committed `debounce` seconds ago or more (unless
an event of that document waits or is being sent here); at most SWEEP_EVENTS of each, the next sweep going on
from there, and at most POSTS_AT_ONCE POSTs in flight. So a change committed within the quiet period before the node is killed (SIGKILL, power
loss), or an event given up on while the receiver was down, goes out with a later sweep (after the restart, the
first one at least `debounce` after the commit). With several nodes on PostgreSQL each reports live what it
commits, and one node at a time sweeps, for all of them.

Not guaranteed: exactly once. An event is sent again when its mark was not recorded (node killed after the
receiver accepted it; marks are written in batches, off the commit path; storage failing), or when one node's
sweep meets an event another node is sending. Events are merged: a receiver learns that a document changed (or
was deleted, even if created again since), not each step, and should fetch it. Turning webhooks on for the first
time over a database marks every stored document reported: nothing older is sent. Once the marks exist, what
changes or is deleted while webhooks are off (or on nodes without them) is sent by the next sweep of a node
with webhooks. Only commits are reported, never a change that storage refused. A node sends a document's events
in order: a delivery waits for the one before it (at most one change event waits so), and a deletion cancels the
change events still waiting or being retried (they arrived after the deletion, with the receiver failing).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from functools import partial

import httpx

from collab_server.logs import Throttled
from collab_server.metrics import Metrics
from collab_server.pacing import every
from collab_server.room import Room
from collab_server.storage import StorageError, Store

log = logging.getLogger(__name__)
_log_undelivered = Throttled(log, logging.WARNING)  # a receiver down for a sweep's backlog: a line per 10 s

RETRY_DELAY = 0.5  # seconds before the first retry; doubled for each next one
POSTS_AT_ONCE = 8  # POSTs in flight at a time: a sweep's 1,000 at once timed out in httpx's pool and took the CPU
SWEEP_BATCH = 1000  # documents a sweep looks at per query
SWEEP_EVENTS = 1000  # events of each kind a sweep sends at most
CHANGED, DELETED = "document.changed", "document.deleted"


def check_url(url: str) -> None:
    """ValueError, in one line, unless events can be POSTed to `url`: http:// or https:// with a host (anything else
    would fail every delivery). The URL itself is not repeated, as it may hold a token."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"webhook_url: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")


class Reported:
    """What the receiver accepted, to record as the store's webhook marks: written in batches, one write at a
    time. A write that fails is retried with the next; one never made only has a sweep send the event again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.changed: dict[str, float] = {}  # document: its `updated` read before the event was sent
        self.deleted: set[str] = set()
        self._writing: asyncio.Task[None] | None = None

    def __contains__(self, doc: str) -> bool:
        return doc in self.changed or doc in self.deleted

    def change(self, doc: str, updated: float) -> None:
        self.changed[doc] = max(updated, self.changed.get(doc, updated))
        self.write()

    def deletion(self, doc: str) -> None:
        self.deleted.add(doc)
        self.write()

    def write(self) -> None:
        """Write what is not written yet, in the background (unless a write is under way: it goes on with it)."""
        if self._writing is None and (self.changed or self.deleted):
            self._writing = asyncio.create_task(self._write(), name="webhook-marks")

    async def _write(self) -> None:
        try:
            while self.changed or self.deleted:
                changed, deleted = dict(self.changed), set(self.deleted)
                try:
                    await self.store.mark_reported(changed, sorted(deleted))
                except StorageError as exc:
                    log.warning("webhooks: recording delivered events failed (a sweep may send them again) "
                                "error=%s", exc)
                    return
                for doc, updated in changed.items():
                    if self.changed.get(doc) == updated:
                        del self.changed[doc]
                self.deleted -= deleted
        finally:
            self._writing = None

    async def flush(self) -> None:
        """Wait for the write under way, then for one more of what is left (after a failed write)."""
        if self._writing is not None:
            await asyncio.wait([self._writing])
        self.write()
        if self._writing is not None:
            await asyncio.wait([self._writing])


class Webhooks:
    """Debounces each document's commits into change events, delivers events in background tasks, records what the
    receiver accepted and sweeps the store for what was never reported."""

    def __init__(self, url: str, store: Store, metrics: Metrics, *, secret: str = "", debounce: float = 2.0,
                 max_wait: float = 10.0, sweep_interval: float = 60.0, attempts: int = 4,
                 timeout: float = 5.0) -> None:
        check_url(url)
        self.url = url
        self.store = store
        self.metrics = metrics
        self.secret = secret.encode()
        self.debounce = debounce
        self.max_wait = max(max_wait, debounce)
        self.sweep_interval = sweep_interval
        self.attempts = attempts
        self.timeout = timeout
        self._client = httpx.AsyncClient(timeout=timeout)
        self._pending: dict[str, tuple[float, asyncio.TimerHandle]] = {}  # document: (first change, timer)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._running: dict[str, list[asyncio.Task[None]]] = {}  # each document's deliveries still running, in order
        self._queued: set[str] = set()  # documents with a change event waiting for the event before it
        self._reported = Reported(store)
        self._posting = asyncio.Semaphore(POSTS_AT_ONCE)
        self._cursor = ""  # the sweep goes on looking for unreported changes after this name

    async def open(self) -> None:
        """Have the store keep webhook marks (call once it is open, before any commit)."""
        await self.store.keep_marks()

    def attach(self, room: Room) -> None:
        """Report the room's commits (call as each room loads)."""
        room.on_committed.append(lambda: self.changed(room.name))

    def changed(self, doc: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        first = now
        if (pending := self._pending.get(doc)) is not None:
            first, timer = pending
            timer.cancel()
        due = min(now + self.debounce, first + self.max_wait)
        self._pending[doc] = (first, loop.call_at(due, self._fire, doc))

    def deleted(self, doc: str) -> None:
        if (pending := self._pending.pop(doc, None)) is not None:
            pending[1].cancel()
        self._send(DELETED, doc)

    def _fire(self, doc: str) -> None:
        del self._pending[doc]
        self._send(CHANGED, doc)

    def _send(self, event: str, doc: str) -> None:
        running = self._running.setdefault(doc, [])
        if event == DELETED:  # events still waiting or being retried would arrive after it
            for earlier in running:
                earlier.cancel()
            self._queued.discard(doc)
        elif doc in self._queued:  # the change event waiting reads the document's time when its turn comes
            return
        elif running:
            self._queued.add(doc)
        task = asyncio.create_task(self._deliver(event, doc, running[-1] if running else None),
                                   name=f"webhook:{event}:{doc}")
        self._deliveries.add(task)
        running.append(task)
        task.add_done_callback(partial(self._delivered, doc))

    def _delivered(self, doc: str, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        running = self._running[doc]
        running.remove(task)
        if not running:
            del self._running[doc]

    async def _deliver(self, event: str, doc: str, before: asyncio.Task[None] | None) -> None:
        """POST the event once the document's previous one is done; record it once accepted. A change event
        first reads the document's last commit time: what commits after the read is reported again."""
        if before is not None:
            await asyncio.wait([before])
            self._queued.discard(doc)
        updated: float | None = None
        if event == CHANGED:
            try:
                stamps = await self.store.updated([doc])
            except StorageError as exc:  # sent, and not recorded: a sweep sends it again
                log.warning("webhooks: reading the commit time of %s failed error=%s", doc, exc)
            else:
                if doc not in stamps:  # deleted since, by another node: its deletion is reported instead
                    return
                updated = stamps[doc]
        if not await self._post(event, doc):
            return
        if event == DELETED:
            self._reported.deletion(doc)
        elif updated is not None:
            self._reported.change(doc, updated)

    async def _post(self, event: str, doc: str) -> bool:
        """POST the event, retried with backoff; whether the receiver accepted it."""
        body = json.dumps({"event": event, "document": doc, "time": time.time()}).encode()
        headers = {"content-type": "application/json", "x-collab-event": event}
        if self.secret:
            headers["x-collab-signature"] = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        error = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(RETRY_DELAY * 2 ** (attempt - 1))
            try:
                async with self._posting:
                    response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= response.status_code < 300:
                self.metrics.webhooks_delivered.inc()
                return True
            error = f"status {response.status_code}"
        self.metrics.errors.labels("webhook").inc()
        _log_undelivered("webhook not delivered event=%s document=%s attempts=%d error=%s",
                         event, doc, self.attempts, error)
        return False

    async def sweep_every(self) -> None:
        """Sweep now, then every `sweep_interval` seconds (run as a task; cancel it to stop; see pacing.every)."""
        await every(self.sweep_interval, self._sweep, "webhooks: sweep", expected=(StorageError,), at_once=True)

    async def _sweep(self) -> None:
        """If this node leads the sweep, send what the store holds as unreported: deletions (unless one is being
        sent here), then changes last committed `debounce` seconds ago or more (a later one is, or was, the
        committing node's to report live; unless an event of the document waits or is being sent here), up to
        SWEEP_EVENTS of each; the next sweep goes on after the last document looked at."""
        if not await self.store.leads_sweep():
            self.metrics.webhook_sweeps.labels("other").inc()
            return
        self._reported.write()  # what a failed write left
        for doc in await self.store.deletions_to_report(SWEEP_EVENTS):
            running = self._running.get(doc, [])
            if doc in self._reported or any(task.get_name() == f"webhook:{DELETED}:{doc}" for task in running):
                continue
            self._send(DELETED, doc)  # cancels the change events of the document made again since: they follow it
            if running:
                self.changed(doc)
        before, sent = time.time() - self.debounce, 0
        while sent < SWEEP_EVENTS:
            docs, after = await self.store.unreported(self._cursor, before, SWEEP_BATCH)
            for doc in docs:
                if doc not in self._pending and doc not in self._running and doc not in self._reported:
                    self._send(CHANGED, doc)
                    sent += 1
            self._cursor = after or ""
            if after is None:
                break
        self.metrics.webhook_sweeps.labels("this").inc()

    async def close(self, timeout: float) -> None:
        """Send what waits for its quiet period now, give deliveries `timeout` seconds to finish, and record what
        was delivered (the sweep task is cancelled first)."""
        for doc in list(self._pending):
            self._pending[doc][1].cancel()
            self._fire(doc)
        if self._deliveries:
            _, late = await asyncio.wait(self._deliveries, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("webhooks: %d deliveries cut short by shutdown", len(late))
                await asyncio.wait(late)
        await self._reported.flush()
        await self._client.aclose()
