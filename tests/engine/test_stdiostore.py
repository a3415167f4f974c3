"""StdioStore without systemd: what it asks of a descriptor store, and the
pipes passed back at a start (real pipes)."""

from __future__ import annotations

import os

from supervisor.engine.stdiostore import StdioStore, stdio_names


class RecordingStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def store_fds(self, name: str, fds: list[int]) -> bool:
        self.calls += [("store", name, fd) for fd in fds]
        return True

    def remove_fds(self, name: str) -> bool:
        self.calls.append(("remove", name, -1))
        return True


def test_pipes_are_stored_at_spawn_and_removed_when_the_tree_is_gone() -> None:
    store = RecordingStore()
    stdio = StdioStore(store)
    stdio.keep("abc", 7, 8)
    stdio.keep("nopipes", None, None)
    stdio.forget("abc")
    assert store.calls == [
        ("store", "stdio-abc-in", 7), ("store", "stdio-abc-out", 8),
        ("remove", "stdio-abc-in", -1), ("remove", "stdio-abc-out", -1),
    ]


def test_without_a_store_nothing_is_asked_and_nothing_is_passed_back() -> None:
    stdio = StdioStore(None)
    stdio.keep("abc", 7, 8)
    stdio.forget("abc")
    assert stdio.take("abc") == (None, None)
    assert stdio.close_untaken() == []


def test_passed_pipes_go_to_their_instance_and_the_rest_are_closed_and_removed() -> None:
    adopted_r, adopted_w = os.pipe()
    orphan_r, orphan_w = os.pipe()
    store = RecordingStore()
    stdio_in, _ = stdio_names("adopted")
    orphan_in, _ = stdio_names("gone")
    stdio = StdioStore(store, {stdio_in: adopted_w, orphan_in: orphan_w})
    try:
        assert stdio.take("adopted") == (adopted_w, None)
        assert stdio.take("adopted") == (None, None)  # taken once
        assert stdio.close_untaken() == [orphan_in]
        assert store.calls == [("remove", orphan_in, -1)]
        assert os.read(orphan_r, 1) == b""  # its only writer was closed
        os.write(adopted_w, b"x")  # still the caller's
        assert os.read(adopted_r, 1) == b"x"
    finally:
        for fd in (adopted_r, adopted_w, orphan_r):
            os.close(fd)
