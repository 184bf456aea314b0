"""Pure encode/decode of y-websocket messages (y-protocols sync + awareness); no I/O.

Every decoder raises :class:`ProtocolError` on malformed input, never anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum

MAX_VARUINT_BYTES = 10  # 64 bits / 7 bits per byte
MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer a yjs client (JavaScript, lib0) decodes


class ProtocolError(ValueError):
    """A message does not follow the y-websocket wire format."""


class MessageType(IntEnum):
    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3


class SyncType(IntEnum):
    STEP1 = 0
    STEP2 = 1
    UPDATE = 2


_SYNC_TYPES = tuple(SyncType)  # by value: indexing is ~30 times cheaper than calling the enum


def write_varuint(value: int) -> bytes:
    """Encode a non-negative integer as a lib0 varUint."""
    if value < 0:
        raise ValueError("varuint must be non-negative")
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def write_bytes(data: bytes) -> bytes:
    """Encode a lib0 varUint8Array (length prefix + bytes)."""
    return write_varuint(len(data)) + data


class Reader:
    """A cursor over a message that raises ProtocolError on truncated or oversized fields."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varuint(self) -> int:
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80:  # one byte: message types and most lengths
            self.pos = pos + 1
            return data[pos]
        value = shift = 0
        for pos in range(pos, min(pos + MAX_VARUINT_BYTES, len(data))):
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value >> 64:  # a tenth byte can carry more than 64 bits; encoded again it would take 11
                    raise ProtocolError("varint too long")
                self.pos = pos + 1
                return value
            shift += 7
        raise ProtocolError("truncated varint" if len(data) - self.pos < MAX_VARUINT_BYTES else "varint too long")

    def bytes(self) -> bytes:
        length = self.varuint()
        end = self.pos + length
        if end > len(self.data):
            raise ProtocolError(f"truncated byte array: need {length} bytes, have {len(self.data) - self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def string(self) -> str:
        try:
            return self.bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("invalid utf-8 string") from exc

    def at_end(self) -> bool:
        return self.pos >= len(self.data)


@dataclass(frozen=True, slots=True)
class SyncMessage:
    kind: SyncType
    payload: bytes  # state vector for STEP1, a v1 update otherwise


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    payload: bytes  # the encoded awareness update (see decode_awareness)


@dataclass(frozen=True, slots=True)
class AuthMessage:
    denied: bool
    reason: str


@dataclass(frozen=True, slots=True)
class QueryAwarenessMessage:
    pass


Message = SyncMessage | AwarenessMessage | AuthMessage | QueryAwarenessMessage


def decode_message(data: bytes) -> Message:
    """Decode one y-websocket frame. Trailing bytes after the message are an error."""
    reader = Reader(data)
    kind = reader.varuint()
    msg: Message
    if kind == MessageType.SYNC:
        sub = reader.varuint()
        if sub not in (0, 1, 2):
            raise ProtocolError(f"unknown sync message type {sub}")
        msg = SyncMessage(_SYNC_TYPES[sub], reader.bytes())
    elif kind == MessageType.AWARENESS:
        msg = AwarenessMessage(reader.bytes())
    elif kind == MessageType.AUTH:
        denied = reader.varuint() == 0
        msg = AuthMessage(denied, reader.string())
    elif kind == MessageType.QUERY_AWARENESS:
        msg = QueryAwarenessMessage()
    else:
        raise ProtocolError(f"unknown message type {kind}")
    if not reader.at_end():
        raise ProtocolError(f"{len(data) - reader.pos} trailing bytes after message")
    return msg


def is_update(data: bytes) -> bool:
    """Whether frame `data` is (or claims to be) a document update: SyncStep2 or Update."""
    return data[:2] in _UPDATE_PREFIXES


_UPDATE_PREFIXES = (bytes((MessageType.SYNC, SyncType.STEP2)), bytes((MessageType.SYNC, SyncType.UPDATE)))


def sync_step1(state_vector: bytes) -> bytes:
    return bytes((MessageType.SYNC, SyncType.STEP1)) + write_bytes(state_vector)


def sync_step2(update: bytes) -> bytes:
    return bytes((MessageType.SYNC, SyncType.STEP2)) + write_bytes(update)


def sync_update(update: bytes) -> bytes:
    return bytes((MessageType.SYNC, SyncType.UPDATE)) + write_bytes(update)


def auth_denied(reason: str) -> bytes:
    return bytes((MessageType.AUTH, 0)) + write_bytes(reason.encode("utf-8"))


def query_awareness() -> bytes:
    return bytes((MessageType.QUERY_AWARENESS,))


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client_id: int
    clock: int
    state: str  # JSON text; "null" means the client is gone

    @property
    def removed(self) -> bool:
        return self.state == "null"


def awareness_size(payload: bytes) -> int:
    """How many entries an awareness update says it holds, read without decoding them."""
    return Reader(payload).varuint()


def decode_awareness(payload: bytes, *, check_json: bool = True) -> list[AwarenessEntry]:
    """Decode an awareness update; the JSON of each state must parse (unless decoded and checked before)."""
    reader = Reader(payload)
    count = reader.varuint()
    entries = []
    for _ in range(count):
        client_id = reader.varuint()
        clock = reader.varuint()
        if client_id > MAX_SAFE_INTEGER or clock > MAX_SAFE_INTEGER:
            # relayed to yjs peers, whose decoder (lib0) throws on integers past 2^53 - 1
            raise ProtocolError("awareness client id or clock beyond 2^53 - 1")
        entries.append(AwarenessEntry(client_id, clock, reader.string()))
    if not reader.at_end():
        raise ProtocolError("trailing bytes after awareness update")
    if check_json:
        check_awareness_json(entries)
    return entries


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Python's json takes NaN, Infinity and -Infinity; JavaScript's JSON.parse throws on them (1e400 it takes)
_JSON = json.JSONDecoder(parse_constant=_no_constant)


def check_awareness_json(entries: list[AwarenessEntry]) -> None:
    """Raise ProtocolError unless every state is JSON that JavaScript's JSON.parse takes (yjs peers parse what
    the server relays)."""
    for entry in entries:
        try:
            _JSON.decode(entry.state)
        except ValueError as exc:
            raise ProtocolError("awareness state is not JSON") from exc
        except RecursionError as exc:
            raise ProtocolError("awareness state nests too deep") from exc


def keep_newest(presence: dict[int, AwarenessEntry], entries: list[AwarenessEntry]) -> None:
    """Fold `entries` into `presence` (client id → entry) as applying them in order would leave it: a higher
    clock wins, and a removal wins a tie of clocks (as in y-protocols)."""
    for entry in entries:
        held = presence.get(entry.client_id)
        if held is None or entry.clock > held.clock or (entry.clock == held.clock and entry.removed):
            presence[entry.client_id] = entry


def merge_awareness_updates(updates: list[bytes]) -> bytes:
    """One awareness update holding each client's newest entry among `updates` (decoded before, so valid)."""
    presence: dict[int, AwarenessEntry] = {}
    for update in updates:
        keep_newest(presence, decode_awareness(update, check_json=False))
    return encode_awareness_update(list(presence.values()))


def encode_awareness_update(entries: list[AwarenessEntry]) -> bytes:
    """Encode awareness entries as an awareness update (the payload of a type-1 message)."""
    body = bytearray(write_varuint(len(entries)))
    for entry in entries:
        body += write_varuint(entry.client_id)
        body += write_varuint(entry.clock)
        body += write_bytes(entry.state.encode("utf-8"))
    return bytes(body)


def awareness_message(update: bytes) -> bytes:
    """Wrap an encoded awareness update in a type-1 message."""
    return bytes((MessageType.AWARENESS,)) + write_bytes(update)


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    """Encode awareness entries as a complete type-1 message."""
    return awareness_message(encode_awareness_update(entries))


KEEPALIVE = encode_awareness([])
"""An awareness message with no entries: resets client inactivity timers, changes nothing."""
