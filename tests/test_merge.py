"""merge_all merges in groups (collab_server/merge.py): the result must be the document one merge would give."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, merge_updates

from collab_server.merge import FAN_IN, merge_all
from tests.rawclient import state_vector

EDITS = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["insert", "delete", "map", "array", "share"]),
                           st.integers(0, 1000)), min_size=1, max_size=3 * FAN_IN + 5)


def updates_of(edits: list[tuple[int, str, int]]) -> list[bytes]:
    """The update of every edit three editors make, some after syncing with another."""
    docs = [Doc() for _ in range(3)]
    updates: list[bytes] = []
    for who, kind, n in edits:
        doc, before = docs[who], docs[who].get_state()
        text = doc.get("t", type=Text)
        if kind == "insert":
            text.insert(n % (len(text) + 1), chr(97 + n % 26))
        elif kind == "delete" and len(text):
            del text[n % len(text)]
        elif kind == "map":
            doc.get("m", type=Map)[f"k{n % 4}"] = n
        elif kind == "array":
            doc.get("a", type=Array).append(n)
        else:
            doc.apply_update(docs[n % 3].get_update(doc.get_state()))
        update = doc.get_update(before)
        if update != b"\x00\x00":
            updates.append(update)
    return updates


def content(update: bytes) -> tuple:
    doc = Doc()
    doc.apply_update(update)
    return (str(doc.get("t", type=Text)), doc.get("m", type=Map).to_py(), doc.get("a", type=Array).to_py(),
            state_vector(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EDITS, st.randoms(use_true_random=False))
def test_merging_in_groups_gives_the_document_one_merge_gives(edits, rnd) -> None:
    updates = updates_of(edits)
    if not updates:
        return
    rnd.shuffle(updates)  # merging does not need causal order
    assert content(merge_all(updates)) == content(merge_updates(*updates))


def test_more_updates_than_one_group_take_several_rounds() -> None:
    doc = Doc()
    text = doc.get("t", type=Text)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    for i in range(FAN_IN * FAN_IN + 1):  # three rounds of merging
        text.insert(len(text) // 2, chr(97 + i % 26))
    assert content(merge_all(updates)) == content(doc.get_update())
    assert merge_all(updates[:1]) == updates[0]
