"""Every setting in one place: its default, its environment variable (COLLAB_<NAME>) and its CLI flag."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "COLLAB_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 1234
    db: str = "./collab.db"
    # storage / broker backends: "sqlite" | "postgres", "local" | "redis"
    store: str = "sqlite"
    broker: str = "local"
    postgres_dsn: str = "postgresql://127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # distributed broker only: seconds between checks that loaded rooms hold all that other nodes committed
    # (a node that dies between commit and publish, or events lost while Redis was down); 0 = off
    resync_interval: float = 5.0
    # sqlite synchronous pragma: "full" survives power loss, "normal" survives process crashes
    sqlite_synchronous: str = "full"
    # compaction: fold the update log into the checkpoint once a document has this many log entries
    compact_threshold: int = 500
    # rooms with no connection for this long are flushed and unloaded
    idle_unload_seconds: float = 30.0
    # connections
    request_header_timeout: float = 20.0  # seconds to send a request's line and headers (websocket upgrades too)
    max_message_size: int = 16 * 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    keepalive_interval: float = 10.0
    per_message_deflate: bool = False  # compress frames: saves bandwidth on slow links, costs server CPU
    # trust X-Forwarded-For/-Proto from a proxy on 127.0.0.1 (uvicorn's ProxyHeadersMiddleware) for the client
    # address in uvicorn's log lines; nothing else reads it, and it costs every connection a coroutine frame
    proxy_headers: bool = False
    awareness_timeout: float = 30.0  # presence not renewed for this long is removed (clients renew every 15 s)
    # a peer too slow to read is closed (1013) once this many messages, or bytes, wait for it even after
    # merging them (coalesce.py); a message bigger than the byte limit still goes out when nothing else waits
    send_queue_limit: int = 4096
    send_queue_bytes: int = 64 * 1024 * 1024
    max_connections_per_room: int = 10_000
    rate_limit_per_second: float = 0.0  # incoming messages per connection; 0 = unlimited
    rate_limit_burst: int = 2000
    # access control
    auth_secret: str = ""
    auth_required: bool = False
    # refused websockets: by default the upgrade is refused with 403, which a browser sees only as a failed
    # connection (y-websocket retries forever); on, the upgrade is accepted and closed at once with 4401 (no
    # token) or 4403 (invalid, expired or not covering) and the reason, which y-websocket treats as permanent
    auth_close_codes: bool = False
    # browser pages on these origins may call the HTTP API (CORS; cors.py): comma-separated scheme://host[:port],
    # or * for any; "" = none, so only pages the server itself serves can (websockets are not affected)
    cors_origins: str = ""
    # TLS: serve https:// and wss:// with this certificate chain and private key (PEM files; the key may be in the
    # certificate file); "" = plain http:// and ws://, as behind a proxy that terminates TLS
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # automatic versions (versions.py): a document that changes gets a saved version at most every this many
    # seconds (its first at its first change); the newest `versions_keep` automatic ones are kept; 0 = off
    version_interval: float = 0.0
    versions_keep: int = 24
    # webhooks (webhooks.py): POST document.changed (after `webhook_debounce` quiet seconds, at least every
    # `webhook_max_wait` while changes go on) and document.deleted events to this URL; "" = off
    webhook_url: str = ""
    webhook_secret: str = ""  # signs each body: X-Collab-Signature: sha256=<HMAC-SHA256 hex>
    webhook_debounce: float = 2.0
    webhook_max_wait: float = 10.0
    # static web demo, served at / when the directory exists
    web_demo_dir: str = str(Path(__file__).resolve().parent.parent / "web_demo" / "dist")
    # seconds between returns of freed C heap memory to the OS (glibc malloc_trim, in a worker thread; heap.py);
    # 0 = never. Only `collab-server serve` does it: it is a process setting
    heap_trim_interval: float = 30.0
    log_level: str = "info"
    log_format: str = "text"  # "text" | "json"
    shutdown_timeout: float = 10.0

    @classmethod
    def load(cls, config_file: str | None = None, **overrides: Any) -> "Settings":
        """Defaults < TOML file < environment < explicit overrides (CLI flags); None overrides are ignored."""
        values: dict[str, Any] = {}
        if config_file:
            with open(config_file, "rb") as fh:
                values.update(tomllib.load(fh))
        for f in fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(cls(), **{k: _coerce(cls, k, v) for k, v in values.items()})


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    kind = type(getattr(cls(), name))
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from exc
