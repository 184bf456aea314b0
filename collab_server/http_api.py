"""The JSON/binary HTTP API under /api/: list documents, read and write state, JSON block edits, copies,
presence, saved versions, history, past versions.

Document names may contain '/', so the name is the greedy middle of every path and the operation is its
fixed last segment(s): ``/api/docs/{name}/json``, ``/update``, ``/blocks``, ``/copy``, ``/presence``,
``/versions[/{id}[/restore]]``, ``/history``, ``/at/{seq}``. A name that itself ends in such a suffix is
still unambiguous, because each route matches only its own suffix.
``DELETE /api/docs/{name}`` takes the whole rest of the path as the name.
Characters such as '?', '#' and '%' in a name must be percent-encoded.

Tokens follow the websocket rules (``?token=`` or ``Authorization: Bearer``): with auth on, a missing
token is 401; an invalid, expired or non-covering token, or a read-only token on a write, is 403.
Listing documents (``?prefix=&after=&limit=``, pages in name order) needs a prefix token whose prefix begins
the listed prefix: ``prefix=""`` lists everything, ``prefix="team/"`` that team's documents. Errors are
``{"error": ...}``.
Reads answer committed changes only; reading a document that was never written is 404.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from pycrdt import Doc
from starlette.convertors import IntegerConvertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from collab_server import names
from collab_server.auth import AuthError, Grant, authorize, token_from, verify_listing
from collab_server.config import Settings
from collab_server.edits import EditError, apply_ops, parse_ops, restore_ops
from collab_server.model import block_to_json, blocks_to_json, get_block
from collab_server.openapi import MAX_LABEL, openapi_spec
from collab_server.presence import LimitExceeded
from collab_server.protocol import ProtocolError
from collab_server.replay import Replay
from collab_server.room import Room, RoomClosed
from collab_server.rooms import Rooms
from collab_server.storage import HistoryCompacted, StorageError, Store, VersionInfo
from collab_server.storage.health import RETRY_AFTER

BINARY = "application/octet-stream"
SMALL_BODY = 64 * 1024  # bytes of the JSON bodies that only name things (a label, a copy's target)
LIST_LIMIT, LIST_MAX = 1000, 10_000  # documents per page of GET /api/docs: default, most
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]

log = logging.getLogger(__name__)


class _Id(IntegerConvertor):
    """A version or log position in a path: Starlette's int took any number of digits, and Python's int() refuses
    more than 4,300 (sys.int_info.default_max_str_digits), which answered 500; longer ones match no route."""

    regex = "[0-9]{1,4300}"


register_url_convertor("id", _Id())


class ApiError(Exception):
    """Ends a request with a JSON error body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers

    def response(self) -> Response:
        headers = self.headers
        if self.status == 503:  # storage unavailable or failing, or the server stopping: come back later
            headers = {"Retry-After": str(RETRY_AFTER), **(headers or {})}
        return JSONResponse({"error": str(self)}, status_code=self.status, headers=headers)


class _Endpoint:
    """An ASGI app dispatching on the HTTP method; ApiError and unknown methods become JSON errors, and a client
    that leaves before sending its whole body gets nothing.

    Being a class instance (not a function), Starlette's Route passes every method to it.
    """

    def __init__(self, **handlers: Handler) -> None:
        self.handlers = {method.upper(): handler for method, handler in handlers.items()}
        if "GET" in self.handlers:
            self.handlers["HEAD"] = self.handlers["GET"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        handler = self.handlers.get(request.method)
        try:
            if handler is None:
                raise ApiError(405, f"method {request.method} not allowed",
                               {"Allow": ", ".join(sorted(self.handlers))})
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except ClientDisconnect:  # anyone can do this: an ERROR line with a traceback each time would flood the log
            log.debug("client left during its request body: %s %s", request.method, request.url.path)
            return
        await response(scope, receive, send)


def export_json(doc: Doc) -> dict[str, Any]:
    """The document as plain JSON: blocks with resolved statuses."""
    try:
        return blocks_to_json(doc)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ApiError(422, f"document does not follow the block model: {exc}") from exc


class _EscapedJSON(JSONResponse):
    """JSON with every character beyond ASCII escaped: presence states are JSON text clients wrote, whose strings
    may hold a lone UTF-16 surrogate (a name cut in the middle of an emoji), which has no UTF-8 form."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def api_routes(rooms: Rooms, store: Store, settings: Settings,
               refresh: Callable[[Room], Awaitable[None]] | None = None) -> list[BaseRoute]:
    """Routes of the /api/ namespace; put them before the websocket catch-all route. `refresh` (with several
    nodes, `Resync.refresh`) catches a room loaded already up with what storage holds before a request uses it."""

    def token(request: Request) -> str | None:
        """The request's token; 401 if auth is on and there is none."""
        found = token_from(dict(request.query_params), [], request.headers.get("authorization"))
        if settings.auth_required and not found:
            raise ApiError(401, "missing token", {"WWW-Authenticate": "Bearer"})
        return found

    def grant(request: Request, document: str) -> Grant:
        try:
            return authorize(settings.auth_secret, settings.auth_required, document, token(request))
        except AuthError as exc:
            raise ApiError(403, str(exc)) from exc

    def doc_name(request: Request, *, write: bool = False, name: str | None = None) -> str:
        """The path's document name (or `name`), once the request's token allows reading (or writing) it."""
        name = request.path_params["name"] if name is None else name
        if not names.valid(name) or not names.path_is_utf8(request.scope):
            raise ApiError(400, "invalid document name")
        if grant(request, name).readonly and write:
            raise ApiError(403, "read-only token: document changes are not accepted")
        return name

    @contextlib.asynccontextmanager
    async def room_of(name: str, *, existing: bool = True, exclusive: bool = False) -> AsyncIterator[Room]:
        """The loaded room, held meanwhile, with everything committed so far (by any node); if `existing`, 404
        unless written before, and all of it committed. `exclusive`: held by one node at a time (`Store.exclusive`),
        for a request whose change depends on what it reads."""
        loaded = name in rooms.loaded
        try:
            room = await rooms.acquire(name)
        except StorageError as exc:
            raise ApiError(503, f"storage unavailable: {exc}") from exc
        try:
            async with contextlib.AsyncExitStack() as stack:
                if exclusive:
                    await _storage(stack.enter_async_context(store.exclusive(name)))
                if (loaded or exclusive) and refresh is not None:  # loaded before the lock was had, too
                    await _storage(refresh(room))
                if existing:
                    await room.flush()
                    if room.doc.get_state() == b"\x00":
                        raise ApiError(404, "no such document")
                yield room
        finally:
            rooms.release(room)

    async def committed(room: Room, write: Awaitable[T], what: str) -> T:
        """Await `write` (the room's `apply` or `edit`) and wait until what it changed is committed; 503 if the
        room closed meanwhile or storage failed."""
        try:
            result = await write
        except RoomClosed as exc:
            raise ApiError(503, "the document was closed meanwhile (deleted, or the server is stopping): "
                                f"{what} not saved") from exc
        await room.flush()
        if room.failed:
            failing = store.health.failing
            raise ApiError(503, f"storage failure: {what} not saved" + (f" ({failing})" if failing else ""))
        return result

    async def list_docs(request: Request) -> Response:
        prefix, after = request.query_params.get("prefix", ""), request.query_params.get("after", "")
        limit = _int_param(request, "limit", LIST_LIMIT, 1, LIST_MAX)
        if any(ord(c) < 32 for c in prefix + after):  # no name holds one (and SQLite's GLOB stops at a NUL)
            raise ApiError(400, "prefix and after are parts of document names: no control characters")
        if settings.auth_required:
            try:
                verify_listing(settings.auth_secret, token(request) or "", prefix)
            except AuthError as exc:
                raise ApiError(403, f'listing needs a token with prefix "{prefix}" or a start of it: {exc}') from exc
        docs = await _storage(store.list_docs(prefix, after, limit + 1))  # one more: is there a next page?
        page = docs[:limit]
        return JSONResponse({
            "docs": [{"name": d.name, "updated": d.updated, "log_entries": d.log_entries} for d in page],
            "next": page[-1].name if len(docs) > limit else None,
        })

    async def get_json(request: Request) -> Response:
        name = doc_name(request)
        async with room_of(name) as room:
            return JSONResponse({"name": name, "blocks": export_json(room.doc)})

    async def get_update(request: Request) -> Response:
        name = doc_name(request)
        state_vector = _state_vector(request.query_params.get("sv", ""))
        async with room_of(name) as room:
            try:
                update = await room.encode_state(state_vector)
            except ProtocolError as exc:
                raise ApiError(400, str(exc)) from exc
        return Response(update, media_type=BINARY)

    async def post_update(request: Request) -> Response:
        name = doc_name(request, write=True)
        update = await _read_body(request, settings.max_message_size)
        async with room_of(name, existing=False) as room:
            try:
                await committed(room, room.apply(update, origin="http"), "update")
            except ProtocolError as exc:
                raise ApiError(400, str(exc)) from exc
            except LimitExceeded as exc:
                raise ApiError(409, str(exc)) from exc
        return Response(status_code=204)

    async def post_blocks(request: Request) -> Response:
        name = doc_name(request, write=True)
        body = _json_body(await _read_body(request, settings.max_message_size, "JSON edits"))
        async with room_of(name, existing=False) as room:
            try:
                touched = await committed(room, room.edit(partial(apply_ops, ops=parse_ops(body))), "edits")
            except EditError as exc:
                raise ApiError(exc.status, str(exc)) from exc
            blocks = {block_id: get_block(room.doc, block_id) for block_id in touched}
            return JSONResponse({"name": name, "blocks": {
                block_id: None if block is None else block_to_json(block) for block_id, block in blocks.items()}})

    async def saved_state(name: str, version: int) -> bytes:
        """The state saved as `version` of `name`; 404 if there is none."""
        state = await _storage(store.load_version(name, version)) if 0 <= version < 2**63 else None
        if state is None:
            raise ApiError(404, "no such version")
        return state

    async def list_versions(request: Request) -> Response:
        name = doc_name(request)
        async with room_of(name):
            versions = await _storage(store.versions(name))
        return JSONResponse({"name": name, "versions": [_version_json(v) for v in versions]})

    async def save_version(request: Request) -> Response:
        name = doc_name(request, write=True)
        label = _label(await _read_body(request, SMALL_BODY, None))
        async with room_of(name) as room:
            state = await room.encode_state()
            version = await _storage(store.save_version(name, label, state))
        return JSONResponse(_version_json(version), status_code=201)

    async def get_version(request: Request) -> Response:
        name = doc_name(request)
        form = _format(request)
        async with room_of(name):
            state = await saved_state(name, request.path_params["version"])
        if form == "update":
            return Response(state, media_type=BINARY)
        return JSONResponse({"name": name, "version": request.path_params["version"],
                             "blocks": export_json(_doc_of([state]))})

    async def restore_version(request: Request) -> Response:
        name = doc_name(request, write=True)
        version: int = request.path_params["version"]
        async with room_of(name, exclusive=True) as room:  # two restores through two nodes at once kept both
            state = await saved_state(name, version)
            target = export_json(_doc_of([state]))
            backup = await _storage(store.save_version(name, f"before restoring version {version}",
                                                       await room.encode_state()))
            await committed(room, room.edit(lambda doc: apply_ops(doc, restore_ops(doc, target))), "restore")
            return JSONResponse({"name": name, "saved_before": _version_json(backup),
                                 "blocks": export_json(room.doc)})

    async def copy_doc(request: Request) -> Response:
        name = doc_name(request)
        body = _json_body(await _read_body(request, SMALL_BODY, '{"to": ...}'))
        if not isinstance(body, dict) or set(body) - {"to", "version"} or "to" not in body or not isinstance(
                body.get("version", 0), int) or isinstance(body.get("version"), bool):
            raise ApiError(400, 'expected {"to": "<new document>", "version": <id, optional>}')
        target = doc_name(request, write=True, name=body["to"])
        async with room_of(name) as source:
            if "version" in body:
                state = await saved_state(name, body["version"])
            else:
                state = await source.encode_state()
        async with room_of(target, existing=False) as room:
            await room.flush()
            if room.doc.get_state() != b"\x00":
                raise ApiError(409, f"document {target!r} exists; copies go to new documents only")
            await committed(room, room.edit(lambda doc: doc.apply_update(state)), "copy")
        return JSONResponse({"name": target, "from": name}, status_code=201)

    async def get_presence(request: Request) -> Response:
        name = doc_name(request)
        room = rooms.loaded.get(name)  # not loaded: nobody is connected to this node
        entries = room.presence() if room is not None else []
        return _EscapedJSON({
            "name": name,
            "connections": len(room.connections) if room is not None else 0,
            "presence": [{"client_id": e.client_id, "state": _awareness_state(e.state)} for e in entries],
        })

    async def get_history(request: Request) -> Response:
        name = doc_name(request)
        async with room_of(name):
            entries = await _storage(store.history(name))
        return JSONResponse({"name": name, "entries": [
            {"seq": e.seq, "time": e.time, "size": e.size} for e in entries]})

    async def get_at(request: Request) -> Response:
        name = doc_name(request)
        seq: int = request.path_params["seq"]
        form = _format(request)
        async with room_of(name):
            try:
                updates = await store.load_until(name, seq)
            except HistoryCompacted as exc:
                raise ApiError(410, str(exc)) from exc
            except StorageError as exc:
                raise ApiError(503, f"storage unavailable: {exc}") from exc
        doc = _doc_of(updates)
        if form == "update":
            return Response(doc.get_update(), media_type=BINARY)
        return JSONResponse({"name": name, "seq": seq, "blocks": export_json(doc)})

    async def delete_doc(request: Request) -> Response:
        name = doc_name(request, write=True)
        if not await _storage(rooms.delete(name)):
            raise ApiError(404, "no such document")
        return Response(status_code=204)

    async def get_openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec())

    async def no_route(request: Request) -> Response:
        raise ApiError(404, "no such API route")

    return [
        # first: a DELETE takes the whole rest of the path as the name, even one ending in "/json"
        _route("/api/docs/{name:path}", _Endpoint(delete=delete_doc), methods=["DELETE"]),
        _route("/api/openapi.json", _Endpoint(get=get_openapi)),
        _route("/api/docs", _Endpoint(get=list_docs)),
        _route("/api/docs/{name:path}/json", _Endpoint(get=get_json)),
        _route("/api/docs/{name:path}/update", _Endpoint(get=get_update, post=post_update)),
        _route("/api/docs/{name:path}/blocks", _Endpoint(post=post_blocks)),
        _route("/api/docs/{name:path}/copy", _Endpoint(post=copy_doc)),
        _route("/api/docs/{name:path}/presence", _Endpoint(get=get_presence)),
        _route("/api/docs/{name:path}/versions", _Endpoint(get=list_versions, post=save_version)),
        _route("/api/docs/{name:path}/versions/{version:id}", _Endpoint(get=get_version)),
        _route("/api/docs/{name:path}/versions/{version:id}/restore", _Endpoint(post=restore_version)),
        _route("/api/docs/{name:path}/history", _Endpoint(get=get_history)),
        _route("/api/docs/{name:path}/at/{seq:id}", _Endpoint(get=get_at)),
        _route("/api/{rest:path}", _Endpoint(**{m: no_route for m in ALL_METHODS})),
    ]


def _route(path: str, endpoint: _Endpoint, methods: list[str] | None = None) -> Route:
    """A Route whose path parameters also match newlines, so names like "a\\nb" get a JSON 400, not a miss."""
    route = Route(path, endpoint, methods=methods)
    route.path_regex = re.compile(route.path_regex.pattern, re.DOTALL)
    return route


def _doc_of(updates: list[bytes]) -> Doc:
    """A document holding `updates`, applied in order."""
    replay = Replay()
    for update in updates:
        replay.apply(update)
    return replay.close()


async def _storage(call: Awaitable[T]) -> T:
    """Await a store call, turning StorageError into 503."""
    try:
        return await call
    except StorageError as exc:
        raise ApiError(503, f"storage unavailable: {exc}") from exc


def _format(request: Request) -> str:
    form = request.query_params.get("format", "json")
    if form not in ("json", "update"):
        raise ApiError(400, "format must be json or update")
    return form


def _label(body: bytes) -> str:
    """The label of a version to save: ``{"label": "..."}``, or "" for an empty body."""
    if not body.strip():
        return ""
    value = _json_body(body)
    if not isinstance(value, dict) or set(value) - {"label"} or not isinstance(value.get("label", ""), str):
        raise ApiError(400, 'expected {"label": "..."} or an empty body')
    label = value.get("label", "")
    if len(label) > MAX_LABEL:
        raise ApiError(400, f"label longer than {MAX_LABEL} characters")
    try:
        label.encode()
    except UnicodeEncodeError as exc:
        raise ApiError(400, "label is not valid Unicode (a lone surrogate)") from exc
    if any(ord(c) < 32 for c in label):  # PostgreSQL text cannot hold NUL; none of them belongs in a label
        raise ApiError(400, "label holds a control character")
    return label


def _awareness_state(text: str) -> Any:
    """A state as a client sent it, in JSON text, with what JSON cannot answer shown as null: NaN and Infinity
    literals, numbers beyond a double's range (1e400, which JavaScript reads as Infinity), and a state nested too
    deep for Python's parser here."""
    try:
        return json.loads(text, parse_constant=lambda _: None, parse_float=_finite_float, parse_int=_finite_int)
    except RecursionError:  # checked as it came in, on a shorter stack than a request's
        return None


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _finite_int(text: str) -> int | None:
    return int(text) if math.isfinite(float(text)) else None


def _version_json(version: VersionInfo) -> dict[str, Any]:
    return {"id": version.id, "time": version.time, "label": version.label, "size": version.size,
            "auto": version.auto}


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    value = _decimal(text)
    if value is None or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}")
    return value


def _decimal(text: str) -> int | None:
    """`text` as an integer if it is ASCII digits only, else None (str.isdigit also takes '²', which int() refuses;
    int() refuses more than 4300 digits)."""
    if not text.isascii() or not text.isdigit():
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _state_vector(text: str) -> bytes:
    """Decode a base64url (padding optional) state vector; empty means 'send everything'."""
    if not text:
        return b"\x00"
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "sv must be a base64url-encoded state vector") from exc


async def _read_body(request: Request, limit: int, expected: str | None = "a binary Yjs v1 update") -> bytes:
    """The request body, refused with 413 beyond `limit` bytes and with 400 when empty, unless `expected` is
    None (an empty body is fine)."""
    declared = _decimal(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise ApiError(413, f"body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body exceeds {limit} bytes")
    if not body and expected is not None:
        raise ApiError(400, f"empty body: expected {expected}")
    return bytes(body)


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"body is not JSON: {exc}") from exc
