"""The command line as a client: tables a person can read, `status --watch`,
JSON for scripts, and exit codes. (acquire/release/logs round trips, exit 1 on
an error and exit 69 with no daemon are in test_service.py.)"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor import cli, commands, display, exitstatus
from tests.conftest import PYTHON, eventually

SLEEPER = '[adapters.sleeper]\ncommand = ["/bin/sh", "-c", "(sleep 3600 & wait) & exec sleep 3600"]\nstop_timeout = 0.5\n'
NOW = 1_800_000_000.0


def status_result(instances: list[dict[str, object]]) -> dict[str, object]:
    daemon = {
        "pid": 4242, "uptime_s": 3725.0, "instances": len(instances), "leases": 3, "connections": 2,
        "cgroup_mode": True, "shutting_down": False, "rss_bytes": 3 * 2**30 // 2, "memory_budget": 4 * 2**30,
    }
    return {"daemon": daemon, "instances": instances}


def instance_row(**fields: object) -> dict[str, object]:
    row = {
        "instance": "a1b2c3d4e5f6", "job": "job-7", "adapter": "claude-acp", "state": "running", "pid": 31337,
        "pids": [31337, 31338, 31339], "refcount": 2, "started_at": NOW - 65, "rss_bytes": 512 * 2**20 + 2**19,
    }
    return row | fields


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "supervisor", *args], check=False, capture_output=True, text=True, timeout=20)


def start_cli(*args: str) -> subprocess.Popen[str]:
    """The CLI with Ctrl-C's default action, even when the suite itself was
    started with SIGINT ignored (a background job of a non-interactive
    shell), which the CLI would inherit and then never see a Ctrl-C."""
    return subprocess.Popen(
        [PYTHON, "-c", RUN_WITH_CTRL_C, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# `python -m supervisor ARGS`, with Python's own Ctrl-C handler whatever the
# disposition inherited.
RUN_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'supervisor'; runpy.run_module('supervisor', run_name='__main__', alter_sys=True)"
)


def read_lines(proc: subprocess.Popen[str], wanted: int, timeout: float = 10.0) -> list[str]:
    """The next `wanted` lines of `proc`'s stdout, failing after `timeout`."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(lines) < wanted:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), f"only {lines} within {timeout}s"
            line = proc.stdout.readline()
            assert line, f"stdout ended after {lines}"
            lines.append(line)
    return lines


# -- rendering -------------------------------------------------------------------


def test_status_table_shows_job_adapter_pid_refcount_age_and_rss_in_human_units() -> None:
    text = display.render_status(status_result([instance_row(), instance_row(instance="ffff00001111", pid=None, pids=[], state="starting", started_at=None, rss_bytes=0)]), NOW)
    summary, header, first, second = text.splitlines()
    assert "up 1h02m" in summary and "RSS 1.5 GiB of 4.0 GiB budget" in summary and "mode cgroup" in summary
    assert header.split() == ["INSTANCE", "JOB", "ADAPTER", "STATE", "PID", "PROCS", "REFCOUNT", "AGE", "RSS"]
    assert first.split() == ["a1b2c3d4e5f6", "job-7", "claude-acp", "running", "31337", "3", "2", "1m05s", "512.5", "MiB"]
    assert second.split() == ["ffff00001111", "job-7", "claude-acp", "starting", "-", "0", "2", "-", "0", "B"]
    # Columns line up: every row starts each column where the header does.
    assert first.index("job-7") == header.index("JOB") and second.index("2 ") >= header.index("REFCOUNT")


def test_status_without_instances_and_while_shutting_down() -> None:
    result = status_result([])
    result["daemon"]["shutting_down"] = True  # type: ignore[index]
    summary, body = display.render_status(result, NOW).splitlines()
    assert summary.endswith("SHUTTING DOWN") and body == "no instances"


def test_human_units() -> None:
    assert [display.human_bytes(v) for v in (0, 1023, 1024, 5 * 2**20 + 2**19, 3 * 2**30)] == ["0 B", "1023 B", "1.0 KiB", "5.5 MiB", "3.0 GiB"]
    assert [display.human_age(s) for s in (None, -3, 59, 60, 3599, 3600, 90061)] == ["-", "0s", "59s", "1m00s", "59m59s", "1h00m", "25h01m"]


def test_a_watch_frame_redraws_a_terminal_and_appends_in_a_pipe() -> None:
    on_terminal = display.watch_frame("TABLE", 2.0, NOW, in_place=True)
    assert on_terminal.startswith(display.CLEAR_SCREEN) and on_terminal.endswith("TABLE\n") and "every 2s" in on_terminal
    in_pipe = display.watch_frame("TABLE", 0.5, NOW, in_place=False)
    assert display.CLEAR_SCREEN not in in_pipe and in_pipe.startswith("every 0.5s") and in_pipe.endswith("TABLE\n\n")


# -- against the daemon ------------------------------------------------------------


def test_status_watch_refreshes_until_ctrl_c_and_exits_0(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    assert run_cli("--socket", daemon.socket, "acquire", "job-w", "sleeper", "--detach", "--ttl", "30").returncode == 0
    watcher = start_cli("--socket", daemon.socket, "status", "--watch", "0.1")
    try:
        lines = read_lines(watcher, 20)
        titles = [line for line in lines if line.startswith("every 0.1s")]
        rows = [line.split() for line in lines if line.split()[1:3] == ["job-w", "sleeper"]]
        assert len(titles) >= 2 and len(rows) >= 2, lines
        assert rows[0][3:7] == ["running", rows[0][4], "3", "1"]
    finally:
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=10)
    assert watcher.returncode == 0 and "Traceback" not in stderr


def test_status_watch_json_is_one_document_per_refresh_and_exits_69_when_the_daemon_goes(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    watcher = start_cli("--socket", daemon.socket, "--json", "status", "--watch", "0.1")
    try:
        documents = [json.loads(line) for line in read_lines(watcher, 3)]
        assert all(d["daemon"]["pid"] == daemon.pid and d["instances"] == [] for d in documents)
        daemon.stop()
        stdout, stderr = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == exitstatus.EX_UNAVAILABLE, stderr
    error = json.loads(stdout.splitlines()[-1])["error"]
    assert daemon.socket in error["message"] and "Traceback" not in stderr


def test_sweep_and_reports_render_tables_and_json(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    sock = ("--socket", daemon.socket)
    swept = run_cli(*sock, "sweep")
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout.split()[:4] == ["WHEN", "KIND", "DURATION", "SCANNED"]
    human = run_cli(*sock, "reports", "--limit", "5")
    assert human.returncode == 0, human.stderr
    header, *rows = human.stdout.splitlines()
    assert header.split()[:2] == ["WHEN", "KIND"] and [row.split()[2] for row in rows] == ["manual", "startup"]
    as_json = json.loads(run_cli(*sock, "--json", "reports", "--limit", "1").stdout)
    assert [report["kind"] for report in as_json["reports"]] == ["manual"]


def test_a_daemon_error_names_the_error_and_its_code(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    completed = run_cli("--socket", daemon.socket, "logs", "no-such-instance")
    assert completed.returncode == exitstatus.EX_ERROR
    assert "no instance or lease 'no-such-instance'" in completed.stderr and "(InvalidParams, error -32602)" in completed.stderr
    as_json = run_cli("--socket", daemon.socket, "--json", "logs", "no-such-instance")
    assert as_json.returncode == exitstatus.EX_ERROR and json.loads(as_json.stdout)["error"]["code"] == -32602


@pytest.mark.parametrize("args", [("--json", "status"), ("status",), ("--json", "logs", "no-such-instance")])
def test_output_to_a_reader_that_stopped_reading_ends_quietly_with_sigpipes_status(start_daemon, args) -> None:
    # `adapter-supervisor --json status | head -c0`: every write fails (EPIPE).
    # That is neither a daemon that cannot be reached nor a crash.
    daemon = start_daemon(SLEEPER)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(
            [PYTHON, "-m", "supervisor", "--socket", daemon.socket, *args],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=20, check=False,
        )
    finally:
        os.close(write_end)
    assert completed.returncode == exitstatus.EX_BROKEN_PIPE == 128 + signal.SIGPIPE
    assert "Traceback" not in completed.stderr and "cannot talk to the daemon" not in completed.stderr


def test_status_lists_each_lease_under_the_instances_and_why_an_instance_exited() -> None:
    leases = [
        {"lease": "0vIlhan7W_QY3NvyUvk4Tm5W", "detached": False, "expires_at": None, "uid": 0, "pid": 4711},
        {"lease": "Zq81mmPa", "detached": True, "expires_at": NOW + 125, "uid": 1000, "pid": None},
    ]
    exited = instance_row(instance="ffff00001111", state="exited", pids=[], returncode=-9, reason="killed", leases=[])
    text = display.render_status(status_result([instance_row(leases=leases), exited]), NOW)
    lines = text.splitlines()
    assert lines[3].split()[3:7] == ["exited", "(killed,", "rc", "-9)"]
    blank = lines.index("")
    header, bound, detached = lines[blank + 1:]
    assert header.split() == ["LEASE", "INSTANCE", "KIND", "EXPIRES", "UID", "HOLDER", "PID"]
    assert bound.split() == ["0vIlhan7W_QY3NvyUvk4Tm5W", "a1b2c3d4e5f6", "bound", "-", "0", "4711"]
    assert detached.split() == ["Zq81mmPa", "a1b2c3d4e5f6", "detached", "in", "2m05s", "1000", "-"]
    # Without leases there is no lease table.
    assert "" not in display.render_status(status_result([instance_row(leases=[])]), NOW).splitlines()


# -- the command line's own habits -------------------------------------------------

# A tiny adapter that writes a numbered stderr line every 0.1 s.
COUNTER = (
    '[adapters.counter]\ncommand = ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo line $i >&2; sleep 0.1; done"]\n'
    "stop_timeout = 0.5\n"
)


def parser_actions(parser: argparse.ArgumentParser, path: str = "adapter-supervisor") -> list[tuple[str, argparse.Action]]:
    """Every argument of `parser` and of its commands, with where it is."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found += parser_actions(subparser, f"{path} {name}")
        else:
            found.append((path, action))
    return found


def test_every_argument_of_every_command_has_help_text() -> None:
    actions = parser_actions(cli.build_parser())
    assert len(actions) > 40
    missing = [f"{where} {action.option_strings or action.dest}" for where, action in actions if not action.help]
    assert missing == []


def test_help_lists_every_exit_status_the_command_line_returns() -> None:
    statuses = {value for name, value in vars(exitstatus).items() if name.startswith("EX_")}
    assert statuses == {0, 1, 2, 69, 73, 78, 130, 141}
    for args in (["--help"], ["logs", "--help"]):
        completed = run_cli(*args)
        assert completed.returncode == 0
        listed = {int(line.split()[0]) for line in completed.stdout.split("exit status:\n")[1].splitlines() if line.strip()}
        assert listed == statuses, args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["acquire", "j", "demo", "--ttl", "5"], "--ttl needs --detach"),
        (["acquire", "j", "demo", "--detach"], "--detach needs --ttl SECONDS"),
        (["acquire", "j", "demo", "--detach", "--ttl", "0"], "--ttl must be above 0 and at most 2592000 seconds"),
        (["renew", "L", "--ttl", "3000000"], "--ttl must be above 0 and at most 2592000 seconds"),
        (["acquire", "j", "demo", "--param", "workdir"], "--param needs NAME=VALUE, got 'workdir'"),
        (["acquire", "a\nb", "demo"], "JOB must not contain control characters (found U+000A)"),
        (["release-job", "j" * 257], "JOB must be 1 to 256 characters, got 257"),
        (["release", "L" * 129], "LEASE must be 1 to 128 characters, got 129"),
        (["logs", "i", "--lines", "0"], "--lines must be >= 1, got 0"),
        (["logs", "i", "--lines", "10001"], "--lines must be <= 10000, got 10001"),
        (["reports", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["completion", "fish"], "argument SHELL: invalid choice: 'fish'"),
    ],
)
def test_arguments_the_daemon_would_refuse_are_refused_in_the_command_lines_terms(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--socket", "/nonexistent/never-contacted.sock", *argv])
    assert exited.value.code == exitstatus.EX_USAGE == 2
    error = capsys.readouterr().err
    assert message in error and "params." not in error
    assert error.startswith(f"usage: adapter-supervisor {argv[0]}")


def test_global_options_go_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    for argv in (
        ["--json", "--socket", "/s", "status"],
        ["status", "--json", "--socket", "/s"],
        ["--json", "status", "--socket", "/s"],
        ["--socket", "/s", "status", "--json"],
    ):
        args = cli.parse_arguments(parser, argv)
        assert (args.json, args.socket, args.command) == (True, "/s", "status"), argv
    args = cli.parse_arguments(parser, ["status"])
    assert (args.json, args.socket) == (False, None)


def test_status_json_after_the_command_against_the_daemon(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    completed = run_cli("status", "--json", "--socket", daemon.socket)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["daemon"]["pid"] == daemon.pid


def test_new_lines_are_what_follows_the_overlap_of_two_tails() -> None:
    assert commands.new_lines([], ["a", "b"]) == ["a", "b"]
    assert commands.new_lines(["a", "b"], ["a", "b"]) == []
    assert commands.new_lines(["a", "b"], ["a", "b", "c"]) == ["c"]
    # The tail moved on: its first lines fell off.
    assert commands.new_lines(["a", "b", "c"], ["c", "d", "e"]) == ["d", "e"]
    assert commands.new_lines(["x", "x"], ["x", "x", "x"]) == ["x"]
    # Nothing in common: every line is new.
    assert commands.new_lines(["a", "b"], ["c", "d"]) == ["c", "d"]


def test_logs_takes_an_instance_or_a_lease(start_daemon) -> None:
    daemon = start_daemon(COUNTER)
    sock = ("--socket", daemon.socket)
    acquired = json.loads(run_cli(*sock, "--json", "acquire", "job-l", "counter", "--detach", "--ttl", "60").stdout)

    client = daemon.client()
    assert eventually(lambda: len(client.logs(acquired["instance"], lines=3)) == 3, timeout=10.0)
    for target in (acquired["instance"], acquired["lease"]):
        completed = run_cli(*sock, "--json", "logs", target, "--lines", "3")
        assert completed.returncode == 0, completed.stderr
        lines = json.loads(completed.stdout)["lines"]
        assert len(lines) == 3 and all(line.startswith("line ") for line in lines), (target, lines)
    assert run_cli(*sock, "release", acquired["lease"]).returncode == 0


def test_logs_follow_prints_each_new_line_once_and_ctrl_c_exits_130_quietly(start_daemon) -> None:
    daemon = start_daemon(COUNTER)
    acquired = json.loads(run_cli("--socket", daemon.socket, "--json", "acquire", "job-f", "counter", "--detach", "--ttl", "60").stdout)
    follower = start_cli("--socket", daemon.socket, "logs", "-f", acquired["lease"], "--lines", "1")
    try:
        numbers = [int(line.split()[1]) for line in read_lines(follower, 25)]
    finally:
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=10)
    assert numbers == list(range(numbers[0], numbers[0] + 25)), numbers
    assert follower.returncode == exitstatus.EX_INTERRUPTED and stderr == ""
    assert run_cli("--socket", daemon.socket, "release", acquired["lease"]).returncode == 0


def test_logs_follow_of_a_lease_ends_when_the_lease_is_released(start_daemon) -> None:
    daemon = start_daemon(COUNTER)
    acquired = json.loads(run_cli("--socket", daemon.socket, "--json", "acquire", "job-r", "counter", "--detach", "--ttl", "60").stdout)
    follower = start_cli("--socket", daemon.socket, "logs", "--follow", acquired["lease"])
    try:
        read_lines(follower, 3)
        assert run_cli("--socket", daemon.socket, "release", acquired["lease"]).returncode == 0
        _, stderr = follower.communicate(timeout=10)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0 and f"no longer following {acquired['lease']}: no such lease" in stderr


def test_metrics_prints_the_prometheus_text(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    completed = run_cli("metrics", "--socket", daemon.socket)
    assert completed.returncode == 0, completed.stderr
    names = {line.split()[2] for line in completed.stdout.splitlines() if line.startswith("# TYPE ")}
    assert "adapter_supervisor_instances" in names and not completed.stdout.endswith("\n\n")
    as_json = json.loads(run_cli("metrics", "--json", "--socket", daemon.socket).stdout)
    assert {line.split()[2] for line in as_json["text"].splitlines() if line.startswith("# TYPE ")} == names


def test_adapters_lists_the_config_as_a_table_and_as_json(start_daemon) -> None:
    daemon = start_daemon(SLEEPER + COUNTER.replace("counter]", "counter]\nmemory_limit = \"64MiB\"\nuser = \"@peer\""))
    run_cli("--socket", daemon.socket, "acquire", "job-a", "sleeper", "--detach", "--ttl", "60")
    human = run_cli("adapters", "--socket", daemon.socket)
    assert human.returncode == 0, human.stderr
    header, counter, sleeper = human.stdout.splitlines()
    assert header.split() == ["ADAPTER", "LIVE", "MAX", "STDIO", "MEMORY", "LIMIT", "USER", "PARAMS", "COMMAND"]
    assert counter.split()[:8] == ["counter", "0", "64", "null", "64.0", "MiB", "@peer", "-"]
    assert sleeper.split()[:7] == ["sleeper", "1", "64", "null", "-", "-", "-"] and "sleep 3600" in sleeper
    as_json = json.loads(run_cli("--json", "adapters", "--socket", daemon.socket).stdout)
    assert [(a["name"], a["live"], a["user"]) for a in as_json["adapters"]] == [("counter", 0, "@peer"), ("sleeper", 1, None)]
    run_cli("--socket", daemon.socket, "release-job", "job-a")


# -- check-config ------------------------------------------------------------------


def test_check_config_lists_every_error_and_exits_78(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[daemon]\nsocket_mode = "9999"\nsweep_interval = 0\n'
        '[adapters.a]\ncommand = []\n[adapters.b]\ncommand = ["/bin/true"]\nlinger = -1\ncolour = "red"\n'
    )
    completed = run_cli("check-config", str(path))
    assert completed.returncode == exitstatus.EX_CONFIG
    keys = ["daemon.socket_mode", "daemon.sweep_interval", "adapters.a.command", "adapters.b.linger", "adapters.b.colour"]
    lines = completed.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines[:-1]] == keys
    assert all(line.startswith(f"adapter-supervisor: {path}: ") for line in lines[:-1])
    assert lines[-1] == f"{path}: 5 errors" and completed.stdout == ""
    as_json = json.loads(run_cli("--json", "check-config", str(path)).stdout)
    assert as_json["ok"] is False and [e["key"] for e in as_json["errors"]] == keys


def test_check_config_warns_of_a_program_a_spawn_would_not_find_and_exits_0(tmp_path) -> None:
    path = tmp_path / "warn.toml"
    path.write_text('[adapters.gone]\ncommand = ["/no/such/binary"]\n[adapters.fine]\ncommand = ["/bin/true"]\n')
    completed = run_cli("check-config", str(path))
    assert completed.returncode == exitstatus.EX_OK, completed.stderr
    assert completed.stdout == f"{path}: OK (2 adapters: fine, gone; 1 warning)\n"
    assert completed.stderr == (
        f"adapter-supervisor: warning: {path}: adapters.gone.command: "
        "program '/no/such/binary' not found (no such file); a spawn will fail\n"
    )
    as_json = json.loads(run_cli("check-config", str(path), "--json").stdout)
    assert as_json["ok"] is True and [w["key"] for w in as_json["warnings"]] == ["adapters.gone.command"]


def test_status_filters_reach_the_daemon_and_bad_ones_are_usage_errors(start_daemon) -> None:
    daemon = start_daemon('[adapters.idle]\ncommand = ["/bin/sleep", "60"]\nstop_timeout = 0.5\n')
    client = daemon.client()
    client.call("acquire", {"job": "one", "adapter": "idle"})
    client.call("acquire", {"job": "two", "adapter": "idle"})
    shown = run_cli("status", "--socket", daemon.socket, "--json", "--job", "two", "--state", "running", "--uid", "0")
    assert shown.returncode == 0, shown.stderr
    assert [row["job"] for row in json.loads(shown.stdout)["instances"]] == ["two"]
    none = run_cli("status", "--socket", daemon.socket, "--json", "--adapter", "other")
    assert json.loads(none.stdout)["instances"] == []
    for bad in (("--state", "sleeping"), ("--uid", "-1"), ("--uid", "root")):
        refused = run_cli("status", "--socket", daemon.socket, *bad)
        assert refused.returncode == 2 and bad[0] in refused.stderr, refused.stderr


def run_on_a_terminal(args: list[str], *, rows: int, env: dict[str, str]) -> str:
    """Run the CLI with its stdout on a pseudo-terminal `rows` lines high;
    what it wrote there."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, 120, 0, 0))
    try:
        done = subprocess.run([PYTHON, "-m", "supervisor", *args], stdout=slave, stderr=subprocess.PIPE,
                              env={**os.environ, "COLUMNS": "120", "LINES": str(rows), **env}, timeout=20)
        assert done.returncode == 0, done.stderr
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    return out.decode(errors="replace")


def test_a_table_longer_than_the_terminal_goes_through_the_pager(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon('[adapters.idle]\ncommand = ["/bin/sleep", "60"]\nstop_timeout = 0.5\n')
    client = daemon.client()
    for n in range(12):
        client.call("acquire", {"job": f"job-{n:02d}", "adapter": "idle"})
    paged = tmp_path / "paged"
    pager = f"{PYTHON} -c \"import sys; open('{paged}', 'w').write(sys.stdin.read())\""
    shown = run_on_a_terminal(["status", "--socket", daemon.socket], rows=8, env={"PAGER": pager})
    assert "job-11" in paged.read_text() and "job-11" not in shown
    paged.unlink()
    # A table that fits, PAGER=cat, or a pipe: printed as it is.
    shown = run_on_a_terminal(["status", "--socket", daemon.socket, "--job", "job-03"], rows=40, env={"PAGER": pager})
    assert "job-03" in shown and not paged.exists()
    piped = run_cli("status", "--socket", daemon.socket)
    assert "job-11" in piped.stdout
