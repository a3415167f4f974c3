"""The daemon's log writer (supervisor/logconfig.py TurnWriter): lines logged on the
trio thread reach the stream when the scheduler turn ends, in order; lines
from other threads at once; nothing is held once the run is over."""

from __future__ import annotations

import io
import threading

import trio

from supervisor.logconfig import MAX_HELD_LINES, TurnWriter


class Recording(io.StringIO):
    """A stream that remembers what each write() brought."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_trio_thread_lines_wait_for_the_end_of_the_turn_and_keep_their_order() -> None:
    out = Recording()
    writer = TurnWriter(out)
    seen_during_turn: list[str] = []

    async def main() -> None:
        writer.write("one\n")
        writer.flush()
        writer.write("two\n")
        writer.flush()
        seen_during_turn.append(out.getvalue())
        await trio.sleep(0.01)  # the turn ends: the loop waits for I/O
        seen_during_turn.append(out.getvalue())
        writer.write("three\n")

    trio.run(main, instruments=[writer])
    assert seen_during_turn == ["", "one\ntwo\n"]
    # Held lines go out in one write; what is left at the end of the run too.
    assert out.writes == ["one\ntwo\n", "three\n"]


def test_lines_from_other_threads_and_outside_a_run_are_written_at_once() -> None:
    out = Recording()
    writer = TurnWriter(out)
    writer.write("before the run\n")
    assert out.getvalue() == "before the run\n"
    during: list[str] = []

    def from_a_thread() -> None:
        writer.write("from a thread\n")
        writer.flush()
        during.append(out.getvalue())

    async def main() -> None:
        thread = threading.Thread(target=from_a_thread)
        thread.start()
        thread.join()

    trio.run(main, instruments=[writer])
    assert during == ["before the run\nfrom a thread\n"]
    writer.write("after the run\n")
    assert out.getvalue().endswith("after the run\n")


def test_a_stream_that_fails_drops_the_line_and_the_run_goes_on() -> None:
    out = Recording()
    writer = TurnWriter(out)

    async def main() -> None:
        writer.write("lost\n")
        out.close()  # writes now raise ValueError
        await trio.sleep(0.01)
        return "finished"

    assert trio.run(main, instruments=[writer]) == "finished"


def test_a_turn_that_logs_many_lines_writes_them_as_it_goes_in_order() -> None:
    out = Recording()
    writer = TurnWriter(out)
    seen: list[int] = []

    async def main() -> None:
        for n in range(MAX_HELD_LINES * 2 + 5):
            writer.write(f"{n}\n")
        seen.append(len(out.getvalue().splitlines()))

    trio.run(main, instruments=[writer])
    assert seen == [MAX_HELD_LINES * 2]
    assert out.getvalue().splitlines() == [str(n) for n in range(MAX_HELD_LINES * 2 + 5)]


def test_a_hook_never_raises_even_when_the_stream_does() -> None:
    class Exploding(Recording):
        def write(self, text: str) -> int:
            raise RuntimeError("broken stream")

    writer = TurnWriter(Exploding())

    async def main() -> str:
        writer.write("lost\n")
        await trio.sleep(0.01)
        writer.write("also lost\n")
        return "finished"

    assert trio.run(main, instruments=[writer]) == "finished"
