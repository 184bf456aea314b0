"""The Store interface: what a room needs from durable storage, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from collab_server.logs import Throttled
from collab_server.merge import merge_all
from collab_server.pacing import GilTurns
from collab_server.replay import Replay, apply_offering_gil
from collab_server.slicing import slow_documents
from collab_server.surrogates import precut
from collab_server.storage.health import CommitHealth


log = logging.getLogger(__name__)


def fold_updates(updates: list[bytes], doc: str | None = None) -> bytes:
    """One compact update equivalent to `updates` applied in order (a checkpoint). `updates` is the previous
    checkpoint, if any, then the log: at least one; `doc` names their document, to apply its large updates in
    parts once it is known to be slow to apply (slicing.py), and to learn that.

    Applying through a document, unlike merge_updates, joins adjacent items and drops deleted content,
    so the checkpoint is small and fast to load. What the document holds back (changes whose causal
    dependencies are not among `updates`, as when another node commits an earlier change later; heldback.py)
    is carried over, so it applies once its dependencies arrive. Usually there is none, and the checkpoint is
    just the document's state.

    Compaction runs this in a worker thread: it offers the GIL back every GIL_TURN (1 ms) of work (GilTurns).
    """
    replay = Replay(name=doc)
    turns = GilTurns()
    for update, scan in precut(updates):
        apply_offering_gil(replay.apply, update, doc, replay.held, turns, scan)
    return merge_all([replay.close().get_update(), *replay.held.updates])


class SlowMarks:
    """Documents found slow to apply (slicing.py) while a store is open, for the store to mark so, with the
    document: a store recalls the mark when it reads the document (`slow_documents.recall`), so that its next
    load, in any process, is applied in parts from the start instead of holding the event loop once to learn it.
    `wake` is the store's write loop's event: it writes the marks (`take`) in a transaction of their own."""

    def __init__(self, wake: asyncio.Event) -> None:
        self._wake = wake
        self._names: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __bool__(self) -> bool:
        return bool(self._names)

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        slow_documents.listeners.append(self._found)

    def close(self) -> None:
        if self._found in slow_documents.listeners:
            slow_documents.listeners.remove(self._found)

    def _found(self, name: str) -> None:
        """Told by slow_documents, from the thread that applied (a fold's is a worker thread)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed without closing the store: nothing to mark
            self._loop.call_soon_threadsafe(self._add, name)

    def _add(self, name: str) -> None:
        self._names.add(name)
        self._wake.set()

    def take(self) -> list[str]:
        """The names to mark, forgotten here: a mark that fails to be written is learned again at a later load."""
        names, self._names = list(self._names), set()
        return names


class StorageError(RuntimeError):
    """A write or read against the store failed; the caller must not treat the data as durable."""


class DeletedMeanwhile(StorageError):
    """The document was deleted (by another node) after this node's room loaded it: a write of that room is dropped
    with the rest of the document, as if it had committed just before the deletion."""


ENTRY_BYTES = 32  # a log entry of a single keystroke is 15-25 bytes; see log_weight


def log_weight(update: bytes) -> int:
    """How much a log entry counts toward the compaction threshold: one per ENTRY_BYTES, at least one. Changes
    that arrive while a commit is in flight share an entry, so in a burst one entry can hold hundreds of
    them; counting by size folds such a log as soon as it holds about as much as the threshold's worth of
    single changes would."""
    return max(1, len(update) // ENTRY_BYTES)


def rows_weight(rows: list[tuple[int, bytes]]) -> int:
    """The log_weight of (seq, update) log rows together."""
    return sum(log_weight(update) for _, update in rows)


FOLD_SHARE = 2  # a served document's log is folded at 1/FOLD_SHARE of its checkpoint's weight, if over the threshold
RETRY_FIRST = 1.0  # seconds before a compaction storage refused is tried again, doubled at each failure in a row
RETRY_MOST = 60.0  # seconds, at most


class Compactor:
    """Runs a store's compactions off its commit path: at most one per document at a time, started when a
    commit brings the document's log count (entries weighed by log_weight) to its threshold, and again while
    the count is still over it (a burst committed during a fold, with nothing committed after it, must not
    stay in the log).

    A served document's threshold grows with its checkpoint (weighed like a log entry) to 1/FOLD_SHARE of it: a
    fold applies and rewrites the whole checkpoint, so folding a large document every `threshold` entries made
    its compaction cost grow with its size at a fixed rate of edits (a 50-80 KB document flooded by a client
    folded ten times a second, each fold taking the GIL from the loop and its swap the writer from every other
    room's commits), where this way a fold's cost is in proportion to what it folds, and a load replays at most
    about half a checkpoint's worth of log after the checkpoint.

    A document no longer served gets its log folded once it holds a tenth of the threshold, so its next load
    reads one checkpoint instead of replaying the log (a shorter log is not worth rewriting the checkpoint).

    A compaction that storage refuses (StorageError: a full disk, a corrupt database) is not started again before
    RETRY_FIRST seconds, doubled at each failure in a row up to RETRY_MOST: started again at every commit, it
    failed a thousand times in 25 s. Its failures are logged in a line without a traceback, at most once per 10 s.
    """

    def __init__(self, compact: Callable[[str], Awaitable[None]], log_counts: dict[str, int],
                 threshold: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._compact = compact
        self._log_counts = log_counts
        self.threshold = threshold
        self._clock = clock
        self._checkpoints: dict[str, int] = {}  # served documents' checkpoints, weighed by log_weight
        self._running: dict[str, asyncio.Task[None]] = {}
        self._refused: dict[str, tuple[int, float]] = {}  # documents storage refused to compact: (times in a
        # row, clock time before which none starts)
        self._log_refused = Throttled(log, logging.ERROR, clock=clock)
        self._closing = False

    def loaded(self, doc: str, log: list[bytes], checkpoint: bytes | None) -> None:
        """A room loaded `doc`: count its log, and weigh its checkpoint for its threshold."""
        self._log_counts[doc] = sum(map(log_weight, log))
        self._checkpoints[doc] = log_weight(checkpoint) if checkpoint else 0

    def folded(self, doc: str, weight: int, checkpoint: bytes) -> None:
        """A compaction folded log entries weighing `weight` of `doc` into `checkpoint`."""
        self._log_counts[doc] = max(0, self._log_counts[doc] - weight)
        if doc in self._checkpoints:
            self._checkpoints[doc] = log_weight(checkpoint)

    def threshold_of(self, doc: str) -> int:
        return max(self.threshold, self._checkpoints.get(doc, 0) // FOLD_SHARE)

    def after_commit(self, doc: str) -> None:
        if self._log_counts.get(doc, 0) >= self.threshold_of(doc):
            self._start(doc)

    def after_unload(self, doc: str) -> None:
        self._checkpoints.pop(doc, None)
        if self._log_counts.get(doc, 0) >= max(1, self.threshold // 10):
            self._start(doc)
        elif doc not in self._running:
            self._log_counts.pop(doc, None)  # loading counts again: a server that saw many documents keeps none
            self._refused.pop(doc, None)

    def _start(self, doc: str) -> None:
        if doc in self._running or self._closing:
            return
        if doc in self._refused and self._clock() < self._refused[doc][1]:
            return
        self._running[doc] = asyncio.create_task(self._run(doc), name=f"compact:{doc}")

    async def _run(self, doc: str) -> None:
        try:
            await self._compact(doc)
        except StorageError as exc:
            times = self._refused.get(doc, (0, 0.0))[0] + 1
            delay = min(RETRY_MOST, RETRY_FIRST * 2 ** (times - 1))
            self._refused[doc] = (times, self._clock() + delay)
            self._log_refused("compaction failed doc=%s times_in_a_row=%d retry_in=%gs error=%s",
                              doc, times, delay, exc)
            return
        except Exception:
            log.exception("compaction failed doc=%s", doc)
            self._log_counts[doc] = 0  # a log yrs cannot fold: tried again a threshold's worth of commits later
            return
        finally:
            del self._running[doc]
            if self._log_counts.get(doc) == 0:
                del self._log_counts[doc]
        self._refused.pop(doc, None)
        self.after_commit(doc)

    async def forget(self, doc: str) -> None:
        """Wait until no compaction of `doc` runs, then drop its count: the document is being deleted, and
        nothing commits to it meanwhile (its room is closed), so no compaction starts again."""
        while (task := self._running.get(doc)) is not None:
            await asyncio.wait([task])
        self._log_counts.pop(doc, None)
        self._checkpoints.pop(doc, None)
        self._refused.pop(doc, None)

    def stop_at(self, when: float) -> None:
        """Server shutdown: start no compaction after loop time `when` (a log left unfolded is replayed at the next
        load), so that folding the logs of every room unloaded at shutdown does not outlast the graceful timeout."""
        asyncio.get_running_loop().call_at(when, setattr, self, "_closing", True)

    async def close(self) -> None:
        """Start no more compactions and wait for those running."""
        self._closing = True
        await asyncio.gather(*self._running.values(), return_exceptions=True)


class HistoryCompacted(StorageError):
    """The requested past version lies before the checkpoint: its log entries were folded away."""


@dataclass(frozen=True, slots=True)
class DocInfo:
    name: str
    updated: float  # unix seconds of the last write
    log_entries: int  # updates not yet folded into the checkpoint


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    time: float  # unix seconds
    size: int  # bytes


@dataclass(frozen=True, slots=True)
class LogMark:
    """What one read of a document held: its checkpoint (a number that changes whenever it is replaced) and the
    log entries beside it. Only compaction removes entries, and it replaces the checkpoint."""
    checkpoint: int
    entries: array[int]  # their ids, 8 bytes each (a resync keeps a mark per loaded room)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    id: int  # unique in the store, increasing
    time: float  # unix seconds
    label: str
    size: int  # bytes of the saved state
    auto: bool = False  # saved by the server on a schedule (see versions.py), not on request


Deferred = bytes | Callable[[], bytes]  # an update, or a function the store calls for it (see Store.submit)
Pending = tuple[str, Deferred, "asyncio.Future[int]"]


def take(batch: list[Pending]) -> list[tuple[str, bytes, asyncio.Future[int]]]:
    """`batch` with each deferred update taken now, as its group commit begins. One whose function fails gets
    a StorageError and is left out."""
    taken = []
    for doc, update, fut in batch:
        if callable(update):
            try:
                update = update()
            except Exception as exc:  # noqa: BLE001  reported to the submitter, never to the batch
                log.exception("deferred update failed doc=%s", doc)
                if not fut.done():
                    fut.set_exception(StorageError(f"update could not be prepared: {exc!r}"))
                continue
        taken.append((doc, update, fut))
    return taken


class Store(Protocol):
    """Append-only update log per document, compacted into a checkpoint.

    `submit` enqueues an update for the next group commit and returns a future that resolves (to the
    update's log sequence number) once the update is durable, or fails with StorageError. The update may be
    a function returning it: the store calls it (on the event loop) when the commit that writes it begins,
    so the submitter can keep adding changes to one log entry while earlier commits are in flight.
    """

    on_commit: Callable[[int, float], None] | None  # (batch size, seconds), called after each group commit
    health: CommitHealth  # whether commits are failing (logged without flooding; /ready reports it)

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Commit everything submitted so far, then release resources."""

    def submit(self, doc: str, update: Deferred) -> asyncio.Future[int]: ...

    async def load(self, doc: str) -> list[bytes]:
        """The checkpoint (if any) followed by the log, in commit order."""

    async def load_new(self, doc: str, since: LogMark | None) -> tuple[list[bytes], LogMark | None]:
        """The updates of `doc` that the read marked `since` did not hold (all of them if None), at least, in commit
        order, and the mark of this read (None if the store does not keep one: the next read returns all)."""

    async def compact(self, doc: str) -> None:
        """Fold the log into the checkpoint atomically."""

    def unloaded(self, doc: str) -> None:
        """This node stopped serving `doc`: fold its log in the background if it is long enough to matter."""

    def stop_compacting_at(self, when: float) -> None:
        """Server shutdown: start no compaction after loop time `when` (`Compactor.stop_at`)."""

    async def delete(self, doc: str) -> bool:
        """Erase the checkpoint, log and saved versions of `doc` in one transaction; returns whether it had a
        checkpoint or log. The caller has closed the document's room, so nothing commits to it meanwhile."""

    async def list_docs(self, prefix: str = "", after: str = "", limit: int | None = None) -> list[DocInfo]:
        """Stored documents whose name starts with `prefix` and sorts after `after`, in name order, at most
        `limit` of them."""

    async def updated(self, docs: list[str]) -> dict[str, float]:
        """Time of the last write to each of `docs` that has one (changes whenever any node commits)."""

    async def history(self, doc: str) -> list[LogEntry]: ...

    async def load_until(self, doc: str, seq: int) -> list[bytes]:
        """The updates needed to rebuild `doc` as it was after log entry `seq` (HistoryCompacted if gone)."""

    async def save_version(self, doc: str, label: str, state: bytes, *, auto: bool = False) -> VersionInfo:
        """Keep `state` (the whole document as one update) as a named version of `doc`; compaction never
        touches it."""

    def exclusive(self, doc: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by one node at a time per document, for a request that reads the document and writes what it
        read decides (a restore): nodes taking turns, the second reads what the first wrote."""

    async def save_auto_version(self, doc: str, label: str, state: bytes, since: float) -> VersionInfo | None:
        """`save_version(..., auto=True)` unless `doc` has an automatic version saved at or after `since` (unix
        time), by any node: None then."""

    async def prune_versions(self, doc: str, keep: int) -> int:
        """Delete all but the newest `keep` automatic versions of `doc`; returns how many were deleted."""

    async def versions(self, doc: str) -> list[VersionInfo]:
        """The saved versions of `doc`, oldest first."""

    async def load_version(self, doc: str, version: int) -> bytes | None:
        """The state saved as `version` of `doc`, or None."""

    async def ping(self) -> None:
        """Raise StorageError when the store is unreachable."""

    # --- webhook marks (webhooks.py): what was reported to the receiver, per document ----------------------

    async def keep_marks(self) -> None:
        """Keep webhook marks from now on: create their table if missing, each stored document marked reported as
        of its current `updated` (turning webhooks on reports nothing older). Once the table exists, `delete`
        records in its transaction a deletion to report, whichever node deletes."""

    async def unreported(self, after: str, before: float, limit: int) -> tuple[list[str], str | None]:
        """Look at the next `limit` stored documents in name order after `after` (an index range, never the whole
        table): returns those whose last commit is later than their mark (or that have none) and at or before
        `before` (unix time), and the name to look after next (None: these were the last)."""

    async def deletions_to_report(self, limit: int) -> list[str]:
        """Up to `limit` documents whose deletion is still to report."""

    async def mark_reported(self, changed: dict[str, float], deleted: list[str]) -> None:
        """Record what the receiver accepted: for each of `changed`, a change event sent after reading the
        document's `updated` as the given value (the mark becomes the greater of it and the mark's own); for each
        of `deleted`, its deletion (the mark is removed)."""

    async def leads_sweep(self) -> bool:
        """Whether this node is the one, of the nodes sharing the store, that sweeps for unreported webhook events:
        the first to ask leads until its store closes (or loses its connection)."""
