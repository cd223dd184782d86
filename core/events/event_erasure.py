"""Erasure from the event store: every segment that holds the person's events is written
again without them (under its own name, so the index still finds it) and its count in
`eventsegments` corrected.

The dedup index keeps the erased events' ids as claimed by their segment: an event Braze
delivers again (the same id) is still a duplicate, so erased events do not come back by
redelivery.
"""

from __future__ import annotations

from collections import Counter

from core.events.store import EVENTS_CONTAINER, EventStore, SegmentEntry
from core.privacy.person import Matcher
from core.privacy.scrub import scrub_file


def erase_events(store: EventStore, matcher: Matcher) -> Counter[str]:
    counts: Counter[str] = Counter()
    blobs = store.storage.blobs
    entries = [
        entry for entry in store.index.query("RowKey ne @guard", {"guard": "~hour"}) if entry.blob
    ]
    for entry in entries:
        found = blobs.read_versioned(EVENTS_CONTAINER, entry.blob)
        if found is None:
            continue
        scrubbed = scrub_file(entry.blob, found[0], matcher)
        if scrubbed is None:
            continue
        if scrubbed.data is None:  # not readable as events: nothing of it can stay
            blobs.delete(EVENTS_CONTAINER, entry.blob)
            removed = entry.events
        else:
            blobs.create(EVENTS_CONTAINER, entry.blob, scrubbed.data, overwrite=True)
            removed = scrubbed.removed
        counts["events.removed"] += removed
        counts["events.segments_rewritten"] += 1
        _recount(store, entry, removed)
    return counts


def _recount(store: EventStore, entry: SegmentEntry, removed: int) -> None:
    def fewer(current: SegmentEntry | None) -> SegmentEntry | None:
        if current is None:
            return None
        return current.model_copy(update={"events": max(0, current.events - removed)})

    store.index.mutate(entry.partition_key, entry.row_key, fewer)
