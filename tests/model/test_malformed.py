"""Documents are written by arbitrary clients: model readers and the resolver must survive any shape."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from collab_server.model import (
    StatusResolver,
    add_index_entry,
    blocks_map,
    blocks_to_json,
    create_block,
    entries,
    remove_index_entry,
    resolved_status,
    set_status,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
record_like = st.fixed_dictionaries(
    {}, optional={"id": json_values | st.text(max_size=3), "status": json_values | st.sampled_from(["done", "error"]),
                  "seen": json_values | st.lists(st.text(max_size=3), max_size=2), "ts": json_values})


def shared(draw: st.DrawFn, depth: int) -> Any:
    """A random value as a client could store it: JSON, or a shared type of any kind."""
    kind = draw(st.sampled_from(["json", "record", "text", "array", "map"] if depth else ["json", "record"]))
    if kind == "json":
        return draw(json_values)
    if kind == "record":
        return draw(record_like)
    if kind == "text":
        return Text(draw(st.text(max_size=5)))
    if kind == "array":
        return Array([shared(draw, depth - 1) for _ in range(draw(st.integers(0, 3)))])
    keys = draw(st.lists(st.sampled_from(["id", "type", "content", "indexingList", "index_name", "status",
                                          "statusWrites", "x"]), max_size=5, unique=True))
    return Map({key: shared(draw, depth - 1) for key in keys})


@st.composite
def malformed_blocks(draw: st.DrawFn) -> dict[str, Any]:
    return {f"k{i}": shared(draw, 4) for i in range(draw(st.integers(1, 4)))}


@settings(max_examples=300, deadline=None)
@given(malformed_blocks())
def test_resolver_and_readers_survive_any_document_shape(junk: dict[str, Any]) -> None:
    doc = Doc()
    create_block(doc, "good", "paragraph", "ok")
    add_index_entry(doc, "good", "idx", "processing")
    resolver = StatusResolver(doc)
    with doc.transaction():
        for key, value in junk.items():
            blocks_map(doc)[key] = value
    resolver.run()  # must not raise
    assert resolver.run() == []  # idempotent: nothing left to do after one run
    view = blocks_to_json(doc)
    assert view["good"]["indexingList"][0]["status"] == "processing"
    for key in junk:  # every reader copes with the junk block
        list(entries(blocks_map(doc).get(key)))
        resolved_status(doc, key, "idx")
        remove_index_entry(doc, key, "nope")
    set_status(doc, "good", "idx", "done")  # the well-formed block still works
    resolver.run()
    assert blocks_to_json(doc)["good"]["indexingList"][0]["status"] == "done"
    resolver.close()


def test_malformed_records_are_ignored_and_kept() -> None:
    doc = Doc()
    create_block(doc, "b", "paragraph")
    entry = add_index_entry(doc, "b", "idx", "done")
    entry["statusWrites"].append({"id": 5, "status": "error", "seen": []})  # malformed: id not a string
    entry["statusWrites"].append("junk")
    resolver = StatusResolver(doc)
    resolver.run()
    assert resolved_status(doc, "b", "idx") == "done"
    assert len(entry["statusWrites"]) == 3  # the server does not delete what it cannot interpret
    set_status(doc, "b", "idx", "error")
    assert resolved_status(doc, "b", "idx") == "error"
