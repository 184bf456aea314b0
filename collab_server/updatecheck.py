"""Checks on a Yjs v1 update or state vector before yrs reads it.

yrs trusts the counts in its input: it reserves memory for a claimed count before reading one entry (a 5-byte
update claiming 2^28 clients cost 550 MB, a 100-byte one nesting an object of 2^27 keys 300 MB), and it
decodes nested values recursively (an update nesting 100,000 arrays overflowed its stack and killed the
process). So the structs are walked here first: every count must fit in the bytes left, every length too,
and values nest at most MAX_DEPTH deep. The walk reads the structure only (lengths are skipped, not
decoded): a few microseconds for a typical update, a few times yrs's own time for a large one. The delete
set that follows the structs is read by yrs without either risk and is not walked. Everything else
(whether the update makes sense) is left to yrs.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

from collab_server.protocol import ProtocolError

MAX_DEPTH = 256  # nesting of values inside one update (JSON-like content, subdocument options)
MAX_TYPE_DEPTH = 256  # nesting of the types one update creates inside one another
_XML_ELEMENT, _XML_HOOK = 3, 5  # the type refs that carry a name
_FIXED = {127: 0, 126: 0, 121: 0, 120: 0, 124: 4, 123: 8, 122: 8}  # value tags with a fixed size after them


def check_update(update: bytes) -> int:
    """Raise ProtocolError unless the structs of v1 `update` keep their counts, lengths and nesting within
    bounds (it may still be invalid in ways only yrs can tell); return how many types it creates (more than
    MAX_TYPE_DEPTH: see `check_type_depth`)."""
    w = Walk(update, "update")
    data, types = w.data, 0
    for _ in range(w.count()):
        structs = w.count()
        w.uint()  # client
        w.uint()  # clock
        for _ in range(structs):
            if w.pos < len(data) and data[w.pos] & 0x1F == 7:
                types += 1
            w.struct()
    return types


_TEXT_TYPES = (2, 6)  # Y.Text, Y.XmlText: the only types that hold string content
_VALUES = (2, 3, 8, 9)  # JSON, binary, any, subdocument: content of arrays and maps, never of a text

Id = tuple[int, int]  # (client, clock)


class Struct(NamedTuple):
    """One struct of an update, as `structs` reads it: its id and length, content type, origins, the parent it
    names (an id, or None: a root by name, or implied by an origin), whether it is a map's value (a key named),
    the type ref of the type it creates (content 7), and where its bytes start and end in the update."""

    client: int
    clock: int
    length: int
    ref: int
    origins: list[Id]
    parent: Id | None
    keyed: bool
    type_ref: int | None
    start: int
    end: int


def structs(update: bytes) -> tuple[list[Struct], Walk]:
    """The structs of v1 `update` (checked by `check_update`) in order, and the walk, at its delete set."""
    w = Walk(update, "update")
    found = []
    for _ in range(w.count()):
        count = w.count()
        client = w.uint()
        clock = w.uint()
        for _ in range(count):
            start, info = w.pos, w.byte()
            ref = info & 0x1F
            if ref in (0, 10):  # GC, Skip
                length = w.uint()
                found.append(Struct(client, clock, length, ref, [], None, False, None, start, w.pos))
                clock += length
                continue
            origins, parent = w.item_head(info)
            type_ref = w.data[w.pos] if ref == 7 else None  # read by `content` next
            length = w.content(ref)
            found.append(Struct(client, clock, length, ref, origins, parent, bool(info & 0x20), type_ref, start,
                                w.pos))
            clock += length
    return found, w


class _Parents:
    """The structs of an update, with the parent each one names or implies, followed through the update."""

    def __init__(self, update: bytes) -> None:
        self.found, self.walk = structs(update)
        self.by_client: dict[int, list[Struct]] = {}  # each client's structs, in clock order (as an update lists them)
        for s in self.found:
            self.by_client.setdefault(s.client, []).append(s)
        self._starts = {client: [s.clock for s in run] for client, run in self.by_client.items()}
        self._parents: dict[Id, Id | None] = {}  # the parent found for each struct looked at (by its first clock)

    def holding(self, client: int, clock: int) -> Struct | None:
        """The struct of the update holding id (client, clock), if any."""
        at = bisect_right(self._starts.get(client, ()), clock) - 1
        s = self.by_client[client][at] if at >= 0 else None
        return s if s is not None and clock < s.clock + s.length else None

    def parent(self, s: Struct) -> Id | None:
        """The id of the item creating `s`'s parent type, as `s` names it or as the item its origin is in does,
        followed through the update (each struct once: a chain of thousands of items, looked up for each string,
        took cubic time); None for a root, or a parent the update does not show."""
        chain: dict[Id, None] = {}  # the structs followed, in order
        while (s.client, s.clock) not in self._parents:
            chain[(s.client, s.clock)] = None
            origin = self.holding(*s.origins[0]) if s.parent is None and s.origins else None
            if origin is None or (origin.client, origin.clock) in chain:  # the parent named, or none known
                self._parents[(s.client, s.clock)] = s.parent
                break
            s = origin
        found = self._parents[(s.client, s.clock)]
        for at in chain:
            self._parents[at] = found
        return found


def check_text_parents(update: bytes) -> None:
    """Raise ProtocolError if `update` (checked by `check_update`) puts string content in something that is not a
    text, as far as the update itself tells: a map's value, or an item whose parent (named, or that of the item its
    origin is in, followed through the update) is created in the update as another type, or that sits next to an
    array's values. Yjs never makes such an item; yrs, reading an array that holds one with a character beyond the
    BMP, loops for ever (to_json, or an item by position), which stopped the whole server (a 50-byte update). A
    parent the update does not show (one made by an earlier update) is not known here. Call it for updates that
    may hold such a character."""
    update_ = _Parents(update)
    types = {(s.client, s.clock): s.type_ref for s in update_.found if s.type_ref is not None}
    for s in update_.found:
        if s.ref != 4:
            continue
        parent = update_.parent(s)
        kind = types.get(parent) if parent is not None else None
        if s.keyed or (kind is not None and kind not in _TEXT_TYPES):
            raise update_.walk.fail("string content whose parent is not a text")
        if any((origin := update_.holding(*at)) is not None and origin.ref in _VALUES for at in s.origins):
            raise update_.walk.fail("string content among an array's values")


def check_type_depth(update: bytes) -> None:
    """Raise ProtocolError if `update` (checked by `check_update`) nests the types it creates more than
    MAX_TYPE_DEPTH deep. yrs's deep observers build an event for each level a change is under: 10,000 maps nested in
    one update under `blocks` held the event loop, every room's, for two minutes. Yjs has no such limit, but no
    editor nests so deep. Types the update does not show count as roots."""
    update_ = _Parents(update)
    depths: dict[Id, int] = {}
    for s in update_.found:
        if s.type_ref is None:
            continue
        chain: dict[Id, None] = {}  # s and the types of the update it is in, innermost first, to one of known depth
        at: Struct | None = s
        while at is not None and (at.client, at.clock) not in depths:
            chain[(at.client, at.clock)] = None
            parent = update_.parent(at)
            at = update_.holding(*parent) if parent is not None else None
            if at is not None and (at.type_ref is None or (at.client, at.clock) in chain):
                at = None
        depth = depths[(at.client, at.clock)] if at is not None else 0
        for inner in reversed(chain):
            depth += 1
            depths[inner] = depth
            if depth > MAX_TYPE_DEPTH:
                raise update_.walk.fail(f"types nested deeper than {MAX_TYPE_DEPTH}")


def check_state_vector(state_vector: bytes) -> None:
    """Raise ProtocolError unless the entries `state_vector` claims fit in its bytes."""
    Walk(state_vector, "state vector").count()


class Walk:
    """A bounds-checked cursor over a v1 update: reads its structure, skipping what it need not decode."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"invalid {self.what}: {problem} at byte {self.pos} of {len(self.data)}")

    def byte(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self.fail("truncated")
        self.pos = pos + 1
        return self.data[pos]

    def uint(self) -> int:
        data, pos = self.data, self.pos
        end = len(data)
        value = shift = 0
        while pos < end:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return value
            shift += 7
            if shift > 63:
                raise self.fail("varint too long")
        self.pos = pos
        raise self.fail("truncated")

    def count(self) -> int:
        """A count of entries that take a byte or more each: it cannot exceed the bytes left."""
        n = self.uint()
        if n > len(self.data) - self.pos:
            raise self.fail(f"a count of {n}")
        return n

    def skip(self, n: int) -> None:
        if n > len(self.data) - self.pos:
            raise self.fail(f"a length of {n}")
        self.pos += n

    def string(self) -> None:
        self.skip(self.uint())

    def struct(self) -> int:
        """Read one struct; returns how many clocks it takes."""
        info = self.byte()
        ref = info & 0x1F
        if ref in (0, 10):  # GC, Skip
            return self.uint()
        self.item_head(info)
        return self.content(ref)

    def item_head(self, info: int) -> tuple[list[Id], Id | None]:
        """Read what an item of `info` holds before its content: its origins (left, then right), and the parent it
        names if it has no origin (an id; None for a root named, or a parent implied by an origin)."""
        origins = [(self.uint(), self.uint()) for flag in (0x80, 0x40) if info & flag]
        parent = None
        if not origins:  # the parent is named
            if self.uint() == 1:
                self.string()  # a root's name
            else:
                parent = (self.uint(), self.uint())
            if info & 0x20:
                self.string()  # parent's key
        return origins, parent

    def content(self, ref: int) -> int:
        """Read an item's content of type `ref`; returns how many clocks it takes."""
        if ref == 1:  # deleted
            return self.uint()
        if ref == 2:  # JSON strings
            count = self.count()
            for _ in range(count):
                self.string()
            return count
        if ref == 4:  # string: one clock per UTF-16 unit
            size = self.uint()
            start = self.pos
            self.skip(size)
            raw = self.data[start:self.pos]
            return size if raw.isascii() else len(raw.decode("utf-8", "replace").encode("utf-16-le")) // 2
        if ref in (3, 5):  # binary, embed
            self.string()
        elif ref == 6:  # format: key, JSON value
            self.string()
            self.string()
        elif ref == 7:  # type
            type_ref = self.uint()
            if type_ref == _XML_HOOK:  # yrs reads no name after it, so the rest of the update would be misread
                raise self.fail("a Y.XmlHook, which yrs (pycrdt) cannot decode")
            if type_ref == _XML_ELEMENT:
                self.string()
        elif ref == 8:  # any values
            count = self.count()
            self.values(count)
            return count
        elif ref == 9:  # subdocument: guid, options
            self.string()
            self.values(1)
        else:
            raise self.fail(f"content type {ref}")
        return 1

    def values(self, count: int) -> None:
        """Skip `count` lib0 values, iteratively: each frame is [values left, whether each has a key first]."""
        stack = [[count, False]]
        while stack:
            frame = stack[-1]
            if not frame[0]:
                stack.pop()
                continue
            frame[0] -= 1
            if frame[1]:
                self.string()  # the object's key
            tag = self.byte()
            size = _FIXED.get(tag)
            if size is not None:
                self.skip(size)
            elif tag == 119 or tag == 116:  # string, bytes
                self.string()
            elif tag == 125:  # signed varint
                while self.byte() & 0x80:
                    pass
            elif tag == 117 or tag == 118:  # array, object
                n = self.count()
                if len(stack) > MAX_DEPTH:  # the frames below are the containers around this one, and the top
                    raise self.fail(f"values nested deeper than {MAX_DEPTH}")
                stack.append([n, tag == 118])
            else:
                raise self.fail(f"value tag {tag}")
