"""An adapter that writes long stderr lines cannot make the daemon keep more
than its per-instance bytes of them (real daemon, real adapter)."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.procs.stderr import STDERR_TAIL_BYTES
from tests.conftest import PYTHON, eventually

# 150 lines of 4 KiB (600 KB: less than the reader ever skips, so it keeps
# up however slow it is), then it waits.
WRITER = (
    "import sys, time\nfor i in range(150):\n    sys.stderr.write('%04d' % i + 'x' * 4091 + '\\n'); sys.stderr.flush()\n"
    "    time.sleep(0.001)\ntime.sleep(60)\n"
)


def test_an_instances_stderr_tail_is_bounded_in_bytes(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(f"[adapters.writer]\ncommand = {json.dumps([PYTHON, '-c', WRITER])}\nstop_timeout = 1.0\n")
    client = daemon.client()
    lease = client.call("acquire", {"job": "j", "adapter": "writer"})

    def tail() -> list[str] | None:
        lines = client.call("logs", {"lease": lease["lease"], "lines": 1000})["lines"]
        return lines if lines and lines[-1].startswith("0149") else None

    lines = eventually(tail, timeout=10)
    assert lines, "the last line never arrived"
    kept = sum(len(line) + 1 for line in lines)
    assert kept <= STDERR_TAIL_BYTES  # 600 KB were written
    assert len(lines) >= STDERR_TAIL_BYTES // 4096 - 1  # the newest, as many as fit
    client.call("release", {"lease": lease["lease"]})
