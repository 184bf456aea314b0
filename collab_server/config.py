"""Every setting in one place: its default, its environment variable (COLLAB_<NAME>) and its CLI flag."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "COLLAB_"
COMMA_SEPARATED = {"cors_origins"}  # settings holding a list, which a TOML file may also give as an array


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def setting(default: Any, help: str, *, least: float | None = None, above: float | None = None,
            most: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A setting's default, its help line (shown by `collab-server serve --help`) and the values it accepts:
    at least `least`, more than `above`, at most `most`, or one of `choices` (in any case; kept in lower case)."""
    return field(default=default, metadata={"help": help, "least": least, "above": above, "most": most,
                                            "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Every setting of the server; an instance holds usable values only (ValueError otherwise)."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(1234, "port to listen on (0: any free port)", least=0, most=65535)
    db: str = setting("./collab.db", "SQLite database file (store sqlite)")
    store: str = setting("sqlite", "where documents are kept: the SQLite file, or PostgreSQL (several nodes)",
                         choices=("sqlite", "postgres"))
    broker: str = setting("local", "how nodes hear each other's changes: not at all, or through Redis streams "
                          "(with store postgres)",
                          choices=("local", "redis"))
    postgres_dsn: str = setting("postgresql://127.0.0.1:5432/test", "PostgreSQL to use with store postgres "
                                "(?search_path=<schema> keeps a deployment in a schema of its own)")
    redis_url: str = setting("redis://127.0.0.1:6379/0",
                             "Redis to use with broker redis (redis://, rediss:// or unix://)")
    redis_stream_ttl: int = setting(
        600, "broker redis: seconds a room's event stream is kept in Redis after its last event (nodes read events "
        "at once; one that misses them takes the changes from storage at its next resync)", least=1)
    resync_interval: float = setting(
        5.0, "broker redis: seconds between checks that loaded rooms hold all that other nodes committed (a node "
        "that died between commit and publish, events lost while Redis was away); 0 = never", least=0)
    sqlite_synchronous: str = setting(
        "full", "SQLite's synchronous pragma: full survives power loss, normal survives process crashes only",
        choices=("full", "normal", "extra"))
    compact_threshold: int = setting(
        500, "fold a document's update log into its checkpoint once it has this many entries (a large document's: "
             "once they weigh half its checkpoint, if more)", least=1)
    idle_unload_seconds: float = setting(
        30.0, "a room with no connection for this long is flushed and unloaded", least=0)
    request_header_timeout: float = setting(
        20.0, "seconds a client has to send a request's line and headers (websocket upgrades too)", above=0)
    max_message_size: int = setting(16 * 1024 * 1024, "bytes in one incoming websocket message (more: close 1009)",
                                    least=1)
    ping_interval: float = setting(20.0, "seconds between websocket pings to each connection; 0 = none", least=0)
    ping_timeout: float = setting(20.0, "a connection that does not answer a ping within this is dropped",
                                  above=0)
    keepalive_interval: float = setting(
        10.0, "a connection sent nothing for half of this gets an empty awareness message (y-websocket drops a "
        "connection silent for 30 s)", above=0)
    per_message_deflate: bool = setting(
        False, "compress frames (permessage-deflate): saves bandwidth on slow links, costs server CPU")
    proxy_headers: bool = setting(
        False, "trust X-Forwarded-For/-Proto from a proxy on 127.0.0.1, for the client address in uvicorn's log "
        "lines (nothing else reads it; it costs every connection a coroutine frame)")
    awareness_timeout: float = setting(
        30.0, "presence not renewed for this long is removed (clients renew every 15 s)", above=0)
    send_queue_limit: int = setting(
        4096, "a peer too slow to read is closed (1013) once this many messages wait for it, even after merging "
        "them", least=1)
    send_queue_bytes: int = setting(
        64 * 1024 * 1024, "... or this many bytes (a bigger message still goes out when nothing else waits)",
        least=1)
    max_connections_per_room: int = setting(10_000, "connections one room admits (more: close 1008)", least=1)
    rate_limit_per_second: float = setting(
        0.0, "incoming messages per second per connection (more: close 1008); 0 = unlimited", least=0)
    rate_limit_burst: int = setting(2000, "messages a connection may send at once before the rate applies",
                                    least=1)
    loop_share: float = setting(
        0.25, "share of the event loop's time one connection's messages may take, over a while (an update that "
        "rebuilds its document, a sync request on a large one); past it the connection is read again once even, "
        "nothing refused; 0 = no limit", least=0, most=1)
    auth_secret: str = setting("", "secret that signs access tokens (collab-server token); \"\" = tokens off")
    auth_required: bool = setting(False, "refuse websockets and API calls without a valid token")
    auth_close_codes: bool = setting(
        False, "refuse a websocket by accepting it and closing with 4401 (no token) or 4403 (invalid, expired, "
        "not covering) and the reason, which y-websocket treats as final; off: refuse the upgrade with 403, "
        "which a browser sees only as a failed connection (y-websocket retries for ever)")
    cors_origins: str = setting(
        "", "browser pages on these origins may call the HTTP API: comma-separated scheme://host[:port], or * for "
        "any; \"\" = only pages the server serves (websockets are not affected)")
    ssl_certfile: str = setting(
        "", "serve https:// and wss:// with this certificate chain (PEM; SIGHUP reloads it); \"\" = plain "
        "http:// and ws://, as behind a proxy that terminates TLS")
    ssl_keyfile: str = setting("", "its private key (PEM); \"\" = in the certificate file")
    version_interval: float = setting(
        0.0, "a document that changes gets a saved version at most every this many seconds (its first at its "
        "first change); 0 = no automatic versions", least=0)
    versions_keep: int = setting(24, "automatic versions kept per document (the newest)", least=0)
    webhook_url: str = setting(
        "", "POST document.changed and document.deleted events to this http:// or https:// URL; \"\" = no "
        "webhooks")
    webhook_secret: str = setting("", "signs each webhook body: X-Collab-Signature: sha256=<HMAC-SHA256 hex>")
    webhook_debounce: float = setting(2.0, "document.changed is sent after this many quiet seconds ...", least=0)
    webhook_max_wait: float = setting(10.0, "... and at least this often while changes go on", least=0)
    webhook_sweep_interval: float = setting(
        60.0, "seconds between sweeps that send the webhook events never reported (a node killed before sending "
        "them, a receiver down past the retries); one also runs at start", above=0)
    web_demo_dir: str = setting(str(Path(__file__).resolve().parent.parent / "web_demo" / "dist"),
                                "static web demo served at / when the directory exists")
    heap_trim_interval: float = setting(
        30.0, "seconds between returns of freed C heap memory to the OS (glibc malloc_trim); 0 = never",
        least=0)
    log_level: str = setting("info", "least severe log lines written", choices=LOG_LEVELS)
    log_format: str = setting("text", "log lines as text or one JSON object each", choices=("text", "json"))
    shutdown_timeout: float = setting(
        10.0, "seconds SIGTERM waits for connections to close before the server stops (what a client sent that "
        "is still unhandled after half of it is dropped: never applied, its client sends it again)", least=0)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.metadata["choices"] is not None:
                object.__setattr__(self, f.name, getattr(self, f.name).lower())
            _check(f.name, getattr(self, f.name), f.metadata)
        if self.auth_required and not self.auth_secret:
            raise ValueError("auth_required needs auth_secret (COLLAB_AUTH_SECRET)")
        if self.version_interval > 0 and self.versions_keep < 1:
            raise ValueError("version_interval needs versions_keep of at least 1")
        if self.broker == "redis" and self.store == "sqlite":  # each node would keep its own copy of every document
            raise ValueError("broker redis needs store postgres: nodes on SQLite files do not share their documents")
        if self.broker == "redis":
            _check_redis_url(self.redis_url)

    @classmethod
    def load(cls, config_file: str | None = None, **overrides: Any) -> "Settings":
        """Defaults < TOML file < environment < explicit overrides (CLI flags); None overrides are ignored."""
        values: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as fh:
                try:
                    values.update(tomllib.load(fh))
                except ValueError as exc:  # not TOML, or not UTF-8: say which file
                    raise ValueError(f"{config_file}: {exc}") from None
        for f in fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        defaults = cls()
        return replace(defaults, **{k: _coerce(type(getattr(defaults, k)), k, v) for k, v in values.items()})


def _check(name: str, value: Any, rules: Mapping[str, Any]) -> None:
    """ValueError unless `value` is one the setting `name` accepts (see `setting`); a number must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if (least := rules["least"]) is not None and value < least:
        raise ValueError(f"{name} must be at least {least}, not {value!r}")
    if (above := rules["above"]) is not None and value <= above:
        raise ValueError(f"{name} must be more than {above}, not {value!r}")
    if (most := rules["most"]) is not None and value > most:
        raise ValueError(f"{name} must be at most {most}, not {value!r}")
    if (choices := rules["choices"]) is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_redis_url(url: str) -> None:
    """ValueError, in one line, unless the Redis client takes `url` (redis://, rediss:// or unix://, a numeric
    port, ...); the URL itself is not repeated, as it may hold a password."""
    from redis.asyncio.connection import parse_url  # only a node on broker redis needs the client

    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"redis_url: {exc}") from None


def _coerce(kind: type, name: str, value: Any) -> Any:
    """`value` of setting `name` as its default's type `kind` (booleans also from their usual spellings; a list
    of strings, as a TOML array, for a comma-separated one)."""
    if name in COMMA_SEPARATED and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():  # int() would drop the fraction
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf), as TOML can write
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from exc
