"""Pure resolution semantics."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from collab_server.model import STATUS_PRIORITY, frontier, resolve_writes

STATUSES = list(STATUS_PRIORITY)


def record(write_id: str, status: str, *seen: str) -> dict:
    return {"id": write_id, "status": status, "seen": list(seen), "ts": 0.0}


def test_concurrent_writes_resolve_by_priority() -> None:
    base = record("a", "notStarted")
    assert resolve_writes([base, record("b", "done", "a"), record("c", "error", "a")]) == "error"
    assert resolve_writes([record("c", "processing", "a"), record("b", "done", "a")]) == "done"


def test_later_write_supersedes_higher_priority() -> None:
    assert resolve_writes([record("e", "error"), record("r", "processing", "e")]) == "processing"


def test_no_records_resolve_to_none() -> None:
    assert resolve_writes([]) is None


def test_unknown_status_ranks_lowest_and_ties_deterministically() -> None:
    assert resolve_writes([record("a", "weird"), record("b", "notStarted")]) == "notStarted"
    assert resolve_writes([record("a", "x"), record("b", "y")]) == "y"
    # as JavaScript compares strings (by UTF-16 code unit): U+FFFF after an emoji (Python puts it before)
    assert resolve_writes([record("a", "\uffff"), record("b", "😀")]) == "\uffff"


@st.composite
def histories(draw: st.DrawFn) -> list[dict]:
    """Random causal histories: each write has seen a random frontier of earlier writes."""
    records: list[dict] = []
    for i in range(draw(st.integers(1, 12))):
        current = [r["id"] for r in frontier(records)]
        seen = draw(st.lists(st.sampled_from(current), unique=True)) if current else []
        records.append(record(str(i), draw(st.sampled_from(STATUSES)), *seen))
    return records


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms())
def test_resolution_is_order_independent_and_compaction_safe(records: list[dict], rnd) -> None:
    expected = resolve_writes(records)
    shuffled = records[:]
    rnd.shuffle(shuffled)
    assert resolve_writes(shuffled) == expected
    assert resolve_writes(frontier(records)) == expected
    top = max(STATUS_PRIORITY[r["status"]] for r in frontier(records))
    assert STATUS_PRIORITY[expected] == top
