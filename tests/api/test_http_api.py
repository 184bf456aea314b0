"""The HTTP API against a real server process: round trips, diffs, history, past versions, errors, tokens."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from pycrdt import Array, Doc, Map, Text, XmlFragment, XmlText

from collab_server import protocol as p
from collab_server.auth import issue_token
from collab_server.http_api import _awareness_state
from collab_server.model import add_index_entry, blocks_to_json, create_block, set_status
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess, wait_until

SECRET = "s3cret"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def text_doc(content: str) -> Doc:
    doc = Doc()
    doc.get("t", type=Text).insert(0, content)
    return doc


def text_of(update: bytes) -> str:
    doc = Doc()
    doc.apply_update(update)
    return str(doc.get("t", type=Text))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests below that use distinct document names; "x" exists from the start."""
    server = ServerProcess(tmp_path_factory.mktemp("api") / "collab.db").start()
    httpx.post(f"{server.http_url}/api/docs/x/update", content=text_doc("x").get_update()).raise_for_status()
    yield server
    server.stop()


@pytest.fixture
async def http(shared_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shared_server.http_url, timeout=10) as client:
        yield client


@pytest.fixture
async def auth_http(server_factory) -> AsyncIterator[httpx.AsyncClient]:
    server = server_factory("--auth-required", "--auth-secret", SECRET)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        client.ws_url = server.ws_url  # type: ignore[attr-defined]
        yield client


async def test_post_then_get_as_update_and_json(http: httpx.AsyncClient) -> None:
    doc = Doc()
    create_block(doc, "b1", "paragraph", "hello")
    add_index_entry(doc, "b1", "search", "notStarted")
    set_status(doc, "b1", "search", "done")
    name = "team/a/notes"  # names may contain '/'
    response = await http.post(f"/api/docs/{name}/update", content=doc.get_update(),
                               headers={"content-type": "application/octet-stream"})
    assert response.status_code == 204, response.text

    got = await http.get(f"/api/docs/{name}/update")
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    copy = Doc()
    copy.apply_update(got.content)
    assert blocks_to_json(copy) == blocks_to_json(doc)

    as_json = (await http.get(f"/api/docs/{name}/json")).json()
    assert as_json == {"name": name, "blocks": blocks_to_json(doc)}
    assert as_json["blocks"]["b1"]["content"] == "hello"
    assert as_json["blocks"]["b1"]["indexingList"][0]["status"] == "done"


async def test_blocks_holding_binary_xml_or_subdocument_values_are_shown_as_json(http: httpx.AsyncClient) -> None:
    """A Yjs client may put a Uint8Array, an XML type or a subdocument anywhere: the JSON views answered 500
    (not JSON serializable), and a JSON edit of such a block committed, then answered 500, so a retry repeated it."""
    doc = Doc()
    create_block(doc, "b1", "paragraph", "hello")
    add_index_entry(doc, "b1", "search", metadata={"blob": b"\x01\x02"})
    block = doc.get("blocks", type=Map)["b1"]
    with doc.transaction():
        block["type"] = XmlFragment([XmlText("para")])
        block["id"] = Doc()
        block["indexingList"][0]["nested"] = Map({"bytes": b"\x03", "list": Array([b"\x04", 2.0])})
    assert (await http.post("/api/docs/odd-values/update", content=doc.get_update())).status_code == 204
    shown = await http.get("/api/docs/odd-values/json")
    assert shown.status_code == 200, shown.text
    assert {key: shown.json()["blocks"]["b1"][key] for key in ("id", "type")} == {"id": None, "type": "para"}
    entry = shown.json()["blocks"]["b1"]["indexingList"][0]
    assert (entry["blob"], entry["nested"]) == ("AQI=", {"bytes": "Aw==", "list": ["BA==", 2]})
    edited = await http.post("/api/docs/odd-values/blocks", json={"ops": [
        {"op": "set_status", "id": "b1", "index_name": "search", "status": "done"}]})
    assert edited.status_code == 200, edited.text
    assert edited.json()["blocks"]["b1"]["indexingList"][0]["status"] == "done"


async def test_update_diffed_against_state_vector(http: httpx.AsyncClient) -> None:
    doc = text_doc("hello")
    await http.post("/api/docs/d/update", content=doc.get_update())
    replica = Doc()
    replica.apply_update((await http.get("/api/docs/d/update")).content)
    known = replica.get_state()
    doc.get("t", type=Text).insert(5, " world")
    await http.post("/api/docs/d/update", content=doc.get_update(known))

    diff = await http.get("/api/docs/d/update", params={"sv": b64url(known)})
    full = await http.get("/api/docs/d/update")
    assert b" world" in diff.content and b"hello" not in diff.content  # only what the replica lacks
    replica.apply_update(diff.content)
    assert str(replica.get("t", type=Text)) == "hello world" == text_of(full.content)
    nothing_missing = await http.get("/api/docs/d/update", params={"sv": b64url(replica.get_state())})
    assert nothing_missing.content == b"\x00\x00"  # an empty v1 update


async def test_history_grows_and_past_versions_rebuild(http: httpx.AsyncClient) -> None:
    doc = text_doc("")
    text = doc.get("t", type=Text)
    states = []
    for word in ("one", " two", " three"):
        before = doc.get_state()
        text += word
        assert (await http.post("/api/docs/h/update", content=doc.get_update(before))).status_code == 204
        history = (await http.get("/api/docs/h/history")).json()
        states.append(str(text))
        assert len(history["entries"]) == len(states)
    entries = history["entries"]
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert all(e["size"] > 0 and abs(e["time"] - time.time()) < 60 for e in entries)

    for entry, expected in zip(entries, states, strict=True):
        as_update = await http.get(f"/api/docs/h/at/{entry['seq']}", params={"format": "update"})
        assert as_update.headers["content-type"] == "application/octet-stream"
        assert text_of(as_update.content) == expected
        as_json = (await http.get(f"/api/docs/h/at/{entry['seq']}")).json()
        assert as_json == {"name": "h", "seq": entry["seq"], "blocks": {}}

    listed = (await http.get("/api/docs")).json()["docs"]
    assert ("h", 3) in [(d["name"], d["log_entries"]) for d in listed]


async def test_compacted_history_is_gone(server_factory) -> None:
    server = server_factory("--compact-threshold", "3")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        doc = text_doc("")
        for i in range(4):
            before = doc.get_state()
            doc.get("t", type=Text).insert(i, "x")
            await http.post("/api/docs/c/update", content=doc.get_update(before))
        deadline = time.monotonic() + 10
        while len((await http.get("/api/docs/c/history")).json()["entries"]) > 1:  # compaction follows a commit
            assert time.monotonic() < deadline, "no compaction"
            await asyncio.sleep(0.05)
        gone = await http.get("/api/docs/c/at/1")
        assert gone.status_code == 410 and "compacted" in gone.json()["error"]
        assert text_of((await http.get("/api/docs/c/update")).content) == "xxxx"


async def test_websocket_client_receives_posted_update(shared_server: ServerProcess,
                                                        http: httpx.AsyncClient) -> None:
    peer = await RawPeer.connect(f"{shared_server.ws_url}/live/doc")
    await peer.sync()
    assert (await http.post("/api/docs/live/doc/update", content=text_doc("pushed").get_update())).status_code == 204
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == "pushed")
    await peer.close()


@pytest.mark.parametrize("path", ["/api/docs/nope/json", "/api/docs/nope/update", "/api/docs/nope/history",
                                  "/api/docs/nope/at/1", "/api/unknown", "/api/docs/x/unknown"])
async def test_not_found(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 404 and response.json()["error"]


@pytest.mark.parametrize(("method", "path", "params", "body"), [
    ("POST", "/api/docs/x/update", {}, b"not a yjs update"),
    ("POST", "/api/docs/x/update", {}, b""),
    ("POST", "/api/docs/x/update", {}, b"\x01\x01\x05\x00"),  # truncated
    ("GET", "/api/docs/x/update", {"sv": "!!not-base64"}, None),
    ("GET", "/api/docs/x/update", {"sv": b64url(b"\xff\xff")}, None),
    ("GET", "/api/docs/x/at/1", {"format": "xml"}, None),
    ("GET", "/api/docs/bad%01name/json", {}, None),
    ("GET", "/api/docs/new%0Aline/history", {}, None),
])
async def test_bad_request(http: httpx.AsyncClient, method: str, path: str, params: dict, body: bytes | None) -> None:
    response = await http.request(method, path, params=params, content=body)
    assert response.status_code == 400 and response.json()["error"]
    assert text_of((await http.get("/api/docs/x/update")).content) == "x"


async def test_oversized_update_is_refused(server_factory) -> None:
    server = server_factory("--max-message-size", "100")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.post("/api/docs/big/update", content=text_doc("y" * 500).get_update())
    assert response.status_code == 413 and response.json()["error"]


async def test_a_client_that_leaves_mid_body_is_not_an_error(server_factory) -> None:
    """Anyone can send part of a body and leave; an ERROR line with a traceback each time would flood the log."""
    server = server_factory("--log-level", "debug")
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /api/docs/d/update HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n" + b"x" * 10)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_until(lambda: "client left during its request body: POST /api/docs/d/update" in server.log()
                     or "Exception in ASGI application" in server.log())
    assert "Traceback" not in server.log()


async def test_wrong_method_is_405(http: httpx.AsyncClient) -> None:
    response = await http.put("/api/docs/x/update")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD, POST"


async def test_auth_missing_and_invalid_tokens(auth_http: httpx.AsyncClient) -> None:
    missing = await auth_http.get("/api/docs/a/json")
    assert missing.status_code == 401 and missing.json() == {"error": "missing token"}
    for token in ("garbage", "abc.\u00e9", issue_token("wrong", doc="a"), issue_token(SECRET, doc="b"),
                  issue_token(SECRET, doc="a", ttl=-10)):
        response = await auth_http.get("/api/docs/a/json", params={"token": token})
        assert response.status_code == 403 and response.json()["error"], token
    assert (await auth_http.get("/api/docs")).status_code == 401
    not_admin = await auth_http.get("/api/docs", params={"token": issue_token(SECRET, prefix="a")})
    assert not_admin.status_code == 403 and 'prefix ""' in not_admin.json()["error"]


async def test_auth_tokens_via_query_and_bearer(auth_http: httpx.AsyncClient) -> None:
    rw = issue_token(SECRET, prefix="team/")
    posted = await auth_http.post("/api/docs/team/a/update", content=text_doc("ok").get_update(),
                                  headers={"authorization": f"Bearer {rw}"})
    assert posted.status_code == 204
    got = await auth_http.get("/api/docs/team/a/update", params={"token": issue_token(SECRET, doc="team/a")})
    assert text_of(got.content) == "ok"
    admin = issue_token(SECRET, prefix="", access="ro")
    listed = await auth_http.get("/api/docs", headers={"authorization": f"Bearer {admin}"})
    assert [d["name"] for d in listed.json()["docs"]] == ["team/a"]


async def test_listing_in_pages_by_prefix(http: httpx.AsyncClient) -> None:
    for i in range(5):
        await http.post(f"/api/docs/paged/{i}/update", content=text_doc(str(i)).get_update())
    pages, after = [], ""
    while True:
        page = (await http.get("/api/docs", params={"prefix": "paged/", "after": after, "limit": 2})).json()
        pages.append([d["name"] for d in page["docs"]])
        if page["next"] is None:
            break
        after = page["next"]
    assert pages == [["paged/0", "paged/1"], ["paged/2", "paged/3"], ["paged/4"]]
    for limit in ("0", "10001", "two", "\u00b2", "\uff12", "1" * 5000):  # superscript and fullwidth 2, too many digits
        bad = await http.get("/api/docs", params={"limit": limit})
        assert bad.status_code == 400 and "limit" in bad.json()["error"]
    for params in ({"prefix": "paged/\x00x"}, {"prefix": "paged/", "after": "paged/0\x00"}):  # GLOB stopped at NUL
        bad = await http.get("/api/docs", params=params)
        assert bad.status_code == 400 and "control character" in bad.json()["error"]


async def test_a_prefix_token_lists_its_own_documents_only(auth_http: httpx.AsyncClient) -> None:
    rw = issue_token(SECRET, prefix="")
    for name in ("team/a", "team/b", "other"):
        await auth_http.post(f"/api/docs/{name}/update", params={"token": rw}, content=text_doc("x").get_update())
    team = issue_token(SECRET, prefix="team/", access="ro")
    listed = await auth_http.get("/api/docs", params={"prefix": "team/", "token": team})
    assert [d["name"] for d in listed.json()["docs"]] == ["team/a", "team/b"]
    narrower = await auth_http.get("/api/docs", params={"prefix": "team/a", "token": team})
    assert [d["name"] for d in narrower.json()["docs"]] == ["team/a"]
    for params in ({"token": team}, {"prefix": "other", "token": team},
                   {"prefix": "team/a", "token": issue_token(SECRET, doc="team/a")}):
        refused = await auth_http.get("/api/docs", params=params)
        assert refused.status_code == 403 and "listing needs" in refused.json()["error"]


async def test_read_only_token_cannot_post(auth_http: httpx.AsyncClient) -> None:
    rw, ro = issue_token(SECRET, doc="r"), issue_token(SECRET, doc="r", access="ro")
    await auth_http.post("/api/docs/r/update", params={"token": rw}, content=text_doc("kept").get_update())
    peer = await RawPeer.connect(f"{auth_http.ws_url}/r?token={ro}")  # type: ignore[attr-defined]
    await peer.sync()
    refused = await auth_http.post("/api/docs/r/update", params={"token": ro},
                                   content=text_doc("intruder").get_update())
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    history = (await auth_http.get("/api/docs/r/history", params={"token": ro})).json()
    assert len(history["entries"]) == 1
    got = await auth_http.get("/api/docs/r/update", params={"token": ro})
    assert text_of(got.content) == "kept"
    # a probe write through the rw token arrives, and nothing of the refused one came before it
    await auth_http.post("/api/docs/r/update", params={"token": rw}, content=text_doc("!").get_update())
    await peer.wait_for(lambda: "!" in str(peer.doc.get("t", type=Text)))
    assert "intruder" not in str(peer.doc.get("t", type=Text))
    await peer.close()


async def test_presence_lists_the_awareness_states_and_connections_of_a_document(
        shared_server: ServerProcess, http: httpx.AsyncClient) -> None:
    alice = await RawPeer.connect(f"{shared_server.ws_url}/presence/p")
    bob = await RawPeer.connect(f"{shared_server.ws_url}/presence/p")
    await alice.send(p.encode_awareness([p.AwarenessEntry(11, 1, '{"user": {"name": "Alice"}}')]))
    await bob.send(p.encode_awareness([p.AwarenessEntry(22, 1, '{"user": {"name": "Bob"}, "far": 1e400}')]))
    await alice.wait_for(lambda: set(alice.awareness) == {11, 22})
    answer = (await http.get("/api/docs/presence/p/presence")).json()
    assert answer["name"] == "presence/p" and answer["connections"] == 2
    assert sorted(answer["presence"], key=lambda e: e["client_id"]) == [
        {"client_id": 11, "state": {"user": {"name": "Alice"}}},
        {"client_id": 22, "state": {"user": {"name": "Bob"}, "far": None}}]  # as JSON.stringify writes Infinity
    await bob.close()
    await alice.wait_for(lambda: set(alice.awareness) == {11})
    answer = (await http.get("/api/docs/presence/p/presence")).json()
    assert answer["connections"] == 1 and [e["client_id"] for e in answer["presence"]] == [11]
    assert (await http.get("/api/docs/nobody/presence")).json() == {"name": "nobody", "connections": 0,
                                                                     "presence": []}
    # a name cut in the middle of an emoji, as JSON.stringify writes it: a lone surrogate, escaped in the answer
    await alice.send(p.encode_awareness([p.AwarenessEntry(11, 2, '{"user": {"name": "Zo\\ud83d"}}')]))
    await alice.wait_for(lambda: "ud83d" in alice.awareness[11])
    answer = await http.get("/api/docs/presence/p/presence")
    assert answer.status_code == 200 and b'"Zo\\ud83d"' in answer.content
    assert answer.json()["presence"] == [{"client_id": 11, "state": {"user": {"name": "Zo\ud83d"}}}]


async def test_presence_shows_numbers_beyond_a_double_as_null(shared_server: ServerProcess,
                                                              http: httpx.AsyncClient) -> None:
    """JavaScript reads 1e400 as Infinity, which JSON has no form for (as for NaN); a number within range stays."""
    peer = await RawPeer.connect(f"{shared_server.ws_url}/presence/huge")
    state = '{"a": 1e400, "b": [-1e400, 1%s, 1%s, 1.5e308]}' % ("0" * 400, "0" * 308)
    await peer.send(p.encode_awareness([p.AwarenessEntry(5, 1, state)]))
    await peer.wait_for(lambda: 5 in peer.awareness)
    answer = await http.get("/api/docs/presence/huge/presence")
    assert answer.status_code == 200
    assert answer.json()["presence"] == [{"client_id": 5, "state": {"a": None, "b": [None, None, 10**308, 1.5e308]}}]
    await peer.close()


def test_a_presence_state_too_deep_for_the_parser_on_a_request_s_stack_is_shown_as_null() -> None:
    """A state is checked as it comes in, on a shorter stack than a request's: one nested just short of Python's
    limit there answered 500 here."""
    deep = "[" * 100_000 + "]" * 100_000
    assert _awareness_state(deep) is None
    assert _awareness_state('{"a": [[1]]}') == {"a": [[1]]}


@pytest.mark.parametrize("path", ["/api/docs/v/versions/" + "9" * 5000, "/api/docs/v/at/" + "9" * 5000,
                                  "/api/docs/v/versions/" + "9" * 20 + "/restore"])
async def test_a_version_or_position_of_thousands_of_digits_is_not_found(http: httpx.AsyncClient, path: str
                                                                           ) -> None:
    """Starlette's int path parameter took any number of digits, which int() refuses past 4,300: 500."""
    response = await (http.post(path) if path.endswith("restore") else http.get(path))
    assert response.status_code == 404
