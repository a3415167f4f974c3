"""Short garbage-collection pauses: full collections look only at what is new.

CPython's collector runs a full (generation 2) collection in the middle of
whichever request allocated last, and it looks at every tracked object: at
10,000 instances (about a million objects: their tasks, frames, events and
records) one took 0.6-1.3 s of the trio thread. Here, every object that
survives a full collection is frozen (`gc.freeze`) right after it, so the next
full collection looks only at what was made since: long-lived objects (the
instances' own) are examined once, not again at every collection.

What this gives up: a reference cycle that includes a frozen object is never
collected. Objects freed by reference counting (nearly all of them: an
instance's objects go when its tasks end and its entries are dropped) are
freed whether frozen or not. The number of frozen objects is in the metrics
(`adapter_supervisor_gc_frozen_objects`), so that a cycle leaking under
churn would show as growth at a constant number of instances.
"""

from __future__ import annotations

import gc
from typing import Any

FULL_GENERATION = 2


def _freeze_after_full_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == FULL_GENERATION:
        gc.freeze()


def install() -> None:
    """From now on, freeze what survives each full collection. Idempotent."""
    if _freeze_after_full_collection not in gc.callbacks:
        gc.callbacks.append(_freeze_after_full_collection)


def frozen_objects() -> int:
    """Objects in the permanent generation (start-up's and every full collection's survivors)."""
    return gc.get_freeze_count()


def uninstall() -> None:
    """Stop freezing after full collections (what is frozen stays frozen)."""
    if _freeze_after_full_collection in gc.callbacks:
        gc.callbacks.remove(_freeze_after_full_collection)
