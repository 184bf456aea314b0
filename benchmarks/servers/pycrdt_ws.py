"""Benchmark launcher for stock pycrdt-websocket 0.16.5 with its SQLite store (pycrdt-store).

    .venv/bin/python benchmarks/servers/pycrdt_ws.py --host 127.0.0.1 --port P --db FILE

What this adds around the stock classes, and nothing more:
- one `SQLiteYStore` per room (all in FILE, keyed by the room name), the usual way to get persistence
  with pycrdt-websocket (the stock `WebsocketServer` creates rooms without a store);
- the room's document is loaded from the store *before* the room is served (the stock classes do not
  load at all; loading first avoids the anchors' defect 8 so that cold-load numbers are meaningful);
- an exception handler that logs instead of letting a room error take the process down (defect 5);
- GET /health → 200 for the orchestrator.
Everything else (one commit per update after broadcast, room deleted when its last client leaves,
awareness handling) is the library as shipped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import uvicorn
from pycrdt.store import SQLiteYStore, YDocNotFound
from pycrdt.websocket import ASGIServer, WebsocketServer, YRoom
from pycrdt.websocket.websocket_server import exception_logger

log = logging.getLogger("bench.pycrdt_ws")


def make_store_class(db_path: str) -> type[SQLiteYStore]:
    return type("BenchSQLiteYStore", (SQLiteYStore,), {"db_path": db_path})


class StoreBackedServer(WebsocketServer):
    """WebsocketServer whose rooms are persisted in one SQLite file and loaded before serving."""

    def __init__(self, store_class: type[SQLiteYStore], **kwargs: Any) -> None:
        super().__init__(exception_handler=exception_logger, **kwargs)
        self.store_class = store_class
        self._loading: dict[str, asyncio.Future[None]] = {}

    async def get_room(self, name: str) -> YRoom:
        if name in self.rooms:
            fut = self._loading.get(name)
            if fut is not None:
                await asyncio.shield(fut)
            room = self.rooms[name]
            await self.start_room(room)
            return room
        fut = asyncio.get_running_loop().create_future()
        self._loading[name] = fut
        store = self.store_class(path=name, log=self.log)
        room = YRoom(ready=False, ystore=store, exception_handler=exception_logger, log=self.log)
        self.rooms[name] = room
        try:
            assert self._task_group is not None
            await self._task_group.start(store.start)
            try:
                await store.apply_updates(room.ydoc)
            except YDocNotFound:
                pass
            room.ready = True
            await self.start_room(room)
        finally:
            self._loading.pop(name, None)
            fut.set_result(None)
        return room

    async def delete_room(self, *, name: str | None = None, room: YRoom | None = None) -> None:
        if name is None:
            assert room is not None
            name = self.get_room_name(room)
        room = self.rooms.get(name)
        await super().delete_room(name=name)
        if room is not None and room.ystore is not None:
            await room.ystore.stop()


def build_app(db_path: str):
    store_class = make_store_class(db_path)
    ws_server = StoreBackedServer(store_class)
    asgi_ws = ASGIServer(ws_server)
    state: dict[str, Any] = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["task"] = asyncio.create_task(ws_server.start())
                    await ws_server.started.wait()
                    # Create the schema once, up front: concurrent first writes from many rooms
                    # would otherwise race to create it.
                    init = store_class(path="__bench_init__", log=log)
                    await ws_server._task_group.start(init.start)
                    await init.db_initialized.wait()
                    await init.stop()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    # Stop rooms first so their stores are closed, then the server.
                    for name in list(ws_server.rooms):
                        try:
                            await ws_server.delete_room(name=name)
                        except Exception:  # pragma: no cover - best effort on shutdown
                            log.exception("stopping room %s", name)
                    await ws_server.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            status = 200 if scope["path"] == "/health" else 404
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"not found"})
        elif scope["type"] == "websocket":
            # Room name = path minus the leading slash, as for the other servers.
            scope = dict(scope, path=scope["path"].lstrip("/"))
            await asgi_ws(scope, receive, send)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1234)
    parser.add_argument("--db", default="pycrdt_ws.db")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(build_app(args.db), host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
