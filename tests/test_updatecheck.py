"""The walk of updates and state vectors before yrs reads them (collab_server/updatecheck.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from collab_server import protocol as p
from collab_server import updatecheck
from collab_server.model import add_index_entry, create_block, set_status
from collab_server.updatecheck import MAX_DEPTH, check_state_vector, check_text_parents, check_update

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False)
    | st.text(max_size=6) | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8)
EDITS = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(
    ["text", "delete", "format", "embed", "map", "array", "nested", "xml", "block", "status", "subdoc"]),
    VALUES, st.text(max_size=4)), max_size=12)


def edit(doc: Doc, kind: str, value, word: str) -> None:
    text = doc.get("t", type=Text)
    if kind == "text":  # ASCII: pycrdt panics deleting or formatting a range that splits a multi-byte character
        text.insert(len(str(text).encode()) // 2, word.encode("ascii", "replace").decode() or "w")
    elif kind == "delete" and str(text):
        del text[0:len(str(text)[0].encode())]
    elif kind == "format" and str(text):
        text.format(0, len(str(text)[0].encode()), {"bold": True, "note": word})
    elif kind == "embed":
        text.insert_embed(0, {"image": word})
    elif kind == "map":
        doc.get("m", type=Map)[word] = value
    elif kind == "array":
        doc.get("a", type=Array).append(value)
    elif kind == "nested":
        doc.get("m", type=Map)["sub"] = Map({"list": Array([value]), "text": Text(word)})
    elif kind == "xml":
        fragment = doc.get("x", type=XmlFragment)
        fragment.children.append(XmlElement("p", {"class": word}, [XmlText(word)]))
    elif kind == "block":
        create_block(doc, word or "b", "p", word)
        add_index_entry(doc, word or "b", "search")
    elif kind == "status" and doc.get("blocks", type=Map).get("b") is not None:
        set_status(doc, "b", "search", "done")
    elif kind == "subdoc":
        doc.get("m", type=Map)["doc"] = Doc()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EDITS)
def test_every_update_and_state_vector_pycrdt_makes_passes(edits) -> None:
    docs = [Doc() for _ in range(3)]
    for who, kind, value, word in edits:
        before = docs[who].get_state()
        try:
            edit(docs[who], kind, value, word)
        except (ValueError, TypeError, OverflowError):
            continue  # a value pycrdt itself refuses
        check_update(docs[who].get_update(before))
        check_text_parents(docs[who].get_update(before))
        docs[(who + 1) % 3].apply_update(docs[who].get_update(docs[(who + 1) % 3].get_state()))
    for doc in docs:
        check_update(doc.get_update())
        check_text_parents(doc.get_update())
        check_update(doc.get_update(docs[0].get_state()))
        check_state_vector(doc.get_state())


def item(content: bytes, ref: int) -> bytes:
    """A one-struct update: an item without origins in root type "t" with `content` of type `ref`."""
    return (p.write_varuint(1) + p.write_varuint(1) + p.write_varuint(1) + p.write_varuint(0) + bytes([ref])
            + p.write_varuint(1) + p.write_bytes(b"t") + content + p.write_varuint(0))


def nested_arrays(depth: int) -> bytes:
    return item(p.write_varuint(1) + b"\x75\x01" * depth + b"\x7e", 8)


@pytest.mark.parametrize(("data", "problem"), [
    (p.write_varuint(2**28), "a count of 268435456"),  # clients
    (p.write_varuint(1) + p.write_varuint(2**28) + b"\x01\x00", "a count of 268435456"),  # structs
    (item(p.write_varuint(1) + b"\x76" + p.write_varuint(2**27), 8), "a count of 134217728"),  # object keys
    (item(p.write_varuint(2**27), 8), "a count of 134217728"),  # any values
    (item(p.write_varuint(2**27), 2), "a count of 134217728"),  # JSON strings
    (item(p.write_varuint(2**20) + b"abc", 4), "a length of 1048576"),  # string
    (nested_arrays(MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH}"),
    (item(b"", 11), "content type 11"),
    (item(p.write_varuint(1) + b"\x70", 8), "value tag 112"),
    (b"\x01\x01\x01", "truncated"),
    (b"\x01\x01" + b"\xff" * 10, "varint too long"),
])
def test_counts_lengths_and_nesting_beyond_bounds_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(p.ProtocolError, match=problem):
        check_update(data)


def test_values_nested_to_the_limit_pass() -> None:
    check_update(nested_arrays(MAX_DEPTH))
    Doc().apply_update(nested_arrays(MAX_DEPTH))


def test_a_state_vector_claiming_more_entries_than_it_holds_is_refused() -> None:
    check_state_vector(b"\x01\x05\x07")
    with pytest.raises(p.ProtocolError, match="invalid state vector: a count of 268435456"):
        check_state_vector(p.write_varuint(2**28))


def test_the_nesting_the_walk_refuses_would_have_killed_the_process_in_yrs() -> None:
    """Why the depth limit exists: yrs decodes nested values recursively, and 100,000 levels overflow its
    stack (SIGSEGV), which no exception handler can catch. Run in a child process."""
    code = "import sys; from pycrdt import Doc; Doc().apply_update(sys.stdin.buffer.read())"
    child = subprocess.run([sys.executable, "-c", code], input=nested_arrays(100_000), capture_output=True,
                           timeout=60)
    assert child.returncode < 0  # killed by a signal
    with pytest.raises(p.ProtocolError, match="nested deeper"):
        check_update(nested_arrays(100_000))


def test_an_xml_hook_is_refused_by_name() -> None:
    # Yjs: `doc.getXmlFragment('x').insert(0, [new Y.XmlHook('hook')])`. yrs reads no name after the type ref,
    # misreads the rest and fails with "unexpected end of buffer"; the walk says what it is instead.
    update = bytes.fromhex("0101d7ccbfaa040007010178050468 6f6f6b00")
    with pytest.raises(ValueError):
        Doc().apply_update(update)
    with pytest.raises(p.ProtocolError, match="Y.XmlHook"):
        check_update(update)


def _structs(*structs: bytes, client: int = 7) -> bytes:
    return p.write_varuint(1) + p.write_varuint(len(structs)) + p.write_varuint(client) + p.write_varuint(0) \
        + b"".join(structs) + p.write_varuint(0)


EMOJI = p.write_bytes("😀ab".encode())
ROOT_A = p.write_varuint(1) + p.write_bytes(b"a")


@pytest.mark.parametrize(("update", "problem"), [
    # a Y.Array made under root map "m", then a string in it (the fuzzer's 50-byte update, in short)
    (_structs(bytes([7 | 0x20]) + ROOT_A + p.write_bytes(b"k") + p.write_varuint(0),
              bytes([4]) + p.write_varuint(0) + p.write_varuint(7) + p.write_varuint(0) + EMOJI),
     "string content whose parent is not a text"),
    (_structs(bytes([4 | 0x20]) + ROOT_A + p.write_bytes(b"k") + EMOJI), "string content whose parent is not a text"),
    # a value in root array "a", then a string after it
    (_structs(bytes([8]) + ROOT_A + p.write_varuint(1) + b"\x77" + p.write_bytes(b"x"),
              bytes([4 | 0x80]) + p.write_varuint(7) + p.write_varuint(0) + EMOJI),
     "string content among an array's values"),
    # a tester's: a block, its list and an entry, then a string whose left origin is the entry (in one update)
    (bytes.fromhex(
        "0201d00f0084e8070a05f09f9880780be80700270106626c6f636b73026231012800e8070002696401770262312800e80700"
        "0474797065017701702700e8070007636f6e74656e74020400e807030568656c6c6f2700e807000c696e646578696e674c69"
        "7374000700e80709012800e8070a0a696e6465785f6e616d650177067365617263682800e8070a0673746174757301770464"
        "6f6e652700e8070a0c737461747573577269746573000800e8070d0176040269647706313030303a61067374617475737704"
        "646f6e65047365656e75000274737d0100"),
     "string content whose parent is not a text"),
])
def test_string_content_outside_a_text_is_refused(update: bytes, problem: str) -> None:
    """Yjs puts strings only in texts. yrs, reading an array that holds one with a character beyond the BMP, loops
    for ever (it stopped the whole server); what the update itself shows of such an item is refused."""
    check_update(update)
    with pytest.raises(p.ProtocolError, match=problem):
        check_text_parents(update)


def test_strings_in_texts_pass() -> None:
    doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    create_block(doc, "b", "p", "hi 😀 there")  # a text made in the update, with its string
    doc.get("t", type=Text).insert(0, "root 😀")
    doc.get("m", type=Map)["sub"] = Map({"text": Text("😀"), "list": Array(["😀 a value"])})
    fragment = doc.get("x", type=XmlFragment)
    fragment.children.append(XmlElement("p", {}, [XmlText("😀")]))
    for update in [*updates, doc.get_update()]:
        check_text_parents(update)


def test_string_parents_are_followed_once_per_struct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each string's parent was found by following its origins one by one, each looked up by a scan of its
    client's structs: a 27 KB update of 3,000 emoji typed by two clients in turns took 123 s to check. Each struct
    is now looked up once, by bisection."""
    docs = [Doc(client_id=client) for client in (1, 2)]
    for i in range(600):
        writer, reader = docs[i % 2], docs[1 - i % 2]
        text = writer.get("t", type=Text)
        text.insert(len(str(text).encode()), "😀")
        reader.apply_update(writer.get_update(reader.get_state()))
    update = docs[0].get_update()
    lookups = []
    bisect = updatecheck.bisect_right
    monkeypatch.setattr(updatecheck, "bisect_right", lambda *args: lookups.append(args) or bisect(*args))
    check_text_parents(update)
    assert len(lookups) <= 3 * 600  # a few per string (its origins, and its parent chain once), not a scan each


def nested_maps(depth: int, ordered: bool = True) -> bytes:
    """An update creating `depth` maps, each in the one before, under the root map `blocks`; listed innermost
    first unless `ordered` (an update may list its structs in any client order)."""
    docs = [Doc(client_id=depth + 10)] if ordered else [Doc(client_id=10 + i) for i in range(depth)]
    doc = docs[0]
    if ordered:
        with doc.transaction():
            at = doc.get("blocks", type=Map)
            for _ in range(depth):
                at["c"] = Map()
                at = at["c"]
        return doc.get_update()
    updates = []
    for i, writer in enumerate(docs):  # each level by another client, whose id is higher than the level's above
        for update in updates:
            writer.apply_update(update)
        at = writer.get("blocks", type=Map)
        for _ in range(i):
            at = at["c"]
        at["c"] = Map()
        updates.append(writer.get_update(docs[i - 1].get_state() if i else Doc().get_state()))
    merged = Doc()
    for update in updates:
        merged.apply_update(update)
    return merged.get_update()


@pytest.mark.parametrize("ordered", [True, False], ids=["one-client", "a-client-a-level"])
def test_types_nested_beyond_the_limit_in_one_update_are_refused(ordered: bool) -> None:
    """yrs's deep observers build an event for each level a change is under: 10,000 maps nested in one update under
    `blocks` held every room's loop for two minutes."""
    fine = nested_maps(updatecheck.MAX_TYPE_DEPTH, ordered)
    assert check_update(fine) == updatecheck.MAX_TYPE_DEPTH
    updatecheck.check_type_depth(fine)
    deep = nested_maps(updatecheck.MAX_TYPE_DEPTH + 1, ordered)
    assert check_update(deep) == updatecheck.MAX_TYPE_DEPTH + 1
    with pytest.raises(p.ProtocolError, match=f"types nested deeper than {updatecheck.MAX_TYPE_DEPTH}"):
        updatecheck.check_type_depth(deep)


def test_many_types_side_by_side_are_not_nesting() -> None:
    doc = Doc()
    with doc.transaction():
        for i in range(2 * updatecheck.MAX_TYPE_DEPTH):
            create_block(doc, f"b{i}", "p", "text")
    assert check_update(doc.get_update()) == 3 * 2 * updatecheck.MAX_TYPE_DEPTH
    updatecheck.check_type_depth(doc.get_update())
