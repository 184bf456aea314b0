"""Block edits as the HTTP API applies them (collab_server/edits.py) and set_content's minimal replacement."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from collab_server.edits import EditError, apply_ops, parse_ops, restore_ops
from collab_server.model.blocks import EntryList
from collab_server.model import (
    add_index_entry,
    block_content,
    blocks_map,
    blocks_to_json,
    create_block,
    delete_block,
    entry_status,
    get_block,
    remove_index_entry,
    resolved_status,
    set_content,
    set_entry_metadata,
    set_status,
)

TEXT = st.text(alphabet=st.sampled_from(list("ab é😀\u0301")), max_size=12)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT, TEXT, st.integers(0, 12))
def test_set_content_gives_the_new_text_and_keeps_a_concurrent_insert_outside_the_change(old, new, extra, at) -> None:
    base = Doc()
    create_block(base, "b", "p", old)
    ours, theirs = Doc(), Doc()
    for replica in (ours, theirs):
        replica.apply_update(base.get_update())
    set_content(ours, "b", new)
    assert str(block_content(ours, "b")) == new
    at = min(at, len(old))
    block_content(theirs, "b").insert(len(old[:at].encode()), extra)
    ours.apply_update(theirs.get_update(ours.get_state()))
    merged = str(block_content(ours, "b"))
    # the changed span lies between the common prefix and suffix; an insert before or after it is kept in place
    prefix = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
    if at < prefix:
        assert merged == new[:at] + extra + new[at:]
    assert len(merged) == len(new) + len(extra)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT, st.lists(st.integers(0, 12), max_size=3))
def test_set_content_of_a_text_holding_embeds_keeps_them_and_changes_only_the_characters(old, new, places) -> None:
    """A client's embed (`insertEmbed`, a mention) takes a place in the text but is not in the content read: the
    span was found in the text read and cut by the positions of the one holding embeds, so the change landed off
    by one for each embed before it, deleting other characters ("alpha beta gamma" -> "alpha betaGAMMAa")."""
    doc = Doc()
    create_block(doc, "b", "p", old)
    text = block_content(doc, "b")
    for n, at in enumerate(sorted(places, reverse=True)):
        text.insert_embed(len(old[:min(at, len(old))].encode()), {"mention": n})
    set_content(doc, "b", new)
    assert str(text) == new
    embeds = [piece for piece, _ in text.diff() if not isinstance(piece, str)]
    assert embeds == [{"mention": float(n)} for n in reversed(range(len(places)))]


def test_set_content_beside_an_embed_changes_what_differs_where_it_is() -> None:
    doc = Doc()
    create_block(doc, "b", "p", "alpha beta gamma delta")
    text = block_content(doc, "b")
    text.insert_embed(0, {"mention": "bob"})
    set_content(doc, "b", "alpha beta GAMMA delta")
    assert text.diff() == [({"mention": "bob"}, None), ("alpha beta GAMMA delta", None)]


IDS = st.sampled_from(["x", "x", "x", "y", "text-less", "list-less", "not-a-map"])
OPS = st.lists(st.one_of(
    st.fixed_dictionaries({"op": st.just("create_block"), "id": IDS, "type": st.just("p"), "content": TEXT}),
    st.fixed_dictionaries({"op": st.just("delete_block"), "id": IDS}),
    st.fixed_dictionaries({"op": st.just("set_content"), "id": IDS, "content": TEXT}),
    st.fixed_dictionaries({"op": st.just("add_index"), "id": IDS, "index_name": st.just("i")}),
    st.fixed_dictionaries({"op": st.just("remove_index"), "id": IDS, "index_name": st.just("i")}),
    st.fixed_dictionaries({"op": st.just("set_status"), "id": IDS, "index_name": st.just("i"),
                           "status": st.sampled_from(["notStarted", "processing", "done", "error"])},
                          optional={"expect": st.sampled_from([None, "notStarted", "done", "error"])}),
    st.fixed_dictionaries({"op": st.just("set_metadata"), "id": IDS, "index_name": st.just("i"),
                           "metadata": st.fixed_dictionaries({"k": st.one_of(st.none(), st.integers(0, 9))})}),
), min_size=1, max_size=8)


def unchecked(doc: Doc, op: dict) -> None:
    """An op through the model's functions alone, which raise (or misbehave) where it cannot apply."""
    block = get_block(doc, op["id"])
    if op["op"] == "create_block":
        create_block(doc, op["id"], op["type"])
    elif op["op"] == "delete_block":
        delete_block(doc, op["id"])
    elif block is None:
        raise KeyError(op["id"])
    elif op["op"] == "set_content":
        set_content(doc, op["id"], op["content"])
    elif op["op"] == "add_index":
        add_index_entry(doc, op["id"], op["index_name"])
    elif op["op"] == "remove_index":
        remove_index_entry(doc, op["id"], op["index_name"])
    elif op["op"] == "set_status":
        if "expect" in op and resolved_status(doc, op["id"], op["index_name"]) != op["expect"]:
            raise ValueError("not the status expected")
        set_status(doc, op["id"], op["index_name"], op["status"])
    else:
        set_entry_metadata(doc, op["id"], op["index_name"], op["metadata"])


def malformed_doc() -> Doc:
    """A document with a block holding two entries of one name (added concurrently on two replicas), and
    blocks other clients shaped wrongly."""
    doc = Doc()
    create_block(doc, "x", "p", "start")
    replicas = [Doc(), Doc()]
    for replica in replicas:
        replica.apply_update(doc.get_update())
        add_index_entry(replica, "x", "i")
    for replica in replicas:
        doc.apply_update(replica.get_update(doc.get_state()))
    assert len(blocks_to_json(doc)["x"]["indexingList"]) == 2
    blocks = blocks_map(doc)
    blocks["text-less"] = Map({"id": "text-less", "type": "p", "content": "plain", "indexingList": Array()})
    blocks["list-less"] = Map({"id": "list-less", "content": Text("t")})
    blocks["not-a-map"] = "oops"
    indexing_list = blocks["x"]["indexingList"]
    indexing_list.append(Map({"status": "done"}))  # an entry without a name
    indexing_list.append({"index_name": "i", "status": "error"})  # a plain object, no entry: lookups skip it
    return doc


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, OPS)
def test_a_batch_applies_whole_or_not_at_all(setup, batch) -> None:
    """Checking predicts exactly whether applying succeeds: when it refuses, nothing changed; when it accepts,
    every op applies (as it does alone, one after another)."""
    doc = malformed_doc()
    try:
        with doc.transaction():
            apply_ops(doc, parse_ops({"ops": setup}))
    except EditError:
        pass
    before = blocks_to_json(doc), doc.get_state()
    expected = Doc()
    expected.apply_update(doc.get_update())
    try:
        with doc.transaction():
            touched = apply_ops(doc, parse_ops({"ops": batch}))
    except EditError:
        assert (blocks_to_json(doc), doc.get_state()) == before
        with pytest.raises((KeyError, ValueError, AttributeError, TypeError)):  # the refusal was needed
            for op in batch:
                unchecked(expected, op)
        return
    assert touched == list(dict.fromkeys(op["id"] for op in batch))
    # the same ops, one by one on a copy, give the same blocks
    for op in batch:
        apply_ops(expected, parse_ops({"ops": [op]}))
    strip = {bid: {**b, "indexingList": [{k: v for k, v in e.items() if k != "timestamp"} for e in b["indexingList"]]}
             for bid, b in blocks_to_json(doc).items()}
    assert strip == {bid: {**b, "indexingList": [{k: v for k, v in e.items() if k != "timestamp"}
                                                 for e in b["indexingList"]]}
                     for bid, b in blocks_to_json(expected).items()}


def test_a_batch_reads_each_blocks_entry_list_once(monkeypatch) -> None:
    """A batch of many ops on a block of many entries reads the list once, not once per op (which made 1,000 ops on
    a block of 5,000 entries take a minute)."""
    doc = Doc()
    with doc.transaction():
        create_block(doc, "b", "p")
        for i in range(50):
            add_index_entry(doc, "b", f"i{i}")
    reads = []
    original = EntryList.__init__
    monkeypatch.setattr(EntryList, "__init__", lambda self, block: reads.append(1) or original(self, block))
    ops = [op for i in range(50) for op in (
        {"op": "set_status", "id": "b", "index_name": f"i{i}", "status": "done", "expect": "notStarted"},
        {"op": "set_metadata", "id": "b", "index_name": f"i{i}", "metadata": {"n": i}},
        {"op": "add_index", "id": "b", "index_name": f"n{i}"},
        {"op": "remove_index", "id": "b", "index_name": f"i{i}"})]
    with doc.transaction():
        apply_ops(doc, parse_ops({"ops": ops}))
    assert len(reads) == 1
    assert [(e["index_name"], e["status"]) for e in blocks_to_json(doc)["b"]["indexingList"]] == [
        (f"n{i}", "notStarted") for i in range(50)]


def entries_by_name(blocks: dict) -> dict:
    """Blocks JSON with each entry name's first entry (as lookups by name see them), without timestamps;
    entries without a name, which restoring leaves alone, are left out."""
    def first(entries: list) -> dict:
        named: dict = {}
        for e in entries:
            if "index_name" in e:
                named.setdefault(e["index_name"], {k: v for k, v in e.items() if k != "timestamp"})
        return named
    return {bid: {**block, "indexingList": first(block["indexingList"])} for bid, block in blocks.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, OPS, st.booleans(), st.booleans())
def test_restoring_gives_the_saved_blocks_back(saved_ops, current_ops, saved_malformed, current_malformed) -> None:
    """From any document, restore_ops lead to any saved version's blocks (statuses and metadata included,
    entries matched by name), even when a block of either was shaped wrongly by some client."""
    saved_doc, doc = (malformed_doc() if bad else Doc() for bad in (saved_malformed, current_malformed))
    for target, ops in ((saved_doc, saved_ops), (doc, current_ops)):
        try:
            with target.transaction():
                apply_ops(target, parse_ops({"ops": ops}))
        except EditError:
            pass
    saved = blocks_to_json(saved_doc)
    with doc.transaction():
        apply_ops(doc, restore_ops(doc, saved))  # never refused
    restored = entries_by_name(blocks_to_json(doc))
    typed = {bid for bid, b in saved.items() if b["type"] is not None}  # a block without a type gets ""
    assert {bid: restored.get(bid) for bid in typed} == {bid: entries_by_name(saved)[bid] for bid in typed}
    assert set(restored) == set(saved)


def test_numbers_beyond_what_javascript_holds_exactly_export_as_floats_and_restore() -> None:
    """A client can store any double: integral ones past 2^53 stay floats in JSON (as ints they would not fit
    pycrdt when restored), and NaN or infinities become null, as JSON.stringify makes them."""
    doc = Doc()
    create_block(doc, "b", "p")
    add_index_entry(doc, "b", "i", metadata={"big": 1e300, "past": -(2.0**60), "small": 3.0, "nan": float("nan"),
                                             "inf": float("inf")})
    saved = blocks_to_json(doc)
    entry = saved["b"]["indexingList"][0]
    assert (entry["big"], entry["past"], entry["small"], entry["nan"], entry["inf"]) == (1e300, -(2.0**60), 3, None,
                                                                                         None)
    assert isinstance(entry["small"], int) and isinstance(entry["past"], float)
    fresh = Doc()
    with fresh.transaction():
        apply_ops(fresh, restore_ops(fresh, saved))
    assert entries_by_name(blocks_to_json(fresh)) == entries_by_name(saved)


def test_restoring_keeps_metadata_values_that_are_null() -> None:
    """A saved `null` was restored as a missing key: restore sent `set_metadata {m: null}`, which removes m, and
    where m was missing it saw nothing to change."""
    saved_doc = Doc()
    create_block(saved_doc, "b", "p")
    add_index_entry(saved_doc, "b", "i", metadata={"m": None, "n": None})
    saved = blocks_to_json(saved_doc)
    assert {k: saved["b"]["indexingList"][0][k] for k in ("m", "n")} == {"m": None, "n": None}
    doc = Doc()
    doc.apply_update(saved_doc.get_update())
    set_entry_metadata(doc, "b", "i", {"m": None, "n": 5, "extra": 1})  # m removed, n set, a new key
    with doc.transaction():
        apply_ops(doc, restore_ops(doc, saved))
    assert entries_by_name(blocks_to_json(doc)) == entries_by_name(saved)


def test_expect_after_removing_one_of_two_entries_of_a_name_reads_the_one_left() -> None:
    """Two entries of one name (added concurrently): once a batch removes the first, `expect` is checked against the
    second, as the same ops one by one are (the batch took the status as unknown and answered 409)."""
    doc = malformed_doc()  # block "x" holds two entries named "i"
    second = [e for e in get_block(doc, "x")["indexingList"] if isinstance(e, Map) and e.get("index_name") == "i"][1]
    set_status(doc, "x", "i", "error")  # the first entry's
    with doc.transaction():
        apply_ops(doc, parse_ops({"ops": [{"op": "remove_index", "id": "x", "index_name": "i"},
                                          {"op": "set_status", "id": "x", "index_name": "i", "status": "done",
                                           "expect": "notStarted"}]}))
    assert entry_status(second) == "done"
    with pytest.raises(EditError) as refused, doc.transaction():  # and a stale expectation is still refused
        apply_ops(doc, parse_ops({"ops": [{"op": "set_status", "id": "x", "index_name": "i", "status": "error"},
                                          {"op": "remove_index", "id": "x", "index_name": "i"},
                                          {"op": "add_index", "id": "x", "index_name": "i"},
                                          {"op": "set_status", "id": "x", "index_name": "i", "status": "done",
                                           "expect": "error"}]}))
    assert refused.value.status == 409
