"""When a store's compactions start: the threshold of a served document grows with its checkpoint."""

import asyncio
from collections import defaultdict

from collab_server.storage.base import ENTRY_BYTES, FOLD_SHARE, RETRY_FIRST, Compactor, StorageError


async def test_a_served_documents_threshold_grows_with_its_checkpoint() -> None:
    """A fold rewrites the whole checkpoint, so a large document's log is folded once it weighs a share of the
    checkpoint rather than every `threshold` entries; an unloaded document's log goes back to the threshold."""
    started: list[str] = []

    async def compact(doc: str) -> None:
        started.append(doc)
        counts[doc] = 0  # all folded

    counts: dict[str, int] = defaultdict(int)
    compactor = Compactor(compact, counts, threshold=25)
    checkpoint = b"x" * (ENTRY_BYTES * 200)
    compactor.loaded("big", [b"e"] * 3, checkpoint)
    compactor.loaded("small", [b"e"] * 3, b"x" * 100)
    assert counts == {"big": 3, "small": 3}
    assert compactor.threshold_of("big") == 200 // FOLD_SHARE > 25
    assert compactor.threshold_of("small") == 25

    counts["big"] = counts["small"] = 99
    compactor.after_commit("big")
    compactor.after_commit("small")
    await asyncio.sleep(0)
    assert started == ["small"]

    counts["big"] = 100
    compactor.after_commit("big")
    await asyncio.sleep(0)
    assert started == ["small", "big"]

    counts["big"] = 100
    compactor.folded("big", 90, b"x" * (ENTRY_BYTES * 60))  # it lost content: the threshold shrinks with it
    assert counts["big"] == 10 and compactor.threshold_of("big") == 30
    compactor.after_unload("big")  # nothing serves it: a fold on unload, and the plain threshold from now on
    assert compactor.threshold_of("big") == 25
    compactor.folded("big", 10, checkpoint)  # a fold after the unload does not weigh it again
    assert compactor.threshold_of("big") == 25
    await compactor.close()


async def test_a_log_that_cannot_be_folded_is_logged_and_tried_again_a_threshold_later(caplog) -> None:
    """A fold yrs refuses (a log no load could apply either) ends its task with one log line, not an exception
    nobody retrieves, and is not tried again at every commit."""
    started: list[str] = []

    async def compact(doc: str) -> None:
        started.append(doc)
        raise RuntimeError("Cannot apply update: block parent must be deleted or shared ref type")

    counts: dict[str, int] = defaultdict(int)
    compactor = Compactor(compact, counts, threshold=25)
    counts["doc"] = 30
    compactor.after_commit("doc")
    await asyncio.wait(list(compactor._running.values()))
    assert started == ["doc"] and "compaction failed doc=doc" in caplog.text
    counts["doc"] += 1  # the next commit
    compactor.after_commit("doc")
    assert not compactor._running and started == ["doc"]
    counts["doc"] += 24
    compactor.after_commit("doc")
    await asyncio.wait(list(compactor._running.values()))
    assert started == ["doc", "doc"]
    await compactor.close()


async def test_a_compaction_storage_refuses_is_tried_again_after_a_growing_delay_and_logged_in_one_line(
        caplog) -> None:
    """Started again at every commit, a compaction of a corrupt database failed a thousand times in 25 s, each
    with a traceback. Now each failure in a row doubles the wait before the next try, and the log gets one line
    (no traceback) per 10 s; a success ends the waits."""
    now = [1000.0]
    started: list[str] = []
    refusing = [True]

    async def compact(doc: str) -> None:
        started.append(doc)
        if refusing[0]:
            raise StorageError("loading 'doc' failed: database disk image is malformed")
        counts[doc] = 0

    async def commits(n: int) -> None:
        for _ in range(n):
            counts["doc"] += 1
            compactor.after_commit("doc")
            if compactor._running:
                await asyncio.wait(list(compactor._running.values()))

    counts: dict[str, int] = defaultdict(int)
    compactor = Compactor(compact, counts, threshold=25, clock=lambda: now[0])
    counts["doc"] = 30
    await commits(100)
    assert len(started) == 1
    now[0] += RETRY_FIRST
    await commits(100)
    assert len(started) == 2  # then it waits twice as long
    now[0] += RETRY_FIRST
    await commits(10)
    assert len(started) == 2
    now[0] += RETRY_FIRST
    await commits(10)
    assert len(started) == 3
    failures = [r for r in caplog.records if "compaction failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None
    assert "error=loading 'doc' failed: database disk image is malformed" in failures[0].getMessage()

    refusing[0] = False
    now[0] += 4 * RETRY_FIRST
    await commits(1)
    assert len(started) == 4 and "doc" not in counts  # folded
    refusing[0] = True
    counts["doc"] = 30
    await commits(1)
    now[0] += RETRY_FIRST  # the first failure of a new run waits the first delay again
    await commits(1)
    assert len(started) == 6
    await compactor.close()
