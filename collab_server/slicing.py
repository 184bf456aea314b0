"""Large updates of slow documents applied a part at a time, so that applying one never holds the event loop long.

yrs holds the GIL while it applies an update, and integrating a document's state can take far longer than its
size suggests: where many items were inserted concurrently at the same place (bursts at the start of a text by
several clients), integrating them client by client makes each one skip over the others' (Yjs takes as long).
A soak's 190 KB checkpoint took 600 ms to apply in one call, and every room of the process waited that long at
each load or compaction of that document. Cut at struct boundaries into updates of a few dozen structs, it takes
1.2-1.4 times as long in all, in steps of a few milliseconds with the loop's turns between them. Most documents
gain nothing from it and pay for finding the boundaries in Python (65 ms for an array of 100,000 numbers that
yrs applies in 10 ms), so only documents seen to be slow are applied in parts (`SlowDocuments`): a document's
first load, a fold or a rebuild that takes long tells, and the stores keep the mark with the document, so its next
load in any process is applied in parts from the start (findings 50-52 in benchmarks/README.md).
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from operator import itemgetter
from typing import TypeVar

from collab_server.protocol import write_varuint
from collab_server.updatecheck import Struct, Walk, structs

T = TypeVar("T")

SLICE_STRUCTS = 64  # structs per part
SLICE_FROM_BYTES = 16 * 1024  # smaller updates are applied whole
SLOW_APPLY = 0.05  # CPU seconds: a document one of whose updates took longer than this to apply is applied in parts
# parts held back, waiting on later ones, from which the rest of the update is applied whole: each part applied
# gives every one held back again, so where many wait (a client's edits on top of another's that come later in the
# order `slices` gives, as in a document edited in several sessions) applying in parts grew quadratic, minutes for
# a 1.3 MB document that applies whole in 0.3 s
HELD_PARTS = 8


def slices(update: bytes, size: int = SLICE_STRUCTS) -> list[bytes]:
    """`update` (v1) as updates of at most `size` structs each, whose application in the order given has the
    effect of `update`'s: each client's structs in order, the clients' runs interleaved by how far along each is
    (so that what a struct refers to has mostly come before it; what has not is held back until it comes, and
    past HELD_PARTS parts held back the rest is applied whole), and the delete set last. `[update]` if it has no more than `size` structs. Raises ProtocolError on a malformed
    update. Which updates are worth cutting is `SlowDocuments.cut`'s to say."""
    walk = Walk(update, "update")
    pieces = []
    for _ in range(walk.count()):
        structs, client, clock = walk.count(), walk.uint(), walk.uint()
        parts = -(-structs // size)
        for i in range(parts):
            start, first, count = walk.pos, clock, min(size, structs - i * size)
            for _ in range(count):
                clock += walk.struct()
            pieces.append(((i + 0.5) / parts, client, first, count, update[start:walk.pos]))
    if len(pieces) <= 1:
        return [update]
    pieces.sort(key=itemgetter(0))  # stable: a client's pieces keep their order
    out = [b"".join((b"\x01", write_varuint(count), write_varuint(client), write_varuint(first), body, b"\x00"))
           for _, client, first, count, body in pieces]
    out.append(b"\x00" + update[walk.pos:])
    return out


def causal_parts(update: bytes, size: int) -> list[bytes]:
    """`update` (v1) as updates of about `size` bytes (a struct bigger than that is a part of its own) such that
    whatever a struct refers to in `update` (its origins, its parent, its client's struct before it) comes in its
    part or an earlier one: applied in order, no part waits for a later one (a peer that holds back what waits may
    refuse a connection whose changes wait too often), and the deletions come last, in parts of about `size` too.
    Raises ProtocolError on a malformed update."""
    found, walk = structs(update)
    runs: dict[int, tuple[list[int], list[int]]] = {}  # client -> (first clocks, indexes in `found`) of its structs
    for i, s in enumerate(found):
        clocks, indexes = runs.setdefault(s.client, ([], []))
        clocks.append(s.clock)
        indexes.append(i)
    after: list[list[int]] = [[] for _ in found]  # struct -> the structs referring to it
    waiting = [0] * len(found)  # struct -> how many of the structs it refers to are not placed yet
    for i, s in enumerate(found):
        for client, clock in [(s.client, s.clock - 1), *s.origins, *([s.parent] if s.parent is not None else [])]:
            clocks, indexes = runs.get(client, ([], []))
            at = bisect_right(clocks, clock) - 1
            if at >= 0 and (j := indexes[at]) != i:
                after[j].append(i)
                waiting[i] += 1
    ready = [i for i, count in enumerate(waiting) if not count]
    heapify(ready)
    order = []
    while ready:  # in the update's order where nothing forbids it
        i = heappop(ready)
        order.append(i)
        for j in after[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heappush(ready, j)
    if len(order) < len(found):  # refers in a circle: no update Yjs makes
        raise walk.fail("structs that refer to one another in a circle")
    ordered = [found[i] for i in order]
    parts = [_structs_update(update, group) for group in _groups(ordered, lambda s: (s.client, s.end - s.start), size)]
    deletions: list[tuple[int, slice]] = []  # (client, where one deleted range of it is in `update`)
    for _ in range(walk.count()):
        client, count = walk.uint(), walk.count()
        for _ in range(count):
            start = walk.pos
            walk.uint()
            walk.uint()
            deletions.append((client, slice(start, walk.pos)))
    groups = _groups(deletions, lambda d: (d[0], d[1].stop - d[1].start), size) or [[]]
    return parts + [_deletions_update(update, group) for group in groups]


P = TypeVar("P")
_HEAD = 16  # bytes counted for a client's head in a part (its id, and a count and clock)


def _groups(pieces: list[P], measure: Callable[[P], tuple[int, int]], size: int) -> list[list[P]]:
    """`pieces` in order, in groups of at most `size` bytes (`measure`: a piece's client and bytes; a client's head
    counted once in each group); a piece bigger than that is a group of its own."""
    groups: list[list[P]] = []
    group: list[P] = []
    held, clients = 0, set()
    for piece in pieces:
        client, length = measure(piece)
        if group and held + length + (_HEAD if client not in clients else 0) > size:
            groups.append(group)
            group, held, clients = [], 0, set()
        group.append(piece)
        held += length + (_HEAD if client not in clients else 0)
        clients.add(client)
    if group:
        groups.append(group)
    return groups


def _structs_update(update: bytes, group: list[Struct]) -> bytes:
    """A v1 update of the structs `group` of `update` (each client's in clock order, without gaps), no deletions."""
    by_client: dict[int, list[Struct]] = {}
    for s in group:
        by_client.setdefault(s.client, []).append(s)
    out = [write_varuint(len(by_client))]
    for client, run in by_client.items():
        out += [write_varuint(len(run)), write_varuint(client), write_varuint(run[0].clock),
                *(update[s.start:s.end] for s in run)]
    out.append(b"\x00")
    return b"".join(out)


def _deletions_update(update: bytes, group: list[tuple[int, slice]]) -> bytes:
    """A v1 update of no structs, deleting the ranges `group` (client, where the range is in `update`)."""
    by_client: dict[int, list[bytes]] = {}
    for client, at in group:
        by_client.setdefault(client, []).append(update[at])
    out = [b"\x00", write_varuint(len(by_client))]
    for client, ranges in by_client.items():
        out += [write_varuint(client), write_varuint(len(ranges)), *ranges]
    return b"".join(out)


class SlowDocuments:
    """The names of documents one of whose updates took more than SLOW_APPLY to apply, in this process or (as the
    stores recall) in an earlier one; the `size` most recently seen. Their large updates are applied in parts. The
    time is the applying thread's CPU time: under load, waiting for the GIL or a CPU makes quick documents take that
    long too, and applying those in parts costs up to twenty times as much. Loads (on the event loop) and folds (in
    worker threads) share it; each operation on it is atomic under the GIL."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._names: OrderedDict[str, None] = OrderedDict()
        # told of each name newly found slow, from whichever thread found it (stores keep the mark: SlowMarks)
        self.listeners: list[Callable[[str], None]] = []

    def __contains__(self, name: str | None) -> bool:
        return name in self._names

    def cut(self, name: str | None, update: bytes) -> bool:
        """Whether `update` of document `name` is to be applied in parts (see `slices`); never unnamed."""
        return len(update) >= SLICE_FROM_BYTES and name in self._names

    def timed(self, name: str | None, apply: Callable[[T], object], update: T) -> None:
        """`apply(update)`, noting `name` (unless None) as slow if it takes longer than SLOW_APPLY."""
        started = time.thread_time()
        apply(update)
        if name is not None and time.thread_time() - started > SLOW_APPLY:
            self.note(name)

    def note(self, name: str) -> None:
        """Note `name` as slow, telling the listeners if it was not."""
        new = name not in self._names
        self.recall(name)
        if new:
            for listener in list(self.listeners):
                listener(name)

    def recall(self, name: str) -> None:
        """Note `name` as slow, as storage remembers it (the listeners are not told)."""
        self._names[name] = None
        self._names.move_to_end(name)
        if len(self._names) > self.size:
            self._names.popitem(last=False)


slow_documents = SlowDocuments()
