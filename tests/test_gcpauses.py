"""Full garbage collections freeze what survives them (supervisor/gcpauses.py):
the next full collection does not look at those objects again, while a
reference cycle that becomes garbage before a full collection is still
collected."""

from __future__ import annotations

import gc
import weakref

from supervisor import gcpauses


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_what_survives_a_full_collection_is_frozen_and_new_cycles_are_still_collected() -> None:
    thresholds = gc.get_threshold()
    gcpauses.install()
    gcpauses.install()  # idempotent
    try:
        assert gc.callbacks.count(gcpauses._freeze_after_full_collection) == 1
        assert gc.get_threshold() == (gcpauses.YOUNG_EVERY, gcpauses.MIDDLE_EVERY, gcpauses.FULL_EVERY)
        kept = [Node() for _ in range(2000)]
        gc.collect()
        frozen = gcpauses.frozen_objects()
        assert frozen >= len(kept)
        assert not any(gc.is_tracked(node) and node in gc.get_objects() for node in kept[:3])
        # A cycle made after the freeze, garbage before the next full collection.
        first, second = Node(), Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
        gc.collect()
        assert gone() is None
        assert gcpauses.frozen_objects() >= frozen
    finally:
        gcpauses.uninstall()
        gc.unfreeze()
    assert gcpauses._freeze_after_full_collection not in gc.callbacks
    assert gc.get_threshold() == thresholds
