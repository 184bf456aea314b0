"""A bare y-websocket peer for server tests: raw frames in, decoded messages out, a pycrdt Doc kept in sync."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from collab_server import protocol as p
from collab_server.surrogates import Characters


class RawPeer:
    def __init__(self, ws: ClientConnection, client_id: int | None = None) -> None:
        self.ws = ws
        self.doc = Doc() if client_id is None else Doc(client_id=client_id)
        self.messages: list[p.Message] = []
        self.awareness: dict[int, str] = {}
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, url: str, client_id: int | None = None, **kwargs) -> "RawPeer":
        return cls(await connect(url, max_size=None, **kwargs), client_id)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                msg = p.decode_message(frame)
                if isinstance(msg, p.SyncMessage) and msg.kind != p.SyncType.STEP1:
                    self.doc.apply_update(msg.payload)
                elif isinstance(msg, p.AwarenessMessage):
                    for entry in p.decode_awareness(msg.payload):
                        if entry.removed:
                            self.awareness.pop(entry.client_id, None)
                        else:
                            self.awareness[entry.client_id] = entry.state
                async with self._changed:
                    self.messages.append(msg)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def waiter() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or self.closed.is_set())
        await asyncio.wait_for(waiter(), timeout)
        assert predicate(), "connection closed before the condition held"

    def edit_offline(self, change: Callable[[Doc], object]) -> bytes:
        """Make a local change without sending it; returns its update for later."""
        updates: list[bytes] = []
        subscription = self.doc.observe(lambda event: updates.append(event.update))
        try:
            with self.doc.transaction():
                change(self.doc)
        finally:
            self.doc.unobserve(subscription)
        return updates[0] if updates else b"\x00\x00"

    async def edit(self, change: Callable[[Doc], object]) -> None:
        """Make a local change and send it to the server."""
        await self.send(p.sync_update(self.edit_offline(change)))

    async def send(self, frame: bytes | str) -> None:
        await self.ws.send(frame)

    async def sync(self, timeout: float = 10.0) -> None:
        """Send SyncStep1 and wait for the server's SyncStep2 answer."""
        seen = sum(1 for m in self.messages if isinstance(m, p.SyncMessage) and m.kind == p.SyncType.STEP2)
        await self.send(p.sync_step1(self.doc.get_state()))
        await self.wait_for(lambda: sum(
            1 for m in self.messages if isinstance(m, p.SyncMessage) and m.kind == p.SyncType.STEP2) > seen, timeout)

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.ws.close_code, self.ws.close_reason or ""

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def text_updates(count: int, name: str = "t", client_id: int | None = None) -> tuple[Doc, list[bytes]]:
    """A doc with `count` one-character inserts into Text `name`, and the update of each insert (by a random
    client, or `client_id`)."""
    doc = Doc(client_id=client_id) if client_id is not None else Doc()
    text = doc.get(name, type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for i in range(count):
        text += chr(ord("a") + i % 26)
    return doc, updates


def slow_text(count: int) -> Doc:
    """A document whose text is slow to integrate (collab_server/slicing.py): `count` characters, each typed before
    the last, which cannot join."""
    doc = Doc()
    text = doc.get("t", type=Text)
    for i in range(count):
        text.insert(0, "é" if i % 2 else "x")
    return doc


def state_vector(doc: Doc) -> dict[int, int]:
    """A document's state vector as {client id: clock}, without clients at clock 0 (the same as absent): its
    encoding lists clients in hash order."""
    reader = p.Reader(doc.get_state())
    clocks = dict((reader.varuint(), reader.varuint()) for _ in range(reader.varuint()))
    return {client: clock for client, clock in clocks.items() if clock}


def second_unit(doc: Doc) -> tuple[int, int]:
    """(client, clock) of the second UTF-16 unit of the one character beyond the BMP in `doc`'s text."""
    characters = Characters()
    characters.add(doc.get_update())
    [(client, clocks)] = characters.seconds.items()
    [clock] = clocks
    return client, clock


def deletion(client: int, clock: int, length: int = 1) -> bytes:
    """The update a Yjs client sends deleting `length` units from (`client`, `clock`): no structs, one range in
    its delete set. pycrdt cannot make one that cuts a character between its two UTF-16 units."""
    return b"\x00\x01" + p.write_varuint(client) + b"\x01" + p.write_varuint(clock) + p.write_varuint(length)


def two_changes(first: str, position: int, second: str) -> tuple[bytes, bytes]:
    """The update inserting `first` into Text "t", and the one inserting `second` at `position` after it (which
    needs it)."""
    from pycrdt import Text

    doc, updates = Doc(), []
    doc.observe(lambda event: updates.append(event.update))
    doc.get("t", type=Text).insert(0, first)
    doc.get("t", type=Text).insert(position, second)
    return updates[0], updates[1]

def two_waiting_on_one() -> tuple[list[bytes], list[bytes], bytes, str]:
    """Two writers' changes of which two wait on the same change `a0`: writer B types "b", then "c" before it;
    writer A, not having heard of B, types "a"; A hears of B and types "d" at the start (a1, after a gap in A's
    clocks until a0); B hears of A and types "e" between "b" and "a" (b2, next to a0). Returns B's first two
    changes, the two that wait on a0 (b2, a1), a0, and the text of all of them."""
    from pycrdt import Text

    a, b = Doc(client_id=3), Doc(client_id=1)
    made: dict[int, list[bytes]] = {3: [], 1: []}
    for doc in (a, b):
        doc.observe(lambda event, doc=doc: made[doc.client_id].append(event.update))
    text_a, text_b = a.get("t", type=Text), b.get("t", type=Text)
    text_b.insert(0, "b")
    text_b.insert(0, "c")
    text_a.insert(0, "a")
    a.apply_update(b.get_update(a.get_state()))
    text_a.insert(0, "d")
    b.apply_update(a.get_update(b.get_state()))
    text_b.insert(3, "e")
    a0, _, a1 = made[3]
    b0, b1, _, b2 = made[1]
    return [b0, b1], [b2, a1], a0, str(text_b)


def whole_and_cut() -> tuple[bytes, bytes]:
    """The same clocks twice: "X😀Y" typed by client 7 (the emoji whole, as a node's write holds it), and the
    state of a document that then had the emoji's second UTF-16 unit deleted (cut in two, "X\ufffdY", as a
    catch-up or a client's copy holds it)."""
    from pycrdt import Text

    from collab_server.replay import apply

    source = Doc(client_id=7)
    source.get("t", type=Text).insert(0, "X😀Y")
    whole = source.get_update()
    doc, characters = Doc(client_id=9), Characters()
    for update in (whole, deletion(7, 2)):
        doc = apply(doc, update, characters)
    return whole, doc.get_update()


def cut_before_it_came() -> tuple[list[bytes], list[bytes], bytes, str]:
    """A change (client 7 types "X😀Y" into "ab") that needs the one before it (typing "ab"), and two changes that
    cut its emoji between its two UTF-16 units, which need it in turn: client 9 types "Q" there, and the emoji's
    second unit is deleted. As two_waiting_on_one: nothing before them, the three that wait, the change they
    wait on, and the text Yjs makes of them all."""
    from pycrdt import Text

    doc, updates = Doc(client_id=7), []
    doc.observe(lambda event: updates.append(event.update))
    doc.get("t", type=Text).insert(0, "ab")
    doc.get("t", type=Text).insert(1, "X😀Y")  # a 0, b 1, X 2, the emoji 3-4, Y 5
    return [], [updates[1], typed_between(9, 0, (7, 4), "Q"), deletion(7, 4)], updates[0], "aX\ufffdQYb"


def cut_past_a_gap() -> tuple[list[bytes], list[bytes], bytes, str]:
    """Client 2 types "pq" before client 1's "x", then an emoji after it; the emoji comes first and is cut (its
    second unit deleted) before "pq" comes. Yjs holds the emoji back until then; yrs integrates it at once
    (its origin "x" is there) past the gap in client 2's clocks, yet reports it held back. As
    two_waiting_on_one: the "x", the emoji and its cut, the "pq", and the text Yjs makes of them."""
    from pycrdt import Text

    one, two = Doc(client_id=1), Doc(client_id=2)
    one.get("t", type=Text).insert(0, "x")
    two.apply_update(one.get_update())
    updates: list[bytes] = []
    two.observe(lambda event: updates.append(event.update))
    two.get("t", type=Text).insert(0, "pq")
    two.get("t", type=Text).insert(3, "😀")  # pycrdt counts UTF-8 bytes: after the "x"
    return [one.get_update()], [updates[1], deletion(2, 3)], updates[0], "pqx\ufffd"


def typed_between(client: int, clock: int, second: tuple[int, int], text: str) -> bytes:
    """The update a Yjs client sends typing BMP `text` at (`client`, `clock`) between the two UTF-16 units of a
    character whose second unit is `second`: the first unit its origin, the second its right origin. pycrdt cannot
    make it."""
    origin, unit = second
    data = text.encode()
    fields = (1, 1, client, clock)  # one client, one struct
    return (b"".join(map(p.write_varuint, fields)) + b"\xc4"  # an item of text with both origins
            + b"".join(map(p.write_varuint, (origin, unit - 1, origin, unit, len(data)))) + data + b"\x00")


def typed_and_cut(count: int) -> list[bytes]:
    """A Yjs client's messages typing an emoji and then, in its next message, a character between its two UTF-16
    units, `count` times (each pair at the end of the text)."""
    from pycrdt import Text

    from collab_server.replay import Replay

    writer = Replay(Doc(client_id=5))
    messages: list[bytes] = []
    for _ in range(count):
        text = writer.doc.get("t", type=Text)  # a cut rebuilds the writer's document
        before = writer.doc.get_state()
        text.insert(len(str(text).encode()), "😀")  # pycrdt counts UTF-8 bytes
        messages.append(writer.doc.get_update(before))
        writer.characters.add(messages[-1])
        second = max(_seconds(writer.doc), key=lambda point: point[1])
        cut = typed_between(5, second[1] + 1, second, "x")
        writer.apply(cut)
        messages.append(cut)
    return messages


def _seconds(doc: Doc) -> list[tuple[int, int]]:
    """(client, clock) of the second UTF-16 unit of each character beyond the BMP in `doc`'s text."""
    characters = Characters()
    characters.add(doc.get_update())
    return [(client, clock) for client, clocks in characters.seconds.items() for clock in clocks]


async def non_reader(url: str, path: str) -> socket.socket:
    """A websocket client that asks for the document (SyncStep1) and then reads nothing, with a small receive
    buffer: a frozen tab, a stopped process."""
    host, port = url.removeprefix("ws://").split(":")
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    await loop.sock_sendall(sock, Frame(Opcode.BINARY, p.sync_step1(b"\x00")).serialize(mask=True, extensions=[]))
    return sock


async def text_writer(url: str, chars: int) -> RawPeer:
    """A peer that wrote a text of `chars` characters to the room at `url`, and synced."""
    writer = await RawPeer.connect(url)
    doc = Doc()
    doc.get("t", type=Text).insert(0, "x" * chars)
    await writer.send(p.sync_update(doc.get_update()))
    await writer.sync()
    return writer
