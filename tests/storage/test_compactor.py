"""When a store's compactions start: the threshold of a served document grows with its checkpoint."""

import asyncio
from collections import defaultdict

from collab_server.storage.base import ENTRY_BYTES, FOLD_SHARE, Compactor


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
