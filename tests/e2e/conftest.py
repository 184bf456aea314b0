from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.jspeer import JsPeer, PeerFactory


@pytest.fixture
async def peer() -> AsyncIterator[PeerFactory]:
    """Start real JS peers: `await peer("alice")`, or `await peer("alice", server.ws_url, "room")` to also
    connect and wait until synced. All are closed at the end of the test."""
    started: list[JsPeer] = []

    async def make(name: str, url: str | None = None, room: str | None = None) -> JsPeer:
        p = JsPeer(name)
        started.append(p)
        await p.start()
        if url is not None:
            assert room is not None, "connecting needs a room"
            await p.connect(url, room)
        return p

    yield make
    await asyncio.gather(*(p.close() for p in started))
