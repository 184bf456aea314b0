"""Per-document signed access tokens: HMAC-SHA256 over JSON claims, checked before the handshake completes.

A token is `base64url(claims).base64url(signature)`; claims are {"doc" | "prefix": str, "access": "rw" | "ro",
"exp": unix seconds}. `doc` grants one document, `prefix` every document whose name starts with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass

SUBPROTOCOL_PREFIX = "collab-token."  # websocket subprotocol form: "collab-token.<token>"


class AuthError(Exception):
    """The token is missing, malformed, forged, expired or does not cover the document."""


@dataclass(frozen=True, slots=True)
class Grant:
    readonly: bool
    expires: float | None = None  # unix seconds when the token's `exp` passes; None without auth


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: str, *, doc: str | None = None, prefix: str | None = None, access: str = "rw",
                ttl: float = 3600.0, now: float | None = None) -> str:
    if (doc is None) == (prefix is None):
        raise ValueError("a token names exactly one of doc or prefix")
    if doc == "":
        raise ValueError("doc must not be empty (no document has an empty name)")
    if access not in ("rw", "ro"):
        raise ValueError("access must be 'rw' or 'ro'")
    if not secret:
        raise ValueError("a secret is required to sign tokens")
    if not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds, not {ttl!r}")
    claims = {"access": access, "exp": int((now or time.time()) + ttl)}
    claims["doc" if doc is not None else "prefix"] = doc if doc is not None else prefix
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{payload}.{_sign(secret, payload)}"


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode("ascii"), hashlib.sha256).digest())


def verify_token(secret: str, token: str, document: str, *, now: float | None = None) -> Grant:
    """The access `token` grants to `document`; raises AuthError when it grants none."""
    claims, readonly = _verified_claims(secret, token, now)
    prefix = _prefix_claim(claims)
    if ("doc" in claims and claims["doc"] == document) or (prefix is not None and document.startswith(prefix)):
        return Grant(readonly=readonly, expires=float(claims["exp"]))
    raise AuthError("token does not cover this document")


def verify_listing(secret: str, token: str, prefix: str, *, now: float | None = None) -> None:
    """Raise AuthError unless `token` covers every document whose name starts with `prefix`: a prefix token
    whose prefix begins `prefix`."""
    granted = _prefix_claim(_verified_claims(secret, token, now)[0])
    if granted is None or not prefix.startswith(granted):
        raise AuthError(f'token does not cover every document starting with "{prefix}"')


def _prefix_claim(claims: dict) -> str | None:
    prefix = claims.get("prefix")
    return prefix if isinstance(prefix, str) else None


def _verified_claims(secret: str, token: str, now: float | None) -> tuple[dict, bool]:
    """The claims of a well-formed, authentic, unexpired token, and whether it is read-only."""
    try:
        payload, signature = token.split(".")
        expected, given = _sign(secret, payload).encode(), signature.encode("ascii")  # base64url is ASCII
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuthError("malformed token") from exc
    if not hmac.compare_digest(expected, given):
        raise AuthError("bad token signature")
    try:
        claims = json.loads(_unb64(payload))
        access, exp = claims["access"], float(claims["exp"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthError("malformed token claims") from exc
    if exp < (now or time.time()):
        raise AuthError("token expired")
    if access not in ("rw", "ro"):
        raise AuthError("unknown access level")
    return claims, access == "ro"


def token_from(query: dict[str, str], subprotocols: list[str], authorization: str | None = None) -> str | None:
    """Find the token in `?token=`, a `collab-token.<token>` subprotocol or an `Authorization: Bearer` header."""
    if query.get("token"):
        return query["token"]
    for proto in subprotocols:
        if proto.startswith(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX):]
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def authorize(secret: str, required: bool, document: str, token: str | None) -> Grant:
    """Read-write for everyone when auth is off; otherwise what a valid token grants."""
    if not required:
        return Grant(readonly=False)
    if not token:
        raise AuthError("missing token")
    return verify_token(secret, token, document)
