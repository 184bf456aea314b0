"""A connection's queue for a peer that is backed up (collab_server/connection.py), in process."""

from __future__ import annotations

import asyncio
import logging

from pycrdt import Doc, Text

from collab_server import protocol as p
from collab_server import connection
from collab_server.connection import Connection
from collab_server.metrics import Metrics


def text_updates(count: int) -> list[bytes]:
    doc = Doc()
    text = doc.get("t", type=Text)
    messages = []
    for i in range(count):
        before = doc.get_state()
        text += str(i)
        messages.append(p.sync_update(doc.get_update(before)))
    return messages


async def test_what_waits_behind_a_slow_send_goes_out_merged_and_unreadable_messages_as_they_were(caplog) -> None:
    sent: list[bytes] = []
    gate = asyncio.Event()

    async def asgi_send(message: dict) -> None:
        await gate.wait()  # the socket is backed up until the gate opens
        sent.append(message["bytes"])

    metrics = Metrics()
    conn = Connection(asgi_send, metrics)  # no frame writer: everything goes through the queue
    first, *rest = text_updates(6)
    conn.send(first)
    await asyncio.sleep(0)  # the drain task takes `first` and waits at the gate
    for message in rest:
        conn.send(message)
    gate.set()
    await asyncio.wait_for(_sent(sent, 2), 5)
    assert sent[0] == first
    replica = Doc()
    for message in sent:
        replica.apply_update(p.decode_message(message).payload)
    assert str(replica.get("t", type=Text)) == "012345"
    assert metrics.registry.get_sample_value("collab_messages_coalesced_total") == 4

    gate.clear()
    unreadable = b"\x00\x02\x03abc"  # not an update: merging fails, and every message still goes out
    conn.send(rest[0])
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="collab_server.connection"):
        conn.send(unreadable)
        conn.send(rest[1])
        gate.set()
        await asyncio.wait_for(_sent(sent, 5), 5)
    assert sent[2:] == [rest[0], unreadable, rest[1]]
    assert "not merged" in caplog.text


async def _sent(sent: list[bytes], count: int) -> None:
    while len(sent) < count:
        await asyncio.sleep(0.01)


async def test_a_queue_over_coalesce_bytes_is_not_merged_on_the_loop(monkeypatch) -> None:
    """Merging a slow peer's whole queue (up to 64 MB) took up to a second of the event loop, every room's, for each
    peer that overflowed: 20 of them held it 22 s. A queue over COALESCE_BYTES overflows without being merged."""
    gate = asyncio.Event()
    merged: list[int] = []

    async def asgi_send(message: dict) -> None:
        await gate.wait()

    real = connection.coalesce
    monkeypatch.setattr(connection, "coalesce", lambda messages: merged.append(sum(map(len, messages)))
                        or real(messages))
    monkeypatch.setattr(connection, "COALESCE_BYTES", 50_000)
    conn = Connection(asgi_send, Metrics(), send_queue_limit=1000, send_queue_bytes=100_000)
    doc = Doc()
    messages = []
    for i in range(30):
        sv = doc.get_state()
        doc.get("t", type=Text).insert(0, str(i % 10) * 5000)
        messages.append(p.sync_update(doc.get_update(sv)))
    conn.send(messages[0])
    await asyncio.sleep(0)  # the drain task takes it and waits at the gate
    for message in messages[1:]:
        conn.send(message)
    assert conn.close_code == 1013
    assert merged == []
    small = Connection(asgi_send, Metrics(), send_queue_limit=3)
    for message in text_updates(5):  # a few small messages over the count limit are still merged
        small.send(message)
    assert small.close_code is None and merged
    gate.set()
