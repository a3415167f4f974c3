"""One benchmark client of one system, driven over stdin/stdout.

Run as `python agent.py SYSTEM ENDPOINT` under the system's own interpreter
(circus needs the circus virtualenv's pyzmq); SYSTEM is `ours`, `supervisord`,
`circus` or `raw` (no daemon: the tree is started with posix_spawn, the floor).
Each stdin line is a JSON command, each stdout line its JSON answer. Times are
CLOCK_MONOTONIC nanoseconds, which the driver and the tree members share, so
the driver can combine them with what it observes itself. A call's `t0`/`t1`
are taken at the socket (the request's send, the read that completed its
answer; raw: around posix_spawn), `c0`/`c1` around the whole client call,
with the client's own encoding and decoding.

Commands (`op`):
  call   {method, params}           one request, answered with its result
  start  {job}                      start the tree ({t0, t1, c0, c1}, see above)
  stop   {job, pids}                stop it (raw: SIGTERM each of `pids`)
  loop   {kind, n, job}             n sequential round trips, latencies in ns;
                                    kind is "status" (raw socket), "library"
                                    (the same request through the system's own
                                    client library) or "acquire_release" (ours)
  exit   {}
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any

import wire

TREE_ADAPTER = "tree"
TREE_PROGRAM = "tree"


class Ours:
    def __init__(self, endpoint: str) -> None:
        self.client = wire.OursClient(endpoint)
        self.leases: dict[str, str] = {}
        self.endpoint = endpoint

    @functools.cached_property
    def library(self) -> Any:
        from supervisor.client import Client  # ours: the agent runs in our virtualenv

        return Client(self.endpoint)

    def socket_times(self) -> tuple[int, int]:
        return self.client.stream.sent_ns, self.client.stream.received_ns

    def call(self, command: dict[str, Any]) -> Any:
        return self.client.call(command["method"], command.get("params"))

    def start(self, command: dict[str, Any]) -> Any:
        result = self.client.call("acquire", {"job": command["job"], "adapter": TREE_ADAPTER})
        self.leases[command["job"]] = result["lease"]
        return result

    def stop(self, command: dict[str, Any]) -> Any:
        return self.client.call("release", {"lease": self.leases.pop(command["job"])})

    def loop(self, kind: str, n: int, job: str | None) -> list[int]:
        stream = self.client.stream
        if kind == "library":
            return time_calls(self.library.status, n)
        if kind == "status":
            return time_calls(functools.partial(stream.exchange, wire.ours_request(1, "status")), n)
        if kind == "acquire_release":
            acquire = wire.ours_request(1, "acquire", {"job": job, "adapter": TREE_ADAPTER})

            def pair() -> None:
                lease = json.loads(stream.exchange(acquire))["result"]["lease"]
                stream.exchange(wire.ours_request(2, "release", {"lease": lease}))

            return time_calls(pair, n)
        raise ValueError(f"no loop {kind!r} for ours")


class Supervisord:
    def __init__(self, endpoint: str) -> None:
        self.client = wire.SupervisordClient(endpoint)
        self.endpoint = endpoint

    @functools.cached_property
    def library(self) -> Any:
        """What supervisorctl uses: xmlrpc.client over supervisord's Unix-socket
        transport (this agent runs in supervisord's virtualenv)."""
        import xmlrpc.client

        from supervisor.xmlrpc import SupervisorTransport

        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport("", "", "unix://" + self.endpoint))

    def socket_times(self) -> tuple[int, int]:
        return self.client.stream.sent_ns, self.client.stream.received_ns

    def call(self, command: dict[str, Any]) -> Any:
        return self.client.call(command["method"], *command.get("params", []))

    def start(self, command: dict[str, Any]) -> Any:
        return self.client.call("supervisor.startProcess", TREE_PROGRAM, True)

    def stop(self, command: dict[str, Any]) -> Any:
        return self.client.call("supervisor.stopProcess", TREE_PROGRAM, True)

    def loop(self, kind: str, n: int, job: str | None) -> list[int]:
        if kind == "library":
            return time_calls(functools.partial(self.library.supervisor.getProcessInfo, TREE_PROGRAM), n)
        if kind != "status":
            raise ValueError(f"no loop {kind!r} for supervisord")
        request = wire.xmlrpc_request("supervisor.getProcessInfo", TREE_PROGRAM)
        return time_calls(functools.partial(self.client.stream.exchange, request), n)


class Circus:
    def __init__(self, endpoint: str) -> None:
        self.client = wire.CircusClient(endpoint)
        self.endpoint = endpoint

    @functools.cached_property
    def library(self) -> Any:
        """circus's own client (what circusctl uses), in circus's virtualenv."""
        from circus.client import CircusClient

        return CircusClient(endpoint=self.endpoint, timeout=30)

    def socket_times(self) -> tuple[int, int]:
        return self.client.sent_ns, self.client.received_ns

    def call(self, command: dict[str, Any]) -> Any:
        return self.client.call(command["method"], command.get("params"))

    def start(self, command: dict[str, Any]) -> Any:
        return self.client.call("start", {"name": TREE_PROGRAM, "waiting": True})

    def stop(self, command: dict[str, Any]) -> Any:
        return self.client.call("stop", {"name": TREE_PROGRAM, "waiting": True})

    def loop(self, kind: str, n: int, job: str | None) -> list[int]:
        if kind == "library":
            command = {"command": "status", "properties": {"name": TREE_PROGRAM}}
            return time_calls(functools.partial(self.library.call, command), n)
        if kind != "status":
            raise ValueError(f"no loop {kind!r} for circus")
        request = wire.circus_request("s", "status", {"name": TREE_PROGRAM})
        return time_calls(functools.partial(self.client.exchange, "s", request), n)


class Raw:
    """No daemon: posix_spawn of the tree command, the floor of any start."""

    def __init__(self, argv_json: str) -> None:
        self.argv = json.loads(argv_json)
        self.roots: dict[str, int] = {}

    def socket_times(self) -> None:
        return None  # no socket: the call is posix_spawn itself

    def call(self, command: dict[str, Any]) -> Any:
        raise ValueError("raw has no control calls")

    def start(self, command: dict[str, Any]) -> Any:
        pid = os.posix_spawn(self.argv[0], self.argv, os.environ)
        self.roots[command["job"]] = pid
        return {"pid": pid}

    def stop(self, command: dict[str, Any]) -> Any:
        for pid, start_time in command["pids"]:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if _start_time(pid) == start_time:
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
        os.waitpid(self.roots.pop(command["job"]), 0)
        return {}

    def loop(self, kind: str, n: int, job: str | None) -> list[int]:
        raise ValueError("raw has no control loop")


def time_calls(call: Any, n: int) -> list[int]:
    """`n` sequential calls of `call()`, each one's latency in ns."""
    samples = []
    for _ in range(n):
        t0 = time.monotonic_ns()
        call()
        samples.append(time.monotonic_ns() - t0)
    return samples


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(data[data.rfind(b")") + 2 :].split()[19])


SYSTEMS = {"ours": Ours, "supervisord": Supervisord, "circus": Circus, "raw": Raw}


def serve(system: Any) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        answer: dict[str, Any]
        try:
            if op == "exit":
                return
            if op == "loop":
                answer = {"samples": system.loop(command["kind"], command["n"], command.get("job"))}
            else:
                handler = {"call": system.call, "start": system.start, "stop": system.stop}[op]
                c0 = time.monotonic_ns()
                result = handler(command)
                c1 = time.monotonic_ns()
                t0, t1 = system.socket_times() or (c0, c1)
                answer = {"t0": t0, "t1": t1, "c0": c0, "c1": c1, "result": result}
        except (wire.ProtocolFailure, OSError, KeyError, ValueError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    system_name, endpoint = sys.argv[1], sys.argv[2]
    serve(SYSTEMS[system_name](endpoint))


if __name__ == "__main__":
    main()
