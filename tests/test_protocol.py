import pytest
from hypothesis import given
from hypothesis import strategies as st

from collab_server import protocol as p


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varuint_roundtrip(value: int) -> None:
    reader = p.Reader(p.write_varuint(value))
    assert reader.varuint() == value
    assert reader.at_end()


def test_varuint_matches_lib0_encoding() -> None:
    assert p.write_varuint(0) == b"\x00"
    assert p.write_varuint(127) == b"\x7f"
    assert p.write_varuint(128) == b"\x80\x01"
    assert p.write_varuint(300) == b"\xac\x02"


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"", "truncated varint"),
        (b"\x80", "truncated varint"),
        (b"\xff" * 11, "varint too long"),
        (b"\xff" * 9 + b"\x7f", "varint too long"),  # ten bytes, but more than 64 bits
        (b"\x07", "unknown message type 7"),
        (b"\x00\x05\x00", "unknown sync message type 5"),
        (b"\x00\x02\x05ab", "truncated byte array"),
        (b"\x00\x02\x01a\x00", "trailing bytes"),
        (b"\x02\x00\x02\xff\xfe", "invalid utf-8"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes, error: str) -> None:
    with pytest.raises(p.ProtocolError, match=error):
        p.decode_message(frame)


def test_messages_roundtrip() -> None:
    assert p.decode_message(p.sync_step1(b"\x00")) == p.SyncMessage(p.SyncType.STEP1, b"\x00")
    assert p.decode_message(p.sync_step2(b"ab")) == p.SyncMessage(p.SyncType.STEP2, b"ab")
    assert p.decode_message(p.sync_update(b"xyz")) == p.SyncMessage(p.SyncType.UPDATE, b"xyz")
    assert p.decode_message(p.auth_denied("no")) == p.AuthMessage(True, "no")
    assert p.decode_message(p.query_awareness()) == p.QueryAwarenessMessage()


@given(st.lists(st.tuples(st.integers(0, 2**53 - 1), st.integers(0, 2**32),
                          st.one_of(st.none(), st.dictionaries(st.text(), st.text())))))
def test_awareness_roundtrip(raw) -> None:
    import json

    entries = [p.AwarenessEntry(cid, clock, json.dumps(state)) for cid, clock, state in raw]
    msg = p.decode_message(p.encode_awareness(entries))
    assert isinstance(msg, p.AwarenessMessage)
    assert p.decode_awareness(msg.payload) == entries


def _apply_awareness(held: dict[int, tuple[int, str]], update: bytes) -> None:
    """y-protocols' applyAwarenessUpdate on client id → (clock, state); a removal keeps the clock."""
    for e in p.decode_awareness(update):
        clock, state = held.get(e.client_id, (0, "null"))
        if clock < e.clock or (clock == e.clock and e.removed and state != "null"):
            held[e.client_id] = (e.clock, e.state)


entry_lists = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from(["null", '{"a":1}', '"b"'])),
                       max_size=5)


@given(st.lists(entry_lists, min_size=1, max_size=6), entry_lists)
def test_merged_awareness_updates_leave_any_receiver_as_the_updates_in_order_would(batches, start) -> None:
    updates = [p.encode_awareness_update([p.AwarenessEntry(*e) for e in batch]) for batch in batches]
    in_order: dict[int, tuple[int, str]] = {}
    _apply_awareness(in_order, p.encode_awareness_update([p.AwarenessEntry(*e) for e in start]))
    merged = dict(in_order)
    for update in updates:
        _apply_awareness(in_order, update)
    _apply_awareness(merged, p.merge_awareness_updates(updates))
    assert merged == in_order


def test_awareness_state_must_be_json() -> None:
    bad = p.encode_awareness_update([p.AwarenessEntry(1, 1, "{not json")])
    with pytest.raises(p.ProtocolError, match="not JSON"):
        p.decode_awareness(bad)


@pytest.mark.parametrize("state", ['{"user":NaN}', "Infinity", '[1,-Infinity]'])
def test_awareness_json_javascript_cannot_parse_is_refused(state: str) -> None:
    """Python's json takes NaN and Infinity; every yjs peer it were relayed to would throw in JSON.parse."""
    with pytest.raises(p.ProtocolError, match="not JSON"):
        p.decode_awareness(p.encode_awareness_update([p.AwarenessEntry(1, 1, state)]))
    assert p.decode_awareness(p.encode_awareness_update([p.AwarenessEntry(1, 1, '{"far":1e400,"s":"NaN"}')]))


@pytest.mark.parametrize("client_id, clock", [(2**53, 1), (1, 2**53), (2**63, 0)])
def test_awareness_beyond_what_yjs_peers_can_decode_is_refused(client_id: int, clock: int) -> None:
    """The server relays awareness to yjs peers, whose decoder throws past 2^53 - 1: refused on arrival."""
    update = p.encode_awareness_update([p.AwarenessEntry(client_id, clock, "{}")])
    with pytest.raises(p.ProtocolError, match="beyond 2\\^53"):
        p.decode_awareness(update)
    assert p.decode_awareness(p.encode_awareness_update([p.AwarenessEntry(2**53 - 1, 2**53 - 1, "{}")]))


def test_keepalive_is_an_empty_awareness_update() -> None:
    msg = p.decode_message(p.KEEPALIVE)
    assert isinstance(msg, p.AwarenessMessage)
    assert p.decode_awareness(msg.payload) == []


@given(st.binary(max_size=64))
def test_decoder_only_raises_protocol_error(frame: bytes) -> None:
    try:
        msg = p.decode_message(frame)
    except p.ProtocolError:
        return
    if isinstance(msg, p.AwarenessMessage):
        try:
            p.decode_awareness(msg.payload)
        except p.ProtocolError:
            pass

