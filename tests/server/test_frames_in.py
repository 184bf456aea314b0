"""Incoming frames cut by the protocol itself (transport.py): however the bytes arrive, the application gets the
messages websockets would give it, and websockets still answers control frames and refuses bad ones."""

import asyncio
from pathlib import Path

import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Text
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode, apply_mask
from websockets.protocol import State
from uvicorn.server import ServerState
from websockets.uri import parse_uri

from collab_server import protocol as p
from collab_server.transport import PONG_BACKLOG, CollabWebSocketProtocol, frame_header
from tests.server.test_transport import _serve
from tests.serverproc import wait_until

DATA_OPCODES = [Opcode.BINARY, Opcode.TEXT, Opcode.CONT]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000]) | st.integers(0, 300), st.booleans(),
       st.sampled_from(DATA_OPCODES), st.binary(max_size=20))
def test_frame_header_finds_the_payload_once_the_header_is_whole(size: int, mask: bool, opcode: Opcode,
                                                                 before: bytes) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    raw = before + Frame(opcode, payload).serialize(mask=mask, extensions=[])
    pos = len(before)
    start, length = frame_header(raw, pos)  # type: ignore[misc]
    assert length == size and start + length == len(raw)
    assert (apply_mask(raw[start:], raw[start - 4:start]) if mask else raw[start:]) == payload
    header = 2 + (2 if 126 <= size < 65536 else 8 if size >= 65536 else 0)
    for cut in range(pos, len(raw)):
        assert frame_header(raw[:cut], pos) == (None if cut - pos < header else (start, length))


class RawSocket:
    """A websocket client that writes frames as raw bytes, cut as the test likes, and reads what the server
    sends through websockets' client protocol. Opened once the server has joined it to the room."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: ClientProtocol) -> None:
        self.reader, self.writer, self.client = reader, writer, client
        self.received: list[Frame] = []

    @classmethod
    async def open(cls, url: str) -> "RawSocket":
        uri = parse_uri(url)
        reader, writer = await asyncio.open_connection(uri.host, uri.port)
        client = ClientProtocol(uri)
        client.send_request(client.connect())
        sock = cls(reader, writer, client)
        writer.write(b"".join(client.data_to_send()))
        await writer.drain()
        await sock.read_until(lambda: client.handshake_exc is not None or client.state is State.OPEN)
        assert client.handshake_exc is None
        await sock.read_until(lambda: any(f.opcode is Opcode.BINARY for f in sock.received))  # joined the room
        return sock

    async def write(self, raw: bytes, chunk: int | None) -> None:
        """Write `raw` in pieces of `chunk` bytes, letting the server read between them."""
        for at in range(0, len(raw), chunk or len(raw)):
            self.writer.write(raw[at:at + (chunk or len(raw))])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def read_until(self, done, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                data = await self.reader.read(65536)
                if not data:
                    self.client.receive_eof()
                    break
                self.client.receive_data(data)
                self.received += [e for e in self.client.events_received() if isinstance(e, Frame)]
        assert done(), self.received

    def close_code(self) -> int | None:
        closes = [Close.parse(f.data).code for f in self.received if f.opcode is Opcode.CLOSE]
        return closes[0] if closes else None

    def close(self) -> None:
        self.writer.close()


def _text_updates(pieces: list[str]) -> tuple[list[bytes], str]:
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    text = doc.get("t", type=Text)
    for piece in pieces:
        text += piece
    return updates, str(text)


def _masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 64], ids=lambda c: f"chunk={c}")
async def test_messages_and_control_frames_arrive_whole_however_the_bytes_are_cut(tmp_path: Path,
                                                                                 chunk: int | None) -> None:
    """Single-frame messages, a message in three fragments with a ping between them, a 16-bit length, an
    unsolicited pong: every update is applied, the ping answered, and the close handshake still works."""
    app, server, task, url = await _serve(tmp_path)
    try:
        sock = await RawSocket.open(f"{url}/room")
        updates, expected = _text_updates(["one ", "two ", "x" * 300, "four"])
        fragmented = p.sync_update(updates[1])
        raw = b"".join([
            _masked(Opcode.BINARY, p.sync_update(updates[0])),
            _masked(Opcode.BINARY, fragmented[:3], fin=False),
            _masked(Opcode.PING, b"hi"),
            _masked(Opcode.CONT, fragmented[3:5], fin=False),
            _masked(Opcode.CONT, fragmented[5:]),
            _masked(Opcode.BINARY, p.sync_update(updates[2])),  # over 125 bytes: a 16-bit length
            _masked(Opcode.PONG, b""),
            _masked(Opcode.BINARY, p.sync_update(updates[3])),
        ])
        await sock.write(raw, chunk)
        room = app.state.rooms.loaded["room"]
        await sock.read_until(lambda: any(f.opcode is Opcode.PONG and f.data == b"hi" for f in sock.received))
        await sock.read_until(lambda: str(room.doc.get("t", type=Text)) == expected)
        await sock.write(_masked(Opcode.CLOSE, Close(1000, "bye").serialize()), chunk)
        await sock.read_until(lambda: sock.close_code() is not None)
        assert sock.close_code() == 1000
        sock.close()
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("frame", [
    Frame(Opcode.BINARY, p.sync_step1(b"\x00")).serialize(mask=False, extensions=[]),  # clients must mask
    _masked(Opcode.BINARY, b"\x00\x00\x01\x00")[:1] + b"\xff" + b"\x7f" * 8,  # claims 2^63 bytes
    _masked(Opcode.CONT, b"\x00"),  # continues nothing
    # a new message before the last one's final fragment
    _masked(Opcode.BINARY, b"\x00", fin=False) + _masked(Opcode.BINARY, b"\x00\x00\x01\x00"),
], ids=["unmasked", "huge-length", "stray-continuation", "message-inside-fragments"])
async def test_a_bad_frame_after_good_ones_is_refused_by_websockets(tmp_path: Path, frame: bytes) -> None:
    app, server, task, url = await _serve(tmp_path, max_message_size=1 << 20)
    try:
        sock = await RawSocket.open(f"{url}/room")
        updates, expected = _text_updates(["kept"])
        await sock.write(_masked(Opcode.BINARY, p.sync_update(updates[0])) + frame, None)
        await sock.read_until(lambda: sock.close_code() is not None)
        assert sock.close_code() == (1009 if b"\x7f" * 8 in frame else 1002)
        room = app.state.rooms.loaded["room"]
        await wait_until(lambda: str(room.doc.get("t", type=Text)) == expected)
        sock.close()
    finally:
        server.should_exit = True
        await task



class _Transport(asyncio.Transport):
    """Just enough of a socket transport for one protocol under test: records writes and reading pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 1234), "peername": ("127.0.0.1", 5678)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("early", [0, 1, 2, 3], ids=lambda n: f"{n}-early-bytes")
async def test_a_frame_begun_before_the_acceptance_is_finished_by_websockets(tmp_path: Path, early: int) -> None:
    """Bytes between the request and the acceptance (a client that does not wait for the 101) are parsed by
    websockets, which may be in the middle of a frame by then: the protocol leaves that connection to it."""
    config = uvicorn.Config(_idle_app, ws="collab_server.transport:CollabWebSocketProtocol", log_config=None)
    config.load()
    protocol = CollabWebSocketProtocol(config, ServerState(), {})
    protocol.connection_made(_Transport())
    client = ClientProtocol(parse_uri("ws://127.0.0.1:1234/room"))
    client.send_request(client.connect())
    protocol.data_received(b"".join(client.data_to_send()))
    messages = [_masked(Opcode.BINARY, bytes([n]) * 200) for n in range(3)]
    raw = b"".join(messages)
    if early:
        protocol.data_received(raw[:early])
    await protocol.send({"type": "websocket.accept"})
    protocol.data_received(raw[early:])
    assert await protocol.queue.get() == {"type": "websocket.connect"}
    assert [(await protocol.queue.get())["bytes"] for _ in range(3)] == [bytes([n]) * 200 for n in range(3)]
    assert protocol.queue.empty()
    assert (protocol._inbound is None) == (early > 0)
    protocol.connection_lost(None)  # leaves the ping rounds: nothing keeps the protocol for later tests
    tasks = list(protocol.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _idle_app(scope, receive, send) -> None:
    await asyncio.Event().wait()


async def test_pings_from_a_peer_that_reads_nothing_do_not_pile_up_answers(tmp_path: Path) -> None:
    """A client sent pings and never read: each pong waited in the server's write buffer (470 MB after 25 s of a
    flood). Once what waits for a peer passes PONG_BACKLOG its pings wait unanswered, so the buffer stays bounded;
    the messages after them are still handled, and the latest ping is answered once the peer reads (a slow client
    whose keepalive went unanswered was closed by its own timeout)."""
    app, server, task, url = await _serve(tmp_path)
    try:
        sock = await RawSocket.open(f"{url}/room")
        ping = _masked(Opcode.PING, b"p" * 125)
        for _ in range(40):  # 100,000 pings: 12.7 MB of pongs, more than the kernel's socket buffers hold
            await sock.write(ping * 2500, None)
        await sock.write(_masked(Opcode.PING, b"latest"), None)
        updates, expected = _text_updates(["after the pings"])
        await sock.write(_masked(Opcode.BINARY, p.sync_update(updates[0])), None)
        room = app.state.rooms.loaded["room"]
        await wait_until(lambda: str(room.doc.get("t", type=Text)) == expected, timeout=30)
        protocol = next(iter(server.server_state.connections))
        assert protocol.transport.get_write_buffer_size() <= PONG_BACKLOG + 1024
        await sock.read_until(lambda: any(f.opcode is Opcode.PONG and f.data == b"latest" for f in sock.received),
                              timeout=30)
        sock.close()
    finally:
        server.should_exit = True
        await task
