"""Merging the messages queued for a backed-up peer into fewer ones with the same effect."""

from __future__ import annotations

from collab_server import protocol as p
from collab_server.surrogates import merge_safely


def coalesce(messages: list[bytes]) -> list[bytes]:
    """Merge the document updates and the awareness updates among `messages` (server-encoded, in send order).

    Messages of other kinds (a sync answer, an auth message) stay where they are and bound the merging: between
    two of them, every document update becomes one update where the first was, and every awareness update one
    message after the others, holding the newest entry of each client (a removal wins a tie of clocks, as in
    y-protocols). Updates that may hold characters beyond the BMP are not merged but moved together
    (surrogates.merge_safely). A peer that applies the result ends with the same document and presence as one
    that applied each message; updates only move earlier and presence only later. Raises ValueError on a
    malformed message.
    """
    out: list[bytes] = []
    updates: list[bytes] = []
    update_at = 0
    presence: dict[int, p.AwarenessEntry] | None = None

    def end_run() -> None:
        nonlocal updates, presence
        if len(updates) > 1:
            out[update_at:update_at + 1] = [p.sync_update(update) for update in merge_safely(updates)]
        if presence is not None:
            out.append(p.encode_awareness(list(presence.values())))
        updates, presence = [], None

    for message in messages:
        msg = p.decode_message(message)
        if isinstance(msg, p.SyncMessage) and msg.kind == p.SyncType.UPDATE:
            if not updates:
                update_at = len(out)
                out.append(message)
            updates.append(msg.payload)
        elif isinstance(msg, p.AwarenessMessage):
            presence = {} if presence is None else presence
            p.keep_newest(presence, p.decode_awareness(msg.payload))
        else:
            end_run()
            out.append(message)
    end_run()
    return out
