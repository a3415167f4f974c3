"""Waits that are not the daemon's work stay off its thread. A root that
cannot exec at once does not hold it: the clone3 spawner waits a bounded
time for the exec (`spawner.EXEC_WAIT_NS`), and an acquire whose root has not
exec'd by then is answered once it has, while the daemon serves everything
else. Nor does a directory service slow to tell a "@peer" client's groups
(the last test).

A root is kept from exec'ing for as long as a test likes by freezing the
daemon's base cgroup (cgroup v2 `cgroup.freeze`): a child born in a frozen
cgroup runs no instruction until it is thawed. Without cgroups the same path
is taken by making the bound 0 (the engine tests at the end).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

from supervisor.core import protocol
from supervisor.core.config import parse_config
from supervisor.core.identity import Credentials
from supervisor.core.errors import SpawnFailed, SupervisorError
from supervisor.engine import engine as engine_module
from supervisor.engine.engine import Engine
from supervisor.engine import instances as instances_module
from supervisor.procs import clonespawn, process, spawner
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from tests.engine.peer import Peer
from tests.engine.test_stop_turns import running_engine
from tests.server.test_listener import RawClient, request_line

pytestmark = pytest.mark.skipif(clonespawn.load() is None, reason="the clone3 spawner was not built (no C compiler)")

ADAPTERS = """
[adapters.sleeper]
command = ["/bin/sleep", "60"]

[adapters.missing]
command = ["/nonexistent/adapter"]
"""


def executable(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def test_acquires_whose_roots_cannot_exec_yet_wait_while_the_daemon_answers_others(start_daemon) -> None:
    daemon = start_daemon(ADAPTERS)
    client = RawClient.connect(daemon.socket)
    try:
        client.send(request_line("warm", "acquire", {"job": "warm", "adapter": "sleeper"}))
        warm = client.messages(1)[0]["result"]
        client.send(request_line("status", "status"))
        base = client.messages(1)[0]["result"]["daemon"]["cgroup_base"]
        if base is None:
            pytest.skip("no writable cgroup v2 hierarchy: nothing to freeze")
        freeze = Path(base) / "cgroup.freeze"
        freeze.write_text("1")
        try:
            client.send(
                request_line(1, "acquire", {"job": "j1", "adapter": "sleeper"})
                + request_line(2, "acquire", {"job": "j2", "adapter": "sleeper"})
                + request_line(3, "acquire", {"job": "j3", "adapter": "missing"})
                + request_line("during", "status")
            )
            # The roots are frozen before their first instruction: the
            # status is answered first, with their instances starting.
            during = client.messages(1)[0]
            assert during["id"] == "during"
            states = {row["job"]: row["state"] for row in during["result"]["instances"]}
            assert states == {"warm": "running", "j1": "starting", "j2": "starting", "j3": "starting"}
        finally:
            freeze.write_text("0")
        answers = {answer["id"]: answer for answer in client.messages(3)}
        pids = [answers[n]["result"]["pid"] for n in (1, 2)]
        assert all(executable(pid) == "/usr/bin/sleep" or executable(pid) == "/bin/sleep" for pid in pids)
        assert "not found" in answers[3]["error"]["message"]
        client.send(request_line("after", "status"))
        after = client.messages(1)[0]["result"]
        assert sorted(row["job"] for row in after["instances"]) == ["j1", "j2", "warm"]
        assert warm["pid"] not in pids
    finally:
        client.sock.close()


def running(tmp_path: Path, daemon: str, adapters: str, cgroups: CgroupManager | None = None) -> AsyncContextManager[
    tuple[Engine, Peer, trio.Nursery]
]:
    """An engine of this config (a `[daemon]` section's extra lines, and
    adapters), running, with a client connected; shut down (again, if the
    test did) and its run ended on the way out."""
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\nsweep_interval = 3600.0\n{daemon}' + adapters,
        str(tmp_path / "supervisor.toml"),
    )
    return running_engine(tmp_path, Engine(config, cgroups=cgroups))


async def test_with_no_wait_for_exec_acquires_answer_once_their_roots_have_execd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound of 0: every spawn after the first (which waits for exec, to
    # prove the kernel) comes back pending, whichever way it is asked for.
    monkeypatch.setattr(spawner, "EXEC_WAIT_NS", 0)
    async with running(tmp_path, 'cgroup = "off"\n', ADAPTERS) as (engine, peer, _):
        first = await engine.acquire(peer, protocol.AcquireParams(job="first", adapter="sleeper"), lambda: None)
        deferred = []
        for n in range(20):
            params = protocol.AcquireParams(job=f"now{n}", adapter="sleeper")
            assert engine.acquire_answers_now(params)
            deferred.append(engine.acquire_now(peer, params))
        awaited = sum(reply.later is not None for reply in deferred)
        assert awaited, "no spawn was left pending"
        assert engine.metrics.spawns_awaited.value("sleeper") == awaited
        replies = [await reply.later() if reply.later is not None else reply for reply in deferred]
        waited = await engine.acquire(peer, protocol.AcquireParams(job="waited", adapter="sleeper"), lambda: None)
        pids = [first.result["pid"], waited.result["pid"], *(reply.result["pid"] for reply in replies)]
        assert len(set(pids)) == 22
        assert all(executable(pid).endswith("/sleep") for pid in pids)
        assert not engine.reaper.others
        with pytest.raises(SpawnFailed, match="not found"):
            failed = engine.acquire_now(peer, protocol.AcquireParams(job="bad", adapter="missing"))
            assert failed.later is not None
            await failed.later()
        assert "bad" not in {instance.job for instance in engine.registry.instances.values()}
        assert engine.busy() is None
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
                   for pid in pids)


@asynccontextmanager
async def frozen_engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, Peer, CgroupManager, protocol.AcquireParams]]:
    """A running engine in cgroup mode with one instance running (so its
    spawner has proven the kernel), then its base cgroup frozen: yields the
    engine, its client, its cgroups and the params of an acquire whose root
    will not exec until thawed. On the way out: thawed, shut down (again, if
    the test did), the engine's run ended."""
    try:
        cgroups = CgroupManager.detect(name=f"test-{secrets.token_hex(6)}")
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable cgroup v2 hierarchy: {exc.reason}")
    freeze = cgroups.base / "cgroup.freeze"
    adapters = '[adapters.sleeper]\ncommand = ["/bin/sleep", "60"]\nstop_timeout = 1.0\n'
    async with running(tmp_path, "", adapters, cgroups) as (engine, peer, _):
        try:
            await engine.acquire(peer, protocol.AcquireParams(job="first", adapter="sleeper"), lambda: None)
            freeze.write_text("1")
            yield engine, peer, cgroups, protocol.AcquireParams(job="frozen", adapter="sleeper")
        finally:
            # (A root left frozen would keep the engine's nursery open:
            # thawed, it execs and is stopped.)
            if freeze.exists():
                freeze.write_text("0")


async def test_a_shutdown_kills_roots_that_never_exec_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A root frozen before its exec never settles by itself: a shutdown
    # waits its bound (here stop_timeout 1 s less 0.9 s), then kills it, our
    # own unreaped child, and is done, leaving nothing behind.
    monkeypatch.setattr(engine_module, "SHUTDOWN_MARGIN_S", -0.9)
    async with frozen_engine(tmp_path) as (engine, peer, cgroups, params):
        reply = engine.acquire_now(peer, params)
        assert reply.later is not None
        [instance] = [i for i in engine.registry.instances.values() if i.job == params.job]
        [pid] = [int(p) for p in (cgroups.base / instance.id / "cgroup.procs").read_text().split()]
        began = trio.current_time()
        await engine.shutdown()
        assert trio.current_time() - began < 5
        assert engine.busy() is None, "the frozen root is still awaited after the shutdown"
        with trio.fail_after(5):
            # Answered, one way or the other (the lease may be gone).
            with contextlib.suppress(SupervisorError):
                await reply.later()
    assert not os.path.exists(f"/proc/{pid}")
    assert not cgroups.base.exists()


async def test_a_peer_adapters_groups_are_looked_up_off_the_trio_thread_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The groups of a "@peer" adapter's client come from the passwd and group
    # databases, which a directory service may answer in seconds: the lookup
    # runs in a worker thread while other tasks run, and is used again for
    # the client's next spawns instead of being made on the trio thread.
    looked_up: list[tuple[int, int]] = []
    real = instances_module.credentials_of

    def slow_credentials_of(uid: int, gid: int | None = None) -> Credentials:
        looked_up.append((uid, -1 if gid is None else gid))
        time.sleep(0.3)
        return real(uid, gid)

    monkeypatch.setattr(instances_module, "credentials_of", slow_credentials_of)
    steps = 0

    async def probe() -> None:
        nonlocal steps
        while True:
            await trio.sleep(0.01)
            steps += 1

    adapters = '[adapters.mine]\ncommand = ["/bin/sleep", "60"]\nuser = "@peer"\n'
    async with running(tmp_path, 'cgroup = "off"\n', adapters) as (engine, peer, nursery):
        params = protocol.AcquireParams(job="j1", adapter="mine")
        assert not engine.acquire_answers_now(params)
        nursery.start_soon(probe)
        first = await engine.acquire(peer, params, lambda: None)
        assert looked_up == [(peer.uid, peer.gid)]
        assert steps >= 10, f"the trio thread ran other tasks only {steps} times during a 0.3 s lookup"
        second = await engine.acquire(peer, protocol.AcquireParams(job="j2", adapter="mine"), lambda: None)
        assert looked_up == [(peer.uid, peer.gid)], "the credentials were looked up again"
        for reply in (first, second):
            status = Path(f"/proc/{reply.result['pid']}/status").read_text()
            assert f"Uid:\t{peer.uid}\t" in status


async def test_a_root_stuck_before_exec_is_looked_at_ever_less_often_and_identified_once_it_execs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Frozen, the root stays pending: looked at every millisecond at first,
    # then less and less often (many stuck roots must not take the thread).
    # /proc could not tell its start time at the spawn (out of fds, here
    # made up): it is read again once the root has exec'd, else no check
    # would take the root for itself.
    looks = 0
    real_settled = spawner.RootProcess.exec_settled

    def counted(root: spawner.RootProcess, wait_ns: int = 0) -> bool:
        nonlocal looks
        looks += 1
        return real_settled(root, wait_ns)

    real_launch = clonespawn.launch

    def launch_without_start_time(*args, **kwargs):  # type: ignore[no-untyped-def]
        pid, _, launched = real_launch(*args, **kwargs)
        return pid, 0, launched  # as when the clock crossed a tick around clone3

    monkeypatch.setattr(spawner.RootProcess, "exec_settled", counted)
    monkeypatch.setattr(clonespawn, "launch", launch_without_start_time)
    monkeypatch.setattr(spawner, "_identify_child", lambda pid: process.ProcessId(pid, 0))
    async with frozen_engine(tmp_path) as (engine, peer, cgroups, params):
        reply = engine.acquire_now(peer, params)
        assert reply.later is not None
        looks = 0
        await trio.sleep(0.5)
        # Every ms for 10 ms, then 2, 4, ... 100 ms apart: about 20 looks in
        # 0.5 s (500 at one per millisecond).
        assert 5 <= looks <= 60, looks
        (cgroups.base / "cgroup.freeze").write_text("0")
        with trio.fail_after(5):
            answer = await reply.later()
        pid = answer.result["pid"]
        [running] = [r for r in engine.instances.running.values() if r.root.pid == pid]
        assert running.root.id == process.identify(pid) and running.root.id.start_time
    assert not cgroups.base.exists()
