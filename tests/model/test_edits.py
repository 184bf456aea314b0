"""Block edits as the HTTP API applies them (collab_server/edits.py) and set_content's minimal replacement."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from collab_server.edits import EditError, apply_ops, parse_ops
from collab_server.model import block_content, blocks_to_json, create_block, set_content

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


OPS = st.lists(st.one_of(
    st.fixed_dictionaries({"op": st.just("create_block"), "id": st.sampled_from("xyz"), "type": st.just("p")}),
    st.fixed_dictionaries({"op": st.just("delete_block"), "id": st.sampled_from("xyz")}),
    st.fixed_dictionaries({"op": st.just("set_content"), "id": st.sampled_from("xyz"), "content": TEXT}),
    st.fixed_dictionaries({"op": st.just("add_index"), "id": st.sampled_from("xyz"), "index_name": st.just("i")}),
    st.fixed_dictionaries({"op": st.just("remove_index"), "id": st.sampled_from("xyz"), "index_name": st.just("i")}),
    st.fixed_dictionaries({"op": st.just("set_status"), "id": st.sampled_from("xyz"), "index_name": st.just("i"),
                           "status": st.sampled_from(["notStarted", "processing", "done", "error"])}),
), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, OPS)
def test_a_batch_applies_whole_or_not_at_all(setup, batch) -> None:
    doc = Doc()
    create_block(doc, "x", "p", "start")
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
    except EditError as exc:
        assert exc.status == 404
        assert (blocks_to_json(doc), doc.get_state()) == before
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
