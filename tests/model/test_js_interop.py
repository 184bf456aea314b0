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
    blocks_to_json,
    create_block,
    find_index_entry,
    resolved_status,
    set_status,
)
from tests.model.replicas import sync_all

SCRIPT = Path(__file__).with_name("js_model_check.mjs")
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def run_js(*args: str) -> tuple[Doc, dict[str, Any]]:
    """Run the JS check; returns the doc it produced (loaded in Python) and its JSON."""
    out = subprocess.run(["node", str(SCRIPT), *args], capture_output=True, text=True,
                         check=True, timeout=30, cwd=SCRIPT.parents[2]).stdout
    result = json.loads(out)
    doc = Doc()
    doc.apply_update(base64.b64decode(result["update"]))
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
