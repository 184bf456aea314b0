"""Webhooks against a real receiver: debounced change events, signatures, retries, deletes and shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pycrdt import Text

from collab_server import webhooks
from collab_server.metrics import Metrics
from collab_server.storage.sqlite import SQLiteStore
from tests.rawclient import RawPeer, text_updates
from tests.serverproc import wait_until
from tests.webhookreceiver import Receiver

SECRET = "hook-secret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def hooked(server_factory, receiver: Receiver, *flags: str):
    return server_factory("--webhook-url", receiver.url, "--webhook-secret", SECRET, *flags)


async def edit(peer: RawPeer, text: str) -> None:
    await peer.edit(lambda d: d.get("t", type=Text).insert(0, text))


async def test_a_burst_of_changes_is_one_signed_event_once_the_document_is_quiet(server_factory,
                                                                                 receiver: Receiver) -> None:
    server = hooked(server_factory, receiver, "--webhook-debounce", "0.3")
    peer = await RawPeer.connect(f"{server.ws_url}/team/notes")
    await peer.sync()
    for i in range(30):
        await edit(peer, str(i % 10))
    await peer.wait_for(lambda: len(str(peer.doc.get("t", type=Text))) == 30)
    await receiver.wait_for(lambda: receiver.events("team/notes"))
    delivery = receiver.posts[0]
    assert delivery.event["event"] == "document.changed" and abs(delivery.event["time"] - time.time()) < 60
    assert delivery.headers["x-collab-event"] == "document.changed"
    expected = "sha256=" + hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(delivery.headers["x-collab-signature"], expected)

    other = await RawPeer.connect(f"{server.ws_url}/later")  # a later burst elsewhere, as a clock
    await other.sync()
    await edit(other, "x")
    await receiver.wait_for(lambda: receiver.events("later"))
    assert len(receiver.events("team/notes")) == 1  # the whole burst, once
    assert server.metric("collab_webhooks_delivered_total") == 2


async def test_a_document_that_keeps_changing_is_reported_every_max_wait(server_factory,
                                                                         receiver: Receiver) -> None:
    server = hooked(server_factory, receiver, "--webhook-debounce", "0.4", "--webhook-max-wait", "0.6")
    peer = await RawPeer.connect(f"{server.ws_url}/busy")
    await peer.sync()
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # never quiet for the debounce
        await edit(peer, "x")
        await asyncio.sleep(0.1)
    assert len(receiver.events("busy")) >= 2  # not one event at the very end


async def test_a_failing_receiver_is_retried_and_deletes_are_reported(server_factory, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    server = hooked(server_factory, receiver, "--webhook-debounce", "0.1")
    peer = await RawPeer.connect(f"{server.ws_url}/flaky")
    await peer.sync()
    await edit(peer, "x")
    await receiver.wait_for(lambda: server.metric("collab_webhooks_delivered_total") == 1)
    assert [e["event"] for e in receiver.events("flaky")] == ["document.changed"] * 3  # two failures, a success
    assert len({d.body for d in receiver.posts}) == 1  # the same event each time

    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.delete("/api/docs/flaky")).status_code == 204
        assert (await http.delete("/api/docs/never-existed")).status_code == 404
    await receiver.wait_for(lambda: len(receiver.events()) == 4)
    assert receiver.events()[-1]["event"] == "document.deleted" and receiver.events()[-1]["document"] == "flaky"
    assert server.metric('collab_errors_total{kind="webhook"}') == 0


async def test_shutdown_sends_what_waits_for_its_quiet_period(server_factory, receiver: Receiver) -> None:
    server = hooked(server_factory, receiver, "--webhook-debounce", "60")
    peer = await RawPeer.connect(f"{server.ws_url}/late")
    await peer.sync()
    await edit(peer, "x")
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == "x")  # committed (echoed)
    assert receiver.events() == []
    await asyncio.to_thread(server.stop)
    assert [(e["event"], e["document"]) for e in receiver.events()] == [("document.changed", "late")]


async def test_an_unreachable_receiver_is_counted_and_never_disturbs_editing(server_factory) -> None:
    server = server_factory("--webhook-url", "http://127.0.0.1:9/unreachable", "--webhook-debounce", "0")
    peer = await RawPeer.connect(f"{server.ws_url}/doc")
    await peer.sync()
    await edit(peer, "x")
    deadline = time.monotonic() + 15
    while server.metric('collab_errors_total{kind="webhook"}') < 1:  # four attempts, 3.5 s of backoff
        assert time.monotonic() < deadline, "the failed delivery was not counted"
        await asyncio.sleep(0.05)
    await edit(peer, "y")
    await peer.wait_for(lambda: str(peer.doc.get("t", type=Text)) == "yx")


async def in_process(tmp_path: Path, answer: Callable, *docs: str) -> tuple[SQLiteStore, webhooks.Webhooks]:
    """Webhooks (debounce 0) on a fresh SQLite store holding a change to each of `docs`, POSTing to `answer`."""
    store = SQLiteStore(str(tmp_path / "hooks.db"))
    await store.open()
    for doc in docs:
        await store.submit(doc, text_updates(1)[1][0])
    hooks = webhooks.Webhooks("http://receiver/hook", store, Metrics(), debounce=0)
    await hooks.open()
    hooks._client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return store, hooks


async def test_a_document_s_events_arrive_in_order_and_a_deletion_cancels_a_change_being_retried(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The receiver fails the change event, and the document is deleted before the retry: the receiver saw
    `changed` (failed), `deleted`, then `changed` again, and a consumer taking them in order believed the document
    existed. Now the retry is cancelled; and a document's events never overtake each other."""
    monkeypatch.setattr(webhooks, "RETRY_DELAY", 0.05)
    posted: list[tuple[str, str]] = []
    failed_once = asyncio.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        event = json.loads(request.content)
        posted.append((event["event"], event["document"]))
        if len(posted) == 1:
            failed_once.set()
            return httpx.Response(500)
        return httpx.Response(204)

    store, hooks = await in_process(tmp_path, answer, "doc", "other")
    hooks.changed("doc")
    await asyncio.wait_for(failed_once.wait(), 10)
    hooks.changed("doc")  # a second change event, waiting on the first, which is being retried
    while "doc" in hooks._pending:  # it fires after its debounce of 0
        await asyncio.sleep(0)
    hooks.deleted("doc")
    hooks.changed("other")
    await asyncio.sleep(0)  # the change event of "other" fires after its debounce of 0
    await hooks.close(timeout=10)
    await store.close()
    assert [event for event in posted if event[1] == "doc"] == [("document.changed", "doc"),
                                                               ("document.deleted", "doc")]
    assert ("document.changed", "other") in posted


def sweeps(server) -> float:
    """Sweeps the server ran so far."""
    return server.metric('collab_webhook_sweeps_total{by="this"}')


async def edit_committed(server, doc: str, text: str) -> None:
    """Insert `text` in `doc` and wait until it is committed: another peer receives a change only then."""
    writer = await RawPeer.connect(f"{server.ws_url}/{doc}")
    watcher = await RawPeer.connect(f"{server.ws_url}/{doc}")
    await asyncio.gather(writer.sync(), watcher.sync())
    await edit(writer, text)
    await watcher.wait_for(lambda: text in str(watcher.doc.get("t", type=Text)))
    await asyncio.gather(writer.close(), watcher.close())


async def test_a_change_committed_just_before_a_kill_is_reported_after_the_restart(server_factory,
                                                                                   receiver: Receiver) -> None:
    flags = ("--webhook-debounce", "2", "--webhook-sweep-interval", "0.2")
    server = hooked(server_factory, receiver, *flags)
    await edit_committed(server, "crashed", "x")
    server.kill()  # inside the quiet period: the event was only scheduled
    assert receiver.events() == []
    restarted = hooked(server_factory, receiver, *flags)
    await receiver.wait_for(lambda: receiver.accepted("crashed"))
    assert receiver.accepted() == [("document.changed", "crashed")]
    done = sweeps(restarted)
    await wait_until(lambda: sweeps(restarted) >= done + 3)
    assert receiver.accepted() == [("document.changed", "crashed")]  # recorded: later sweeps send it no more


async def test_a_deletion_never_delivered_before_a_kill_is_reported_after_the_restart(server_factory,
                                                                                      receiver: Receiver) -> None:
    flags = ("--webhook-debounce", "0.1", "--webhook-sweep-interval", "0.2")
    server = hooked(server_factory, receiver, *flags)
    receiver.down = True
    await edit_committed(server, "doomed", "x")
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.delete("/api/docs/doomed")).status_code == 204
    await receiver.wait_for(lambda: ("document.deleted" in [e["event"] for e in receiver.events("doomed")]))
    server.kill()  # while the deletion is being retried
    assert receiver.accepted() == []
    receiver.down = False
    hooked(server_factory, receiver, *flags)
    await receiver.wait_for(lambda: receiver.accepted("doomed"))
    assert receiver.accepted() == [("document.deleted", "doomed")]  # no change event for a document deleted since


async def test_a_change_is_reported_once_a_receiver_down_past_every_retry_is_back(server_factory,
                                                                                 receiver: Receiver) -> None:
    server = hooked(server_factory, receiver, "--webhook-debounce", "0.1", "--webhook-sweep-interval", "0.5")
    receiver.down = True
    await edit_committed(server, "patient", "x")
    await wait_until(lambda: server.metric('collab_errors_total{kind="webhook"}') >= 1, 30)  # every attempt failed
    receiver.down = False
    await receiver.wait_for(lambda: receiver.accepted("patient"), 30)
    done = sweeps(server)
    await wait_until(lambda: sweeps(server) >= done + 3)
    assert receiver.accepted() == [("document.changed", "patient")]


async def test_turning_webhooks_on_over_a_database_sends_nothing_for_its_documents(server_factory,
                                                                                    receiver: Receiver) -> None:
    server = server_factory()
    for name in ("old", "older"):
        await edit_committed(server, name, name)
    await asyncio.to_thread(server.stop)
    server = hooked(server_factory, receiver, "--webhook-debounce", "0", "--webhook-sweep-interval", "0.2")
    await wait_until(lambda: sweeps(server) >= 2)
    await edit_committed(server, "new", "y")  # a change after, as a clock
    await receiver.wait_for(lambda: receiver.accepted("new"))
    done = sweeps(server)
    await wait_until(lambda: sweeps(server) >= done + 2)
    assert [(e["event"], e["document"]) for e in receiver.events()] == [("document.changed", "new")]


async def test_a_document_has_at_most_one_change_event_waiting_behind_the_one_being_sent(tmp_path: Path) -> None:
    """A receiver that does not answer held one task per change event fired meanwhile (every max_wait while the
    document kept changing): now the one waiting reads the document's time when its turn comes, for all of them."""
    release = asyncio.Event()
    posted: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content)["event"])
        await release.wait()
        return httpx.Response(204)

    store, hooks = await in_process(tmp_path, answer, "doc")
    for _ in range(20):
        hooks.changed("doc")
        while "doc" in hooks._pending:  # it fires after its debounce of 0
            await asyncio.sleep(0)
    assert len(hooks._running["doc"]) == 2
    release.set()
    await hooks.close(timeout=10)
    await store.close()
    assert posted == ["document.changed"] * 2


async def test_a_sweep_posts_a_few_events_at_a_time(tmp_path: Path) -> None:
    """A sweep sent its 1,000 events at once: httpx's pool timed out nearly all of them and its bookkeeping took the
    CPU (the event loop held up for 6-47 s). POSTs now go POSTS_AT_ONCE at a time."""
    release = asyncio.Event()
    in_flight, most = 0, 0
    accepted: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        accepted.append(json.loads(request.content)["document"])
        return httpx.Response(204)

    store, hooks = await in_process(tmp_path, answer)
    for i in range(40):  # changes no live event reported (webhooks were off, or the node was killed)
        await store.submit(f"doc{i}", text_updates(1)[1][0])
    await hooks._sweep()
    while in_flight < webhooks.POSTS_AT_ONCE:
        await asyncio.sleep(0.01)
    release.set()
    await hooks.close(timeout=10)
    await store.close()
    assert most == webhooks.POSTS_AT_ONCE and sorted(accepted) == sorted(f"doc{i}" for i in range(40))


async def test_a_swept_deletion_comes_before_the_change_of_the_document_made_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A document deleted and made again while the receiver failed: the sweep skipped the deletion while the new
    document's change event was retried, so the receiver got that change, then the older deletion, and believed
    the document gone until the next sweep. The deletion now goes first, and the change after it."""
    monkeypatch.setattr(webhooks, "RETRY_DELAY", 0.2)
    accepted: list[str] = []
    failing = True

    def answer(request: httpx.Request) -> httpx.Response:
        if failing:
            return httpx.Response(503)
        accepted.append(json.loads(request.content)["event"])
        return httpx.Response(204)

    store, hooks = await in_process(tmp_path, answer, "doc")
    await store.delete("doc")  # its deletion event was lost (say, the node was killed): the mark says so
    await store.submit("doc", text_updates(1)[1][0])  # made again
    hooks.changed("doc")
    while "doc" not in hooks._running:  # the change event is being sent, and retried
        await asyncio.sleep(0)
    await hooks._sweep()
    failing = False
    await hooks.close(timeout=10)
    await store.close()
    assert accepted == ["document.deleted", "document.changed"]
