"""The JS twin (web_demo/src/model.js) and the Python model agree on shape and resolution."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc

from collab_server.model import (
    add_index_entry,
    blocks_map,
    blocks_to_json,
    create_block,
    entries,
    entry_status,
    find_index_entry,
    resolved_status,
    set_status,
)
from tests.model.replicas import sync_all

SCRIPT = Path(__file__).with_name("js_model_check.mjs")
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def run_js_result(*args: str) -> tuple[Doc, dict[str, Any]]:
    """Run the JS check; returns the doc it produced (loaded in Python) and everything it printed."""
    proc = subprocess.run(["node", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=30, cwd=SCRIPT.parents[2])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    doc = Doc()
    doc.apply_update(base64.b64decode(result["update"]))
    return doc, result


def run_js(*args: str) -> tuple[Doc, dict[str, Any]]:
    """Run the JS check; returns the doc it produced (loaded in Python) and its JSON."""
    doc, result = run_js_result(*args)
    return doc, result["json"]


def test_python_resolves_a_js_built_document_like_js() -> None:
    doc, js_json = run_js("build")
    assert blocks_to_json(doc) == js_json
    assert resolved_status(doc, "b1", "vector") == "error"
    assert resolved_status(doc, "b1", "keyword") == "processing"
    assert resolved_status(doc, "b2", "vector") == "done"
    vector = dict(js_json["b1"]["indexingList"][0])
    assert vector.pop("timestamp") in (20, 21, 22)  # last-writer-wins among the concurrent writes
    assert vector == {"index_name": "vector", "model": "m1", "dims": 3, "status": "error"}
    assert js_json["b2"]["content"] == "title!"
    b2 = js_json["b2"]["indexingList"][0]
    assert (b2["raw"], b2["unset"]) == ("AQL6", None)  # JSON.stringify dropped an undefined key, Python showed null


def test_js_resolves_a_python_built_document_like_python() -> None:
    a, b = Doc(client_id=1), Doc(client_id=2)
    create_block(a, "b1", "paragraph", "text")
    add_index_entry(a, "b1", "vector", metadata={"model": "m1", "nested": {"k": [1, 2.5]}}, ts=10)
    add_index_entry(a, "b1", "keyword", ts=10)
    sync_all(a, b)
    set_status(a, "b1", "vector", "done", ts=20)
    set_status(b, "b1", "vector", "error", ts=21)
    set_status(a, "b1", "keyword", "processing", ts=20)
    set_status(a, "b1", "keyword", "done", ts=21)
    sync_all(a, b)
    update = base64.b64encode(a.get_update()).decode()
    retried, js_json = run_js("retry", update)
    assert js_json == blocks_to_json(a)
    assert [e["status"] for e in js_json["b1"]["indexingList"]] == ["error", "done"]
    # JS's retry saw both concurrent writes, so it supersedes the error
    assert resolved_status(retried, "b1", "vector") == "processing"
    assert len(find_index_entry(retried, "b1", "vector")["statusWrites"]) == 1


def test_concurrent_unknown_statuses_tie_alike_in_js_and_python() -> None:
    """Ties between unknown statuses go to the greatest string: JavaScript compares UTF-16 code units, Python
    compared code points, so replicas disagreed on "\uffff" against "😀" (and the server materialised Python's)."""
    a, b = Doc(client_id=1), Doc(client_id=2)
    create_block(a, "b1", "paragraph")
    add_index_entry(a, "b1", "vector", ts=10)
    sync_all(a, b)
    set_status(a, "b1", "vector", "\uffff", ts=20)
    set_status(b, "b1", "vector", "😀", ts=21)
    sync_all(a, b)
    _, js_json = run_js("retry", base64.b64encode(a.get_update()).decode())
    assert js_json == blocks_to_json(a)
    assert resolved_status(a, "b1", "vector") == "\uffff"


def test_js_readers_skip_junk_shapes_and_writers_refuse_them() -> None:
    doc, result = run_js_result("junk")  # node exits non-zero if any JS reader throws
    no_entries = dict.fromkeys(["vector", "keyword", "proto", "idx", "idx2", "idx3"])
    assert result["resolved"] == {
        **dict.fromkeys(["arr", "mapList", "nil", "noList", "num", "str", "text", "textList"], no_entries),
        # malformed records are ignored; "constructor" is an unknown status, below notStarted
        "good": {**no_entries, "vector": "done", "keyword": "notStarted", "proto": "notStarted"},
        # the plain-object entry is skipped; junk statusWrites fall back to a string `status`
        "mixed": {**no_entries, "idx": "done", "idx2": "error"},
    }
    assert result["removed"] == {"keyword": True, "missing": []}
    assert result["errors"] == {
        "addToNumber": "no block num",
        "addToNoList": "block noList has no indexingList array",
        "addToTextList": "block textList has no indexingList array",
        "setOnNumber": "no index entry num/idx",
        "setOnPlainEntry": "no index entry mixed/nope",
        "contentOfNumber": "no block num",
        "contentNotText": "block mixed has no content text",
    }
    js_json = result["json"]
    assert sorted(js_json) == ["good", "mapList", "mixed", "noList", "textList"]  # the Y.Map blocks
    assert js_json["good"] == blocks_to_json(doc)["good"] == {
        "id": "good", "type": "paragraph", "content": "hello", "indexingList": [
            {"index_name": "vector", "model": "m1", "status": "done", "timestamp": 20},
            {"index_name": "proto", "status": "notStarted", "timestamp": 10},
        ]}
    assert js_json["mixed"] == blocks_to_json(doc)["mixed"] == {"id": "mixed", "type": 3, "content": "", "indexingList": [
        {"index_name": "idx", "status": "done"},
        {"index_name": "idx2", "status": "done", "timestamp": 50},
        {"index_name": "idx3", "status": None},
    ]}
    assert len(find_index_entry(doc, "good", "vector")["statusWrites"]) == 11  # malformed records kept
    # removeIndexEntry deleted "keyword" at its array position, behind the junk, which stays
    indexing_list = list(blocks_map(doc)["good"]["indexingList"])
    assert indexing_list[:2] == [5, "junk"] and str(indexing_list[2]) == "x"
    assert [entry["index_name"] for entry in indexing_list[3:]] == ["vector", "proto"]
    assert resolved_status(doc, "mixed", "idx2") == "done"  # setStatus replaced its junk statusWrites
    assert result["entries"] == {  # JS skips the same junk entries as Python
        block_id: [[entry.get("index_name"), entry_status(entry)] for entry in entries(blocks_map(doc).get(block_id))]
        for block_id in result["resolved"]
    }
