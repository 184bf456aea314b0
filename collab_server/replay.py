"""A document built from stored updates (a checkpoint and its log, at load or in a compaction's fold), each applied
as a Yjs replica applies it: characters cut between their UTF-16 units as Yjs cuts them (surrogates.py), and what
waits on a change still to come held and given again (heldback.py)."""

from __future__ import annotations

from pycrdt import Doc, TransactionEvent

from collab_server.heldback import Held
from collab_server.surrogates import Characters


class Replay:
    """Applies updates one by one to `doc`; `doc` is replaced when a cut needs it rebuilt."""

    __slots__ = ("doc", "characters", "held", "_reported", "_subscription")

    def __init__(self, doc: Doc | None = None, characters: Characters | None = None,
                 held: Held | None = None) -> None:
        self.doc = Doc() if doc is None else doc
        self.characters = Characters() if characters is None else characters
        self.held = Held() if held is None else held
        self._reported: list[bytes] = []
        self._subscription = self.doc.observe(self._report)

    def _report(self, event: TransactionEvent) -> None:
        self._reported.append(event.update)

    def apply(self, update: bytes) -> None:
        """Apply `update` (what pycrdt raises when it refuses one is raised here)."""
        reported = self._reported
        reported.clear()
        held_before = bool(self.held.updates)
        doc, update, seconds = self.characters.prepare_and_read(self.doc, update, self.held.updates)
        if doc is not self.doc:  # built from a state: it holds nothing back
            self.doc.unobserve(self._subscription)
            self.doc, self._subscription = doc, doc.observe(self._report)
        with doc.transaction():
            doc.apply_update(update)
            self.held.give(doc)
        if self.held.whole(reported, update):
            self.characters.applied(update, seconds)  # not read a second time
            return
        if self.held.note(doc, update) is None and not held_before:
            # all of it is in the document, and nothing else came with it (a state with deletions re-encoded)
            self.characters.applied(update, seconds)
            return
        for part in reported:
            self.characters.add(part)

    def close(self) -> Doc:
        """The document, no longer observed."""
        self.doc.unobserve(self._subscription)
        return self.doc
