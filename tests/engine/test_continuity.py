"""Continuity across incarnations (supervisor/engine/continuity.py): the
proof a recorded root must still show before it is adopted."""

from __future__ import annotations

import os
import subprocess

from supervisor.engine.continuity import carries_tag
from supervisor.procs import process
from tests.conftest import eventually


def test_only_a_root_with_the_daemons_and_the_instances_tags_is_ours() -> None:
    tags = {process.DAEMON_ENV: "k" * 16, process.INSTANCE_ENV: "i-1"}
    ours = subprocess.Popen(["sleep", "60"], env={**os.environ, **tags})
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        ours_id = eventually(lambda: process.identify(ours.pid))
        stranger_id = eventually(lambda: process.identify(stranger.pid))
        assert eventually(lambda: carries_tag(ours_id, "k" * 16, "i-1"))
        assert not carries_tag(ours_id, "k" * 16, "i-2"), "another instance's root"
        assert not carries_tag(ours_id, "x" * 16, "i-1"), "another daemon's root"
        assert not carries_tag(stranger_id, "k" * 16, "i-1"), "no tag at all"
        # The same pid with another start time: a record from before pid reuse.
        assert not carries_tag(process.ProcessId(ours.pid, ours_id.start_time - 1), "k" * 16, "i-1")
    finally:
        for child in (ours, stranger):
            child.kill()
            child.wait()
