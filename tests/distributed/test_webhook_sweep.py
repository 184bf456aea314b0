"""Webhooks with several nodes on one PostgreSQL: one node at a time sweeps for unreported events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pycrdt import Text

from tests.distributed.cluster import Cluster
from tests.rawclient import RawPeer
from tests.serverproc import ServerProcess, wait_until
from tests.webhookreceiver import Receiver

pytestmark = pytest.mark.distributed


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def sweeps(node: ServerProcess, by: str) -> float:
    return node.metric(f'collab_webhook_sweeps_total{{by="{by}"}}')


def ticks(node: ServerProcess) -> float:
    """Sweep intervals the node has seen: sweeps it ran, and those another node led."""
    return sweeps(node, "this") + sweeps(node, "other")


async def both_tick(nodes: list[ServerProcess], times: int) -> None:
    start = [ticks(node) for node in nodes]
    await wait_until(lambda: all(ticks(node) >= before + times for node, before in zip(nodes, start)), 20)


async def test_a_change_found_by_a_sweep_is_sent_by_one_node_only(cluster: Cluster, receiver: Receiver) -> None:
    flags = ("--webhook-url", receiver.url, "--webhook-debounce", "1", "--webhook-sweep-interval", "0.3")
    committer = cluster.start_node("a", *flags)
    writer = await RawPeer.connect(f"{committer.ws_url}/{cluster.room}")
    watcher = await RawPeer.connect(f"{committer.ws_url}/{cluster.room}")
    await asyncio.gather(writer.sync(), watcher.sync())
    await writer.edit(lambda d: d.get("t", type=Text).insert(0, "x"))
    await watcher.wait_for(lambda: str(watcher.doc.get("t", type=Text)) == "x")  # committed: it was broadcast
    committer.kill()  # inside the quiet period: no node ever reports this change live
    assert receiver.events() == []

    receiver.down = True  # each node that sweeps sends the event, and keeps sending it, until it is accepted
    nodes = [cluster.start_node("b", *flags), cluster.start_node("c", *flags)]
    await receiver.wait_for(lambda: receiver.events(cluster.room))
    await both_tick(nodes, 3)
    receiver.down = False
    await receiver.wait_for(lambda: receiver.accepted(cluster.room))
    await both_tick(nodes, 3)
    assert receiver.accepted() == [("document.changed", cluster.room)]
    leaders = [node for node in nodes if sweeps(node, "this") > 0]
    assert len(leaders) == 1

    leader, = leaders
    other, = [node for node in nodes if node is not leader]
    leader.kill()  # its session ends, and its lead with it
    led = sweeps(other, "this")
    await wait_until(lambda: sweeps(other, "this") > led, 20)
