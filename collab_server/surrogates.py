"""Characters cut between their two UTF-16 units, which yrs gets wrong.

Yjs counts text in UTF-16 units, so a client can insert, delete or format at a position between the two units
of a character beyond the Basic Multilingual Plane (most emoji). Yjs then replaces both halves with U+FFFD
on every replica. yrs (y-crdt's `split_str`, pycrdt 0.14) keeps the whole character left of the cut and an
item whose length no longer matches its text: every state it encodes from then on loses the cut and all
the same client wrote after it, so a reload, a compaction or a fresh client's sync silently drops edits.

So the cut is made here as Yjs makes it, before yrs sees it. `Characters` knows where a document's text
holds such characters; `Characters.plan` gives the document's state with each character an update cuts
replaced by two U+FFFD (the same two UTF-16 units, so every item keeps its clocks), to build the document again
from (replay.py builds it, a slow document's in parts). yrs then cuts between two characters, and the document is
the one every Yjs replica holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from pycrdt import Doc, merge_updates

from collab_server.heldback import clocks
from collab_server.merge import merge_all
from collab_server.protocol import ProtocolError, write_varuint
from collab_server.updatecheck import Walk

_FOUR_BYTE = re.compile(rb"[\xf0-\xf4]")  # leads a 4-byte UTF-8 sequence: a character beyond the BMP
_SEQUENCE = re.compile(rb"[\xf0-\xf4][\x80-\xbf]{3}")  # a lead and three bytes that could continue it
_LEADS = (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")

Point = tuple[int, int]  # (client, clock)
_BEYOND = write_varuint(0xFFFFFFFF)  # a clock (yrs's are 32-bit) past every struct of a client


def beyond_bmp(data: bytes) -> bool:
    """Whether `data` may hold a character beyond the BMP: a byte that could lead one and three that could
    continue it. Outside text such a run is rare: in a varint it takes a value of 2^28 or more (one client id
    in ~200); in 8-byte numbers and binary content one in ~3,000 positions. So a document without such
    characters is seldom read in Python (a state of 100,000 array items: 2.5 ms to apply, 34 ms more to read).
    memchr looks for the leads first in a large update (0.06 ms a megabyte for the five, against 2 ms for the
    regex)."""
    if len(data) >= 2048 and not any(lead in data for lead in _LEADS):
        return False
    return _SEQUENCE.search(data) is not None


class Characters:
    """Where a document's text holds characters beyond the BMP: the clocks of each one's second UTF-16 unit, by
    client (~60 bytes a character)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: dict[int, set[int]] = {}

    def __contains__(self, point: Point) -> bool:
        clocks = self.seconds.get(point[0])
        return clocks is not None and point[1] in clocks

    def add(self, update: bytes) -> None:
        """Note the characters beyond the BMP in the text of `update`, which the document has applied."""
        if beyond_bmp(update):
            self._note(Scan(update, cuts=False).seconds)

    def applied(self, update: bytes, seconds: list[Point] | None) -> None:
        """Note the characters of `update`, applied whole, as `plan` read them (`Cut.seconds`; read again if None)."""
        if seconds is None:
            self.add(update)
        else:
            self._note(seconds)

    def _note(self, seconds: list[Point]) -> None:
        for client, clock in seconds:
            clocks = self.seconds.get(client)
            if clocks is None:
                clocks = self.seconds[client] = set()
            clocks.add(clock)

    def reads(self, update: bytes) -> bool:
        """Whether `plan` reads `update` in Python (`Scan`; a large one is worth reading in a worker thread)."""
        return bool(self.seconds) or beyond_bmp(update)

    def plan(self, doc: Doc, update: bytes, held: list[bytes] | None = None, scan: Scan | None = None, *,
             apart: bool = False) -> Cut:
        """How to apply `update` to `doc` so that yrs cuts no character. A character of the document it cuts is
        replaced in a state to build a new document from (`Cut.state`; from then on this object knows that
        document's characters); one of its own text, in a copy of the update. `held`: what `doc` holds back of
        earlier updates (heldback.py), which integrates with this one and may cut its text or be cut by it: a
        character it holds that is cut is replaced in `held` itself, and the document is rebuilt (yrs keeps the
        uncut copy it holds back, so the caller gives `held` to the new document). `scan`: `update` read already.
        `apart`: leave reading the document for the cut (`Cut.fix`, all of a cut client's text) to the caller,
        who may do it in a worker thread (`Fix.run`) and then `settle` the cut; nothing may change `doc` meanwhile."""
        held = held if held is not None else []
        if scan is None:
            if not self.reads(update) and not any(map(beyond_bmp, held)):
                return Cut(update, [], None)
            scan = Scan(update)
        scans = [Scan(rest) for rest in held]
        cuts = set(scan.cuts).union(*(rest.cuts for rest in scans))
        cut = {point for point in cuts if point in self} if self.seconds else set()
        cut_own = cuts.intersection(scan.seconds)
        seconds: list[Point] | None = scan.seconds
        if cut_own:
            update, seconds = _replace(update, scan, cut_own), None
        cut_held: set[Point] = set()
        for i, rest in enumerate(scans):
            cut_rest = cuts.intersection(rest.seconds)
            if cut_rest:
                held[i] = _replace(held[i], rest, cut_rest)
                cut_held |= cut_rest
        if cut or cut_held:
            # yrs integrates a struct past a gap in its client's clocks when its origins are there, and encodes it
            # in the state while reporting it held back: so a character held back may be in the state too
            cut |= cut_held
            clients = {client for client, _ in cut}
            others = [client for client in clocks(doc.get_state()) if client not in clients]
            fix = Fix(doc.get_update(_holding(others)),  # only the cut clients' structs are read
                      doc.get_update(_holding(clients)) if others else None, cut, bool(cut_held))
            planned = Cut(update, seconds, None, fix)
            return planned if apart else self.settle(planned, *fix.run())
        return Cut(update, seconds, None)

    def settle(self, cut: Cut, state: bytes | None, seconds: list[Point]) -> Cut:
        """`cut` (planned `apart`) with what its `Fix.run` gave: the state to rebuild the document from, if any."""
        assert cut.fix is not None
        if state is not None:
            for client in {client for client, _ in cut.fix.cut}:
                self.seconds.pop(client, None)
            self._note([point for point in seconds if point not in cut.fix.cut])
            return Cut(cut.update, cut.seconds, state)
        for client, clock in cut.fix.cut:  # those characters were deleted since: forget them, so the next cut
            self.seconds[client].discard(clock)  # there reads nothing
        return Cut(cut.update, cut.seconds, None)


class Cut(NamedTuple):
    """How to apply an update so that yrs cuts no character (`Characters.plan`)."""

    update: bytes  # to apply instead of the update
    seconds: list[Point] | None  # the characters of its text, if read (for `Characters.applied`)
    state: bytes | None  # to build the document again from before applying it (None: the document as it is)
    fix: Fix | None = None  # planned apart: the document's characters to cut, to `run` and `settle` first


class Fix(NamedTuple):
    """Characters of a document to cut as Yjs cuts them: `part`, the structs of every client with one of them,
    `rest`, the other clients' (None: there are none), `cut`, the clocks of their second units; `held`: one is
    in what the document holds back, so it is rebuilt even if the document has none of them."""

    part: bytes
    rest: bytes | None
    cut: set[Point]
    held: bool

    def run(self) -> tuple[bytes | None, list[Point]]:
        """The state with those characters cut (None: the document no longer holds any, and nothing is held), and
        the characters beyond the BMP of `part`. Reads bytes only: a worker thread can run it."""
        known = Scan(self.part, cuts=False)
        fixed = _replace(self.part, known, self.cut)
        if fixed is self.part and not self.held:
            return None, known.seconds
        return (merge_updates(self.rest, fixed) if self.rest is not None else fixed), known.seconds


def precut(updates: list[bytes]) -> list[tuple[bytes, Scan | None]]:
    """`updates`, to be applied in order, with every character beyond the BMP that one of them cuts replaced by two
    U+FFFD in whichever of them holds it: applied so, no document needs rebuilding for a cut (a fold of a log of
    cuts rebuilt its document at each, ~0.8 s of CPU for 500 of them), and the document they make is the one
    a Yjs replica holds, where such a character is replaced once cut, whenever that was. Each comes with what
    reading it found (for `Characters.plan`, which would read it again), None where it was not read or changed.
    Reads them all, so a worker thread's work (a fold's, a large load's)."""
    if not any(map(beyond_bmp, updates)):
        return [(update, None) for update in updates]
    scans = [Scan(update) for update in updates]
    seconds = {point for scan in scans for point in scan.seconds}
    cut = {point for scan in scans for point in scan.cuts if point in seconds}
    return [(_replace(update, scan, cut), None) if cut.intersection(scan.seconds) else (update, scan)
            for update, scan in zip(updates, scans)]


def _holding(clients: Iterable[int]) -> bytes:
    """A v1 state vector holding every struct of `clients`: a document's update for it leaves them out."""
    clients = list(clients)
    return b"".join([write_varuint(len(clients)), *(write_varuint(client) + _BEYOND for client in clients)])


def merge_safely(updates: list[bytes]) -> list[bytes]:
    """`updates` merged into one, or as they are if one may hold a character beyond the BMP: yrs's merge slices
    updates that hold the same clocks at each other's item boundaries, and the same character may be whole in
    one (a node's write) and cut in two in another (a catch-up, a client's copy, another node's row), which
    would cut it as yrs does, outside any document."""
    if len(updates) <= 1 or any(_holds_beyond_bmp(update) for update in updates):
        return updates
    return [merge_all(updates)]


def _holds_beyond_bmp(update: bytes) -> bool:
    """Whether the text of `update` holds a character beyond the BMP. What may encode one also occurs outside
    text (see beyond_bmp), so where it occurs the text is read."""
    return beyond_bmp(update) and bool(Scan(update, cuts=False).seconds)


def _replace(data: bytes, scan: Scan, seconds: set[Point]) -> bytes:
    """`data` with each character whose second unit is at one of `seconds` replaced by two U+FFFD; `data`
    itself if none is in its text (it may have been deleted)."""
    parts = []
    at = 0
    for client, clock, length_at, start, end in scan.strings:
        text = data[start:end].decode("utf-8", "replace")
        out = []
        units = clock
        for char in text:
            if char > "\uffff" and (client, units + 1) in seconds:
                out.append("\ufffd\ufffd")
            else:
                out.append(char)
            units += 2 if char > "\uffff" else 1
        new = "".join(out).encode()
        if new != data[start:end]:
            parts += [data[at:length_at], write_varuint(len(new)), new]
            at = end
    if not parts:
        return data
    parts.append(data[at:])
    return b"".join(parts)


class Scan:
    """What a v1 update holds that matters here: `seconds`, the clocks of the second units of characters beyond
    the BMP in its text; `cuts` (if asked for), the points where integrating it splits items: after each origin,
    before each right origin, at both ends of each deleted range; `strings`, where each text holding such
    characters is: its client and clock, where its length prefix starts, where its bytes start and end.

    A loaded document can hold 100,000 structs, so the common ones are read inline, varints that are not needed
    skipped; the rarer contents are read by updatecheck's Walk. Bounds were checked by `check_update` for a
    client's update; a delete set it does not walk raises ProtocolError here if truncated."""

    __slots__ = ("seconds", "cuts", "strings")

    def __init__(self, data: bytes, cuts: bool = True) -> None:
        self.seconds: list[Point] = []
        self.cuts: list[Point] = []
        self.strings: list[tuple[int, int, int, int, int]] = []
        try:
            self._read(data, cuts)
        except IndexError:
            raise ProtocolError("invalid update: truncated") from None

    def _read(self, data: bytes, want_cuts: bool) -> None:
        pos = 0
        walk = Walk(data, "update")
        seconds, cuts = self.seconds, self.cuts

        def uint() -> int:
            nonlocal pos
            b = data[pos]
            pos += 1
            if b < 0x80:
                return b
            value, shift = b & 0x7F, 7
            while True:
                b = data[pos]
                pos += 1
                value |= (b & 0x7F) << shift
                if b < 0x80:
                    return value
                shift += 7

        def skip_uint() -> None:
            nonlocal pos
            while data[pos] & 0x80:
                pos += 1
            pos += 1

        for _ in range(uint()):
            structs = uint()
            client = uint()
            clock = uint()
            for _ in range(structs):
                info = data[pos]
                pos += 1
                ref = info & 0x1F
                if ref == 0 or ref == 10:  # GC, Skip
                    clock += uint()
                    continue
                if want_cuts:
                    if info & 0x80:  # origin: the item is cut after it
                        origin = uint()
                        cuts.append((origin, uint() + 1))
                    if info & 0x40:  # right origin: cut before it
                        origin = uint()
                        cuts.append((origin, uint()))
                else:
                    for _ in range(((info >> 7) & 1) + ((info >> 6) & 1)):
                        skip_uint()
                        skip_uint()
                if not info & 0xC0:  # a parent named, not implied by an origin
                    if uint() == 1:
                        size = uint()  # not `pos += uint()`: that adds to the position before the length
                        pos += size
                    else:
                        skip_uint()
                        skip_uint()
                    if info & 0x20:
                        size = uint()
                        pos += size
                if ref == 4:  # text
                    length_at = pos
                    size = uint()
                    start, pos = pos, pos + size
                    raw = data[start:pos]
                    if raw.isascii():
                        clock += size
                        continue
                    text = raw.decode("utf-8", "replace")
                    if not _FOUR_BYTE.search(raw):
                        clock += len(text)
                        continue
                    self.strings.append((client, clock, length_at, start, pos))
                    for char in text:
                        if char > "\uffff":
                            clock += 2
                            seconds.append((client, clock - 1))
                        else:
                            clock += 1
                elif ref == 1:  # deleted
                    clock += uint()
                else:
                    walk.pos = pos
                    if ref == 8 or ref == 2:  # any, JSON: one clock per value
                        count = walk.count()
                        if ref == 8:
                            walk.values(count)
                        else:
                            for _ in range(count):
                                walk.string()
                        clock += count
                    else:
                        walk.content(ref)
                        clock += 1
                    pos = walk.pos
        if want_cuts and pos < len(data):
            for _ in range(uint()):
                client = uint()
                for _ in range(uint()):
                    start = uint()
                    cuts += ((client, start), (client, start + uint()))
