"""``collab-client``: read a room, edit its blocks, or replay updates into it, from the shell.

Exit status: 0 on success, 1 when the operation fails (server unreachable, unknown block, bad replay
file), 2 for bad arguments. Errors are one line on stderr.

Replay file format: one Yjs v1 update per line, base64 (standard alphabet, padding optional); blank
lines and lines starting with ``#`` are ignored; ``-`` reads stdin. All updates are validated before
connecting and applied once synced, so they may build on what the room holds.

Edits count as done once the server has answered a round trip sent after them (CollabClient.flush).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

from pycrdt import Doc

from client_py.client import CollabClient, ServerClosed
from collab_server.model import (
    STATUS_PRIORITY,
    add_index_entry,
    blocks_to_json,
    create_block,
    set_content,
    set_status,
)

T = TypeVar("T")


class CliError(Exception):
    """A failure to report as one line, with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_updates(path: str) -> list[bytes]:
    """Parse a replay file (see module docstring); each update must decode as a Yjs update."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc
    updates = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            update = base64.b64decode(line + "=" * (-len(line) % 4), validate=True)
            Doc().apply_update(update)
        except ValueError as exc:  # binascii.Error is a ValueError
            raise CliError(f"{path} line {number}: not a base64 Yjs update ({exc})") from exc
        updates.append(update)
    return updates


async def _connected(args: argparse.Namespace, edit: Callable[[Doc], None] | None = None) -> Doc:
    """Sync with the room, apply ``edit`` to the synced doc and wait until the server has it."""
    async with CollabClient(args.url, args.room, token=args.token) as client:
        try:
            await client.synced(args.timeout)
            if edit is not None:
                edit(client.doc)
                await client.flush(args.timeout)
        except ServerClosed as exc:
            raise CliError(f"the server refused {client.url}: {exc}") from None
        except PermissionError as exc:  # a read-only token
            raise CliError(str(exc)) from None
        except TimeoutError:
            reason = f": {client.last_error}" if client.last_error else ""
            raise CliError(f"no sync with {client.url} within {args.timeout:g} s{reason}") from None
        return client.doc


async def cmd_get(args: argparse.Namespace) -> None:
    doc = await _connected(args)
    print(json.dumps({"blocks": blocks_to_json(doc)}, indent=2, sort_keys=True))


async def cmd_replay(args: argparse.Namespace) -> None:
    updates = read_updates(args.file)

    def edit(doc: Doc) -> None:
        for update in updates:
            doc.apply_update(update)

    await _connected(args, edit)
    print(f"replayed {len(updates)} updates")


async def cmd_block_add(args: argparse.Namespace) -> None:
    await _connected(args, lambda doc: create_block(doc, args.block_id, args.type, args.content))


async def cmd_set_content(args: argparse.Namespace) -> None:
    await _connected(args, lambda doc: _known(lambda: set_content(doc, args.block_id, args.text)))


async def cmd_add_index(args: argparse.Namespace) -> None:
    def edit(doc: Doc) -> None:
        _known(lambda: add_index_entry(doc, args.block_id, args.index_name, args.status, args.metadata))

    await _connected(args, edit)


async def cmd_set_status(args: argparse.Namespace) -> None:
    await _connected(args, lambda doc: _known(lambda: set_status(doc, args.block_id, args.index_name, args.status)))


def _known(action: Callable[[], T]) -> T:
    """Run a model call, turning its KeyError (unknown block/entry) or ValueError into a CliError."""
    try:
        return action()
    except (KeyError, ValueError) as exc:
        raise CliError(exc.args[0]) from None


def _ws_url(text: str) -> str:
    if urlsplit(text).scheme not in ("ws", "wss"):
        raise argparse.ArgumentTypeError(f"not a ws:// or wss:// URL: {text!r}")
    return text


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collab-client", description="Read a room, edit its blocks, or replay updates into it.")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for sync (default 10)")
    parser.add_argument("--token", default=os.environ.get("COLLAB_TOKEN"),
                        help="access token for a server with auth on (default: env COLLAB_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(sub: argparse._SubParsersAction, name: str, handler: Callable[..., Awaitable[None]],
                help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help)
        cmd.add_argument("url", type=_ws_url, help="server URL, e.g. ws://127.0.0.1:1234")
        cmd.add_argument("room")
        cmd.set_defaults(handler=handler)
        return cmd

    command(commands, "get", cmd_get, "print the room's blocks as JSON")
    replay = command(commands, "replay", cmd_replay, "apply a file of base64 updates (one per line)")
    replay.add_argument("file", help="update file, or - for stdin")

    block = commands.add_parser("block", help="edit blocks").add_subparsers(
        dest="block_command", required=True, parser_class=_Parser)
    add = command(block, "add", cmd_block_add, "create a block (no-op if it exists)")
    add.add_argument("block_id")
    add.add_argument("--type", default="paragraph")
    add.add_argument("--content", default="")
    content = command(block, "set-content", cmd_set_content,
                      "make a block's content TEXT (only the span that differs changes)")
    content.add_argument("block_id")
    content.add_argument("text")
    index = command(block, "add-index", cmd_add_index, "add an index entry to a block")
    index.add_argument("block_id")
    index.add_argument("index_name")
    index.add_argument("--status", default="notStarted", choices=STATUS_PRIORITY)
    index.add_argument("--metadata", type=_json_object, default=None, help="extra entry fields, a JSON object")
    status = command(block, "set-status", cmd_set_status, "record a status for an index entry")
    status.add_argument("block_id")
    status.add_argument("index_name")
    status.add_argument("status", choices=STATUS_PRIORITY)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger("client_py").setLevel(logging.ERROR)  # what fails is said once, as the command's error
    try:
        asyncio.run(args.handler(args))
    except CliError as exc:
        parser.exit(1, f"collab-client: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
