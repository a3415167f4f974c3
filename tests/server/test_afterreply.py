"""`afterreply`: work a request's handler leaves for after its reply runs then,
always, and only for that handler's own task."""

from __future__ import annotations

import pytest
import trio

from supervisor import afterreply


async def test_deferred_work_waits_for_the_end_of_the_block_and_runs_in_order() -> None:
    ran: list[str] = []
    with afterreply.deferring():
        afterreply.defer(ran.append, "first")
        afterreply.defer(lambda *, item: ran.append(item), item="second")
        assert ran == []
        ran.append("reply sent")
    assert ran == ["reply sent", "first", "second"]


async def test_outside_a_handler_work_runs_at_once() -> None:
    ran: list[str] = []
    afterreply.defer(ran.append, "now")
    assert ran == ["now"]


async def test_work_runs_when_the_handler_fails_and_a_failing_piece_stops_no_other() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in deferred work")

    with pytest.raises(ValueError, match="handler"), afterreply.deferring():
        afterreply.defer(broken)
        afterreply.defer(ran.append, "after the broken one")
        raise ValueError("the handler failed")
    assert ran == ["after the broken one"]


async def test_work_runs_when_the_handler_is_cancelled() -> None:
    ran: list[str] = []
    with trio.move_on_after(0.01) as scope, afterreply.deferring():
        afterreply.defer(ran.append, "cleanup")
        await trio.sleep_forever()
    assert scope.cancelled_caught and ran == ["cleanup"]


async def test_tasks_started_by_the_handler_run_their_work_themselves() -> None:
    # A task inherits the handler's context; its work must not wait for (or,
    # once the handler is done, be lost after) the handler's reply.
    ran: list[str] = []

    async def other_task(started: trio.Event, finish: trio.Event) -> None:
        afterreply.defer(ran.append, "other, before the reply")
        started.set()
        await finish.wait()
        afterreply.defer(ran.append, "other, after the reply")

    started, finish = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        with afterreply.deferring():
            nursery.start_soon(other_task, started, finish)
            await started.wait()
            assert ran == ["other, before the reply"]
            afterreply.defer(ran.append, "handler")
        assert ran == ["other, before the reply", "handler"]
        finish.set()
    assert ran[-1] == "other, after the reply"


async def test_blocks_nest_per_request() -> None:
    ran: list[str] = []
    with afterreply.deferring():
        afterreply.defer(ran.append, "outer")
        with afterreply.deferring():
            afterreply.defer(ran.append, "inner")
        assert ran == ["inner"]
    assert ran == ["inner", "outer"]


async def test_run_now_runs_the_work_early_once_and_later_work_at_once() -> None:
    # A reply about to wait for room runs the deferred work first.
    ran: list[str] = []
    with afterreply.deferring():
        afterreply.defer(ran.append, "deferred")
        afterreply.run_now()
        assert ran == ["deferred"]
        afterreply.defer(ran.append, "after run_now")
        assert ran == ["deferred", "after run_now"]
        ran.append("reply sent")
    assert ran == ["deferred", "after run_now", "reply sent"]


async def test_run_now_leaves_another_tasks_work_alone() -> None:
    ran: list[str] = []

    async def other_task() -> None:
        afterreply.run_now()

    with afterreply.deferring():
        afterreply.defer(ran.append, "the handler's")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
        assert ran == []
    assert ran == ["the handler's"]
