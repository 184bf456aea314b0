#!/usr/bin/env python3
"""Server CPU per keystroke: typing into a block document's `content` Text against typing into a plain Text.

    .venv/bin/python benchmarks/block_typing.py [--rooms 10] [--keys 3000] [--repeat 3]

Our server only (the others have no block model or status resolver): it starts collab_server on a free port
with a scratch database, seeds each room with a document (50 blocks with 3 index entries each, or one Text of
the same length), then sends every room's keystrokes (one update per character, made beforehand by a pycrdt
replica) as fast as the socket takes them and waits until the server has answered a sync request sent after
the last one. The figure is the server process's CPU time (user + system, from /proc) over that span, divided
by the keystrokes. The clients' own work is not counted, so Python clients do not distort it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pycrdt import Doc, Text
from websockets.asyncio.client import ClientConnection, connect

from collab_server import protocol as p
from collab_server.model import add_index_entry, block_content, create_block, set_status

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port  # noqa: E402  (benchmarks/run.py)

PARAGRAPH = "hello world " * 5


def seed(kind: str) -> Doc:
    doc = Doc()
    if kind == "blocks":
        for b in range(50):
            create_block(doc, f"b{b}", "paragraph", PARAGRAPH)
            for e in range(3):
                add_index_entry(doc, f"b{b}", f"idx{e}")
                set_status(doc, f"b{b}", f"idx{e}", "processing")
    else:
        doc.get("t", type=Text).insert(0, PARAGRAPH * 50)
    return doc


def keystrokes(source: Doc, kind: str, keys: int) -> list[bytes]:
    """`keys` one-character updates typed in the middle of one paragraph by a replica of `source`."""
    replica = Doc()
    replica.apply_update(source.get_update())
    updates: list[bytes] = []
    replica.observe(lambda event: updates.append(event.update))
    text = block_content(replica, "b7") if kind == "blocks" else replica.get("t", type=Text)
    for _ in range(keys):
        text.insert(len(text) // 2, "x")
    return updates


async def synced(ws: ClientConnection) -> None:
    """Ask for the document and wait for the answer: the server answers after what was sent before."""
    await ws.send(p.sync_step1(b"\x00"))
    while True:
        msg = p.decode_message(await ws.recv())
        if isinstance(msg, p.SyncMessage) and msg.kind == p.SyncType.STEP2:
            return


async def cpu_per_key(port: int, pid: int, kind: str, rooms: int, keys: int, run: int) -> float:
    source = seed(kind)
    typed = keystrokes(source, kind, keys)
    conns = []
    for i in range(rooms):
        ws = await connect(f"ws://127.0.0.1:{port}/{kind}-{run}-{i}", max_size=None)
        await ws.send(p.sync_update(source.get_update()))
        await synced(ws)  # also consumes the server's SyncStep1 and the answer to nothing asked yet
        await synced(ws)
        conns.append(ws)

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def type_into(ws: ClientConnection) -> None:
        for update in typed:
            await ws.send(p.sync_update(update))
        await synced(ws)

    before = cpu()
    await asyncio.gather(*(type_into(ws) for ws in conns))
    spent = cpu() - before
    for ws in conns:
        await ws.close()
    return spent / (rooms * keys) * 1e6


async def up(port: int) -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit("the server did not start")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--keys", type=int, default=3000, help="keystrokes per room")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        server = subprocess.Popen([sys.executable, "-m", "collab_server", "serve", "--port", str(port),
                                   "--db", str(Path(scratch) / "bench.db"), "--log-level", "warning"], cwd=ROOT)
        try:
            await up(port)
            figures: dict[str, list[float]] = {"text": [], "blocks": []}
            for run in range(args.repeat):
                for kind in figures:
                    figures[kind].append(await cpu_per_key(port, server.pid, kind, args.rooms, args.keys, run))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.rooms} rooms × {args.keys} keystrokes, {args.repeat} repeats (median, range):")
    for kind, values in figures.items():
        label = "plain Text" if kind == "text" else "block document (50 blocks × 3 index entries)"
        print(f"  {label:46} {statistics.median(values):6.1f} µs of server CPU per keystroke "
              f"({min(values):.1f}–{max(values):.1f})")


if __name__ == "__main__":
    started = time.monotonic()
    asyncio.run(main())
    print(f"({time.monotonic() - started:.0f} s)")
