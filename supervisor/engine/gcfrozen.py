"""How many objects the garbage collector no longer examines (its permanent
generation, filled by `gc.freeze`), without walking them each time.

`gc.get_freeze_count()` walks the whole permanent generation: its cost grows
with every object frozen (the instances' own, at thousands of instances),
and the metrics ask for it at every scrape, on the trio thread. Here it is
asked once, at the first `frozen_objects()`, and from then on the count is
kept up to date by whoever freezes (`supervisor.gcpauses` tells `grew` how
many objects each of its freezes moved). `forget` starts over (after a
`gc.unfreeze`).
"""

from __future__ import annotations

import gc

# The permanent generation's size, once counted (None: not yet).
_count: int | None = None


def frozen_objects() -> int:
    """Objects in the permanent generation now."""
    global _count
    if _count is None:
        _count = gc.get_freeze_count()
    return _count


def grew(objects: int) -> None:
    """A `gc.freeze()` just moved `objects` objects into the permanent generation."""
    global _count
    if _count is not None:
        _count += objects


def forget() -> None:
    """Count again at the next `frozen_objects()` (what is frozen changed otherwise)."""
    global _count
    _count = None
