"""An instance's stderr (supervisor/procs/stderr.py): the log budget, floods,
quiet spells and cancellation, on real pipes."""

from __future__ import annotations

import os
import sys

import trio

from supervisor.procs import process, spawner, stderr
from supervisor.procs.spawner import spawn_root
from supervisor.procs.stderr import (
    STDERR_DROPS_REPORT_S,
    STDERR_LINES,
    STDERR_LOG_BURST,
    LineBudget,
    capture_stderr,
    decode_tail,
)
from tests.procs.test_spawner import adapter, wait_for


def test_the_line_budget_gives_a_burst_then_a_steady_rate_and_reports_drops_at_intervals() -> None:
    budget = LineBudget(0.0, burst=10, per_s=100.0)
    assert budget.take(4, 0.0) == 4
    assert budget.take(10, 0.0) == 6  # the rest of the burst
    assert budget.dropped_to_report(0.0) == 0, "a report before STDERR_DROPS_REPORT_S"
    assert budget.take(5, 0.03) == 3  # 30 ms at 100 a second
    assert budget.take(1, 1.0) == 1
    assert budget.take(100, 1.0) == 9  # refilled to the burst, no further
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S) == 4 + 2 + 91
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S) == 0, "reported twice"
    assert budget.take(3, STDERR_DROPS_REPORT_S + 0.001) == 0
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S + 0.001) == 0, "the next report is not due yet"
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S + 0.001, final=True) == 3


async def test_a_flood_of_stderr_is_logged_up_to_the_budget_and_every_line_is_accounted_for() -> None:
    total = 20 * STDERR_LOG_BURST
    script = f"import sys\nsys.stderr.write(''.join('line %d\\n' % i for i in range({total})))\n"
    root = spawn_root(adapter([sys.executable, "-c", script]), instance_id="i", job="j", params={}, daemon_key="k")
    logged: list[str] = []
    dropped: list[int] = []
    started = trio.current_time()
    try:
        with trio.fail_after(20):
            await capture_stderr(root, logged.append, dropped.append)
    finally:
        assert wait_for(root) == 0
        root.close_stdio()
    elapsed = trio.current_time() - started
    assert STDERR_LOG_BURST <= len(logged) <= STDERR_LOG_BURST + stderr.STDERR_LOG_PER_S * elapsed + 1
    assert logged[:STDERR_LOG_BURST] == [f"line {i}" for i in range(STDERR_LOG_BURST)]
    numbers = [int(line.split()[1]) for line in logged]
    assert numbers == sorted(set(numbers)), "lines logged twice or out of order"
    assert dropped and len(logged) + sum(dropped) == total
    assert decode_tail(root.stderr_tail, STDERR_LINES) == [f"line {i}" for i in range(total - STDERR_LINES, total)]


async def test_a_read_both_logged_in_part_and_kept_whole_in_the_tail() -> None:
    # One read of 1100 lines (written at once into an empty pipe): the first
    # STDERR_LOG_BURST are logged, the last STDERR_LINES kept, and those two
    # overlap.
    root, write_end = pipe_root()
    count = STDERR_LOG_BURST + 100
    os.write(write_end, "".join(f"line {i}\n" for i in range(count)).encode())
    os.close(write_end)
    logged: list[str] = []
    dropped: list[int] = []
    with trio.fail_after(5):
        await capture_stderr(root, logged.append, dropped.append)
    assert logged == [f"line {i}" for i in range(STDERR_LOG_BURST)]
    assert dropped == [100]
    assert decode_tail(root.stderr_tail, STDERR_LINES) == [f"line {i}" for i in range(count - STDERR_LINES, count)]


def pipe_root() -> tuple[spawner.RootProcess, int]:
    """A RootProcess whose stderr is a pipe this test writes: (root, write end)."""
    read_end, write_end = os.pipe()
    return spawner.RootProcess(id=process.ProcessId(os.getpid(), 0), stdin_fd=None, stdout_fd=None, stderr_fd=read_end), write_end


async def test_lines_dropped_before_a_quiet_spell_are_reported_during_it(nursery) -> None:
    root, write_end = pipe_root()
    dropped: list[int] = []
    nursery.start_soon(capture_stderr, root, lambda line: None, dropped.append)
    os.write(write_end, "".join(f"line {i}\n" for i in range(STDERR_LOG_BURST + 100)).encode())
    with trio.fail_after(STDERR_DROPS_REPORT_S + 5):
        while not dropped:
            await trio.sleep(0.05)
    assert dropped == [100], "the count waited for more input"
    os.close(write_end)


async def test_a_reader_cancelled_mid_flood_still_reports_what_it_dropped() -> None:
    root, write_end = pipe_root()
    logged: list[str] = []
    dropped: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture_stderr, root, logged.append, dropped.append)
        os.write(write_end, "".join(f"line {i}\n" for i in range(STDERR_LOG_BURST + 100)).encode())
        with trio.fail_after(5):
            while len(logged) < STDERR_LOG_BURST:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # before the next report is due
    assert dropped == [100]
    os.close(write_end)


# -- the tail's bounds (pure) ------------------------------------------------------


def test_a_tail_keeps_the_last_lines_within_its_lines_and_bytes() -> None:
    from supervisor.procs.stderr import StderrTail

    tail = StderrTail(max_lines=5, max_bytes=100)
    tail.extend(b"%02d" % n for n in range(10))
    assert list(tail) == [b"05", b"06", b"07", b"08", b"09"] and tail.bytes == 10
    tail.extend([b"x" * 60, b"y" * 30])  # 7 lines: the 2 oldest go
    assert list(tail) == [b"07", b"08", b"09", b"x" * 60, b"y" * 30] and tail.bytes == 96
    tail.append(b"w" * 10)  # 106 bytes: the oldest go until it fits
    assert list(tail) == [b"x" * 60, b"y" * 30, b"w" * 10] and tail.bytes == 100
    tail.append(b"z" * 100)
    assert list(tail) == [b"z" * 100]


def test_tails_past_their_total_shrink_to_a_share_and_forgotten_ones_give_it_back() -> None:
    from supervisor.procs.stderr import STDERR_TAIL_MIN_BYTES, StderrTail, TailBudget

    budget = TailBudget(max_bytes=64 * 1024)
    line = b"a" * 1024
    tails = [StderrTail(budget=budget, max_bytes=256 * 1024) for _ in range(4)]
    for tail in tails:
        tail.extend([line] * 40)  # 40 KiB each, 160 KiB wanted in all
    # Each tail that grew past the total was cut to its share (64 KiB / 4).
    assert all(tail.bytes <= 40 * 1024 for tail in tails)
    assert budget.total == sum(tail.bytes for tail in tails)
    assert budget.total <= 64 * 1024 + 3 * 24 * 1024
    for tail in tails:
        tail.append(line)
    assert all(tail.bytes <= max(STDERR_TAIL_MIN_BYTES, 16 * 1024) for tail in tails)
    assert budget.total <= 64 * 1024
    tails[0].release()
    assert (budget.tails, len(tails[0]), budget.total) == (3, 0, sum(t.bytes for t in tails[1:]))
