"""Characters cut between their two UTF-16 units by real Yjs edits (collab_server/surrogates.py)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Text, merge_updates

from collab_server import surrogates
from collab_server.replay import apply
from collab_server.storage.base import fold_updates
from collab_server.surrogates import Characters, merge_safely
from tests.rawclient import deletion, second_unit, state_vector, whole_and_cut

CUTS = Path(__file__).parent / "js" / "cuts.mjs"


def yjs_scenarios(seed: int, count: int) -> list[dict]:
    """Random edits by three Yjs replicas (tests/js/cuts.mjs): the updates in a server's order, and the text a
    Yjs document holds after them."""
    proc = subprocess.run(["node", str(CUTS), str(seed), str(count)], capture_output=True, text=True,
                          timeout=60, cwd=CUTS.parents[2], check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def delta(doc: Doc) -> list[dict]:
    """The text as a Yjs delta: inserts with their attributes."""
    out = []
    for insert, attrs in doc.get("t", type=Text).diff():
        out.append({"insert": insert, "attributes": attrs} if attrs else {"insert": insert})
    return out


def reloaded(doc: Doc) -> Doc:
    """What a fresh replica gets from `doc`'s encoded state."""
    fresh = Doc()
    fresh.apply_update(doc.get_update())
    return fresh


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_document_holds_what_yjs_holds_and_encodes_it_whole(seed: int) -> None:
    scenarios = yjs_scenarios(seed, 25)
    broken_by_yrs = 0
    for scenario in scenarios:
        updates = [base64.b64decode(u) for u in scenario["updates"]]
        expected = [{k: v for k, v in op.items() if v} for op in scenario["delta"]]

        plain = Doc()
        for update in updates:
            plain.apply_update(update)
        broken_by_yrs += str(reloaded(plain).get("t", type=Text)) != scenario["text"]

        doc, characters = Doc(), Characters()
        for update in updates:
            doc = apply(doc, update, characters)
        assert delta(doc) == expected
        again = reloaded(doc)
        assert state_vector(again) == state_vector(doc)
        assert delta(again) == expected
        folded = Doc()
        folded.apply_update(fold_updates(updates))
        assert delta(folded) == expected
    assert broken_by_yrs > len(scenarios) // 2  # the scenarios do cut characters, which yrs alone gets wrong


def test_text_without_characters_beyond_the_bmp_is_left_alone() -> None:
    source = Doc()
    source.get("t", type=Text).insert(0, "héllo 中文")
    update = source.get_update()
    doc, characters = Doc(), Characters()
    assert characters.plan(doc, update) == (update, [], None, None)  # not read, nothing to rebuild
    assert apply(doc, update, characters) is doc
    assert not characters.seconds


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1), at=st.integers(0, 10))
def test_every_character_beyond_the_bmp_is_noted(text: str, at: int) -> None:
    source = Doc()
    t = source.get("t", type=Text)
    t.insert(0, "ab")
    characters = Characters()
    doc = apply(Doc(), source.get_update(), characters)
    before = source.get_state()
    t.insert(min(at, 2), text)
    apply(doc, source.get_update(before), characters)
    assert sum(map(len, characters.seconds.values())) == sum(char > "\uffff" for char in text)


def test_a_large_document_without_such_characters_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that could lead a 4-byte character occur in the varints of a large state; reading a state of 100,000
    array items in Python took 15 times as long as applying it."""
    source = Doc(client_id=12345)  # a random id of 2^28 or more may itself encode such a run (1 in ~200; CI met one)
    items = source.get("c", type=Array)
    for i in range(5000):
        items.append(i % 1000)
    state = source.get_update()
    assert any(lead in state for lead in b"\xf0\xf1\xf2\xf3\xf4")
    reads: list[bytes] = []
    monkeypatch.setattr(surrogates.Scan, "__init__", lambda scan, data, cuts=True: reads.append(data))
    assert merge_safely([state, state]) != [state, state]
    doc = apply(Doc(), state, Characters())
    assert doc.get("c", type=Array).to_py() == items.to_py() and reads == []


def test_a_cut_where_a_deleted_character_was_leaves_the_document_and_forgets_it() -> None:
    doc, characters = Doc(), Characters()
    text = doc.get("t", type=Text)
    text.insert(0, "a😀b")
    characters.add(doc.get_update())
    client, clock = second_unit(doc)
    del text[1:5]  # the whole emoji (pycrdt counts UTF-8 bytes)
    assert characters.plan(doc, deletion(client, clock)).state is None
    assert (client, clock) not in characters
    assert apply(doc, deletion(client, clock), characters) is doc
    assert str(text) == "ab"


def test_updates_holding_a_character_whole_and_cut_are_relayed_unmerged() -> None:
    # The same clocks, as a node's write holds them (the emoji whole) and as a catch-up or a client's copy holds
    # them after a cut (two items). yrs's merge slices one at the other's item boundaries, inside the emoji.
    whole, cut = whole_and_cut()
    merged = Doc()
    merged.apply_update(merge_updates(whole, cut))
    assert str(merged.get("t", type=Text)) != "X\ufffdY"  # what merging them would have relayed

    assert merge_safely([whole, cut]) == [whole, cut]
    doc, characters = Doc(), Characters()
    for update in merge_safely([whole, cut]):
        doc = apply(doc, update, characters)
    assert str(doc.get("t", type=Text)) == "X\ufffdY"
    plain = [deletion(7, 0), deletion(7, 3)]
    assert merge_safely(plain) == [merge_updates(*plain)]
    # a byte that could lead a 4-byte character, in a client id's varint (0xF0 0x01), is not text
    ascii_ = Doc(client_id=0xF0)
    edits: list[bytes] = []
    ascii_.observe(lambda event: edits.append(event.update))
    ascii_.get("t", type=Text).insert(0, "ab")
    ascii_.get("t", type=Text).insert(2, "cd")
    assert all(b"\xf0" in edit for edit in edits)
    assert merge_safely(edits) == [merge_updates(*edits)]


def test_a_cut_reads_only_the_structs_of_the_clients_it_cuts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A document typed mostly by others: rebuilding it for a cut reads the cut character's client alone, and keeps
    what it knows of the others' characters."""
    doc, characters = Doc(), Characters()
    for client, typed in ((11, "other 🙂 text " * 200), (12, "a😀b"), (13, "🎉 more " * 200)):
        writer = Doc(client_id=client)
        writer.apply_update(doc.get_update())
        writer.get("t", type=Text).insert(0, typed)
        doc = apply(doc, writer.get_update(doc.get_state()), characters)
    [clock] = [clock for clock in characters.seconds[12]]
    others = {client: set(characters.seconds[client]) for client in (11, 13)}
    reads: list[bytes] = []
    scan = surrogates.Scan.__init__
    monkeypatch.setattr(surrogates.Scan, "__init__",
                        lambda self, data, cuts=True: (reads.append(data), scan(self, data, cuts))[1])
    doc = apply(doc, deletion(12, clock), characters)
    assert str(doc.get("t", type=Text)).count("a\ufffdb") == 1
    assert delta(reloaded(doc)) == delta(doc)
    assert max(map(len, reads)) < 100 and all(b"other" not in data and b"more" not in data for data in reads)
    assert characters.seconds[11] == others[11] and characters.seconds[13] == others[13]
    assert (12, clock) not in characters
