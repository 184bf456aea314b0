"""Bad input closes only the offending connection, with a clear code; nothing accepted is lost."""

import asyncio
import base64

import httpx
import pytest
from pycrdt import Doc, Text
from websockets.frames import Frame, Opcode

from collab_server import protocol as p
from collab_server.auth import issue_token
from collab_server.room import VIEWER_READ_LIMIT
from collab_server.model import add_index_entry, blocks_to_json, create_block
from collab_server.updatecheck import structs
from tests.rawclient import RawPeer, state_vector, text_updates
from tests.serverproc import wait_until
from tests.test_updatecheck import nested_maps

BAD_FRAMES = {
    "truncated varint": (b"\x00\x02\x85", 1007),
    "unknown message type": (b"\x09\x00", 1007),
    "unknown sync type": (b"\x00\x07\x00", 1007),
    "truncated byte array": (b"\x00\x02\x10abc", 1007),
    "invalid update": (p.sync_update(b"garbage-data-here"), 1007),
    "invalid state vector": (p.sync_step1(b"\xff\xff"), 1007),
    "bad awareness json": (p.encode_awareness([p.AwarenessEntry(5, 1, "{oops")]), 1007),
    "awareness nested too deep": (p.encode_awareness([p.AwarenessEntry(5, 1, "[" * 50_000 + "]" * 50_000)]), 1007),
    # relayed, yjs peers' decoder would throw on it (lib0 reads integers up to 2^53 - 1)
    "awareness client id past 2^53": (p.encode_awareness([p.AwarenessEntry(2**53, 1, "{}")]), 1007),
    # found by fuzzing: ten varint bytes holding 70 bits were accepted, and relayed as an eleven-byte varint
    "awareness client id past 64 bits": (p.awareness_message(b"\x01" + b"\xff" * 9 + b"\x7f" + b"\x01\x02{}"), 1007),
    # one item holding a value nested 50,000 arrays deep (100,000 overflowed yrs's stack: tests/test_updatecheck.py)
    "values nested too deep": (p.sync_update(b"\x01\x01\x01\x00\x08\x01\x01t\x01" + b"\x75\x01" * 50_000 + b"\x7e\x00"),
                               1007),
    # found by fuzzing: pycrdt raises RuntimeError for the first (after integrating part of it) and a
    # PanicException, which is not an Exception, for the second
    "update yrs cannot integrate": (p.sync_update(bytes.fromhex(
        "0103070908010161027c3f800000770374776f87070a01280007090178017c3f80000000")), 1007),
    "update that makes yrs panic": (p.sync_update(bytes.fromhex(
        "01030783e8c59d0908010161027c3f000000770374776f87070a012800070b0178017c3f80000000")), 1007),
    # found by fuzzing: a string with an emoji in a block's indexingList array (Yjs puts strings only in texts):
    # yrs reading the array looped for ever, so the resolver stopped the whole server
    "string content in an array": (p.sync_update(bytes.fromhex(
        "0103932100270106626c6f636b730262310127009321000c696e646578696e674c69737400040093210106f09f9880616200")), 1007),
    "empty frame": (b"", 1007),
    # 10,000 maps nested under `blocks` held every room's loop for two minutes (yrs's deep observer)
    "types nested too deep": (p.sync_update(nested_maps(10_000)), 1007),
}


async def _accepted_text(server, room: str, count: int) -> tuple[RawPeer, str]:
    peer = await RawPeer.connect(f"{server.ws_url}/{room}")
    doc, updates = text_updates(count)
    for update in updates:
        await peer.send(p.sync_update(update))
    expected = str(doc.get("t", type=Text))
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == expected)
    return peer, expected


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frame_closes_only_that_connection(server, case: str) -> None:
    frame, code = BAD_FRAMES[case]
    good, expected = await _accepted_text(server, "room", 20)
    other_room, _ = await _accepted_text(server, "other", 5)
    bad = await RawPeer.connect(f"{server.ws_url}/room")
    await bad.send(frame)
    got_code, reason = await bad.wait_closed()
    assert got_code == code, reason
    assert reason  # a clear reason for the person debugging the client
    # the room, the other room and the process are unaffected
    _, more = text_updates(1, name="u")
    await good.send(p.sync_update(more[0]))
    await good.wait_for(lambda: str(good.doc.get("u", type=Text)) == "a")
    assert not good.closed.is_set() and not other_room.closed.is_set()
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == expected
    # what the server holds is what it stored and what it broadcast
    assert state_vector(fresh.doc) == state_vector(good.doc)
    assert "bad input" in server.log() and "Traceback" not in server.log()


async def test_text_frame_closes_with_1003(server) -> None:
    good, expected = await _accepted_text(server, "room", 10)
    bad = await RawPeer.connect(f"{server.ws_url}/room")
    await bad.send("hello")
    code, reason = await bad.wait_closed()
    assert code == 1003 and "text frames" in reason
    fresh = await RawPeer.connect(f"{server.ws_url}/room")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == expected
    assert server.alive()


async def test_oversized_message_closes_with_1009(server_factory) -> None:
    server = server_factory("--max-message-size", "1000")
    good, expected = await _accepted_text(server, "room", 10)
    bad = await RawPeer.connect(f"{server.ws_url}/room")
    await bad.send(p.sync_update(b"\x00" * 5000))
    code, _ = await bad.wait_closed()
    assert code == 1009
    await good.sync()
    assert str(good.doc.get("t", type=Text)) == expected
    assert httpx.get(f"{server.http_url}/health").status_code == 200
    # websockets refuses it from the frame's header: logged and counted as other bad input is
    assert 'collab_errors_total{kind="too_big"} 1.0' in httpx.get(f"{server.http_url}/metrics").text
    await wait_until(lambda: "bad input room=room" in server.log() and "code=1009" in server.log())


async def test_a_text_frame_that_is_not_utf8_closes_with_1003_and_no_traceback(server) -> None:
    bad = await RawPeer.connect(f"{server.ws_url}/room")
    frame = Frame(Opcode.TEXT, b"\xff\xfe not utf-8").serialize(mask=True, extensions=[])
    bad.ws.transport.write(frame)  # websockets' client would not send it
    code, reason = await bad.wait_closed()
    assert code == 1003 and "text frames" in reason
    assert "Traceback" not in server.log() and "Invalid UTF-8" not in server.log()


async def test_many_bad_clients_at_once_leave_the_server_healthy(server) -> None:
    good, expected = await _accepted_text(server, "room", 30)
    bads = [await RawPeer.connect(f"{server.ws_url}/room") for _ in range(20)]
    frames = [f for f, _ in BAD_FRAMES.values()]
    await asyncio.gather(*(b.send(frames[i % len(frames)]) for i, b in enumerate(bads)))
    codes = await asyncio.gather(*(b.wait_closed() for b in bads))
    assert all(code == 1007 for code, _ in codes)
    await good.sync()
    assert str(good.doc.get("t", type=Text)) == expected and not good.closed.is_set()


async def test_websocket_to_bare_root_is_refused_with_403_not_500(server) -> None:
    """Defect 7: refusing a connection must not make uvicorn answer 500."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{server.ws_url}/"):
            pass
    assert info.value.response.status_code == 403
    assert server.alive()


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


async def test_a_few_bytes_claiming_millions_of_clients_never_reach_yrs(server) -> None:
    """yrs reserves memory for the client count an update or state vector claims before reading any entry:
    2^28 in a 5-byte frame cost the process 550 MB. Such frames are refused before yrs sees them."""
    good, expected = await _accepted_text(server, "room", 5)
    peak = _peak_rss_kb(server.proc.pid)
    huge = p.write_varuint(2**28)
    for frame in (p.sync_update(huge), p.sync_step2(huge), p.sync_step1(huge)):
        bad = await RawPeer.connect(f"{server.ws_url}/room")
        await bad.send(frame)
        code, reason = await bad.wait_closed()
        assert code == 1007 and "a count of 268435456" in reason
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        assert (await http.post("/api/docs/room/update", content=huge)).status_code == 400
        sv = base64.urlsafe_b64encode(huge).rstrip(b"=").decode()
        assert (await http.get("/api/docs/room/update", params={"sv": sv})).status_code == 400
    assert _peak_rss_kb(server.proc.pid) - peak < 64 * 1024
    assert not good.closed.is_set()


async def test_string_content_put_in_a_list_by_a_later_update_resets_the_room_and_is_not_stored(server) -> None:
    """A first update makes a block, its list and an entry; a second puts a string holding an emoji after the entry.
    No update alone shows that the string lands in an array, and yrs, reading the array, loops for ever: the
    resolver stopped the whole server, and the stored document stopped it at every load. The change is refused
    now (the room is reset, its clients reconnect to the document as stored) and never stored."""
    author = Doc(client_id=7)
    create_block(author, "b", "p", "x")
    add_index_entry(author, "b", "ix")
    base = author.get_update()
    entry = [s for s in structs(base)[0] if s.type_ref == 1 and not s.keyed][-1]  # the entry: a map in the list
    poison = (p.write_varuint(1) + p.write_varuint(1) + p.write_varuint(99) + p.write_varuint(0) + bytes([0x84])
              + p.write_varuint(entry.client) + p.write_varuint(entry.clock) + p.write_bytes("😀x".encode())
              + p.write_varuint(0))
    watcher = await RawPeer.connect(f"{server.ws_url}/poisoned")
    bad = await RawPeer.connect(f"{server.ws_url}/poisoned")
    await bad.send(p.sync_update(base))
    await watcher.wait_for(lambda: "b" in blocks_to_json(watcher.doc))
    await bad.send(p.sync_update(poison))
    code, reason = await bad.wait_closed()
    assert code == 1007 and "refused" in reason
    assert (await watcher.wait_closed())[0] == 1007
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        assert (await http.get("/health")).status_code == 200
        shown = await http.get("/api/docs/poisoned/json")  # loaded again from storage: it does not hold the string
    assert shown.status_code == 200 and shown.json()["blocks"]["b"]["indexingList"][0]["index_name"] == "ix"


def _payload(case: str) -> bytes:
    return p.decode_message(BAD_FRAMES[case][0]).payload


# what a viewer's update frame holds -> whether it is well-formed (refused as a write) or not (1007)
VIEWER_PAYLOADS = {
    **{case: (_payload(case), False) for case in ("invalid update", "values nested too deep",
                                                  "string content in an array")},
    **{case: (_payload(case), True) for case in ("update yrs cannot integrate", "update that makes yrs panic")},
    "nested to kill yrs": (b"\x01\x01\x01\x00\x08\x01\x01t\x01" + b"\x75\x01" * 100_000 + b"\x7e\x00", False),
    "claiming 2^28 clients": (p.write_varuint(2**28), False),
    "too large to be read": (text_updates(1, name="v")[1][0][:3] + b"x" * 300_000, True),  # refused unread
}


@pytest.mark.parametrize("case", list(VIEWER_PAYLOADS))
async def test_a_viewers_bad_update_is_refused_before_yrs_reads_it(server_factory, case: str) -> None:
    """A read-only connection's handshake answer is read (does it bring anything?), never applied: it went to yrs
    unchecked, so one frame nesting values 100,000 deep killed the process (SIGSEGV) and 6 bytes claiming 2^28
    clients held the loop. It is now checked as a writer's update is (1007), or refused as a write; an update, or a
    handshake answer too large to be a viewer's, is refused unread."""
    server = server_factory("--auth-required", "--auth-secret", "s")
    writer = await RawPeer.connect(f"{server.ws_url}/room?token={issue_token('s', doc='room')}")
    await writer.sync()
    payload, well_formed = VIEWER_PAYLOADS[case]
    for frame in (p.sync_step2(payload), p.sync_update(payload)):
        viewer = await RawPeer.connect(f"{server.ws_url}/room?token={issue_token('s', doc='room', access='ro')}")
        await viewer.sync()
        await viewer.send(frame)
        if well_formed or frame[1] == p.SyncType.UPDATE or len(payload) > VIEWER_READ_LIMIT:  # refused unread
            await viewer.wait_for(lambda: any(isinstance(m, p.AuthMessage) and m.denied for m in viewer.messages))
            assert not viewer.closed.is_set()
        else:
            code, reason = await viewer.wait_closed()
            assert code == 1007 and reason
    _, more = text_updates(1, name="u")
    await writer.send(p.sync_update(more[0]))
    await writer.wait_for(lambda: str(writer.doc.get("u", type=Text)) == "a")
    assert server.alive() and "Traceback" not in server.log()
