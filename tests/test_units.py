"""The shipped systemd units beyond the system pair (tests/test_systemd.py):
the user units pass `systemd-analyze verify --user` as shipped, match the
daemon's defaults for a user other than root, and their ExecStart= run as
an unprivileged uid with a user manager's environment serves on the socket
the user socket unit names; `install-units` prints and writes the units
with ExecStart= running this installation."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from supervisor import units
from supervisor.client import Client
from supervisor.core import config as config_module
from tests.asuser import owned_dir, serve_as
from tests.conftest import DAEMON_START_TIMEOUT_S, PYTHON, eventually
from tests.test_systemd import parse_unit, process_state

REPO = Path(__file__).resolve().parent.parent
SYSTEM_UNITS = REPO / "systemd"
USER_UNITS = REPO / "systemd" / "user"
CONSOLE_SCRIPT = Path(PYTHON).parent / "adapter-supervisor"

# The uid the user service runs as: no account of a test host uses it.
USER_UID = 61030


def verify(directory: Path, *, user: bool, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify [--user]` of both units in `directory`."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the systemd package"
    return subprocess.run(
        [analyze, "verify", *(["--user"] if user else []), *units.UNIT_NAMES],
        cwd=directory, capture_output=True, text=True, timeout=20, check=False,
        env={**os.environ, **(env or {})},
    )


def user_manager_env(tmp_path: Path) -> dict[str, str]:
    """What a user's manager gives `verify --user`: a runtime directory, and
    a home whose ~/.local/bin holds the command the user unit runs (%h)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "adapter-supervisor").symlink_to(CONSOLE_SCRIPT)
    return {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)}


def test_the_user_units_pass_systemd_analyze_verify_as_shipped(tmp_path: Path) -> None:
    """Unchanged: ExecStart= runs %h/.local/bin/adapter-supervisor, and the
    test's home has it. verify warns (exit 0) of an unknown key or bad value,
    so the test requires silence too."""
    for name in units.UNIT_NAMES:
        shutil.copy(USER_UNITS / name, tmp_path / name)
    result = verify(tmp_path, user=True, env=user_manager_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_pass_verify_with_a_command_path_systemd_must_read_quoted(tmp_path: Path, user: bool) -> None:
    """A virtual environment at a path with a space, `%` and `$`: the
    rendered ExecStart= names that very file, or verify says it is missing."""
    odd = tmp_path / "venvs" / "my 100% $agents" / "bin"
    odd.mkdir(parents=True)
    (odd / "adapter-supervisor").symlink_to(CONSOLE_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    for name, text in units.render_units(user, [str(odd / "adapter-supervisor")]).items():
        (out / name).write_text(text)
    result = verify(out, user=user, env=user_manager_env(tmp_path) if user else None)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_rendering_changes_the_program_of_execstart_and_nothing_else() -> None:
    for user, directory in ((False, SYSTEM_UNITS), (True, USER_UNITS)):
        rendered = units.render_units(user, ["/opt/as/bin/adapter-supervisor"])
        shipped_service = (directory / units.SERVICE).read_text().splitlines()
        service = rendered[units.SERVICE].splitlines()
        changed = [(old, new) for old, new in zip(shipped_service, service, strict=True) if old != new]
        assert len(changed) == 1
        old, new = changed[0]
        assert old.startswith("ExecStart=") and new.startswith("ExecStart=/opt/as/bin/adapter-supervisor serve --config ")
        assert new.split(" ", 1)[1] == old.split(" ", 1)[1]
        assert rendered[units.SOCKET] == (directory / units.SOCKET).read_text()


def test_systemd_words_read_back_as_themselves() -> None:
    assert units.systemd_word("/usr/local/bin/adapter-supervisor") == "/usr/local/bin/adapter-supervisor"
    assert units.systemd_word("/opt/100%/$x") == "/opt/100%%/$$x"
    assert units.systemd_word("/opt/100%/$x", program=True) == "/opt/100%%/$x"
    assert units.systemd_word('/opt/a b/"q"\\') == '"/opt/a b/\\"q\\"\\\\"'


def test_the_user_units_match_the_daemons_defaults_for_a_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    service = parse_unit(USER_UNITS / units.SERVICE)
    sock = parse_unit(USER_UNITS / units.SOCKET)
    single = {key: values[-1] for key, values in service["Service"].items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    assert single["ExecStart"] == "%h/.local/bin/adapter-supervisor serve --config %E/adapter-supervisor/supervisor.toml"
    assert "-HUP" in single["ExecReload"] and "$MAINPID" in single["ExecReload"]
    assert single["Restart"] == "on-failure" and single["Delegate"] == "yes" and single["KillMode"] == "process"
    assert service["Install"]["WantedBy"] == ["default.target"]
    # In a user's manager these need a user namespace, in which other uids
    # all read as 65534: the daemon could not tell its clients apart.
    namespaced = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateUsers", "PrivateDevices", "ProtectKernelModules"}
    assert namespaced.isdisjoint(single)
    # %t is $XDG_RUNTIME_DIR: the socket and runtime directory are the ones
    # the daemon uses by default when it is not root.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (listen,) = sock["Socket"]["ListenStream"]
    assert listen.replace("%t", str(tmp_path)) == config_module.default_socket_path()
    assert os.path.join(str(tmp_path), single["RuntimeDirectory"]) == os.path.dirname(config_module.default_socket_path())
    assert config_module.default_state_dir().startswith(os.path.join(str(tmp_path), single["RuntimeDirectory"]) + "/")
    assert sock["Socket"]["FileDescriptorName"] == ["control"] and sock["Socket"]["SocketMode"] == ["0600"]
    # No SocketGroup=: a user's manager may only give the file to a group the user is in.
    assert "SocketGroup" not in sock["Socket"] and sock["Install"]["WantedBy"] == ["sockets.target"]


CONFIG = """
[daemon]
log_format = "json"

[adapters.pair]
command = ["/bin/sh", "-c", "/bin/sleep 60 & exec /bin/sleep 60"]
stop_timeout = 1.0
"""


def test_the_user_service_serves_as_an_unprivileged_user_with_the_default_paths(tmp_path: Path) -> None:
    """The user unit's ExecStart=, its specifiers expanded as the user's
    manager expands them, run as a uid that is not root with the manager's
    environment: READY=1, the socket where the user socket unit listens,
    state in the runtime directory, whole trees stopped, a clean exit."""
    base = Path(f"/tmp/adapter-supervisor-test-units-{os.getpid()}-{secrets.token_hex(4)}")
    base.mkdir(mode=0o755)
    try:
        runtime = owned_dir(base / "runtime", USER_UID, 0o700)
        home = owned_dir(base / "home", USER_UID)
        config_dir = owned_dir(home / ".config" / "adapter-supervisor", USER_UID)
        (config_dir / "supervisor.toml").write_text(CONFIG)
        service = {k: v[-1] for k, v in parse_unit(USER_UNITS / units.SERVICE)["Service"].items()}
        argv = service["ExecStart"].replace("%E", str(home / ".config")).split()
        assert argv[0] == "%h/.local/bin/adapter-supervisor"
        listen = parse_unit(USER_UNITS / units.SOCKET)["Socket"]["ListenStream"][0].replace("%t", str(runtime))
        address = f"adapter-supervisor-test-{secrets.token_hex(8)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(b"\0" + address.encode())
            notify.settimeout(DAEMON_START_TIMEOUT_S)
            daemon = serve_as(
                USER_UID, argv[1:], log_path=tmp_path / "daemon.log",
                env={"XDG_RUNTIME_DIR": str(runtime), "HOME": str(home), "NOTIFY_SOCKET": f"@{address}"},
            )
            try:
                assert notify.recv(4096).startswith(b"READY=1"), (tmp_path / "daemon.log").read_text()
                info = os.stat(listen)
                assert stat.S_ISSOCK(info.st_mode) and info.st_uid == USER_UID
                state = runtime / "adapter-supervisor" / "state"
                assert state.stat().st_uid == USER_UID and stat.S_IMODE(state.stat().st_mode) == 0o700
                with Client(listen, timeout=10) as client:  # root may always connect
                    assert client.call("hello")["pid"] == daemon.pid
                    lease = client.call("acquire", {"job": "j", "adapter": "pair", "detach": True, "ttl": 60})
                    # The root forks its child right after it starts: wait for both.
                    def both_running() -> dict | None:
                        status = client.call("status")
                        return status if len(status["instances"][0]["pids"]) == 2 else None

                    row = eventually(both_running, timeout=5)
                    assert row, client.call("status")
                    (instance,) = row["instances"]
                    assert len(instance["pids"]) == 2
                    assert all(os.stat(f"/proc/{pid}").st_uid == USER_UID for pid in instance["pids"])
                    # No delegated cgroup for this uid here: the process table it is.
                    assert row["daemon"]["cgroup_mode"] is False
                    client.call("release", {"lease": lease["lease"]})
                assert eventually(lambda: all(process_state(pid) in (None, "Z") for pid in instance["pids"]), timeout=3)
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(20) == 0
                assert not os.path.lexists(listen)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait(10)
        text = (tmp_path / "daemon.log").read_text()
        ready = next(json.loads(line) for line in text.splitlines() if '"daemon.ready"' in line)
        assert ready["socket"] == listen and ready["config"] == str(config_dir / "supervisor.toml")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_cli(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(command or [str(CONSOLE_SCRIPT)]), *args], capture_output=True, text=True, timeout=30, check=False,
    )


def test_install_units_writes_the_units_running_the_command_that_wrote_them(tmp_path: Path) -> None:
    target = tmp_path / "units"
    first = run_cli("install-units", "--dir", str(target))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[:2] == [f"written: {target / name}" for name in units.UNIT_NAMES]
    assert "systemctl daemon-reload && systemctl enable --now adapter-supervisor.socket adapter-supervisor.service" in first.stdout
    service = (target / units.SERVICE).read_text()
    assert f"\nExecStart={CONSOLE_SCRIPT} serve --config /etc/adapter-supervisor/supervisor.toml\n" in service
    assert (target / units.SOCKET).read_text() == (SYSTEM_UNITS / units.SOCKET).read_text()
    assert stat.S_IMODE((target / units.SERVICE).stat().st_mode) == 0o644
    # Again: nothing to do. After a local edit: replaced (drop-ins are for edits).
    again = json.loads(run_cli("install-units", "--dir", str(target), "--json").stdout)
    assert [unit["action"] for unit in again["units"]] == ["unchanged", "unchanged"]
    (target / units.SERVICE).write_text(service.replace("WatchdogSec=30s", "WatchdogSec=1h"))
    replaced = json.loads(run_cli("install-units", "--dir", str(target), "--json").stdout)
    assert [unit["action"] for unit in replaced["units"]] == ["replaced", "unchanged"]
    assert (target / units.SERVICE).read_text() == service
    assert sorted(p.name for p in target.iterdir()) == sorted(units.UNIT_NAMES)


def test_install_units_prints_what_it_would_write(tmp_path: Path) -> None:
    printed = run_cli("install-units", "--user", "--print")
    assert printed.returncode == 0, printed.stderr
    written = run_cli("install-units", "--user", "--dir", str(tmp_path))
    assert written.returncode == 0, written.stderr
    home_units = units.default_unit_dir(user=True)
    expected = "\n".join(f"# {home_units / name}\n{(tmp_path / name).read_text()}" for name in units.UNIT_NAMES)
    assert printed.stdout == expected
    assert f"\nExecStart={CONSOLE_SCRIPT} serve --config %E/adapter-supervisor/supervisor.toml\n" in printed.stdout


def test_install_units_through_python_m_finds_the_console_script_of_its_environment() -> None:
    printed = run_cli("install-units", "--print", command=[PYTHON, "-m", "supervisor"])
    assert printed.returncode == 0, printed.stderr
    assert f"\nExecStart={CONSOLE_SCRIPT} serve " in printed.stdout


def test_console_command_resolution(tmp_path: Path) -> None:
    assert units.console_command(str(CONSOLE_SCRIPT)) == [str(CONSOLE_SCRIPT)]
    # Not the console script (python -m, a test runner): the one beside this interpreter.
    assert units.console_command(str(tmp_path / "__main__.py")) == [str(CONSOLE_SCRIPT)]


def test_install_units_that_cannot_write_exits_73_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    failed = run_cli("install-units", "--dir", str(blocker / "units"))
    assert failed.returncode == 73
    assert str(blocker / "units") in failed.stderr and "Traceback" not in failed.stderr
    assert failed.stdout == ""


def test_the_default_unit_directories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert units.default_unit_dir() == Path("/etc/systemd/system")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert units.default_unit_dir(user=True) == tmp_path / "systemd" / "user"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert units.default_unit_dir(user=True) == tmp_path / "home" / ".config" / "systemd" / "user"

