"""Structured logging: key=value text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from urllib.parse import unquote_plus


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class OneLine(logging.Filter):
    """For a library that logs each retry with a traceback (asyncpg's pool while the database is away):
    keep the message and the error, on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {error}", None
            record.exc_info, record.exc_text = None, None
        return True


# a query parameter (its name may be percent-encoded, as a query decoder reads it) and its value
_PARAMETER = re.compile(r"(?<![\w.~%+-])((?:[\w.~+-]|%[0-9A-Fa-f]{2})+)=[^&;\s\"']+")


def _masked(match: re.Match[str]) -> str:  # `TOKEN=` is no token to the server, but likely a mistyped one
    return f"{match[1]}=…" if unquote_plus(match[1]).lower() == "token" else match[0]


class Redacted(logging.Filter):
    """Access tokens out of log lines: uvicorn logs each websocket's path with its query string, where y-websocket
    clients put `?token=`, a credential until it expires (`?%74oken=` is read as that too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message:
            masked = _PARAMETER.sub(_masked, message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


QUIET_RETRIES = ("asyncpg.pool",)
# chatter below WARNING unless debugging: websockets' "connection open" on every handshake, httpx's line for every
# webhook POST (with the receiver's URL, which may hold a credential)
CHATTY = ("websockets", "httpx")


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    else:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler.addFilter(Redacted())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_RETRIES:
        logging.getLogger(name).filters[:] = [OneLine()]
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)


class Throttled:
    """A log line for a problem that recurs while its cause lasts (every commit or room while the disk is full),
    written at most once per `interval` seconds; the next one written says how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self._next = float("-inf")
        self._skipped = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            msg, args = f"{msg} (and %d more in the last %g s)", (*args, self._skipped, self.interval)
        self.logger.log(self.level, msg, *args)
        self._next, self._skipped = now + self.interval, 0
