"""Websocket token enforcement with raw peers, and the `collab-server token` CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from pycrdt import Doc, Text
from websockets.exceptions import InvalidStatus

from collab_server import protocol as p
from collab_server.auth import AuthError, issue_token, verify_token
from tests.rawclient import RawPeer
from tests.serverproc import ROOT, ServerProcess, wait_until

SECRET = "s3cret"


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory("--auth-required", "--auth-secret", SECRET)


def text_update(content: str) -> bytes:
    doc = Doc()
    doc.get("t", type=Text).insert(0, content)
    return doc.get_update()


def text(peer: RawPeer) -> str:
    return str(peer.doc.get("t", type=Text))


def auth_replies(peer: RawPeer) -> list[p.AuthMessage]:
    return [m for m in peer.messages if isinstance(m, p.AuthMessage)]


@pytest.mark.parametrize("query", [
    "",
    "?token=garbage",
    f"?token={issue_token('other-secret', doc='doc')}",
    f"?token={issue_token(SECRET, doc='doc', ttl=-5)}",
    f"?token={issue_token(SECRET, doc='other')}",
    f"?token={issue_token(SECRET, prefix='team/')}",
    "?token=abc.%C3%A9",
], ids=["missing", "malformed", "bad-signature", "expired", "other-doc", "prefix-not-covering",
        "non-ascii-signature"])
async def test_refused_upgrade_is_403(server: ServerProcess, query: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await RawPeer.connect(f"{server.ws_url}/doc{query}")
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(("how", "code", "reason"), [
    ({}, 4401, "missing token"),
    ({"query": f"?token={issue_token(SECRET, doc='doc', ttl=-5)}"}, 4403, "token expired"),
    ({"subprotocols": ["collab-token.garbage"]}, 4403, "malformed token"),
    ({"query": "?token=abc.%C3%A9"}, 4403, "malformed token"),
    ({"headers": {"Authorization": f"Bearer {issue_token(SECRET, doc='other')}"}}, 4403,
     "token does not cover this document"),
], ids=["missing", "expired-query", "malformed-subprotocol", "non-ascii-query", "other-doc-header"])
async def test_with_auth_close_codes_a_refused_client_learns_why(server_factory, how: dict, code: int,
                                                                 reason: str) -> None:
    """Browsers hide a refused upgrade's status; accepting and closing with 44xx tells y-websocket to stop."""
    server = server_factory("--auth-required", "--auth-secret", SECRET, "--auth-close-codes")
    peer = await RawPeer.connect(f"{server.ws_url}/doc{how.get('query', '')}",
                                 subprotocols=how.get("subprotocols"), additional_headers=how.get("headers"))
    assert peer.ws.subprotocol == (how.get("subprotocols") or [None])[0]  # a browser requires the echo
    assert await peer.wait_closed() == (code, reason)
    assert not peer.messages  # not a byte of the document
    assert server.metric('collab_errors_total{kind="auth"}') == 1


async def test_with_auth_close_codes_a_path_that_names_no_room_closes_with_4400(server_factory) -> None:
    """Refused with 403, a path naming no room made y-websocket retry for ever, as a refused token did."""
    server = server_factory("--auth-required", "--auth-secret", SECRET, "--auth-close-codes")
    peer = await RawPeer.connect(f"{server.ws_url}/a/../b?token={issue_token(SECRET, doc='b')}")
    assert await peer.wait_closed() == (4400, "bad room name")


async def test_token_via_query_subprotocol_or_header(server: ServerProcess) -> None:
    prefix = issue_token(SECRET, prefix="team/")
    ways = {
        "query": dict(uri=f"{server.ws_url}/team/a?token={prefix}"),
        "subprotocol": dict(uri=f"{server.ws_url}/team/b", subprotocols=[f"collab-token.{prefix}"]),
        "header": dict(uri=f"{server.ws_url}/team/c", additional_headers={"Authorization": f"Bearer {prefix}"}),
    }
    for way, kwargs in ways.items():
        peer = await RawPeer.connect(kwargs.pop("uri"), **kwargs)
        if way == "subprotocol":
            assert peer.ws.subprotocol == f"collab-token.{prefix}"  # the server echoes the chosen protocol
        await peer.sync()
        await peer.send(p.sync_update(text_update(way)))
        await peer.wait_for(lambda peer=peer, way=way: text(peer) == way)
        await peer.close()


async def test_read_only_peer_reads_but_never_writes(server: ServerProcess) -> None:
    writer = await RawPeer.connect(f"{server.ws_url}/doc?token={issue_token(SECRET, doc='doc')}")
    await writer.send(p.sync_update(text_update("original")))
    await writer.wait_for(lambda: text(writer) == "original")
    await writer.send(p.encode_awareness([p.AwarenessEntry(7, 1, '{"user":"w"}')]))

    reader = await RawPeer.connect(f"{server.ws_url}/doc?token={issue_token(SECRET, doc='doc', access='ro')}")
    await reader.sync()
    assert text(reader) == "original"
    await reader.wait_for(lambda: reader.awareness.get(7) == '{"user":"w"}')

    # a handshake answer holding nothing the server lacks (y-websocket's, from a viewer) is no refused write
    await reader.send(p.sync_step2(b"\x00\x00"))
    await reader.send(p.sync_step2(reader.doc.get_update()))
    await reader.send(p.sync_update(text_update("update-from-reader")))
    await reader.send(p.sync_step2(text_update("step2-from-reader")))
    await reader.wait_for(lambda: len(auth_replies(reader)) == 2)
    assert all(m.denied and "read-only" in m.reason for m in auth_replies(reader))

    # frames are handled in order: once the writer's probe is echoed, the refused writes are long settled
    await writer.send(p.sync_update(text_update("probe")))
    await writer.wait_for(lambda: "probe" in text(writer))
    await reader.wait_for(lambda: "probe" in text(reader))
    assert "reader" not in text(writer) and "reader" not in text(reader)
    admin = issue_token(SECRET, prefix="", access="ro")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        history = (await http.get("/api/docs/doc/history", params={"token": admin})).json()["entries"]
        stored = Doc()
        stored.apply_update((await http.get("/api/docs/doc/update", params={"token": admin})).content)
    assert len(history) == 2  # "original" and "probe"
    assert "reader" not in str(stored.get("t", type=Text))
    assert not reader.closed.is_set() and len(auth_replies(reader)) == 2
    await reader.close()
    await writer.close()


async def test_a_read_only_peer_cannot_take_over_or_remove_another_client_s_presence(server: ServerProcess) -> None:
    """A viewer sent a state, or a removal, for a writer's client id at a higher clock: the room took it and relayed
    it, so everyone saw the viewer's state as the writer's, or the writer gone, and refused the writer's own next
    states as older. Such entries are dropped now; the viewer's own presence still goes out."""
    rw, ro = (f"{server.ws_url}/doc?token={issue_token(SECRET, doc='doc', access=access)}" for access in ("rw", "ro"))
    writer, watcher, viewer = await RawPeer.connect(rw), await RawPeer.connect(rw), await RawPeer.connect(ro)
    await writer.send(p.encode_awareness([p.AwarenessEntry(7, 1, '{"user":"w"}')]))
    await viewer.wait_for(lambda: 7 in viewer.awareness)
    await viewer.send(p.encode_awareness([p.AwarenessEntry(7, 100, '{"user":"forged"}')]))
    await viewer.send(p.encode_awareness([p.AwarenessEntry(7, 101, "null")]))
    await viewer.send(p.encode_awareness([p.AwarenessEntry(9, 1, '{"user":"v"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(9) == '{"user":"v"}')  # handled after the two before it
    relayed = [e for m in watcher.messages if isinstance(m, p.AwarenessMessage) for e in p.decode_awareness(m.payload)]
    # the watcher may get the writer's state twice (relayed, and with the presence it got as it joined)
    assert {e.clock for e in relayed if e.client_id == 7} == {1} and watcher.awareness.get(7) == '{"user":"w"}'
    await writer.send(p.encode_awareness([p.AwarenessEntry(7, 2, '{"user":"w2"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(7) == '{"user":"w2"}')
    await viewer.send(p.encode_awareness([p.AwarenessEntry(9, 2, "null")]))  # its own: still its to remove
    await watcher.wait_for(lambda: 9 not in watcher.awareness)
    # the writer clears its presence: a viewer's state for its id at a high clock would hold off its next ones
    await writer.send(p.encode_awareness([p.AwarenessEntry(7, 3, "null")]))
    await watcher.wait_for(lambda: 7 not in watcher.awareness)
    await viewer.send(p.encode_awareness([p.AwarenessEntry(7, 200, '{"user":"claimed"}')]))
    await writer.send(p.encode_awareness([p.AwarenessEntry(7, 4, '{"user":"w4"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(7) == '{"user":"w4"}')
    # a viewer that reconnects may show its own presence again
    again = await RawPeer.connect(ro)
    await again.send(p.encode_awareness([p.AwarenessEntry(9, 3, '{"user":"v again"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(9) == '{"user":"v again"}')
    assert not viewer.closed.is_set()
    for peer in (writer, watcher, viewer, again):
        await peer.close()


async def test_a_read_only_peer_cannot_claim_the_client_id_of_someone_who_wrote(server: ServerProcess) -> None:
    """A viewer could claim any client id the room held no presence clock of, such as that of a writer not announced
    yet (after a restart, or one that shows no presence), read from the document's state vector: at a high clock,
    its state then held off the writer's own. Ids that wrote to the document are not a viewer's to claim."""
    rw, ro = (f"{server.ws_url}/authored?token={issue_token(SECRET, doc='authored', access=access)}"
              for access in ("rw", "ro"))
    writer, watcher, viewer = await RawPeer.connect(rw, client_id=5555), await RawPeer.connect(rw), \
        await RawPeer.connect(ro)
    await writer.edit(lambda doc: doc.get("t", type=Text).insert(0, "mine"))
    await watcher.wait_for(lambda: text(watcher) == "mine")
    await viewer.send(p.encode_awareness([p.AwarenessEntry(5555, 50, '{"user":"forged"}')]))
    await viewer.send(p.encode_awareness([p.AwarenessEntry(9, 1, '{"user":"v"}')]))  # never seen: the viewer's own
    await watcher.wait_for(lambda: watcher.awareness.get(9) == '{"user":"v"}')  # handled after the forged one
    assert 5555 not in watcher.awareness
    await writer.send(p.encode_awareness([p.AwarenessEntry(5555, 1, '{"user":"w"}')]))
    await watcher.wait_for(lambda: watcher.awareness.get(5555) == '{"user":"w"}')
    assert not viewer.closed.is_set()
    for peer in (writer, watcher, viewer):
        await peer.close()


@pytest.mark.parametrize(("close_codes", "code"), [((), 1008), (("--auth-close-codes",), 4403)],
                         ids=["default", "auth-close-codes"])
async def test_a_connection_is_closed_when_its_token_expires(server_factory, close_codes: tuple[str, ...],
                                                             code: int) -> None:
    """A token is checked at the upgrade only: a connection admitted with it kept editing after its `exp` for ever.
    Now it is closed then, and what it sends afterwards is not applied."""
    server = server_factory("--auth-required", "--auth-secret", SECRET, *close_codes)
    peer = await RawPeer.connect(f"{server.ws_url}/doc?token={issue_token(SECRET, doc='doc', ttl=3)}")
    await peer.send(p.sync_update(text_update("before")))
    await peer.wait_for(lambda: text(peer) == "before")
    peer.ws.transport.pause_reading()  # it does not see the close frame, so it can still send after it
    await wait_until(lambda: "reason=token expired" in server.log(), timeout=10)
    await peer.send(p.sync_update(text_update("after")))
    peer.ws.transport.resume_reading()
    assert await peer.wait_closed() == (code, "token expired")
    await wait_until(lambda: server.metric("collab_connections") == 0)  # its session handled all it received
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        stored = Doc()
        stored.apply_update((await http.get("/api/docs/doc/update",
                                            params={"token": issue_token(SECRET, doc="doc", access="ro")})).content)
    assert str(stored.get("t", type=Text)) == "before"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collab_server", "token", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=30)


def test_cli_token_verifies() -> None:
    out = run_cli("--secret", SECRET, "--doc", "notes/a", "--access", "ro", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    assert verify_token(SECRET, out.stdout.strip(), "notes/a").readonly
    with pytest.raises(AuthError):
        verify_token(SECRET, out.stdout.strip(), "notes/b")

    by_env = run_cli("--prefix", "notes/", env={"COLLAB_AUTH_SECRET": SECRET})
    assert by_env.returncode == 0, by_env.stderr
    assert not verify_token(SECRET, by_env.stdout.strip(), "notes/b").readonly
    with pytest.raises(AuthError):
        verify_token("wrong", by_env.stdout.strip(), "notes/b")

    no_secret = run_cli("--doc", "x", env={"COLLAB_AUTH_SECRET": ""})
    assert no_secret.returncode == 2 and "secret" in no_secret.stderr
    for ttl in ("nan", "inf"):
        endless = run_cli("--secret", SECRET, "--doc", "x", "--ttl", ttl)
        assert (endless.returncode, endless.stderr) == (2, f"collab-server: ttl must be a finite number of seconds, "
                                                           f"not {ttl}\n")
    for ttl in ("0", "-60"):  # expired when issued: every use refused
        expired = run_cli("--secret", SECRET, "--doc", "x", "--ttl", ttl)
        assert (expired.returncode, expired.stderr) == (2, f"collab-server: ttl must be more than 0 seconds, "
                                                           f"not {float(ttl)!r}\n")
    empty = run_cli("--secret", SECRET, "--doc", "")  # no document has an empty name: no use of it would work
    assert (empty.returncode, empty.stderr) == (2, "collab-server: doc must not be empty (no document has an empty "
                                                   "name)\n")
