"""Cross-origin access to the HTTP API from browser pages served elsewhere (`--cors-origins`)."""

from __future__ import annotations

import re

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

ORIGIN = re.compile(r"https?://[^/\s?#]+")


def parse_origins(value: str) -> list[str]:
    """`"https://app.example, http://localhost:5173"` → the origins; `"*"` → any origin; `""` → none.
    A trailing slash is dropped (browsers send origins without one); anything with a path is refused."""
    origins = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        origin = item[:-1] if item.endswith("/") else item
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise ValueError(f"cors_origins: {item!r} is not an origin (scheme://host[:port], or *)")
        origins.append(origin)
    return origins


def cors_middleware(value: str) -> list[Middleware]:
    """The middleware answering preflights and adding Access-Control-* headers, if any origin is allowed.
    Tokens travel in the Authorization header or the query, never in cookies, so credentials stay off."""
    origins = parse_origins(value)
    if not origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)]
