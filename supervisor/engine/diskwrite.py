"""Blocking file writes, run off the trio thread and bounded in time."""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger()

# Reports, the durable record and the metrics file are written shielded (they
# must not be lost to a cancel) but bounded: a hung disk must not hang the daemon.
FILE_WRITE_TIMEOUT_S = 5.0


async def write_bounded(failure_event: str, write: Callable[..., None], *args: object) -> None:
    """Run `write(*args)` in a worker thread for at most FILE_WRITE_TIMEOUT_S
    (then the thread is abandoned and finishes or fails on its own). Failures
    are logged as `failure_event`, never raised. `write` must only touch files."""
    with trio.move_on_after(FILE_WRITE_TIMEOUT_S) as scope:
        try:
            await trio.to_thread.run_sync(write, *args, abandon_on_cancel=True)
        except OSError as exc:
            log.error(failure_event, error=str(exc))
    if scope.cancelled_caught:
        log.error(failure_event, error=f"no answer from the disk within {FILE_WRITE_TIMEOUT_S}s")
