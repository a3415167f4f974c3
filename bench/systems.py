"""The three systems under test, each started on a Unix socket in a temporary
directory with the same tree program, and the driver's handle on a client.

* `Ours`: `python -m supervisor serve --config X` from the project's venv, with a
  `tree` adapter (the benchmark tree) and an `idle` adapter (`sleep`, for
  instance counts), in cgroup mode or process-table mode.
* `Supervisord`: supervisord from its own venv, program `tree` with the same
  command, `stopasgroup` and `killasgroup` (its best settings for trees).
* `Circus`: circusd from its own venv, watcher `tree` with the same command and
  `stop_children` (its best setting for trees), ZeroMQ endpoints over ipc://.

Each system's stop signal is SIGTERM and its grace before SIGKILL is
`STOP_GRACE_S`. Every process started here carries `BENCH_MARK` in its
environment so the driver can find any leftover at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import envs, procwatch

BENCH_DIR = envs.BENCH_DIR
TREE_SCRIPT = BENCH_DIR / "tree.py"
AGENT_SCRIPT = BENCH_DIR / "agent.py"
LOADGEN_SCRIPT = BENCH_DIR / "loadgen.py"
ECHO_SCRIPT = BENCH_DIR / "echo.py"
PROJECT_PYTHON = envs.REPO_DIR / ".venv" / "bin" / "python"

# The environment variable every process of a run carries (value: the run id).
MARK_ENV = "BENCH_MARK"

# Grace between SIGTERM and SIGKILL, the same for every system: long enough
# that a SIGKILL never ends a tree that exits on SIGTERM.
STOP_GRACE_S = 2.0

# A daemon slower than this to answer its first request has failed to start.
START_TIMEOUT_S = 30.0

# Instances of the `idle` adapter a daemon may hold (the fill cost goes to 10,000).
MAX_IDLE_INSTANCES = 12000

# Connections our daemon accepts; the footprint workload opens 10,000 in the
# full run (the daemon also caps them at half its open-file limit).
MAX_CONNECTIONS = 10_000


def tree_command(pidfile: Path) -> list[str]:
    """The tree every system starts: the base interpreter, isolated and without
    site, so it starts as fast as Python can."""
    return [envs.base_python(), "-I", "-S", str(TREE_SCRIPT), str(pidfile)]


def client_python(protocol: str) -> list[str]:
    """Interpreter (and flags) for the clients of a system speaking `protocol`:
    circus's need its venv's pyzmq; the others only the standard library."""
    if protocol == "circus":
        return [str(envs.CIRCUS.python)]
    return [envs.base_python(), "-S", "-E"]


def agent_python(protocol: str) -> list[str]:
    """Interpreter for a system's bench/agent.py: the system's own virtualenv,
    whose client library the agent also measures (ours: this process's)."""
    if protocol == "ours":
        return [sys.executable]
    if protocol == "supervisord":
        return [str(envs.SUPERVISORD.python)]
    return client_python(protocol)


@dataclass
class Agent:
    """The driver's end of a bench/agent.py process."""

    popen: subprocess.Popen[str]

    @classmethod
    def start(cls, protocol: str, endpoint: str, env: dict[str, str]) -> Agent:
        popen = subprocess.Popen(
            [*agent_python(protocol), str(AGENT_SCRIPT), protocol, endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        return cls(popen)

    @property
    def stdout_fd(self) -> int:
        assert self.popen.stdout is not None
        return self.popen.stdout.fileno()

    def send(self, op: str, **fields: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.popen.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.popen.args} exited with {self.popen.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"agent error: {answer['error']}")
        return answer

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.receive()

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                self.send("exit")
                self.popen.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass


@dataclass
class System:
    """A daemon under test, started in `workdir`."""

    name: str
    workdir: Path
    env: dict[str, str]
    # Which client speaks to it: "ours", "supervisord" or "circus".
    protocol: str = ""
    popen: subprocess.Popen[bytes] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def pidfile(self) -> Path:
        return self.workdir / "tree.pids"

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def cwd(self) -> Path:
        # Never the checkout for a peer: its `supervisor` package would shadow
        # supervisord's own.
        return self.workdir

    def write_config(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the daemon answers a request."""
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with open(self.log_path, "wb") as log:
            # The driver runs no threads, so a preexec_fn is safe here.
            self.popen = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True, preexec_fn=procwatch.terminate_with_parent,  # noqa: PLW1509
            )

    def wait_ready(self) -> None:
        assert self.popen is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                if self.ready():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_S}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def agent(self) -> Agent:
        return Agent.start(self.protocol, self.endpoint, self.env)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within `timeout`."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.errors.append(f"{self.name} ignored SIGTERM for {timeout}s; killed")
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except FileNotFoundError:
            return ""


class Ours(System):
    def __init__(self, workdir: Path, env: dict[str, str], *, cgroup: str = "auto", log_level: str = "info",
                 sweep_interval: float = 30.0, name: str = "ours") -> None:
        super().__init__(name, workdir, env, protocol="ours")
        self.cgroup = cgroup
        self.log_level = log_level
        self.sweep_interval = sweep_interval

    @property
    def endpoint(self) -> str:
        return str(self.workdir / "control.sock")

    @property
    def config_path(self) -> Path:
        return self.workdir / "supervisor.toml"

    def write_config(self) -> None:
        daemon = {
            "socket": self.endpoint,
            "state_dir": str(self.workdir / "state"),
            "sweep_interval": self.sweep_interval,
            "max_connections": MAX_CONNECTIONS,
            "log_format": "json",
            "log_level": self.log_level,
            "cgroup": self.cgroup,
        }
        tree = {
            "command": tree_command(self.pidfile),
            "stdio": "null",
            "stop_signal": "SIGTERM",
            "stop_timeout": STOP_GRACE_S,
            "linger": 0.0,
            "max_instances": 64,
        }
        idle = {
            "command": ["/bin/sleep", "86400"],
            "stdio": "null",
            "stop_signal": "SIGTERM",
            "stop_timeout": STOP_GRACE_S,
            "linger": 0.0,
            "max_instances": MAX_IDLE_INSTANCES,
        }
        # `idle` held to a memory_limit (never reached by a sleep): what the
        # limit watch measures (bench/watchcost.py).
        limited = {**idle, "memory_limit": "1GiB"}
        echo = {"command": ["/bin/cat"], "stdio": "pipe", "stop_signal": "SIGTERM", "stop_timeout": STOP_GRACE_S}
        text = "[daemon]\n" + _toml_table(daemon)
        text += "\n[adapters.tree]\n" + _toml_table(tree)
        text += "\n[adapters.idle]\n" + _toml_table(idle)
        text += "\n[adapters.limited]\n" + _toml_table(limited)
        text += "\n[adapters.echo]\n" + _toml_table(echo)
        self.config_path.write_text(text)

    def command(self) -> list[str]:
        return [str(PROJECT_PYTHON), "-m", "supervisor", "serve", "--config", str(self.config_path)]

    def ready(self) -> bool:
        from bench import wire

        client = wire.OursClient(self.endpoint, timeout=5)
        try:
            client.call("hello")
        finally:
            client.close()
        return True

    def mode(self) -> str:
        from bench import wire

        client = wire.OursClient(self.endpoint, timeout=10)
        try:
            return "cgroup" if client.call("status")["daemon"]["cgroup_mode"] else "process-table"
        finally:
            client.close()

    def crash_lines(self) -> list[str]:
        text = self.log_tail(limit=10**9)
        markers = ("Traceback", '"request.crashed"', '"daemon.crashed"')
        return [line[:500] for line in text.splitlines() if any(m in line for m in markers)]


class Supervisord(System):
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__("supervisord", workdir, env, protocol="supervisord")

    @property
    def endpoint(self) -> str:
        return str(self.workdir / "supervisord.sock")

    @property
    def config_path(self) -> Path:
        return self.workdir / "supervisord.conf"

    def write_config(self) -> None:
        command = " ".join(tree_command(self.pidfile))
        self.config_path.write_text(
            f"""[unix_http_server]
file={self.endpoint}

[supervisord]
logfile={self.workdir / "supervisord-main.log"}
pidfile={self.workdir / "supervisord.pid"}
childlogdir={self.workdir}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:tree]
command={command}
autostart=false
autorestart=false
startsecs=0
startretries=0
stopsignal=TERM
stopwaitsecs={STOP_GRACE_S:g}
stopasgroup=true
killasgroup=true
stdout_logfile=NONE
stderr_logfile=NONE
"""
        )

    def command(self) -> list[str]:
        return [str(envs.SUPERVISORD.script("supervisord")), "-c", str(self.config_path)]

    def ready(self) -> bool:
        from bench import wire

        client = wire.SupervisordClient(self.endpoint, timeout=5)
        try:
            return client.call("supervisor.getState")["statename"] == "RUNNING"
        finally:
            client.close()


class Circus(System):
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__("circus", workdir, env, protocol="circus")

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.workdir / 'circus.endpoint'}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "circus.ini"

    def write_config(self) -> None:
        python, *args = tree_command(self.pidfile)
        self.config_path.write_text(
            f"""[circus]
endpoint = {self.endpoint}
pubsub_endpoint = ipc://{self.workdir / 'circus.pubsub'}
statsd = False
check_delay = 5
loglevel = info
logoutput = {self.workdir / 'circusd-main.log'}

[watcher:tree]
cmd = {python}
args = {' '.join(args)}
numprocesses = 1
autostart = False
copy_env = True
stop_signal = TERM
stop_children = True
graceful_timeout = {STOP_GRACE_S:g}
"""
        )

    def command(self) -> list[str]:
        return [str(envs.CIRCUS.script("circusd")), str(self.config_path)]

    def ready(self) -> bool:
        # The driver has no pyzmq: ask through a short-lived agent.
        agent = self.agent()
        try:
            agent.request("call", method="status", params={"name": "tree"})
        except RuntimeError:
            return False
        finally:
            agent.close()
        return True


class Echo(System):
    """Not a supervisor: bench/echo.py, the floor of a JSON-RPC round trip on trio."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__("echo", workdir, env, protocol="ours")

    @property
    def endpoint(self) -> str:
        return str(self.workdir / "echo.sock")

    def write_config(self) -> None:
        pass

    def command(self) -> list[str]:
        return [str(PROJECT_PYTHON), str(ECHO_SCRIPT), self.endpoint]

    def ready(self) -> bool:
        from bench import wire

        client = wire.OursClient(self.endpoint, timeout=5)
        try:
            client.call("hello")
        finally:
            client.close()
        return True


def raw_agent(pidfile: Path, env: dict[str, str]) -> Agent:
    """An agent that starts the tree with posix_spawn itself: the floor."""
    return Agent.start("raw", json.dumps(tree_command(pidfile)), env)


def _toml_table(values: dict[str, object]) -> str:
    # JSON strings, numbers and arrays of strings are valid TOML values.
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def leftover_processes(mark: str, exclude: set[int]) -> list[int]:
    """Pids of live processes carrying this run's mark, except `exclude`."""
    entry = f"{MARK_ENV}={mark}".encode()
    found = []
    for pid in procwatch.list_pids():
        if pid in exclude or pid == os.getpid():
            continue
        stat = procwatch.read_stat(pid)
        if stat is None or stat[0] in procwatch.EXITED_STATES:
            continue
        if procwatch.environ_has(pid, entry):
            found.append(pid)
    return found
