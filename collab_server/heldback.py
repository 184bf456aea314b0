"""Changes yrs holds back until their causal dependencies arrive.

An update can refer to items a document does not have yet: a client's change made on top of another node's change
that has not come through the broker, a log row committed before the row it builds on. yrs keeps such structs (and
deletions of unknown items) aside and integrates them when the dependencies arrive, but it reports nothing when it
holds them back, nothing of theirs is in `Doc.get_update()`, and a document rebuilt from its state loses them.
"""

from __future__ import annotations

from pycrdt import Doc, get_update

from collab_server.protocol import Reader
from collab_server.updatecheck import structs


def clocks(state: bytes) -> dict[int, int]:
    """A v1 state vector as {client: next clock}."""
    reader = Reader(state)
    return {reader.varuint(): reader.varuint() for _ in range(reader.varuint())}


def waits(update: bytes, known: dict[int, int]) -> bool:
    """Whether v1 `update` (checked by `check_update`) holds a change that a document of state `known` would hold
    back: a struct past a gap in its client's clocks, an origin or parent in neither, or the deletion of an item
    in neither."""
    found, w = structs(update)
    reach = dict(known)  # the clock each client reaches, in the document and then in the update
    for s in found:
        if s.clock > reach.get(s.client, 0):
            return True
        reach[s.client] = max(reach.get(s.client, 0), s.clock + s.length)
    if any(clock >= reach.get(client, 0) for s in found for client, clock in (*s.origins, *filter(None, [s.parent]))):
        return True
    for _ in range(w.count()):  # delete set: client, then ranges of (clock, length)
        client = w.uint()
        for _ in range(w.count()):
            if w.uint() + w.uint() > reach.get(client, 0):
                return True
    return False


def lacking(diff: bytes, known: dict[int, int]) -> bool:
    """Whether a v1 update diffed against a document's state holds something the document lacks: structs it
    could not integrate, or deletions of items it does not have (the others it has applied already)."""
    reader = Reader(diff)
    if reader.varuint():  # clients with structs beyond the state
        return True
    for _ in range(reader.varuint()):  # delete set: client, ranges of (clock, length)
        client = reader.varuint()
        for _ in range(reader.varuint()):
            clock, length = reader.varuint(), reader.varuint()
            if clock + length > known.get(client, 0):
                return True
    return False


class Held:
    """What a document holds back of the updates applied to it, to give it again: to a document rebuilt from its
    state, and whenever the document changes, since yrs (0.28), given two held-back changes that wait on the same
    change, integrates one of them when it comes and drops the other."""

    __slots__ = ("updates", "_moved")

    def __init__(self) -> None:
        self.updates: list[bytes] = []
        self._moved = False  # whether the last `note` found less held back of the earlier updates than before

    def give(self, doc: Doc) -> None:
        """Apply what is held back to `doc` again, until it integrates no more of it (call inside the transaction
        that applies an update, so that what integrates is reported with it)."""
        while self.updates:
            state = doc.get_state()
            for update in self.updates:
                doc.apply_update(update)
            if doc.get_state() == state:
                return

    def whole(self, reported: list[bytes], update: bytes) -> bool:
        """Whether a document holding nothing back reported `update`, just applied, as applied whole: yrs reports
        what it integrates in one update, the same bytes but for the order of a JSON object's keys (so the same
        length); holding structs back makes it shorter. A deletion of items partly there is reported with a
        shorter range, maybe in as many bytes, so an update deleting something must be reported as it is (an
        update with no deletions ends with a zero: its delete set is empty). Where this says no, `note` tells."""
        if self.updates or len(reported) != 1:
            return False
        report = reported[0]
        return report == update or (len(report) == len(update) and update[-1] == 0)

    def note(self, doc: Doc, update: bytes | None) -> bytes | None:
        """Note what `doc` holds back of `update`, just applied, and forget what it no longer holds back of earlier
        updates; returns what it holds back of `update` (None if nothing, or `update` is None)."""
        state = doc.get_state()
        known = clocks(state)

        def held_back(applied: bytes) -> bytes | None:  # with the update's whole delete set
            rest = get_update(applied, state)
            return rest if lacking(rest, known) else None

        earlier = self.updates
        self.updates = [rest for rest in map(held_back, earlier) if rest is not None]
        self._moved = self.updates != earlier
        rest = None if update is None else held_back(update)
        if rest is not None:
            self.updates.append(rest)
        return rest

    def settle(self, doc: Doc, origin: object = None) -> None:
        """After `note` found part of an update held back: if what was held back before integrated (in part) with
        it, give what is held back again, in a transaction of its own under `origin`, and forget what integrates.
        The update may bring what one held before waits on while part of it waits on that one: yrs integrates the
        one held before and not the part (it stayed out of the document until the next update came; after a
        load's last, for good)."""
        if self._moved:
            with doc.transaction(origin=origin):
                self.give(doc)
            self.note(doc, None)

    def forget(self, rest: bytes) -> None:
        """Hold `rest`, which `note` returned, back no more."""
        self.updates.remove(rest)
