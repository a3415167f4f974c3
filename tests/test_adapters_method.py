"""The `adapters` method against the real daemon: every configured adapter
with its settings and its number of live instances, after a reload too."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import PYTHON, TREE, eventually, read_pidfile
from tests.test_daemon_protocol import STOP_TIMEOUT, TREE_ROLES, Connection


def adapters_toml(pid_dir: Path) -> str:
    command = [PYTHON, TREE, "--pidfile", f"{pid_dir}/{{job}}.pids", "--no-escapee", "--allocate", "{param:mib}"]
    return (
        f"[adapters.tree]\ncommand = {json.dumps(command)}\nparams = [\"mib\"]\nstdio = \"pipe\"\n"
        f"max_instances = 3\nmemory_limit = \"1GiB\"\nstop_timeout = {STOP_TIMEOUT}\n"
        '[adapters.plain]\ncommand = ["/bin/sleep", "60"]\n'
    )


def test_adapters_lists_the_config_and_counts_live_instances(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(adapters_toml(tmp_path))
    with Connection(daemon.socket) as connection:
        plain, tree = connection.result("adapters")["adapters"]  # by name
        assert tree == {
            "name": "tree", "command": [PYTHON, TREE, "--pidfile", f"{tmp_path}/{{job}}.pids", "--no-escapee", "--allocate", "{param:mib}"],
            "params": ["mib"], "stdio": "pipe", "user": None, "max_instances": 3, "memory_limit": 2**30, "live": 0,
        }
        assert plain == {
            "name": "plain", "command": ["/bin/sleep", "60"], "params": [], "stdio": "null", "user": None,
            "max_instances": 64, "memory_limit": None, "live": 0,
        }
        leases = [connection.result("acquire", {"job": f"j{n}", "adapter": "tree", "params": {"mib": "0"}})["lease"] for n in range(2)]
        # A second lease on one instance is not a second instance.
        connection.result("acquire", {"job": "j0", "adapter": "tree", "params": {"mib": "0"}})
        for n in range(2):
            read_pidfile(tmp_path / f"j{n}.pids", roles=TREE_ROLES)
        counts = {a["name"]: a["live"] for a in connection.result("adapters")["adapters"]}
        assert counts == {"tree": 2, "plain": 0}
        connection.result("release_job", {"job": "j1"})
        assert leases and eventually(lambda: connection.result("adapters")["adapters"][1]["live"] == 1)
        # A reload shows the new config: an adapter gone, one added.
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace("[adapters.plain]", "[adapters.other]")
        )
        daemon.popen.send_signal(signal.SIGHUP)
        assert eventually(lambda: [a["name"] for a in connection.result("adapters")["adapters"]] == ["other", "tree"])
        connection.result("release_job", {"job": "j0"})


def test_adapters_takes_no_params(start_daemon) -> None:
    daemon = start_daemon('[adapters.plain]\ncommand = ["/bin/sleep", "60"]\n')
    with Connection(daemon.socket) as connection:
        error = connection.error("adapters", {"name": "plain"})
        assert error["code"] == -32602 and "unknown field `name`" in error["message"]
