"""Command line: `collab-server serve`, `collab-server token` and `collab-server backup`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import ssl
import sys
from dataclasses import fields
from functools import partial

import uvicorn
from starlette.types import ASGIApp

from collab_server import logs
from collab_server.app import CollabApp, create_app
from collab_server.auth import issue_token
from collab_server.config import Settings
from collab_server.heap import malloc_trim, trim_every
from collab_server.storage import StorageError
from collab_server.storage.sqlite import backup as sqlite_backup
from collab_server.transport import CollabHttpProtocol, stop_sessions

log = logging.getLogger(__name__)
NOFILE_CEILING = 1 << 20  # where the hard limit is unlimited (setting the soft one to infinity is refused)
# the cyclic collector's young generation is collected every 10,000 net allocations (CPython's default: 700); a
# busy server allocates that many in a few milliseconds, and connections and rooms are freed by reference counting
GC_THRESHOLDS = (10_000, 20, 10)


class Server(uvicorn.Server):
    """uvicorn's server that, once started (listening: then it logs "collab server ready"), takes what exists by
    then (modules, the app, its store) out of the cyclic collector's view (it lives as long as the process, and
    every full collection walked it again), gives freed heap memory back to the OS every `heap_trim_interval`
    seconds (heap.py) and, serving TLS, reloads its certificate on SIGHUP. At shutdown it tells the app its
    graceful timeout (`CollabApp.stopping`) and every session, connected or not, that it is stopping
    (`transport.stop_sessions`)."""

    def __init__(self, config: uvicorn.Config, heap_trim_interval: float = 0.0) -> None:
        super().__init__(config)
        self.heap_trim_interval = heap_trim_interval
        self._trimming: asyncio.Task[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:  # startup failed: uvicorn returns without a shutdown
            return
        gc.collect()
        gc.freeze()
        trim = malloc_trim() if self.heap_trim_interval > 0 else None
        if trim is not None:
            self._trimming = asyncio.create_task(trim_every(self.heap_trim_interval, trim), name="heap-trim")
        if self.config.ssl is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_certificate)
        log.info("collab server ready")

    def reload_certificate(self) -> None:
        """SIGHUP: read the certificate files again (a renewal) for the connections made from now on. Checked on a
        context of its own first, since a load that fails half-way would leave the live one half-changed; files
        the server cannot use leave it serving the current certificate."""
        certfile, keyfile = str(self.config.ssl_certfile), str(self.config.ssl_keyfile or "")
        try:
            check_certificate(certfile, keyfile)
            load_certificate(self.config.ssl, certfile, keyfile)
        except ValueError as exc:
            log.error("tls: keeping the current certificate: %s", exc)
            return
        log.info("tls: certificate reloaded from %s", certfile)

    async def shutdown(self, sockets: list | None = None) -> None:
        stop_sessions()
        grace = self.config.timeout_graceful_shutdown
        if isinstance(self.config.app, CollabApp) and grace is not None:
            self.config.app.stopping(grace)
        if self._trimming is not None:
            self._trimming.cancel()
        if self.config.ssl is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await super().shutdown(sockets)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting (env COLLAB_<NAME> and the TOML file give the same settings). Values are checked
    by Settings, so that a flag, the environment and the file are refused alike."""
    defaults = Settings()
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata["choices"]
        shown = repr(default) if isinstance(default, str) else default
        text = f"{f.metadata['help']} (default {shown}; env COLLAB_{f.name.upper()})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            parser.add_argument(flag, dest=f.name, default=None, type=str, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collab-server", description="Yjs-compatible collaboration server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the websocket + HTTP server")
    serve.add_argument("--config", default=os.environ.get("COLLAB_CONFIG"),
                       help="TOML file with settings (keys as in --help, underscores) (env COLLAB_CONFIG)")
    _add_setting_flags(serve)
    token = sub.add_parser("token", help="issue a signed access token")
    token.add_argument("--secret", default=os.environ.get("COLLAB_AUTH_SECRET"),
                       help="signing secret (default: env COLLAB_AUTH_SECRET)")
    scope = token.add_mutually_exclusive_group(required=True)
    scope.add_argument("--doc", help="grant exactly this document")
    scope.add_argument("--prefix", help="grant every document whose name starts with this")
    token.add_argument("--access", choices=("rw", "ro"), default="rw",
                       help="rw: read and write; ro: read only (default rw)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry, more than 0 (default 3600)")
    backup = sub.add_parser("backup", help="copy the SQLite database to a new file, safe while the server runs")
    backup.add_argument("--db", default=os.environ.get("COLLAB_DB", Settings().db),
                        help="the server's database (default: env COLLAB_DB or ./collab.db)")
    backup.add_argument("dest", help="the new file to write")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.load(args.config, **overrides)


def uvicorn_config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    """How the server runs `app`: uvicorn's HTTP protocol with a deadline for request heads and its websockets
    sans-I/O protocol (no tasks per connection) extended with direct frame writes (transport.py), our
    settings for frames and keepalive."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=partial(CollabHttpProtocol, header_timeout=settings.request_header_timeout),
        ws="collab_server.transport:CollabWebSocketProtocol",
        ws_max_size=settings.max_message_size,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=settings.per_message_deflate,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        log_config=None,
        access_log=False,
        lifespan="on",
        proxy_headers=settings.proxy_headers,
        ssl_certfile=settings.ssl_certfile or None,
        ssl_keyfile=settings.ssl_keyfile or None,
    )


def check_tls(settings: Settings) -> None:
    """Load the certificate and key once before starting, so a wrong path, a password-protected key or a key that
    does not match the certificate is refused in one line (uvicorn would raise once starting)."""
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise ValueError("ssl_keyfile needs ssl_certfile")
    if settings.ssl_certfile:
        check_certificate(settings.ssl_certfile, settings.ssl_keyfile)


def check_certificate(certfile: str, keyfile: str) -> None:
    """ValueError, in one line, unless the certificate chain and its key can be used (loaded on a scratch context)."""
    load_certificate(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), certfile, keyfile)


def load_certificate(context: ssl.SSLContext, certfile: str, keyfile: str) -> None:
    """Load a certificate chain and its key into `context`; ValueError, in one line, if they cannot be used."""
    key = f"ssl_keyfile {keyfile!r}" if keyfile else "no ssl_keyfile: the key must be in it"
    files = f"ssl_certfile {certfile!r} ({key})"
    try:
        context.load_cert_chain(certfile, keyfile or None, password=_refuse_password)
    except _EncryptedKey:
        raise ValueError(f"cannot use {files}: the private key is encrypted; give it unencrypted") from None
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use {files}: {exc.strerror or exc}") from exc


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    raise _EncryptedKey


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard limit. Every connection is a file descriptor, and the
    usual soft default of 1024 would turn clients away long before memory or CPU run out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open file limit stays at %d (raising it to %d failed: %s)", soft, target, exc)
        return
    log.info("open file limit raised from %d to %d", soft, target)


def serve(settings: Settings, app: ASGIApp | None = None) -> None:
    """Run the server (`app` defaults to `create_app(settings)`) until SIGTERM or SIGINT."""
    if app is None:
        check_tls(settings)
        app = create_app(settings)
    logs.configure(settings.log_level, settings.log_format)
    raise_open_file_limit()
    gc.set_threshold(*GC_THRESHOLDS)
    Server(uvicorn_config(settings, app), settings.heap_trim_interval).run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        try:
            if args.ttl <= 0:  # a token expired when issued would be refused at once
                raise ValueError(f"ttl must be more than 0 seconds, not {args.ttl!r}")
            print(issue_token(args.secret or "", doc=args.doc, prefix=args.prefix, access=args.access, ttl=args.ttl))
        except ValueError as exc:
            print(f"collab-server: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "backup":
        try:
            docs = sqlite_backup(args.db, args.dest)
        except StorageError as exc:
            print(f"collab-server: {exc}", file=sys.stderr)
            return 2
        print(f"backed up {args.db} to {args.dest}: {docs} documents")
        return 0
    try:
        settings = settings_from_args(args)  # values it cannot use are refused here, before anything starts
        check_tls(settings)
        app = create_app(settings)
    except (ValueError, OSError) as exc:
        print(f"collab-server: {exc}", file=sys.stderr)
        return 2
    serve(settings, app)
    return 0
