"""Hypothesis throws thousands of random and mutated y-websocket frames at a live server over many connections.

Afterwards the process must be healthy and clean (no unhandled exception logged), a client that kept editing
another room throughout must never have noticed, peers idling in the fuzzed rooms must only ever have
received well-formed messages, and documents stored before the fuzzing must be unchanged, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from collab_server import protocol as p
from collab_server.model import add_index_entry, create_block, set_status
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess

FUZZ_ROOMS = [f"fuzz/{i}" for i in range(4)]
STABLE_ROOMS = ["stable/text", "stable/blocks"]
EXAMPLES = 2000


def _sample_updates() -> tuple[list[bytes], list[bytes]]:
    """Valid updates of several shapes (and state vectors) to start mutations from."""
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("t", type=Text)
    text += "hello"
    text.insert(2, "XYZ")
    del text[0:3]
    doc.get("m", type=Map)["k"] = {"nested": [1, 2.5, "three", None]}
    doc.get("a", type=Array).extend([1, "two", Map({"x": 1})])
    create_block(doc, "b1", "paragraph", "content")
    add_index_entry(doc, "b1", "idx")
    set_status(doc, "b1", "idx", "done")
    states = [b"\x00", doc.get_state(), Doc().get_state()]
    return updates + [doc.get_update()], states


UPDATES, STATE_VECTORS = _sample_updates()

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=3), max_leaves=6)
awareness_entries = st.builds(p.AwarenessEntry, st.integers(0, 2**53), st.integers(0, 2**32),
                              json_values.map(json.dumps))
valid_frames = st.one_of(
    st.sampled_from(UPDATES).map(p.sync_update),
    st.sampled_from(UPDATES).map(p.sync_step2),
    st.sampled_from(STATE_VECTORS).map(p.sync_step1),
    st.lists(awareness_entries, max_size=3).map(p.encode_awareness),
    st.just(p.query_awareness()),
    st.just(p.KEEPALIVE),
    st.text(max_size=20).map(p.auth_denied),
)


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few byte flips, truncations, extensions, insertions, deletions or absurd varints."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        match draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete", "varint"])):
            case "flip" if out:
                out[min(at, len(out) - 1)] ^= 1 << draw(st.integers(0, 7))
            case "truncate":
                del out[at:]
            case "extend":
                out += draw(st.binary(min_size=1, max_size=16))
            case "insert":
                out[at:at] = draw(st.binary(min_size=1, max_size=8))
            case "delete":
                del out[at:at + draw(st.integers(1, 8))]
            case "varint":  # an absurd length, clock or client id wherever a varint may be read
                out[at:at] = draw(st.sampled_from([b"\xff" * 9 + b"\x7f", b"\xff\xff\xff\xff\x0f", b"\x80"]))
    return bytes(out)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame mutated anywhere: mostly breaks the y-websocket framing itself."""
    return _mutate(draw, draw(valid_frames))


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A well-framed message around a mutated update, state vector or awareness payload: reaches yrs."""
    wrap, payloads = draw(st.sampled_from([
        (p.sync_update, UPDATES), (p.sync_step2, UPDATES), (p.sync_step1, STATE_VECTORS),
        (p.awareness_message, [p.encode_awareness_update([p.AwarenessEntry(1, 2, '{"a":[1]}')])]),
    ]))
    return wrap(_mutate(draw, draw(st.sampled_from(payloads))))


frames = st.one_of(
    valid_frames,
    mutated_frames(),
    mutated_payloads(),
    mutated_payloads(),  # weighted: mutated updates reach the CRDT decoder, where the risky code is
    st.binary(max_size=300),
    st.binary(max_size=64).map(lambda tail: b"\x00" + bytes([tail[0] % 3 if tail else 2]) + tail),
)
# per example: a few concurrent connections, each to a fuzzed room with its own burst of frames
bursts = st.lists(st.tuples(st.sampled_from(FUZZ_ROOMS), st.lists(frames, min_size=1, max_size=8)),
                  min_size=1, max_size=4)


async def _send_burst(ws_url: str, room: str, burst: list[bytes]) -> None:
    async with connect(f"{ws_url}/{room}", max_size=None, open_timeout=10, close_timeout=10) as ws:
        try:
            for frame in burst:
                await ws.send(frame)
        except ConnectionClosed:
            pass  # the server dropped us for a malformed frame: that is the expected outcome


def fuzz(ws_url: str) -> int:
    """Run the hypothesis campaign (blocking; call from a worker thread); returns frames sent."""
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bursts)
    def campaign(example: list[tuple[str, list[bytes]]]) -> None:
        nonlocal sent

        async def run() -> None:
            await asyncio.gather(*(_send_burst(ws_url, room, burst) for room, burst in example))

        asyncio.run(run())
        sent += sum(len(burst) for _, burst in example)

    campaign()
    return sent


async def _editor(ws_url: str, stop: asyncio.Event) -> int:
    """Keep editing the 'watch' room, each edit waited for until echoed; returns the number of rounds."""
    peer = await RawPeer.connect(f"{ws_url}/watch")
    await peer.sync()
    doc = Doc()
    text = doc.get("t", type=Text)
    rounds = 0
    while not stop.is_set():
        before = doc.get_state()
        text += str(rounds % 10)
        await peer.send(p.sync_update(doc.get_update(before)))
        await peer.wait_for(lambda expected=str(text): str(peer.doc.get("t", type=Text)) == expected)
        rounds += 1
    fresh = await RawPeer.connect(f"{ws_url}/watch")
    await fresh.sync()
    assert str(fresh.doc.get("t", type=Text)) == str(text)
    await fresh.close()
    await peer.close()
    return rounds


def _stored_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        names = ",".join("?" * len(STABLE_ROOMS))
        return (conn.execute(f"SELECT doc, id, ts, data FROM updates WHERE doc IN ({names}) ORDER BY id",
                             STABLE_ROOMS).fetchall()
                + conn.execute(f"SELECT name, updated FROM documents WHERE name IN ({names})",
                               STABLE_ROOMS).fetchall()
                + conn.execute(f"SELECT name, seq, data FROM checkpoints WHERE name IN ({names})",
                               STABLE_ROOMS).fetchall())


async def _stable_states(server: ServerProcess) -> list[tuple[bytes, str, dict]]:
    """(state vector, text, blocks) of each stable document, read through a fresh websocket client.

    Not the encoded update itself: yrs encodes JSON maps in hash order, so equal documents may differ in bytes.
    """
    states = []
    for room in STABLE_ROOMS:
        peer = await RawPeer.connect(f"{server.ws_url}/{room}")
        await peer.sync()
        states.append((peer.doc.get_state(), str(peer.doc.get("t", type=Text)),
                       peer.doc.get("blocks", type=Map).to_py()))
        await peer.close()
    return states


async def _write_stable_docs(server: ServerProcess) -> None:
    text_doc, blocks_doc = Doc(), Doc()
    text_doc.get("t", type=Text).insert(0, "must survive the fuzzing")
    create_block(blocks_doc, "b", "heading", "stable")
    add_index_entry(blocks_doc, "b", "idx", "processing")
    for room, doc in zip(STABLE_ROOMS, (text_doc, blocks_doc), strict=True):
        peer = await RawPeer.connect(f"{server.ws_url}/{room}")
        await peer.send(p.sync_update(doc.get_update()))
        await peer.wait_for(lambda peer=peer, doc=doc: peer.doc.get_state() == doc.get_state())
        await peer.close()


# the editor's websocket client draws from `random` while hypothesis runs in its worker thread
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_fuzzed_frames_leave_server_and_other_rooms_intact(server: ServerProcess) -> None:
    await _write_stable_docs(server)
    rows_before, states_before = _stored_rows(server.db), await _stable_states(server)
    assert len(rows_before) == 4
    idlers = []
    for room in FUZZ_ROOMS:  # loaded one by one up front; they see every broadcast of the fuzzed rooms
        idlers.append(await RawPeer.connect(f"{server.ws_url}/{room}"))
        await idlers[-1].sync()

    stop = asyncio.Event()
    editor = asyncio.create_task(_editor(server.ws_url, stop))
    try:
        sent = await asyncio.to_thread(fuzz, server.ws_url)
    finally:
        stop.set()
    rounds = await editor

    assert sent > 5000 and rounds > 10, (sent, rounds)
    assert server.alive()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.http_url}/health")).status_code == 200
    for idler in idlers:  # their reader decodes every message: a malformed broadcast would have killed it
        assert not idler.closed.is_set(), idler.ws.close_reason
        await idler.sync()
        await idler.close()
    assert _stored_rows(server.db) == rows_before
    assert await _stable_states(server) == states_before
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-5000:]
