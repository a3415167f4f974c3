"""Short garbage-collection pauses: full collections look only at what is new.

CPython's collector runs a full (generation 2) collection in the middle of
whichever request allocated last, and it looks at every tracked object: at
10,000 instances (about a million objects: their tasks, frames, events and
records) one took 0.6-1.3 s of the trio thread. Here, every object that
survives a full collection is frozen (`gc.freeze`) right after it, so the next
full collection looks only at what was made since: long-lived objects (the
instances' own) are examined once, not again at every collection. And a full
collection comes after every collection of the middle generation
(FULL_EVERY), which comes after every few of the youngest (MIDDLE_EVERY), so
that what a full collection looks at stays a few thousand objects (its
pauses during a fill to 10,000 instances, against Python's defaults, are in
docs/performance.md).

What this gives up: a reference cycle that includes a frozen object is never
collected. Objects freed by reference counting (nearly all of them: an
instance's objects go when its tasks end and its entries are dropped) are
freed whether frozen or not. The number of frozen objects is in the metrics
(`adapter_supervisor_gc_frozen_objects`); under churn (40,000 instances
acquired and released 100 at a time at 1,000 held) it stayed between 80,000
and 105,000 and the RSS levelled off (docs/performance.md).
"""

from __future__ import annotations

import gc
from typing import Any

FULL_GENERATION = 2

# A full collection after every this many collections of the middle
# generation (Python's default: 10): each then looks at fewer objects.
FULL_EVERY = 1

# A collection of the youngest generation after this many more tracked
# objects made than freed (Python's default: 700).
YOUNG_EVERY = 300

# A collection of the middle generation after this many of the youngest
# (Python's default: 10), so a full one, too: a full collection looks at the
# objects made since the last, a few hundred (0.1-0.3 ms; with 700 and every
# third young one, 6,000 and 2-5 ms during a fill), well under the 5 ms a step
# may take.
MIDDLE_EVERY = 1

# The thresholds before `install`, for `uninstall`.
_previous_thresholds: tuple[int, ...] | None = None


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == FULL_GENERATION:
        gc.freeze()


def install() -> None:
    """From now on, freeze what survives each full collection, collect the
    youngest generation every YOUNG_EVERY objects, the middle one every
    MIDDLE_EVERY young collections and in full after every middle-generation
    collection. Idempotent."""
    global _previous_thresholds
    if _freeze_after_full_collection not in gc.callbacks:
        gc.callbacks.append(_freeze_after_full_collection)
        _previous_thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_EVERY, MIDDLE_EVERY, FULL_EVERY)


def uninstall() -> None:
    """Undo `install` (what is frozen stays frozen)."""
    global _previous_thresholds
    if _freeze_after_full_collection in gc.callbacks:
        gc.callbacks.remove(_freeze_after_full_collection)
    if _previous_thresholds is not None:
        gc.set_threshold(*_previous_thresholds)
        _previous_thresholds = None


def frozen_objects() -> int:
    """Objects in the permanent generation (start-up's and every full collection's survivors)."""
    return gc.get_freeze_count()
