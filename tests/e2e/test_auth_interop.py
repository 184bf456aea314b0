"""Token and read-only enforcement as unmodified yjs + y-websocket clients meet it (tokens in `params`)."""

from __future__ import annotations

import httpx
import pytest
from pycrdt import Doc, Text

from collab_server.auth import issue_token
from tests.serverproc import ServerProcess

SECRET = "interop-secret"
ROOM = "team/notes"


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory("--auth-required", "--auth-secret", SECRET)


async def test_read_only_yjs_client_reads_and_its_edits_are_refused(server, peer):
    writer, reader = await peer("writer"), await peer("reader")
    await writer.connect(server.ws_url, ROOM, params={"token": issue_token(SECRET, prefix="team/")})
    await writer.call("text_insert", index=0, text="original")
    await reader.connect(server.ws_url, ROOM, params={"token": issue_token(SECRET, doc=ROOM, access="ro")})
    await reader.wait_for("doc.text === 'original'")

    await reader.call("text_insert", index=0, text="from-reader ")  # y-websocket sends it as an Update
    denied = await reader.wait_event("auth")
    assert "read-only" in denied["reason"]
    # frames are handled in order: once the writer's probe is echoed, the refused update is long settled
    await writer.call("text_insert", index=8, text=" probe")
    await writer.wait_for("doc.text === 'original probe'")
    await reader.wait_for("doc.text.includes('probe')")
    assert (await writer.state()).doc["text"] == "original probe"
    admin = issue_token(SECRET, prefix="", access="ro")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        stored = Doc()
        stored.apply_update((await http.get(f"/api/docs/{ROOM}/update", params={"token": admin})).content)
    assert str(stored.get("text", type=Text)) == "original probe"
    assert (await reader.state()).status == "connected"  # refused writes do not cost the reader its connection


@pytest.mark.parametrize("token", [None, "garbage", issue_token(SECRET, doc="other"),
                                   issue_token(SECRET, doc=ROOM, ttl=-5), issue_token("wrong", doc=ROOM)],
                         ids=["missing", "malformed", "other-doc", "expired", "bad-signature"])
async def test_refused_yjs_client_never_syncs(server, peer, token):
    intruder = await peer("intruder")
    await intruder.connect(server.ws_url, ROOM, wait_synced=False, params={"token": token} if token else {})
    await intruder.wait_event("connection-close")  # the upgrade is refused; y-websocket would retry
    state = await intruder.state()
    assert not state.synced and state.status != "connected"


@pytest.mark.parametrize(("token", "code"), [(None, 4401), (issue_token(SECRET, doc=ROOM, ttl=-5), 4403)],
                         ids=["missing", "expired"])
async def test_with_auth_close_codes_a_refused_yjs_client_stops_and_hears_why(server_factory, peer, token, code):
    """y-websocket treats 4400-4499 as permanent: no retry storm, and the app gets the reason (to refresh
    the token and call connect() again)."""
    server = server_factory("--auth-required", "--auth-secret", SECRET, "--auth-close-codes")
    intruder = await peer("intruder")
    await intruder.connect(server.ws_url, ROOM, wait_synced=False, params={"token": token} if token else {})
    closed = await intruder.wait_event("closed")
    assert closed["code"] == code and closed["reason"] in ("missing token", "token expired")
    state = await intruder.state()
    assert not state.synced and state.status == "disconnected"
    # the app refreshes the token and resumes the same provider: it syncs
    await intruder.connect(server.ws_url, ROOM, params={"token": issue_token(SECRET, doc=ROOM)})
    assert (await intruder.state()).synced
