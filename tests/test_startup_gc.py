"""Start-up objects are frozen out of the garbage collector (service.py), so
that no request pays for a full collection of them."""

from __future__ import annotations

import gc

from supervisor import gcpauses
from supervisor.serve import freeze_startup_objects


def test_freezing_takes_every_live_object_out_of_later_collections() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        # What the collector still tracks is only what was made since.
        assert len(gc.get_objects()) < frozen / 10
    finally:
        gc.unfreeze()
        gcpauses.uninstall()
