"""systemd integration: sd_notify, socket activation, journald priorities, the units.

The protocols are tested as systemd speaks them, without systemd: the test owns
the datagram socket named by NOTIFY_SOCKET, and passes listening sockets on
descriptors 3, 4, ... with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set the way
systemd sets them (through a small wrapper that learns its own pid and then
execs, so that the pid it writes is the daemon's).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from supervisor.core import adapterconfig, daemonconfig
from supervisor import systemd
from supervisor.client import Client
from tests.conftest import DAEMON_START_TIMEOUT_S, PYTHON, eventually
from tests.test_adoption import recorded_tokens

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED_BINARY = "/usr/local/bin/adapter-supervisor"

# WATCHDOG_USEC given to the daemon: 0.4 s, so pings are due every 0.2 s and a
# second of listening sees several.
WATCHDOG_USEC = 400_000

# Environment variables of the two protocols, which adapters must not inherit.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# Runs as `python -c ACTIVATE FD:NAME ... -- ARGV`: moves the descriptors to 3,
# 4, ..., sets LISTEN_* for its own pid (exec keeps the pid) and execs ARGV.
ACTIVATE = textwrap.dedent(
    """
    import fcntl, os, sys
    split = sys.argv.index("--")
    specs, argv = sys.argv[1:split], sys.argv[split + 1:]
    high = []
    for spec in specs:
        fd = int(spec.partition(":")[0])
        high.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 100))
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(specs))
    os.environ["LISTEN_FDNAMES"] = ":".join(spec.partition(":")[2] for spec in specs)
    os.execv(argv[0], argv)
    """
)

# An adapter that reports which of SYSTEMD_VARIABLES it inherited, then waits.
ENV_REPORTER = (
    "import os, sys, time;"
    f"print('inherited:', *[k for k in {SYSTEMD_VARIABLES!r} if k in os.environ], file=sys.stderr, flush=True);"
    "time.sleep(60)"
)


def clean_environ() -> dict[str, str]:
    """The test's environment without anything systemd may have given the test runner."""
    return {k: v for k, v in os.environ.items() if k not in (*SYSTEMD_VARIABLES, "JOURNAL_STREAM")}


# -- pure parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/123", b"\0/org/freedesktop/systemd1/notify/123"),
        ("@x", b"\0x"),
    ],
)
def test_notify_address_paths_and_abstract_names(value: str, address: str | bytes) -> None:
    assert systemd.parse_notify_address(value) == address


@pytest.mark.parametrize("value", ["", "@", "relative/notify", "vsock:2:1234"])
def test_notify_address_refuses_what_it_cannot_speak(value: str) -> None:
    with pytest.raises(ValueError):
        systemd.parse_notify_address(value)


def test_notification_lines_in_order() -> None:
    assert systemd.format_notification({"READY": 1, "STATUS": "2 leases"}) == b"READY=1\nSTATUS=2 leases"
    for bad in ({}, {"STATUS": "two\nlines"}, {"A=B": 1}, {"": 1}):
        with pytest.raises(ValueError):
            systemd.format_notification(bad)


@pytest.mark.parametrize(
    ("environ", "period"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_period_is_half_the_timeout_and_only_for_us(environ: dict[str, str], period: float | None) -> None:
    assert systemd.watchdog_period(environ, 4242) == period


@pytest.mark.parametrize(
    ("environ", "passed"),
    [
        ({}, []),
        ({"LISTEN_PID": "4243", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "0"}, []),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "1"}, [(3, "unknown")]),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:control"}, [(3, "a"), (4, "control")]),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}, [(3, "unknown"), (4, "unknown")]),
    ],
)
def test_listen_fds_parsing(environ: dict[str, str], passed: list[tuple[int, str]]) -> None:
    assert systemd.parse_listen_fds(environ, 4242) == passed


@pytest.mark.parametrize("count", ["", "many", "-1"])
def test_listen_fds_malformed_count_is_an_error(count: str) -> None:
    with pytest.raises(systemd.ActivationError):
        systemd.parse_listen_fds({"LISTEN_PID": "4242", "LISTEN_FDS": count}, 4242)


def test_choose_listener_by_name_or_alone() -> None:
    assert systemd.choose_listener([]) is None
    assert systemd.choose_listener([(3, "unknown")]) == 3
    assert systemd.choose_listener([(3, "metrics"), (4, "control")]) == 4
    with pytest.raises(systemd.ActivationError, match="control"):
        systemd.choose_listener([(3, "a"), (4, "b")])
    with pytest.raises(systemd.ActivationError):
        systemd.choose_listener([(3, "control"), (4, "control")])


def test_under_journald_only_for_the_very_stream(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "elsewhere", "w") as elsewhere:
        info = os.fstat(journal.fileno())
        environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert systemd.under_journald(journal, environ)
        assert not systemd.under_journald(elsewhere, environ)
        assert not systemd.under_journald(journal, {})
        assert not systemd.under_journald(journal, {"JOURNAL_STREAM": "garbage"})


# -- sd_notify in process -----------------------------------------------------------


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    environ = {"WATCHDOG_USEC": "1000000"}
    notifier = systemd.Notifier.from_environ(environ)
    assert not notifier.enabled
    assert notifier.watchdog_period is None
    assert notifier.notify(READY=1) is False
    assert environ == {}


def test_notifier_speaks_to_an_abstract_socket_and_unsets_the_environment() -> None:
    name = f"adapter-supervisor-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5)
        environ = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "KEEP": "1"}
        notifier = systemd.Notifier.from_environ(environ)
        try:
            assert environ == {"KEEP": "1"}
            assert notifier.watchdog_period == 1.0
            assert notifier.ready(status="live instances: 0, leases: 0")
            assert receiver.recv(4096) == b"READY=1\nSTATUS=live instances: 0, leases: 0"
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert notifier.reloading()
            fields = parse_message(receiver.recv(4096))
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert fields["RELOADING"] == "1"
            assert before <= int(fields["MONOTONIC_USEC"]) <= after
            assert notifier.stopping()
            assert receiver.recv(4096) == b"STOPPING=1"
        finally:
            notifier.close()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = systemd.Notifier(str(tmp_path / "gone.sock"))
    try:
        assert notifier.notify(READY=1) is False
    finally:
        notifier.close()


async def test_watchdog_pings_from_the_event_loop_and_stops_when_it_is_wedged(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        notifier = systemd.Notifier(path, watchdog_period=0.05)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(systemd.watchdog, notifier)
                await trio.sleep(0.3)
                pings = drain(receiver)
                assert 3 <= len(pings) <= 8 and set(pings) == {b"WATCHDOG=1"}
                # Block the event loop on purpose: a watchdog on any other
                # thread would keep pinging through this.
                time.sleep(0.4)  # noqa: ASYNC251
                assert drain(receiver) == []
                await trio.sleep(0.2)
                assert drain(receiver)
                nursery.cancel_scope.cancel()
        finally:
            notifier.close()


async def test_watchdog_returns_when_not_asked_for(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        notifier = systemd.Notifier(path)
        try:
            with trio.fail_after(1):
                await systemd.watchdog(notifier)
            assert drain(receiver) == []
        finally:
            notifier.close()


# -- socket activation in a child process -------------------------------------------

CHECK_ACTIVATION = textwrap.dedent(
    """
    import json, os, sys
    from supervisor import systemd
    try:
        sock = systemd.activated_listener()
    except systemd.ActivationError as exc:
        print(json.dumps({"error": str(exc), "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
        sys.exit(0)
    def is_open(fd):
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True
    print(json.dumps({
        "fd": sock.fileno(), "name": sock.getsockname(), "inheritable": os.get_inheritable(sock.fileno()),
        "open": [fd for fd in (3, 4) if is_open(fd)],
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
    """
)


def activate(specs: list[tuple[socket.socket, str]], argv: list[str], **popen: object) -> subprocess.Popen[bytes]:
    """Start `argv` with `specs` passed as systemd passes sockets."""
    args = [f"{sock.fileno()}:{name}" for sock, name in specs]
    return subprocess.Popen(
        [PYTHON, "-c", ACTIVATE, *args, "--", *argv],
        pass_fds=[sock.fileno() for sock, _ in specs],
        env=clean_environ(),
        **popen,
    )


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_listen_fds_picks_the_control_socket_and_hides_the_rest(tmp_path: Path) -> None:
    with listening_socket(tmp_path / "other.sock") as other, listening_socket(tmp_path / "control.sock") as control:
        child = activate([(other, "metrics"), (control, "control")], [PYTHON, "-c", CHECK_ACTIVATION], stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=20)
    result = json.loads(out)
    assert result == {
        "fd": 4,
        "name": str(tmp_path / "control.sock"),
        "inheritable": False,
        "open": [4],  # the other passed socket is closed; systemd keeps its own copy
        "env": [],
    }


def test_listen_fds_refuses_a_socket_that_is_not_listening(tmp_path: Path) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        child = activate([(left, "control")], [PYTHON, "-c", CHECK_ACTIVATION], stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=20)
    result = json.loads(out)
    assert "not listening" in result["error"] and result["env"] == []


# -- journald priorities ------------------------------------------------------------

LOG_SOME_EVENTS = textwrap.dedent(
    """
    import structlog
    from supervisor.logconfig import configure_logging
    configure_logging("auto", "debug")
    log = structlog.get_logger()
    log.debug("a.debug")
    log.info("a.info", key="value")
    log.warning("a.warning")
    log.error("a.error")
    try:
        raise KeyError("boom")
    except KeyError:
        log.exception("a.exception")
    log.critical("a.critical")
    """
)


def run_logging(tmp_path: Path, *, journal: bool) -> list[str]:
    path = tmp_path / ("journal" if journal else "file")
    with open(path, "wb") as out:
        env = clean_environ()
        info = os.fstat(out.fileno())
        # Not under journald: the variable names another stream, as it does for
        # a child whose stderr was redirected away from the journal.
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino + (0 if journal else 1)}"
        subprocess.run([PYTHON, "-c", LOG_SOME_EVENTS], stderr=out, env=env, check=True, timeout=20)
    return path.read_text().splitlines()


def test_journald_lines_carry_their_priority(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=True)
    priorities = {}
    for line in lines:
        match = re.fullmatch(r"<(\d)>(\{.*\})", line)
        assert match, line
        event = json.loads(match.group(2))
        priorities[event["event"]] = int(match.group(1))
    assert priorities == {"a.debug": 7, "a.info": 6, "a.warning": 4, "a.error": 3, "a.exception": 3, "a.critical": 2}


def test_plain_json_lines_elsewhere(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=False)
    assert [json.loads(line)["event"] for line in lines] == [
        "a.debug", "a.info", "a.warning", "a.error", "a.exception", "a.critical",
    ]


# -- the daemon under (simulated) systemd -------------------------------------------


@dataclass
class Message:
    fields: dict[str, str]
    at: float


class NotifyReceiver:
    """The test's end of NOTIFY_SOCKET: keeps every message with its arrival time."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[Message] = []

    def wait_for(self, check: Callable[[dict[str, str]], bool], timeout: float = 10.0) -> Message:
        """The first message, received from now on, for which `check` holds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching notification within {timeout}s; got {self.messages[-10:]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = Message(parse_message(data), time.monotonic())
            self.messages.append(message)
            if check(message.fields):
                return message

    def close(self) -> None:
        self.sock.close()


def write_config(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A config for `name` with one `reporter` adapter; returns it and its socket path."""
    sock = str(tmp_path / f"{name}.sock")
    adapter_command = json.dumps([PYTHON, "-c", ENV_REPORTER])
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            socket = {json.dumps(sock)}
            state_dir = {json.dumps(str(tmp_path / f"{name}-state"))}
            log_format = "json"
            log_level = "debug"
            cgroup = "off"

            [adapters.reporter]
            command = {adapter_command}
            stop_timeout = 2.0
            """
        )
    )
    return path, sock


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Daemons a test starts itself; any still running at the end is killed and fails the test."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    leftovers = []
    for popen in started:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
            leftovers.append(popen.pid)
    assert not leftovers, f"daemons left running by the test: {leftovers}"


def inherited(client: Client, instance: str) -> list[str]:
    lines = eventually(lambda: client.call("logs", {"instance": instance})["lines"])
    assert lines and lines[0].startswith("inherited:"), lines
    return lines[0].split()[1:]


def test_daemon_speaks_sd_notify(tmp_path: Path, daemons: list[subprocess.Popen[bytes]]) -> None:
    config_path, sock = write_config(tmp_path, "notify")
    address = f"adapter-supervisor-test-{secrets.token_hex(8)}"
    receiver = NotifyReceiver(b"\0" + address.encode())
    log_path = tmp_path / "notify.log"
    try:
        env = {**clean_environ(), "NOTIFY_SOCKET": f"@{address}", "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with open(log_path, "wb") as log_file:
            daemon = subprocess.Popen(
                [PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        daemons.append(daemon)

        # READY=1 comes first, and only once the socket answers: no retrying here.
        ready = receiver.wait_for(lambda f: True, timeout=DAEMON_START_TIMEOUT_S)
        assert ready.fields == {"READY": "1", "STATUS": "live instances: 0, leases: 0"}
        with Client(sock, timeout=5) as client:
            assert client.call("hello")["pid"] == daemon.pid

        # WATCHDOG=1 every WATCHDOG_USEC / 2.
        pings = [receiver.wait_for(lambda f: f == {"WATCHDOG": "1"}).at for _ in range(6)]
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        assert 0.15 <= gaps[len(gaps) // 2] <= 0.3, gaps

        with Client(sock, timeout=10) as client:
            lease = client.call("acquire", {"job": "job-1", "adapter": "reporter"})
            receiver.wait_for(lambda f: f.get("STATUS") == "live instances: 1, leases: 1", timeout=5)
            # The adapter inherits neither the notify socket nor the watchdog.
            assert inherited(client, lease["instance"]) == []

            daemon.send_signal(signal.SIGHUP)
            reloading = receiver.wait_for(lambda f: "RELOADING" in f)
            now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert reloading.fields["RELOADING"] == "1"
            assert now_usec - 10_000_000 < int(reloading.fields["MONOTONIC_USEC"]) <= now_usec
            reloaded = receiver.wait_for(lambda f: "READY" in f)
            assert reloaded.fields["READY"] == "1"

            daemon.send_signal(signal.SIGTERM)
            stopping = receiver.wait_for(lambda f: "STOPPING" in f)
            assert stopping.fields["STOPPING"] == "1"
        assert daemon.wait(20) == 0
    finally:
        receiver.close()
    assert "Traceback" not in log_path.read_text()


def test_an_upgrade_says_reloading_then_ready_from_the_same_pid(tmp_path: Path, daemons: list[subprocess.Popen[bytes]]) -> None:
    config_path, sock = write_config(tmp_path, "upgrade")
    address = f"adapter-supervisor-test-{secrets.token_hex(8)}"
    receiver = NotifyReceiver(b"\0" + address.encode())
    try:
        env = {**clean_environ(), "NOTIFY_SOCKET": f"@{address}", "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        with open(tmp_path / "upgrade.log", "wb") as log_file:
            daemon = subprocess.Popen(
                [PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        daemons.append(daemon)
        receiver.wait_for(lambda f: "READY" in f, timeout=DAEMON_START_TIMEOUT_S)
        with Client(sock, timeout=90) as client:
            lease = client.call("acquire", {"job": "job-1", "adapter": "reporter"})
            assert client.upgrade()["pid"] == daemon.pid
            # The adapter started before the upgrade, and one after, inherit
            # none of systemd's variables.
            assert inherited(client, lease["instance"]) == []
            after = client.call("acquire", {"job": "job-2", "adapter": "reporter"})
            assert inherited(client, after["instance"]) == []
        # In the order sent: RELOADING=1 from the old image, READY=1 from the new.
        assert receiver.wait_for(lambda f: "RELOADING" in f, timeout=10).fields["RELOADING"] == "1"
        assert receiver.wait_for(lambda f: "READY" in f, timeout=10).fields["READY"] == "1"
        # The new image pings the watchdog too (WATCHDOG_PID is still its pid).
        receiver.wait_for(lambda f: f == {"WATCHDOG": "1"}, timeout=5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        receiver.close()


def test_daemon_serves_on_a_passed_socket_and_leaves_it_alone(tmp_path: Path, daemons: list[subprocess.Popen[bytes]]) -> None:
    # The config names the passed socket's path, as /etc/adapter-supervisor
    # and the socket unit both name /run/adapter-supervisor/control.sock.
    config_path, config_sock = write_config(tmp_path, "activated")
    passed_path = Path(config_sock)
    log_path = tmp_path / "activated.log"
    with listening_socket(passed_path) as passed:
        inode = os.stat(passed_path).st_ino
        with open(log_path, "wb") as log_file:
            daemon = activate(
                [(passed, "control")],
                [PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        daemons.append(daemon)
        client = eventually(lambda: try_client(str(passed_path), daemon), timeout=DAEMON_START_TIMEOUT_S)
        assert client, log_path.read_text()
        with client:
            assert client.call("hello")["pid"] == daemon.pid
            lease = client.call("acquire", {"job": "job-1", "adapter": "reporter"})
            assert inherited(client, lease["instance"]) == []

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        # The socket file is still the test's, and still connectable: it was
        # not the daemon's to replace or remove.
        assert os.stat(passed_path).st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(passed_path))
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    ready = next(e for e in events if e["event"] == "daemon.ready")
    assert ready["socket"] == str(passed_path) and ready["socket_activated"] is True


def try_client(path: str, daemon: subprocess.Popen[bytes]) -> Client | None:
    if daemon.poll() is not None:
        raise AssertionError(f"daemon exited with {daemon.returncode}")
    try:
        client = Client(path, timeout=5)
    except OSError:
        return None
    try:
        client.call("hello")
    except OSError:
        client.close()
        return None
    return client


# -- unit files ---------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file as {section: {key: [values...]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks every Exec*= binary exists, so the copy
    verified here runs the console script of this checkout instead of the
    installed /usr/local/bin one; nothing else in the units is changed. A unit
    with an unknown key or a bad value makes verify print a warning (with exit
    status 0), so the test also requires silence."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the systemd package"
    console_script = Path(PYTHON).parent / "adapter-supervisor"
    assert console_script.exists(), console_script
    service = (UNITS / "adapter-supervisor.service").read_text()
    assert service.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    (tmp_path / "adapter-supervisor.service").write_text(
        service.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={console_script} ")
    )
    shutil.copy(UNITS / "adapter-supervisor.socket", tmp_path / "adapter-supervisor.socket")
    result = subprocess.run(
        [analyze, "verify", "adapter-supervisor.service", "adapter-supervisor.socket"],
        cwd=tmp_path, capture_output=True, text=True, timeout=20, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


def test_units_match_the_daemon_defaults() -> None:
    service = parse_unit(UNITS / "adapter-supervisor.service")["Service"]
    sock = parse_unit(UNITS / "adapter-supervisor.socket")["Socket"]
    single = {key: values[-1] for key, values in service.items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    assert single["ExecStart"] == f"{INSTALLED_BINARY} serve --config /etc/adapter-supervisor/supervisor.toml"
    assert "-HUP" in single["ExecReload"] and "$MAINPID" in single["ExecReload"]
    assert single["Restart"] == "on-failure" and single["Delegate"] == "yes"
    # A crash of the daemon must not take the adapters with it (they are adopted).
    assert single["KillMode"] == "process" and single["StateDirectoryMode"] == "0700"
    assert single["NoNewPrivileges"] == "yes"
    # The runtime and state directories are the ones the daemon uses as root.
    assert f"/run/{single['RuntimeDirectory']}" == daemonconfig._SYSTEM_RUNTIME_DIR
    assert f"/var/lib/{single['StateDirectory']}" == daemonconfig._SYSTEM_STATE_DIR
    assert sock["ListenStream"] == [os.path.join(daemonconfig._SYSTEM_RUNTIME_DIR, daemonconfig._SOCKET_NAME)]
    assert sock["SocketMode"] == ["0660"] and sock["FileDescriptorName"] == [systemd.CONTROL_FD_NAME]
    # Stopping waits out the largest stop_timeout plus the daemon's 6 s margin;
    # the default stop_timeout must fit with room to spare.
    default_stop_timeout = adapterconfig.AdapterConfig(name="x", command=("x",)).stop_timeout
    assert seconds(single["TimeoutStopSec"]) >= 10 * default_stop_timeout + 6
    assert seconds(single["WatchdogSec"]) >= 10


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


# -- helpers --------------------------------------------------------------------------


def parse_message(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`, without blocking."""
    received = []
    while True:
        try:
            received.append(sock.recv(4096, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return received


def process_state(pid: int) -> str | None:
    """The state letter of `pid` in /proc (Z: a zombie), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


class StoreReceiver:
    """The test's end of NOTIFY_SOCKET, as systemd's file-descriptor store:
    keeps the descriptors sent with FDSTORE=1 by name, drops them on
    FDSTOREREMOVE=1, and keeps every message."""

    def __init__(self, address: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.stored: dict[str, list[int]] = {}
        self.messages: list[dict[str, str]] = []

    def wait_for(self, check: Callable[[dict[str, str]], bool], timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching notification within {timeout}s; got {self.messages[-10:]}")
            self.sock.settimeout(remaining)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except TimeoutError:
                continue
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds += list(memoryview(payload[:usable]).cast("i"))
            fields = parse_message(data)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                self.stored.setdefault(fields["FDNAME"], []).extend(fds)
            else:
                for fd in fds:
                    os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                for fd in self.stored.pop(fields["FDNAME"], []):
                    os.close(fd)
            if check(fields):
                return fields

    def close(self) -> None:
        for fds in self.stored.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


def test_the_fd_store_keeps_an_adapters_pipes_through_a_crash(tmp_path: Path, daemons: list[subprocess.Popen[bytes]]) -> None:
    """An adapter reading stdin (`cat`) outlives a kill -9 of the daemon,
    because systemd's store holds the daemon's ends of its pipes; the
    restarted daemon takes them back, adopts the instance with its pipes, and
    fds passed by a new `acquire` talk to the same process."""
    sock = str(tmp_path / "store.sock")
    config_path = tmp_path / "store.toml"
    config_path.write_text(textwrap.dedent(f"""
        [daemon]
        socket = {json.dumps(sock)}
        state_dir = {json.dumps(str(tmp_path / "store-state"))}
        log_format = "json"
        log_level = "debug"

        [adapters.echo]
        command = ["/bin/cat"]
        stdio = "pipe"
        stop_timeout = 2.0
    """))
    address = f"adapter-supervisor-test-{secrets.token_hex(8)}"
    receiver = StoreReceiver(b"\0" + address.encode())
    env = {**clean_environ(), "NOTIFY_SOCKET": f"@{address}"}
    argv = [PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)]
    log_file = open(tmp_path / "store.log", "wb")
    try:
        first = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        daemons.append(first)
        receiver.wait_for(lambda f: "READY" in f, timeout=DAEMON_START_TIMEOUT_S)
        with Client(sock, timeout=10) as client:
            lease = client.call("acquire", {"job": "job-1", "adapter": "echo", "detach": True, "ttl": 600})
        instance, pid = lease["instance"], lease["pid"]
        names = (f"stdio-{instance}-in", f"stdio-{instance}-out")
        for name in names:
            receiver.wait_for(lambda f, name=name: f.get("FDNAME") == name and f.get("FDSTORE") == "1")
        assert all(len(receiver.stored[name]) == 1 for name in names)
        # The crash comes once the instance is recorded (what adoption needs).
        assert eventually(lambda: lease["lease"] in recorded_tokens(tmp_path / "store-state"), timeout=10)

        first.kill()
        first.wait(10)
        time.sleep(0.5)  # cat would have read EOF by now without the store
        assert process_state(pid) not in (None, "Z"), "the adapter died with the daemon"

        specs = [f"{receiver.stored[name][0]}:{name}" for name in names]
        second = subprocess.Popen(
            [PYTHON, "-c", ACTIVATE, *specs, "--", *argv],
            pass_fds=[receiver.stored[name][0] for name in names],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
        daemons.append(second)
        receiver.wait_for(lambda f: "READY" in f, timeout=DAEMON_START_TIMEOUT_S)
        with Client(sock, timeout=10) as client:
            row = next(r for r in client.call("status")["instances"] if r["instance"] == instance)
            assert row["adopted"] is True and row["pid"] == pid
            again, (stdin_fd, stdout_fd) = client.call_with_fds("acquire", {"job": "job-1", "adapter": "echo", "fds": True})
            assert again["instance"] == instance
            with os.fdopen(stdin_fd, "wb", buffering=0) as stdin, os.fdopen(stdout_fd, "rb", buffering=0) as stdout:
                stdin.write(b"still here\n")
                assert stdout.readline() == b"still here\n"
                client.call("release", {"lease": again["lease"]})
                client.call("release", {"lease": lease["lease"]})
                # The tree is gone: the store lets its pipes go.
                for name in names:
                    receiver.wait_for(lambda f, name=name: f.get("FDSTOREREMOVE") == "1" and f.get("FDNAME") == name)
        assert eventually(lambda: process_state(pid) in (None, "Z"), timeout=5)
        assert receiver.stored == {}
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        log_file.close()
        receiver.close()
    assert "Traceback" not in (tmp_path / "store.log").read_text()


def test_stored_pipes_no_instance_takes_are_closed_and_removed_from_the_store(
    tmp_path: Path, daemons: list[subprocess.Popen[bytes]]
) -> None:
    config_path, sock = write_config(tmp_path, "untaken")
    address = f"adapter-supervisor-test-{secrets.token_hex(8)}"
    receiver = StoreReceiver(b"\0" + address.encode())
    read_end, write_end = os.pipe()
    try:
        env = {**clean_environ(), "NOTIFY_SOCKET": f"@{address}"}
        with open(tmp_path / "untaken.log", "wb") as log_file:
            daemon = subprocess.Popen(
                [PYTHON, "-c", ACTIVATE, f"{write_end}:stdio-0123456789ab-in", "--",
                 PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)],
                pass_fds=[write_end], stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )
        daemons.append(daemon)
        os.close(write_end)
        # It binds its own socket (a stored pipe is not one to serve on) and
        # lets the pipe go: its only writer is closed, so the reader sees EOF.
        removed = receiver.wait_for(lambda f: "FDSTOREREMOVE" in f, timeout=DAEMON_START_TIMEOUT_S)
        assert removed["FDNAME"] == "stdio-0123456789ab-in"
        receiver.wait_for(lambda f: "READY" in f, timeout=DAEMON_START_TIMEOUT_S)
        with Client(sock, timeout=5) as client:
            assert client.call("hello")["pid"] == daemon.pid
        assert os.read(read_end, 1) == b""
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        os.close(read_end)
        receiver.close()


def test_stored_descriptors_that_are_not_the_pipes_they_are_named_are_not_taken(tmp_path: Path) -> None:
    """Only the service can fill its store, but what comes back is checked:
    a `-in` must be a pipe's write end, a `-out` its read end, and a name
    passed twice is trusted for neither."""
    script = textwrap.dedent(
        """
        import json, os
        from supervisor import systemd
        stored = {}
        systemd.listen_fds_with_names(stored=stored)
        print(json.dumps(sorted(stored)))
        """
    )
    read_end, write_end = os.pipe()
    other_read, other_write = os.pipe()
    directory = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    good_in, good_out = "stdio-aaaaaaaaaaaa-in", "stdio-aaaaaaaaaaaa-out"
    specs = [
        (write_end, good_in), (read_end, good_out),                          # right
        (os.dup(read_end), "stdio-bbbbbbbbbbbb-in"),                         # a read end named -in
        (directory, "stdio-cccccccccccc-out"),                               # not a pipe at all
        (other_write, "stdio-dddddddddddd-in"), (os.dup(other_write), "stdio-dddddddddddd-in"),  # twice
    ]
    fds = [fd for fd, _ in specs]
    try:
        child = subprocess.run(
            [PYTHON, "-c", ACTIVATE, *[f"{fd}:{name}" for fd, name in specs], "--", PYTHON, "-c", script],
            pass_fds=fds, env=clean_environ(), capture_output=True, text=True, timeout=30,
        )
    finally:
        for fd in [*fds, other_read]:
            os.close(fd)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == [good_in, good_out]
