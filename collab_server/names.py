"""Document names: the room a URL path names, and which names are valid."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import Scope

MAX_NAME = 512  # characters


def valid(name: object) -> bool:
    """A document name is 1-512 characters of UTF-8 text without the control characters U+0000-U+001F (lone
    surrogates, which JSON can carry, have no UTF-8 form and so could not be stored), and no "/"-separated part
    of it is "." or ".." (a browser resolves those in a URL, escaped or not, so no page could reach the room)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        return False
    if any(part in (".", "..") for part in name.split("/")):
        return False
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def path_is_utf8(scope: Scope) -> bool:
    """Whether the request path's percent-escapes decode as UTF-8. The server decodes others with U+FFFD for each
    bad sequence, so `/x%FF` and `/x%FE` would name one room."""
    if "\ufffd" not in scope["path"]:
        return True
    try:
        unquote_to_bytes(scope.get("raw_path") or scope["path"].encode()).decode()
    except UnicodeDecodeError:
        return False
    return True


def room_name(scope: Scope) -> str | None:
    """The room a websocket's path names: the percent-decoded path without its leading slash (the query string is
    not part of it); None if that is no valid name."""
    name = scope["path"].removeprefix(scope.get("root_path", "")).removeprefix("/")
    return name if valid(name) and path_is_utf8(scope) else None
