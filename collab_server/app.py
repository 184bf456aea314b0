"""The Starlette application: websocket rooms, operational routes, the web demo, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from collections.abc import AsyncIterator
from typing import NoReturn

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from collab_server import looplag
from collab_server.broker import Broker, BrokerError, create_broker
from collab_server.config import Settings
from collab_server.cors import cors_middleware
from collab_server.http_api import api_routes
from collab_server.metrics import Metrics
from collab_server.readiness import Check
from collab_server.status_events import StatusEvents
from collab_server.session import serve_websocket
from collab_server.resync import Resync
from collab_server.room import Room
from collab_server.rooms import Rooms
from collab_server.storage import StorageError, Store, create_store
from collab_server.storage.health import CommitHealth
from collab_server.versions import AutoVersions
from collab_server.webhooks import Webhooks

log = logging.getLogger(__name__)
EXIT_ABANDONED = 1  # exit status of a stop that gave up on stuck commits
STUCK_POLL = 0.1  # seconds between looks at whether commits are stuck, once a stop is past its timeout


class CollabApp(Starlette):
    """Starlette for HTTP and lifespan; every websocket, whatever its path, is a room session served directly
    (no routing or middleware frames held for the life of a connection, none on the per-message path)."""

    startup_reported = False  # set by the lifespan once it has logged why storage or the broker failed at start
    stop_deadline: float | None = None  # loop time when the graceful shutdown's timeout ends, once it began

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await serve_websocket(scope, receive, send, self.state.rooms, self.state.settings)
        elif scope["type"] == "lifespan":
            await super().__call__(scope, receive, self._lifespan_send(send))
        else:
            await super().__call__(scope, receive, send)

    def stopping(self, grace: float) -> None:
        """The server began a graceful shutdown of `grace` seconds: rebuilds still running at half of it stop, as
        the connections' unhandled messages are dropped then (Rooms.stop_at); no compaction starts past it (the
        folds of the logs of rooms unloaded at shutdown took seconds more)."""
        now = asyncio.get_running_loop().time()
        self.stop_deadline = now + grace
        self.state.rooms.stop_at(now + grace / 2)
        self.state.rooms.store.stop_compacting_at(now + grace)

    def _lifespan_send(self, send: Send) -> Send:
        """Drop the traceback Starlette attaches to a startup failure whose reason is already logged: the log then
        reads `cannot start: <reason>`, not Starlette's internals."""
        async def lifespan_send(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed" and self.startup_reported:
                message = {**message, "message": ""}
            await send(message)
        return lifespan_send


def create_app(settings: Settings | None = None, *, store: Store | None = None,
               broker: Broker | None = None) -> CollabApp:
    """Build the app; `store` and `broker` default to the implementations the settings name. Without `settings`
    they come from the environment (COLLAB_<NAME>), as when uvicorn runs `collab_server.app:create_app --factory`."""
    settings = settings or Settings.load()
    middleware = cors_middleware(settings.cors_origins)
    store = store or create_store(settings)
    broker = broker or create_broker(settings)
    metrics = Metrics()
    store.on_commit = metrics.observe_commit
    store.health.on_error = metrics.errors.labels("storage").inc  # a corrupt database found
    status_events = StatusEvents()
    status_events.subscribe(lambda room, change: metrics.resolver_actions.inc())
    webhooks = None
    if settings.webhook_url:
        webhooks = Webhooks(settings.webhook_url, store, metrics, secret=settings.webhook_secret,
                            debounce=settings.webhook_debounce, max_wait=settings.webhook_max_wait,
                            sweep_interval=settings.webhook_sweep_interval)

    versions = None
    if settings.version_interval > 0:
        versions = AutoVersions(store, metrics, interval=settings.version_interval, keep=settings.versions_keep)

    def on_load(room: Room) -> None:
        status_events.attach(room)
        if webhooks is not None:
            webhooks.attach(room)
        if versions is not None:
            versions.attach(room)

    rooms = Rooms(store, broker, metrics, idle_unload_seconds=settings.idle_unload_seconds,
                  max_connections_per_room=settings.max_connections_per_room,
                  awareness_timeout=settings.awareness_timeout, keepalive_interval=settings.keepalive_interval,
                  on_load=on_load, on_delete=webhooks.deleted if webhooks is not None else None)
    resync = Resync(rooms, store, settings.resync_interval) if settings.broker != "local" else None

    @contextlib.asynccontextmanager
    async def lifespan(app: CollabApp) -> AsyncIterator[None]:
        try:
            await store.open()
            try:
                if webhooks is not None:
                    await webhooks.open()
                await broker.start()
            except BaseException:
                await store.close()
                raise
        except (StorageError, BrokerError) as exc:
            log.error("cannot start: %s", exc)
            app.startup_reported = True
            raise
        watchers = [asyncio.create_task(looplag.watch(metrics), name="loop-lag")]
        if resync is not None and settings.resync_interval > 0:
            watchers.append(asyncio.create_task(resync.run(), name="resync"))
        if webhooks is not None:
            watchers.append(asyncio.create_task(webhooks.sweep_every(), name="webhook-sweep"))
        log.info("collab server starting store=%s broker=%s", settings.store, settings.broker)  # not yet listening
        try:
            yield
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            deadline = app.stop_deadline or asyncio.get_running_loop().time() + settings.shutdown_timeout
            await closed_unless_stuck(asyncio.ensure_future(close()), deadline, store.health)
            if store.health.corrupt is not None:  # commits may have "succeeded" into a file no start can read
                log.error("collab server stopped; the database is corrupt, so commits may be lost: %s",
                          store.health.corrupt)
            elif store.health.failing is None:
                log.info("collab server stopped; everything committed")
            else:  # what failed was never acknowledged: the clients that sent it still hold it
                log.error("collab server stopped; the latest commits failed: %s", store.health.failing)

    async def close() -> None:
        await rooms.close()
        if versions is not None:
            await versions.close()
        if webhooks is not None:  # after the last commits, so their events go out too
            await webhooks.close(settings.shutdown_timeout)
        await broker.close()
        await store.close()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    storage_check, broker_check = Check("storage", store.ping), Check("broker", broker.ping)

    async def ready(request: Request) -> Response:
        if store.health.corrupt is not None:
            return JSONResponse({"status": "unavailable", "error": f"database corrupt: {store.health.corrupt}"},
                                status_code=503)
        failing = store.health.failing
        if failing is not None:
            return JSONResponse({"status": "unavailable", "error": f"commits failing: {failing}"}, status_code=503)
        if (stuck := store.health.stuck_for) is not None:  # a frozen file system still answers SELECT 1
            return JSONResponse({"status": "unavailable", "error": f"commits stuck for {stuck:.0f} s"},
                                status_code=503)
        try:
            await storage_check()
            await broker_check()
        except (StorageError, BrokerError, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "rooms_loaded": len(rooms.loaded)})

    async def demo_missing(request: Request) -> Response:
        return PlainTextResponse(f"web demo not built ({settings.web_demo_dir}): run `make demo`", 404)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    routes: list = [
        Route("/health", health),
        Route("/metrics", prometheus),
        Route("/ready", ready),
        *api_routes(rooms, store, settings, resync.refresh if resync is not None else None),
    ]
    if Path(settings.web_demo_dir).is_dir():
        routes.append(Mount("/", StaticFiles(directory=settings.web_demo_dir, html=True)))
    else:
        routes.append(Route("/", demo_missing))
    app = CollabApp(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.settings = settings
    app.state.rooms = rooms
    app.state.store = store
    app.state.status_events = status_events
    return app


async def closed_unless_stuck(closing: asyncio.Future[None], deadline: float, health: CommitHealth) -> None:
    """Wait for the shutdown's `closing`; from loop time `deadline` on, give up as soon as a commit is stuck
    (`abandon`). A commit blocked in the kernel (a frozen file system) holds its thread until the file system
    thaws: the process must not wait for it past its graceful timeout."""
    loop = asyncio.get_running_loop()
    await asyncio.wait({closing}, timeout=max(0.0, deadline - loop.time()))
    while not closing.done():
        if (stuck := health.stuck_for) is not None:
            abandon(stuck)
        await asyncio.wait({closing}, timeout=STUCK_POLL)
    closing.result()


def abandon(stuck: float) -> NoReturn:
    """Log that the commits in flight are given up, and exit at once. Exiting normally would wait for the stuck
    thread (the database threads are not daemons, and asyncio joins its executor's); what the commits held was
    never acknowledged, so, as after a crash, its clients still hold it and SQLite's journal leaves a whole state."""
    log.error("collab server stopped; gave up at --shutdown-timeout on commits stuck for %.0f s: "
              "what they held is not committed", stuck)
    logging.shutdown()  # flushes the log
    os._exit(EXIT_ABANDONED)
