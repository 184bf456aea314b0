"""A large update applied in parts has the effect of the whole; documents seen to be slow are applied so
(collab_server/slicing.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from collab_server import slicing, surrogates
from collab_server.heldback import Held, clocks, waits
from collab_server.protocol import ProtocolError
from collab_server.pacing import GilTurns
from collab_server.replay import Replay, build
from collab_server.slicing import HELD_PARTS, SLICE_FROM_BYTES, SLOW_APPLY, SlowDocuments, slices, slow_documents
from collab_server.storage.base import fold_updates
from collab_server.updatecheck import structs
from collab_server.surrogates import Cut, Scan
from tests.rawclient import deletion, second_unit, slow_text, state_vector

T = TypeVar("T")

PIECES = ["a", "bc", "é", "😀", "👍🏽", "z" * 20]
EDIT = st.tuples(st.integers(0, 2), st.sampled_from(["insert", "delete", "map", "array", "nested"]),
                 st.integers(0, 10_000), st.sampled_from(PIECES))


def seen(doc: Doc) -> tuple:
    return (str(doc.get("t", type=Text)), doc.get("m", type=Map).to_py(), doc.get("a", type=Array).to_py(),
            state_vector(doc))


def edit(doc: Doc, kind: str, n: int, piece: str) -> None:
    text = doc.get("t", type=Text)
    chars = str(text)
    k = n % (len(chars) + 1)
    at = len(chars[:k].encode())  # pycrdt counts UTF-8 bytes: at a character boundary
    if kind == "insert":
        text.insert(at, piece)
    elif kind == "delete" and k < len(chars):
        del text[at:at + len(chars[k].encode())]
    elif kind == "map":
        doc.get("m", type=Map)[f"k{n % 4}"] = piece
    elif kind == "array":
        doc.get("a", type=Array).insert(n % (len(doc.get("a", type=Array)) + 1), n)
    else:
        doc.get("a", type=Array).append(Map({"n": n, "t": Text(piece)}))


def deleted_ranges(update: bytes) -> int:
    """How many deleted ranges the delete set of v1 `update` lists."""
    walk = structs(update)[1]
    count = 0
    for _ in range(walk.count()):
        walk.uint()
        ranges = walk.count()
        for _ in range(2 * ranges):
            walk.uint()
        count += ranges
    return count


def history(steps: list, base_share: float) -> tuple[bytes, bytes, Doc]:
    """Three replicas edit concurrently (syncing now and then): replica 0 as it was after the first `base_share` of
    the steps, the rest of everything as one update, and a document holding everything."""
    base_at = int(base_share * len(steps))
    docs = [Doc(client_id=i + 1) for i in range(3)]
    base = b"\x00\x00"
    for i, step in enumerate(steps):
        if step == "sync":
            updates = [doc.get_update() for doc in docs]
            for doc in docs:
                for update in updates:
                    doc.apply_update(update)
        else:
            edit(docs[step[0]], *step[1:])
        if i + 1 == base_at:
            base = docs[0].get_update()
    everything = Doc()
    for doc in docs:
        everything.apply_update(doc.get_update())
    with_base = Doc()
    with_base.apply_update(base)
    return base, everything.get_update(with_base.get_state()), everything


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(EDIT, st.just("sync")), min_size=1, max_size=80), st.floats(0, 1), st.integers(1, 6))
def test_an_update_applied_in_parts_leaves_the_document_it_leaves_whole(steps, base_share, size) -> None:
    """Three replicas edit concurrently (syncing now and then); a document holding replica 0 as it was after the
    first `base_share` of the steps gets the rest of everything as one update, whole or in parts of `size`
    structs (any order of the parts would do: what comes before what it refers to is held back until then)."""
    base, rest, everything = history(steps, base_share)
    parts = slices(rest, size)
    whole, in_parts = Replay(), Replay()
    whole.apply(base)
    whole.apply(rest)
    in_parts.apply(base)
    for part in parts:
        in_parts.apply(part)
    assert seen(in_parts.close()) == seen(whole.close()) == seen(everything)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(EDIT, st.just("sync")), min_size=1, max_size=80), st.floats(0, 1), st.integers(1, 400))
def test_causal_parts_never_wait_for_a_later_one_and_leave_the_document_the_whole_does(steps, base_share,
                                                                                        size) -> None:
    """As above, cut into parts of about `size` bytes for a peer (the Python client's backlog): applied in order,
    no part holds a change that waits for a later part (the server closes a connection whose changes wait too
    often: interleaved parts of three clients' edits were closed with 1008 at every reconnect), and only a single
    struct or deleted range makes a part over the size (the deletions went whole in one part)."""
    base, rest, everything = history(steps, base_share)
    receiver = Doc()
    receiver.apply_update(base)
    parts = slicing.causal_parts(rest, size)
    for part in parts:
        assert not waits(part, clocks(receiver.get_state()))
        receiver.apply_update(part)
    assert seen(receiver) == seen(everything)
    for part in parts:  # a part over the size (its counts aside) holds one struct or one deleted range
        assert len(part) <= size + 3 or len(structs(part)[0]) + deleted_ranges(part) == 1


def test_small_updates_stay_whole_and_a_malformed_one_raises() -> None:
    doc = Doc()
    doc.get("t", type=Text).insert(0, "x" * 100)
    update = doc.get_update()
    assert slices(update) == [update]  # one struct
    assert slices(update, 1) == [update]
    for i in range(200):
        doc.get("t", type=Text).insert(0, "y")  # each before the last: items that cannot join
    update = doc.get_update()
    parts = slices(update, 16)
    assert len(parts) > 5 and all(len(part) < len(update) for part in parts)
    with pytest.raises(ProtocolError):
        slices(update[:-40], 16)


def slow_apply(update: bytes) -> None:
    """Takes SLOW_APPLY and more of CPU time."""
    ends = time.thread_time() + SLOW_APPLY * 1.5
    while time.thread_time() < ends:
        pass


def test_documents_slow_to_apply_are_remembered_and_their_large_updates_cut() -> None:
    """What counts is the CPU time of the applying thread: one that waits as long (for the GIL, or a CPU shared with
    other work) was not slow to apply."""
    docs = SlowDocuments(size=2)
    large, small = b"x" * SLICE_FROM_BYTES, b"x" * (SLICE_FROM_BYTES - 1)
    docs.timed("quick", lambda update: None, large)
    docs.timed("waited", lambda update: time.sleep(SLOW_APPLY * 1.5), large)
    assert "quick" not in docs and not docs.cut("quick", large) and "waited" not in docs
    for name in ("a", "b", "c"):
        docs.timed(name, slow_apply, large)
    assert "a" not in docs and "b" in docs and "c" in docs  # the least recently seen made room
    assert docs.cut("c", large) and not docs.cut("c", small)


def test_a_fold_learns_a_document_is_slow_and_then_applies_it_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = slow_text(2000)
    update = doc.get_update()
    applied: list[int] = []
    real_apply = Replay.apply

    def apply(replay: Replay, part: bytes, *scan: Scan) -> None:  # a scan when its client ids look like emoji
        applied.append(len(part))
        real_apply(replay, part, *scan)

    monkeypatch.setattr(Replay, "apply", apply)
    name = "test_slicing-fold"
    assert fold_updates([update], name) == doc.get_update() and applied == [len(update)]  # whole: not known slow
    slow_documents.timed(name, slow_apply, update)  # as a slow load would
    applied.clear()
    assert fold_updates([update], name) == doc.get_update()
    assert len(applied) >= 2000 // 64 and max(applied) < len(update) // 10


def test_a_fold_of_a_slow_document_with_a_cut_applies_it_in_parts_and_rebuilds_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold applies a slow document's state in parts, offering the GIL between them, so the event loop never
    waits behind a whole application; the character a log entry cuts is replaced before (surrogates.precut), so
    the document is not built again for it."""
    doc = slow_text(2000)
    doc.get("t", type=Text).insert(0, "😀")
    updates = [doc.get_update(), deletion(*second_unit(doc))]
    expected = Replay()
    for update in updates:
        expected.apply(update)
    applied: list[int] = []
    offered = 0
    real_timed, real_offer = SlowDocuments.timed, GilTurns.offer

    def timed(documents: SlowDocuments, name: str | None, apply: Callable[[T], object], part: T) -> None:
        applied.append(len(part.update if isinstance(part, Cut) else part))  # a fold times what it integrates
        real_timed(documents, name, apply, part)

    def offer(turns: GilTurns) -> None:
        nonlocal offered
        offered += 1
        real_offer(turns)

    monkeypatch.setattr(SlowDocuments, "timed", timed)
    monkeypatch.setattr(GilTurns, "offer", offer)
    monkeypatch.setattr(Replay, "replace", lambda replay, doc: pytest.fail("the document was rebuilt"))
    name = "test_slicing-fold-cut"
    slow_documents.note(name)
    folded = Doc()
    folded.apply_update(fold_updates(updates, name))
    assert str(folded.get("t", type=Text)) == str(expected.doc.get("t", type=Text))
    assert str(folded.get("t", type=Text)).startswith("\ufffd")
    assert len(applied) >= 2000 // 64  # the state, in parts
    assert max(applied) < len(updates[0]) // 10 and offered >= len(applied)


def test_a_fold_judges_a_document_slow_by_integrating_it_not_by_reading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python reading an update for characters beyond the BMP (surrogates.Scan) hands the GIL on every few
    milliseconds in a fold's worker thread, and applying in parts would not shorten it: only what yrs takes to
    integrate counts, or a document yrs applies quickly would be applied in parts (at many times the cost) ever
    after, on every node, since the stores keep the mark."""
    doc = Doc()
    doc.get("t", type=Text).insert(0, "a😀b")
    update = doc.get_update()
    read = surrogates.Scan.__init__

    def slow_read(scan: surrogates.Scan, data: bytes, cuts: bool = True) -> None:
        slow_apply(data)
        read(scan, data, cuts)

    monkeypatch.setattr(surrogates.Scan, "__init__", slow_read)
    fold_updates([update], "test_slicing-read-slowly")
    assert "test_slicing-read-slowly" not in slow_documents
    monkeypatch.setattr(Replay, "integrate", lambda replay, cut: slow_apply(cut.update))
    fold_updates([update], "test_slicing-integrated-slowly")
    assert "test_slicing-integrated-slowly" in slow_documents


def two_sessions(appends: int) -> bytes:
    """The state of a text two clients typed in turn, then two other clients went on with in a later session."""
    first = [Doc(client_id=1), Doc(client_id=2)]
    later = [Doc(client_id=3), Doc(client_id=4)]
    for session in (first, later):
        for i in range(appends):
            writer, reader = session[i % 2], session[1 - i % 2]
            if session is later and i < 2:
                writer.apply_update(first[0].get_update())
            before = writer.get_state()
            text = writer.get("t", type=Text)
            text.insert(len(str(text)), "x")
            reader.apply_update(writer.get_update(before))
    return later[0].get_update()


def test_parts_held_back_past_a_few_have_the_rest_applied_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut by progress, the later session's parts come before the first session's end they build on, so all wait:
    each part applied gave every one waiting again, quadratic (minutes for a 1.3 MB document). Past HELD_PARTS
    waiting, the rest is applied whole, with the same result."""
    state = two_sessions(3000)
    name = "two-sessions"
    slow_documents.recall(name)
    monkeypatch.setattr(slicing, "SLICE_FROM_BYTES", 0)
    given_again = 0
    give = Held.give

    def counting(held: Held, doc: Doc) -> None:
        nonlocal given_again
        given_again += len(held.updates)
        give(held, doc)

    monkeypatch.setattr(Held, "give", counting)
    built = build(state, 9, name)
    whole = Doc()
    whole.apply_update(state)
    assert seen(built) == seen(whole)
    parts = len(slices(state))
    assert parts > 8 * HELD_PARTS
    # each part gives what waits, never more than HELD_PARTS (+ its own); unbounded, ~parts**2 / 4 in all
    assert given_again <= (HELD_PARTS + 1) * parts
