"""Lease lifecycle against the real daemon, with real process trees.

Every tree test runs three times: with per-instance cgroups (the writable
cgroup v2 hierarchy of this host) and roots born in them by the clone3 spawner;
with cgroups and the subprocess spawner (the root joins its cgroup between fork
and exec); and with the process-table fallback (`cgroup = "off"`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from supervisor.engine.leaseops import RELEASES_PER_TURN
from supervisor.procs import process
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, trio_call, wait_all_gone

STOP_TIMEOUT = 1.0


@pytest.fixture(params=["cgroup", "cgroup-subprocess", "process-table"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def wait_gone_times(members: dict[str, process.ProcessId], daemon_pid: int, timeout: float) -> dict[str, float]:
    """When (time.monotonic) each member was first seen gone, waiting up to
    `timeout` for all; a member still there then is left out. A member is seen
    gone no earlier than it died, so `seen - t >= d` proves it lived `d` after `t`."""
    deadline = time.monotonic() + timeout
    gone_at: dict[str, float] = {}
    while len(gone_at) < len(members) and time.monotonic() <= deadline:
        for role, member in members.items():
            if role not in gone_at and process.is_gone(member, our_pid=daemon_pid):
                gone_at[role] = time.monotonic()
        time.sleep(0.01)
    return gone_at


def daemon_settings(mode: str) -> dict[str, object]:
    return {
        "cgroup": "off" if mode == "process-table" else "auto",
        "spawner": "subprocess" if mode == "cgroup-subprocess" else "auto",
    }


def check_mode(daemon, mode: str) -> None:
    settings = daemon.client().call("status")["daemon"]
    if mode != "process-table" and not settings["cgroup_mode"]:
        pytest.skip("this host has no writable cgroup v2 hierarchy")
    assert settings["cgroup_mode"] == (mode != "process-table")
    assert settings["spawner"] == ("subprocess" if mode == "cgroup-subprocess" else "clone3")


class AsyncConn:
    """A raw trio connection speaking newline-delimited JSON-RPC (test-side)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.next_id = 0

    @classmethod
    async def open(cls, path: str) -> AsyncConn:
        return cls(await trio.open_unix_socket(path))

    async def send(self, method: str, params: dict[str, object] | None = None) -> int:
        self.next_id += 1
        line = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        await self.stream.send_all(json.dumps(line).encode() + b"\n")
        return self.next_id

    async def receive(self) -> dict[str, object]:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def call(self, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
        request_id = await self.send(method, params)
        while True:
            message = await self.receive()
            if message.get("id") == request_id:
                return message

    async def aclose(self) -> None:
        await self.stream.aclose()


def test_last_release_reaps_the_whole_tree_including_a_setsid_escapee(start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT), **daemon_settings(mode))
    check_mode(daemon, mode)
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    members = read_pidfile(pidfile)
    assert lease["pid"] == members["root"].pid
    # The escapee double-forked out of its session; as a child subreaper the
    # daemon adopted it.
    assert process.read_stat(members["escapee"].pid).ppid == daemon.pid
    assert process.read_environ_tag(members["escapee"].pid) == lease["instance"]
    status = client.call("status")
    assert set(status["instances"][0]["pids"]) >= {m.pid for m in members.values()}

    released = client.call("release", {"lease": lease["lease"]})
    assert released == {"refcount": 0, "stopping": True}
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=1.0)


# A seccomp filter (classic BPF, x86_64) that fails one system call with ENOSYS,
# as an old kernel or a container runtime's default profile does, and allows
# the rest: clone3 (Linux 5.3), or close_range (5.9), which the clone3
# spawner's child calls.
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH = 0, 4
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_CLONE3 = 435
_NR_CLOSE_RANGE = 436
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_clone3() -> None:
    """Install the filter for clone3 in this process (a preexec_fn: the daemon inherits it)."""
    refuse_syscall(_NR_CLONE3)


def refuse_close_range() -> None:
    """Install the filter for close_range in this process (a preexec_fn)."""
    refuse_syscall(_NR_CLOSE_RANGE)


def refuse_syscall(number: int) -> None:
    program = (_SockFilter * 6)(
        _SockFilter(_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        _SockFilter(_BPF_JEQ_K, 0, 3, _AUDIT_ARCH_X86_64),  # another arch: allow
        _SockFilter(_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
        _SockFilter(_BPF_JEQ_K, 0, 1, number),
        _SockFilter(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
        _SockFilter(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    )
    fprog = _SockFprog(len(program), program)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the clone3 spawner is built for x86_64 only")
@pytest.mark.parametrize("refuse", [refuse_clone3, refuse_close_range], ids=["clone3", "close_range"])
def test_when_clone3_is_refused_subprocess_starts_that_very_root_and_every_later_one(
    start_daemon, tmp_path: Path, refuse
) -> None:
    daemon = start_daemon(
        tree_adapter("tree", pidfile=tmp_path / "pids-{job}", stop_timeout=STOP_TIMEOUT), preexec=refuse
    )
    client = daemon.client()
    assert client.call("status")["daemon"]["spawner"] == "clone3", "the daemon chose subprocess before trying"
    for job in ("first", "second"):
        lease = client.call("acquire", {"job": job, "adapter": "tree"})
        members = read_pidfile(tmp_path / f"pids-{job}")
        assert lease["pid"] == members["root"].pid
        assert process.read_stat(lease["pid"]).ppid == daemon.pid
        released = client.call("release", {"lease": lease["lease"]})
        assert released == {"refcount": 0, "stopping": True}
        assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    refusals = [e for e in daemon.log_events() if e.get("event") == "spawner.clone3_refused"]
    assert len(refusals) == 1 and refusals[0]["using"] == "subprocess"
    assert client.call("status")["daemon"]["spawner"] == "subprocess"


def test_a_tree_that_ignores_sigterm_is_killed_after_stop_timeout(start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    adapter = tree_adapter("stubborn", pidfile=pidfile, args=("--ignore-term",), stop_timeout=0.6)
    daemon = start_daemon(adapter, **daemon_settings(mode))
    check_mode(daemon, mode)
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "stubborn"})
    members = read_pidfile(pidfile)
    released_at = time.monotonic()
    client.call("release", {"lease": lease["lease"]})
    gone_at = wait_gone_times(members, daemon.pid, 0.6 + 1.0)
    assert set(gone_at) == set(members), "not gone within stop_timeout + 1 s"
    # SIGTERM was ignored, so each member lived until the SIGKILL that comes
    # only once stop_timeout has run out after the release.
    assert all(at - released_at >= 0.6 for at in gone_at.values()), gone_at
    reaped = daemon.wait_for_event("tree.reaped", instance=lease["instance"])
    assert reaped["signalled"] >= len(members) and reaped["killed"] >= len(members)


def test_a_root_that_exits_on_its_own_takes_its_tree_along_and_holders_are_told(start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    adapter = tree_adapter("brief", pidfile=pidfile, args=("--exit-after", "0.5"), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapter, **daemon_settings(mode))
    check_mode(daemon, mode)
    holder = daemon.client()
    lease = holder.call("acquire", {"job": "job-1", "adapter": "brief"})
    members = read_pidfile(pidfile)
    notification = holder.next_notification()
    assert notification["method"] == "adapter_exited"
    assert notification["params"] == {
        "instance": lease["instance"], "job": "job-1", "adapter": "brief",
        "pid": lease["pid"], "returncode": 3, "reason": "exited",
    }
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    # The old lease still releases cleanly; a new acquire gets a new instance.
    other = daemon.client()
    again = other.call("acquire", {"job": "job-1", "adapter": "brief"})
    assert again["spawned"] is True and again["instance"] != lease["instance"]
    assert holder.call("release", {"lease": lease["lease"]})["refcount"] == 0
    states = {i["instance"]: i["state"] for i in other.call("status")["instances"]}
    assert states == {again["instance"]: "running"}


def test_stdio_is_passed_to_the_client_with_the_lease(start_daemon) -> None:
    demo = """
        [adapters.demo]
        command = ["/bin/sh", "-c", "echo up >&2; (sleep 86400 & wait) & exec cat"]
        stdio = "pipe"
        stop_timeout = 1.0
    """
    daemon = start_daemon(demo)
    client = daemon.client()
    result, fds = client.call_with_fds("acquire", {"job": "job-1", "adapter": "demo", "fds": True})
    assert len(fds) == 2
    stdin = os.fdopen(fds[0], "wb", buffering=0)
    stdout = os.fdopen(fds[1], "rb", buffering=0)
    try:
        stdin.write(b"ping\n")
        assert stdout.readline() == b"ping\n"
    finally:
        stdin.close()
        stdout.close()
    # cat answering says nothing of the subshell: wait for it to have started its sleep.
    assert eventually(lambda: len(client.call("status")["instances"][0]["pids"]) == 3)
    assert client.call("status")["instances"][0]["instance"] == result["instance"]


def test_the_bundled_demo_adapter_is_a_three_process_echo_tree(start_daemon, tmp_path: Path) -> None:
    bundled = (Path(__file__).parent.parent / "config" / "supervisor.toml").read_text()
    demo = bundled[bundled.index("[adapters.demo]"):]
    daemon = start_daemon(demo)
    client = daemon.client()
    result, fds = client.call_with_fds("acquire", {"job": "try-me", "adapter": "demo", "fds": True})
    with os.fdopen(fds[0], "wb", buffering=0) as stdin, os.fdopen(fds[1], "rb", buffering=0) as stdout:
        stdin.write(b"hello\n")
        assert stdout.readline() == b"hello\n"
    # cat answering says nothing of the subshell: wait for it to have started its sleep.
    def three_pids() -> list[int] | None:
        pids = client.call("status")["instances"][0]["pids"]
        return pids if len(pids) == 3 else None

    pids = eventually(three_pids)
    assert pids is not None, client.call("status")["instances"][0]["pids"]
    members = {str(p): process.identify(p) for p in pids}
    assert client.call("logs", {"instance": result["instance"]})["lines"] == ["demo adapter for job try-me"]
    client.call("release", {"lease": result["lease"]})
    assert wait_all_gone(members, daemon.pid, 2.0 + 1.0) == {}


async def test_forty_concurrent_acquires_of_one_pair_spawn_exactly_one_instance(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    conns = [await AsyncConn.open(daemon.socket) for _ in range(40)]
    results: list[dict[str, object]] = []

    async def acquire(conn: AsyncConn) -> None:
        results.append(await conn.call("acquire", {"job": "job-1", "adapter": "tree"}))

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(acquire, conn)
    leases = [r["result"] for r in results]
    assert len({lease["instance"] for lease in leases}) == 1
    assert sum(lease["spawned"] for lease in leases) == 1
    assert sorted(lease["refcount"] for lease in leases) == list(range(1, 41))
    assert len({lease["lease"] for lease in leases}) == 40
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    assert [line.split()[0] for line in pidfile.read_text().splitlines()].count("root") == 1
    for conn in conns[:39]:
        await conn.aclose()
    # Once the daemon has seen the 39 closes (only the last one and this status
    # request are connected), their leases are released: one still holds the tree.
    with trio.fail_after(5):
        while (status := (await trio_call(daemon.socket, "status"))["result"])["daemon"]["connections"] != 2:
            await trio.sleep(0.01)
    assert [(i["state"], i["refcount"]) for i in status["instances"]] == [("running", 1)]
    assert all(process.is_running(m) for m in members.values()), "39 of 40 closed: one lease still holds the tree"
    await conns[39].aclose()
    assert await trio.to_thread.run_sync(wait_all_gone, members, daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_the_leases_of_a_client_killed_with_sigkill_are_released(start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT), **daemon_settings(mode))
    check_mode(daemon, mode)
    script = (
        "import sys, time\n"
        "from supervisor.client import Client\n"
        "c = Client(sys.argv[1])\n"
        "r = c.call('acquire', {'job': 'job-1', 'adapter': 'tree'})\n"
        "print(r['lease'], flush=True)\n"
        "time.sleep(3600)\n"
    )
    client_proc = subprocess.Popen([PYTHON, "-c", script, daemon.socket], stdout=subprocess.PIPE)
    try:
        lease = client_proc.stdout.readline().decode().strip()
        members = read_pidfile(pidfile)
        observer = daemon.client()
        assert observer.call("status")["daemon"]["leases"] == 1
        client_proc.kill()
        client_proc.wait()
        assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
        assert eventually(lambda: observer.call("status")["daemon"]["leases"] == 0, timeout=1.0)
        error = pytest.raises(Exception, observer.call, "release", {"lease": lease})
        assert error.value.code == 1002
    finally:
        client_proc.kill()
        client_proc.wait()
        client_proc.stdout.close()


def test_a_stranger_with_the_same_command_line_is_never_touched(start_daemon, tmp_path: Path, mode: str) -> None:
    argv = [PYTHON, "-c", "import time; time.sleep(3600)"]
    adapter = f"[adapters.sleeper]\ncommand = {json.dumps(argv)}\nstop_timeout = 0.5\n"
    daemon = start_daemon(adapter, **daemon_settings(mode))
    check_mode(daemon, mode)
    stranger = subprocess.Popen(argv, start_new_session=True)
    try:
        client = daemon.client()
        lease = client.call("acquire", {"job": "job-1", "adapter": "sleeper"})
        root = process.identify(lease["pid"])
        # Right after exec the kernel may briefly show an empty cmdline.
        assert eventually(lambda: process.read_cmdline(root.pid) == process.read_cmdline(stranger.pid))
        client.call("release", {"lease": lease["lease"]})
        assert wait_all_gone({"root": root}, daemon.pid, 1.5) == {}
        assert daemon.stop() == 0
        assert stranger.poll() is None, "the daemon signalled a process it did not start"
    finally:
        stranger.kill()
        stranger.wait()


def test_release_job_releases_every_lease_of_the_job_and_tells_the_holders(start_daemon, tmp_path: Path) -> None:
    adapters = tree_adapter("a", pidfile=tmp_path / "a", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT) + tree_adapter(
        "b", pidfile=tmp_path / "b", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT
    )
    daemon = start_daemon(adapters)
    holder_a, holder_b, orchestrator = daemon.client(), daemon.client(), daemon.client()
    lease_a = holder_a.call("acquire", {"job": "job-1", "adapter": "a"})
    holder_b.call("acquire", {"job": "job-1", "adapter": "b"})
    other_job = holder_b.call("acquire", {"job": "job-2", "adapter": "a"})
    roles = ("root", "child", "grandchild")
    members = {f"a-{k}": v for k, v in read_pidfile(tmp_path / "a", roles).items()}
    members |= {f"b-{k}": v for k, v in read_pidfile(tmp_path / "b", roles).items()}
    result = orchestrator.call("release_job", {"job": "job-1"})
    assert result["released"] == 2 and len(result["instances"]) == 2
    note = holder_a.next_notification()
    assert note["method"] == "adapter_exited"
    assert note["params"]["instance"] == lease_a["instance"] and note["params"]["reason"] == "released"
    job1 = {k: v for k, v in members.items() if v.pid in (lease_a["pid"],) or k.startswith("b-")}
    assert wait_all_gone(job1, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    def remaining() -> list[str]:
        return [i["instance"] for i in orchestrator.call("status")["instances"]]

    assert eventually(lambda: remaining() == [other_job["instance"]], timeout=1.0), remaining()


def test_a_release_job_of_more_leases_than_one_turn_holds_is_answered_whole(start_daemon, tmp_path: Path) -> None:
    # More leases than RELEASES_PER_TURN: released over turns, not in the hub.
    daemon = start_daemon(tree_adapter("a", pidfile=tmp_path / "a", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    holder, orchestrator = daemon.client(), daemon.client()
    count = RELEASES_PER_TURN + 50
    leases = [holder.call("acquire", {"job": "big", "adapter": "a"}) for _ in range(count)]
    members = read_pidfile(tmp_path / "a", ("root", "child", "grandchild"))
    result = orchestrator.call("release_job", {"job": "big"})
    assert result == {"released": count, "instances": [leases[0]["instance"]]}
    note = holder.next_notification()
    assert note["method"] == "adapter_exited" and note["params"]["reason"] == "released"
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    assert orchestrator.call("release_job", {"job": "big"}) == {"released": 0, "instances": []}
    with pytest.raises(Exception, match="unknown lease|no such lease"):
        holder.call("release", {"lease": leases[-1]["lease"]})


def test_linger_keeps_an_unleased_instance_for_reuse(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("slow", pidfile=pidfile, args=("--no-escapee",), linger=0.8, stop_timeout=STOP_TIMEOUT))
    client = daemon.client()
    first = client.call("acquire", {"job": "job-1", "adapter": "slow"})
    assert client.call("release", {"lease": first["lease"]}) == {"refcount": 0, "stopping": False}
    states = {i["instance"]: i["state"] for i in client.call("status")["instances"]}
    assert states == {first["instance"]: "lingering"}
    again = client.call("acquire", {"job": "job-1", "adapter": "slow"})
    assert again["instance"] == first["instance"] and again["spawned"] is False
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    released_at = time.monotonic()
    client.call("release", {"lease": again["lease"]})
    gone_at = wait_gone_times(members, daemon.pid, 0.8 + STOP_TIMEOUT + 1.0)
    assert set(gone_at) == set(members), "not stopped once its linger ran out"
    assert all(at - released_at >= 0.8 for at in gone_at.values()), "stopped before its linger ran out"


def test_an_acquire_during_a_stop_waits_for_the_old_tree_to_be_gone(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    adapter = tree_adapter("stubborn", pidfile=pidfile, args=("--ignore-term", "--no-escapee"), stop_timeout=0.5)
    daemon = start_daemon(adapter)
    client = daemon.client()
    old = client.call("acquire", {"job": "job-1", "adapter": "stubborn"})
    old_members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    client.call("release", {"lease": old["lease"]})
    new = client.call("acquire", {"job": "job-1", "adapter": "stubborn"})
    # The answer came only once the old tree (which ignores SIGTERM) was gone.
    assert all(process.is_gone(m, our_pid=daemon.pid) for m in old_members.values())
    assert new["instance"] != old["instance"] and new["spawned"] is True
    client.call("release", {"lease": new["lease"]})


def test_a_client_that_vanishes_right_after_acquiring_leaves_nothing_running(start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT), **daemon_settings(mode))
    check_mode(daemon, mode)
    script = (
        "import socket, sys, os\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"acquire\",\"params\":{\"job\":\"j\",\"adapter\":\"tree\"}}\\n')\n"
        "os._exit(0)\n"
    )
    subprocess.run([PYTHON, "-c", script, daemon.socket], check=True)
    spawned = daemon.wait_for_event("adapter.spawned")
    daemon.wait_for_event("tree.reaped", timeout=STOP_TIMEOUT + 1.0, instance=spawned["instance"])
    leftovers = [s.pid for s in process.scan_processes() if process.read_environ_tag(s.pid) == spawned["instance"]]
    assert leftovers == []
    client = daemon.client()
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=1.0)
    assert client.call("status")["daemon"]["leases"] == 0


def test_a_detached_lease_outlives_its_connection(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    with daemon.client() as first:
        lease = first.call("acquire", {"job": "job-1", "adapter": "tree", "detach": True, "ttl": 60})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    second = daemon.client()
    # Once the daemon has seen the first connection close, the lease is still there.
    assert eventually(lambda: second.call("status")["daemon"]["connections"] == 1)
    status = second.call("status")
    assert status["daemon"]["leases"] == 1 and status["instances"][0]["state"] == "running"
    assert all(process.is_running(m) for m in members.values())
    assert second.call("release", {"lease": lease["lease"]})["refcount"] == 0
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def test_in_cgroup_mode_each_instance_tree_lives_in_its_own_cgroup(start_daemon, tmp_path: Path) -> None:
    adapters = tree_adapter("a", pidfile=tmp_path / "a", stop_timeout=STOP_TIMEOUT) + tree_adapter(
        "b", pidfile=tmp_path / "b", stop_timeout=STOP_TIMEOUT
    )
    daemon = start_daemon(adapters, cgroup="auto")
    check_mode(daemon, "cgroup")
    client = daemon.client()
    mode = daemon.wait_for_event("daemon.mode")
    base = Path(mode["base"])
    leases = {name: client.call("acquire", {"job": "job-1", "adapter": name}) for name in ("a", "b")}
    for name, lease in leases.items():
        members = read_pidfile(tmp_path / name)
        in_cgroup = {int(pid) for pid in (base / lease["instance"] / "cgroup.procs").read_text().split()}
        # The setsid double-fork escapee is in its instance's cgroup like the rest.
        assert {m.pid for m in members.values()} <= in_cgroup
        assert all(
            (base / lease["instance"]).name in Path(f"/proc/{m.pid}/cgroup").read_text() for m in members.values()
        )
    assert set(os.listdir(base)) >= {lease["instance"] for lease in leases.values()}
    for lease in leases.values():
        client.call("release", {"lease": lease["lease"]})
    assert eventually(lambda: not any((base / lease["instance"]).exists() for lease in leases.values()), timeout=3.0)
