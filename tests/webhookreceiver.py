"""A real webhook receiver for server tests: an HTTP server in a thread that records every POST."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Records every POST and answers 503 while `down`, else the next of `statuses` (then 204)."""

    def __init__(self) -> None:
        self.posts: list[Delivery] = []
        self.statuses: list[int] = []
        self.down = False
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver._lock:
                    status = 503 if receiver.down else receiver.statuses.pop(0) if receiver.statuses else 204
                    receiver.posts.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def events(self, document: str | None = None) -> list[dict]:
        """Every event POSTed (about `document`), answered as it was or not."""
        with self._lock:
            return [d.event for d in self.posts if document is None or d.event["document"] == document]

    def accepted(self, document: str | None = None) -> list[tuple[str, str]]:
        """(event, document) of each POST answered 2xx (about `document`), in order."""
        with self._lock:
            return [(d.event["event"], d.event["document"]) for d in self.posts
                    if 200 <= d.status < 300 and (document is None or d.event["document"] == document)]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"webhook condition not met; received {self.events()}"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
