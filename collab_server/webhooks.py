"""Webhooks: tell another service, by an HTTP POST, that a document changed or was deleted.

``document.changed`` goes out once a document has been quiet for `debounce` seconds after a commit, and at
least every `max_wait` seconds while it keeps changing; ``document.deleted`` at once. The body is JSON
``{"event", "document", "time"}``; with a secret, ``X-Collab-Signature: sha256=<hex>`` is the HMAC-SHA256
of the body. A POST that fails (network error, timeout, a status other than 2xx) is retried with backoff.
Delivery is at least once while the node runs: a receiver may see an event twice, and with several nodes each
node reports the changes it committed; a change committed within the quiet period before the node is killed
(SIGKILL, power loss) is not reported. Only commits are reported, never a change that storage refused. A
document's events reach the receiver in order: a delivery waits for the one before it, and a deletion cancels
the change events still waiting or being retried (they arrived after the deletion, with the receiver failing).
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

from collab_server.metrics import Metrics
from collab_server.room import Room

log = logging.getLogger(__name__)

RETRY_DELAY = 0.5  # seconds before the first retry; doubled for each next one


def check_url(url: str) -> None:
    """ValueError, in one line, unless events can be POSTed to `url`: http:// or https:// with a host (anything else
    would fail every delivery). The URL itself is not repeated, as it may hold a token."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"webhook_url: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("webhook_url must be an http:// or https:// URL with a host")


class Webhooks:
    """Debounces each document's commits into change events and delivers events in background tasks."""

    def __init__(self, url: str, metrics: Metrics, *, secret: str = "", debounce: float = 2.0,
                 max_wait: float = 10.0, attempts: int = 4, timeout: float = 5.0) -> None:
        check_url(url)
        self.url = url
        self.metrics = metrics
        self.secret = secret.encode()
        self.debounce = debounce
        self.max_wait = max(max_wait, debounce)
        self.attempts = attempts
        self.timeout = timeout
        self._client = httpx.AsyncClient(timeout=timeout)
        self._pending: dict[str, tuple[float, asyncio.TimerHandle]] = {}  # document: (first change, timer)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._running: dict[str, list[asyncio.Task[None]]] = {}  # each document's deliveries still running, in order

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
        self._send("document.deleted", doc)

    def _fire(self, doc: str) -> None:
        del self._pending[doc]
        self._send("document.changed", doc)

    def _send(self, event: str, doc: str) -> None:
        running = self._running.setdefault(doc, [])
        if event == "document.deleted":  # events still waiting or being retried would arrive after it
            for earlier in running:
                earlier.cancel()
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
        if before is not None:  # the document's previous event first
            await asyncio.wait([before])
        body = json.dumps({"event": event, "document": doc, "time": time.time()}).encode()
        headers = {"content-type": "application/json", "x-collab-event": event}
        if self.secret:
            headers["x-collab-signature"] = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        error = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(RETRY_DELAY * 2 ** (attempt - 1))
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= response.status_code < 300:
                self.metrics.webhooks_delivered.inc()
                return
            error = f"status {response.status_code}"
        self.metrics.errors.labels("webhook").inc()
        log.warning("webhook not delivered event=%s document=%s attempts=%d error=%s",
                    event, doc, self.attempts, error)

    async def close(self, timeout: float) -> None:
        """Send what waits for its quiet period now, and give deliveries `timeout` seconds to finish."""
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
        await self._client.aclose()
