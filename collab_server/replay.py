"""A document built from stored updates (a checkpoint and its log, at load or in a compaction's fold), each applied
as a Yjs replica applies it: characters cut between their UTF-16 units as Yjs cuts them (surrogates.py), and what
waits on a change still to come held and given again (heldback.py). A large update of a document known to be slow
to apply, and the state such a document is rebuilt from, are applied in parts with turns for the rest of the
process between them (slicing.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from pycrdt import Doc, TransactionEvent

from collab_server.heldback import Held
from collab_server.pacing import GilTurns, Turns, in_thread
from collab_server.protocol import ProtocolError
from collab_server.slicing import HELD_PARTS, slices, slow_documents
from collab_server.surrogates import Characters, Cut, Scan, precut

READ_APART = 16 * 1024  # bytes from which a load reads an update for characters beyond the BMP in a worker thread


class Replay:
    """Applies updates one by one to `doc`, of document `name` (None: unnamed, never applied in parts); `doc` is
    replaced when a cut needs it rebuilt."""

    __slots__ = ("doc", "characters", "held", "name", "_reported", "_subscription")

    def __init__(self, doc: Doc | None = None, characters: Characters | None = None,
                 held: Held | None = None, name: str | None = None) -> None:
        self.doc = Doc() if doc is None else doc
        self.characters = Characters() if characters is None else characters
        self.held = Held() if held is None else held
        self.name = name
        self._reported: list[bytes] = []
        self._subscription = self.doc.observe(self._report)

    def _report(self, event: TransactionEvent) -> None:
        self._reported.append(event.update)

    def apply(self, update: bytes, scan: Scan | None = None) -> None:
        """Apply `update` (`scan`: it read already; what pycrdt raises when it refuses one is raised here). A
        document rebuilt for it is built in parts if it is known to be slow, offering the GIL between them (see
        `build`; a load, on the event loop, uses `apply_paced`). Notes the document as slow if integrating takes
        long: yrs holds the GIL for all of it, where Python reading the update (`plan`) hands the GIL on every few
        milliseconds in a worker thread, and applying in parts would not shorten that."""
        cut = self.plan(update, scan)
        if cut.state is not None:
            self.replace(build(cut.state, self.doc.client_id, self.name))
        slow_documents.timed(self.name, self.integrate, cut)

    def plan(self, update: bytes, scan: Scan | None = None) -> Cut:
        """How to apply `update` (Characters.plan; `scan`: it read already): a state to rebuild the document from
        first (`replace`), then `integrate`."""
        return self.characters.plan(self.doc, update, self.held.updates, scan)

    def replace(self, doc: Doc) -> None:
        """Go on with `doc`, built from the state `plan` gave."""
        self.doc.unobserve(self._subscription)
        self.doc, self._subscription = doc, doc.observe(self._report)

    def integrate(self, cut: Cut) -> None:
        """Apply the update `plan` gave, to the document rebuilt if it said so."""
        update, doc, reported = cut.update, self.doc, self._reported
        reported.clear()
        held_before = bool(self.held.updates)
        with doc.transaction():
            doc.apply_update(update)
            self.held.give(doc)
        if self.held.whole(reported, update):
            self.characters.applied(update, cut.seconds)  # not read a second time
            return
        rest = self.held.note(doc, update)
        if rest is None and not held_before:
            # all of it is in the document, and nothing else came with it (a state with deletions re-encoded)
            self.characters.applied(update, cut.seconds)
            return
        if rest is not None:
            self.held.settle(doc)
        for part in reported:
            self.characters.add(part)

    def close(self) -> Doc:
        """The document, no longer observed."""
        self.doc.unobserve(self._subscription)
        return self.doc


def _in_turn(update: bytes, parts: list[bytes], held: Held) -> Iterator[bytes]:
    """`parts` of `update` (`slices`, or `[update]`) to apply in turn, and `update` itself instead of the rest once
    more than HELD_PARTS of those applied are held back in `held` (see slicing.py; applied again, it adds only what
    the document lacks)."""
    for part in parts:
        if part is not update and len(held.updates) > HELD_PARTS:
            yield update
            return
        yield part


def apply_offering_gil(apply: Callable[..., None], update: bytes, name: str | None, held: Held, turns: GilTurns,
                       scan: Scan | None = None) -> None:
    """`apply(update)` of document `name` in a worker thread, in parts if it is a large update of a document known
    to be slow (`held`: what applying them holds back, see `_in_turn`), offering the GIL between them; `apply(update,
    scan)` if it is applied whole and `scan` (what reading it found, for `Replay.apply`) is given. `apply` notes
    the document as slow if it takes long."""
    for part in _in_turn(update, slices(update) if slow_documents.cut(name, update) else [update], held):
        if part is update and scan is not None:
            apply(part, scan)
        else:
            apply(part)
        turns.offer()


async def apply_paced(replay: Replay, update: bytes, turns: Turns, scan: Scan | None = None) -> None:
    """`replay.apply(update)` on the event loop, offering the rest of the loop `turns` before it; a large update of
    a document known to be slow is applied in parts with turns between them, cut in a worker thread (cutting reads
    it in Python), and so is the state it is rebuilt from where a part cuts a character. A large update that may
    hold characters beyond the BMP is read for them in a worker thread too (~30 ms per 100,000 items in Python,
    where yrs applies them in 2.5). Notes the document as slow if one application takes long."""
    name = replay.name
    parts = await in_thread(slices, update) if slow_documents.cut(name, update) else [update]
    for part in _in_turn(update, parts, replay.held):
        await turns.offer()
        if part is update and scan is not None:
            cut = replay.plan(part, scan)
        else:
            read = len(part) >= READ_APART and replay.characters.reads(part)
            cut = replay.plan(part, await in_thread(Scan, part) if read else None)
        if cut.state is not None:
            replay.replace(await build_paced(cut.state, replay.doc.client_id, name, turns))
        slow_documents.timed(name, replay.integrate, cut)


async def precut_apart(updates: list[bytes]) -> list[tuple[bytes, Scan | None]]:
    """`surrogates.precut(updates)`, in a worker thread if they are large (it reads them in Python); `updates` as
    they are if one of them cannot be read, for applying it to say which and why."""
    try:
        return await in_thread(precut, updates) if sum(map(len, updates)) >= READ_APART else precut(updates)
    except ProtocolError:
        return [(update, None) for update in updates]


class _Build:
    """A document built from a state, a part at a time. The parts of a state cut none of its characters (their
    items are split where the document's are), so only what a part leaves waiting on a later one is tracked."""

    __slots__ = ("doc", "held")

    def __init__(self, client_id: int) -> None:
        self.doc = Doc(client_id=client_id)  # its own later changes carry on its clock
        self.held = Held()

    def apply(self, part: bytes) -> None:
        self.doc.apply_update(part)
        self.held.give(self.doc)
        if self.held.note(self.doc, part) is not None:
            self.held.settle(self.doc)


def build(state: bytes, client_id: int, name: str | None) -> Doc:
    """A document of `client_id` built from `state` (see surrogates.Cut), in parts offering the GIL between them if
    it is a slow document's (a fold's rebuild, in a worker thread)."""
    built = _Build(client_id)
    apply_offering_gil(partial(slow_documents.timed, name, built.apply), state, name, built.held, GilTurns())
    return built.doc


async def build_paced(state: bytes, client_id: int, name: str | None, turns: Turns) -> Doc:
    """As `build`, on the event loop: a slow document's in parts with `turns` between them."""
    built = _Build(client_id)
    parts = await in_thread(slices, state) if slow_documents.cut(name, state) else [state]
    for part in _in_turn(state, parts, built.held):
        await turns.offer()
        slow_documents.timed(name, built.apply, part)
    return built.doc


def apply(doc: Doc, update: bytes, characters: Characters) -> Doc:
    """Apply `update` to `doc` or, where it cuts a character, to a document built again (`build`); returns the one
    applied. What `doc` holds back is not tracked: `Replay` does that, for updates that may wait on one another."""
    cut = characters.plan(doc, update)
    if cut.state is not None:
        doc = build(cut.state, doc.client_id, None)
    doc.apply_update(cut.update)
    characters.applied(cut.update, cut.seconds)
    return doc
