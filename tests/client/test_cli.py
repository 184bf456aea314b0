"""``collab-client`` as a subprocess: block commands, get, replay, and one-line errors."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pycrdt import Doc

from client_py import CollabClient
from collab_server.auth import issue_token
from collab_server.model import add_index_entry, block_content, create_block, set_status
from tests.client.refserver import RefServer
from tests.serverproc import ROOT, ServerProcess, free_port


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client_py.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(code: int, *args: str) -> str:
    """Run, expect exit status ``code`` and a single-line error; return that line."""
    result = cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collab-client"), result.stderr
    return lines[0]


def test_block_commands_then_get(upstream: RefServer | ServerProcess) -> None:
    url, room = upstream.ws_url, f"cli-{uuid.uuid4().hex[:8]}"
    ok("block", "add", url, room, "b1", "--type", "heading", "--content", "draft")
    ok("block", "set-content", url, room, "b1", "final text")
    ok("block", "add-index", url, room, "b1", "search", "--metadata", '{"lang": "en"}')
    ok("block", "set-status", url, room, "b1", "search", "processing")
    blocks = json.loads(ok("get", url, room))["blocks"]
    entry = blocks["b1"]["indexingList"][0]
    assert (blocks["b1"]["type"], blocks["b1"]["content"]) == ("heading", "final text")
    assert (entry["index_name"], entry["lang"], entry["status"]) == ("search", "en", "processing")


def _model_updates() -> list[bytes]:
    doc, updates = Doc(), []
    doc.observe(lambda event: updates.append(event.update))
    create_block(doc, "b1", "paragraph", "replayed")
    add_index_entry(doc, "b1", "vector")
    set_status(doc, "b1", "vector", "done")
    create_block(doc, "b2", "quote")
    return updates


def test_replay_file_and_stdin(upstream: RefServer | ServerProcess, tmp_path: Path) -> None:
    url, room = upstream.ws_url, f"cli-{uuid.uuid4().hex[:8]}"
    updates = [base64.b64encode(update).decode() for update in _model_updates()]
    path = tmp_path / "updates.txt"
    path.write_text("# exported updates\n" + "\n".join(updates[:2]) + "\n\n")
    assert ok("replay", url, room, str(path)).strip() == "replayed 2 updates"
    result = cli("replay", url, room, "-", stdin="\n".join(u.rstrip("=") for u in updates[2:]))  # unpadded
    assert (result.returncode, result.stdout.strip()) == (0, "replayed 2 updates"), result.stderr
    blocks = json.loads(ok("get", url, room))["blocks"]
    assert sorted(blocks) == ["b1", "b2"]
    assert blocks["b1"]["content"] == "replayed"
    assert blocks["b1"]["indexingList"][0]["status"] == "done"


def test_unreachable_server_is_a_one_line_error() -> None:
    line = fails(1, "--timeout", "1", "get", f"ws://127.0.0.1:{free_port()}", "room")
    assert "no sync with" in line and "within 1 s" in line


@pytest.mark.parametrize("args, message", [
    (["get", "http://127.0.0.1:1", "room"], "not a ws:// or wss:// URL"),
    (["block", "add", "ws://127.0.0.1:1"], "required"),
    (["block", "frobnicate", "ws://127.0.0.1:1", "room"], "invalid choice"),
    (["block", "add-index", "ws://127.0.0.1:1", "room", "b1", "ix", "--metadata", "[1]"], "JSON object"),
    (["--timeout", "soon", "get", "ws://127.0.0.1:1", "room"], "invalid float"),
])
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    assert message in fails(2, *args)


def test_unknown_block_or_entry(upstream: RefServer | ServerProcess) -> None:
    url, room = upstream.ws_url, f"cli-{uuid.uuid4().hex[:8]}"
    assert "no block b9" in fails(1, "block", "set-content", url, room, "b9", "text")
    assert "no index entry b9/ix" in fails(1, "block", "set-status", url, room, "b9", "ix", "done")


def test_bad_replay_files(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}"  # never contacted: files are validated first
    bad = tmp_path / "bad.txt"
    bad.write_text(base64.b64encode(_model_updates()[0]).decode() + "\nnot base64!\n")
    assert "bad.txt line 2: not a base64 Yjs update" in fails(1, "replay", url, "room", str(bad))
    bad.write_text(base64.b64encode(b"\x05\x01garbage").decode() + "\n")
    assert "line 1: not a base64 Yjs update" in fails(1, "replay", url, "room", str(bad))
    assert "cannot read" in fails(1, "replay", url, "room", str(tmp_path / "missing.txt"))


def test_a_token_for_a_server_with_auth_on(server_factory) -> None:
    server = server_factory("--auth-required", "--auth-secret", "k")
    url, room = server.ws_url, f"cli-{uuid.uuid4().hex[:8]}"
    token = issue_token("k", doc=room)
    ok("--token", token, "block", "add", url, room, "b1", "--content", "secured")
    assert json.loads(ok("--token", token, "get", url, room))["blocks"]["b1"]["content"] == "secured"
    refused = fails(1, "get", url, room)
    assert "refused" in refused and "403" in refused
    read_only = issue_token("k", doc=room, access="ro")
    assert "collab-client: error: the server refused edits: read-only connection" in fails(
        1, "--token", read_only, "block", "set-content", url, room, "b1", "changed")
    assert json.loads(ok("--token", read_only, "get", url, room))["blocks"]["b1"]["content"] == "secured"


def test_set_content_changes_only_what_differs(upstream: RefServer | ServerProcess) -> None:
    """As the model's set_content (and the HTTP op) do: a peer's concurrent insert inside the unchanged text stays
    where it was (the command cleared the text and inserted it whole, which moved such an insert away)."""
    url, room = upstream.ws_url, f"cli-{uuid.uuid4().hex[:8]}"
    ok("block", "add", url, room, "b1", "--content", "hello world")

    async def peer(edit=None) -> Doc:
        async with CollabClient(url, room) as client:
            await client.synced()
            if edit is not None:
                edit(client.doc)
                await client.flush()
            return client.doc

    offline = asyncio.run(peer())
    block_content(offline, "b1").insert(5, "X")  # while the command runs, this peer is offline
    ok("block", "set-content", url, room, "b1", "hello world!")
    asyncio.run(peer(lambda doc: doc.apply_update(offline.get_update())))
    assert json.loads(ok("get", url, room))["blocks"]["b1"]["content"] == "helloX world!"


def test_statuses_are_checked_as_the_api_checks_them() -> None:
    url = f"ws://127.0.0.1:{free_port()}"  # never contacted
    assert "invalid choice: 'ERROR'" in fails(2, "block", "set-status", url, "room", "b1", "ix", "ERROR")
    assert "invalid choice: 'Processing'" in fails(2, "block", "add-index", url, "room", "b1", "ix", "--status",
                                                   "Processing")
