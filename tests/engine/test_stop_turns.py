"""Thousands of stops decided at once reach the trio thread in turns: a
`release_job` of a job with many leases releases them over several turns
(`Engine.release_job`), so are the leases of a client that disconnects
holding many (`Engine.disconnected`), and the stops they and a shutdown
decide are started a few at a time (`Instances._start_stops`), so that other
tasks run in between.
Real /bin/sleep roots; turns are counted by a probe task that checkpoints in
a loop, never timed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import secrets
import signal
from pathlib import Path

import pytest
import trio

from supervisor.core import protocol
from supervisor.core.config import parse_config
from supervisor.core.errors import PermissionDenied
from supervisor.engine import leaseops
from supervisor.engine import stopping
from supervisor.engine import engine as engine_module
from supervisor.engine.engine import Engine
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from supervisor.server.methods import METHODS
from tests.engine.peer import Peer

# Trees of one job (one adapter each: an instance is a job and an adapter):
# many more than the stops started per turn.
TREES = 120


def many_adapters(tmp_path: Path) -> Engine:
    adapters = "".join(
        f'[adapters.tool{n}]\ncommand = ["/bin/sleep", "60"]\nstop_timeout = 2.0\n' for n in range(TREES)
    )
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\ncgroup = "off"\nsweep_interval = 3600.0\n' + adapters,
        str(tmp_path / "supervisor.toml"),
    )
    return Engine(config)


@asynccontextmanager
async def running_engine(
    tmp_path: Path, engine: Engine | None = None
) -> AsyncIterator[tuple[Engine, Peer, trio.Nursery]]:
    """`engine` (else one of `many_adapters`), running, with a client
    connected; shut down (every tree stopped: again, if the test did) on the
    way out."""
    engine = engine or many_adapters(tmp_path)
    peer = Peer()
    engine.connected(peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            yield engine, peer, nursery
        finally:
            with trio.CancelScope(shield=True):
                await engine.shutdown()
            nursery.cancel_scope.cancel()


async def fill(engine: Engine, peer: Peer, job: str = "big") -> list[int]:
    """One running instance per adapter for `job`; their root pids."""
    pids = []
    for n in range(TREES):
        params = protocol.AcquireParams(job=job, adapter=f"tool{n}")
        pids.append((await engine.acquire(peer, params, lambda: None)).result["pid"])
    return pids


class StopProbe:
    """Notes, at each of its own steps, which trees have begun their stop
    since its previous step: those began while it waited for the thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = 0
        self.largest_jump = 0
        self.begun: set[str] = set()

    def look(self) -> int:
        running = self.engine.instances.running
        new = {i for i, tree in running.items() if tree.stop_began is not None} - self.begun
        self.begun |= new
        return len(new)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.look()
        task_status.started()
        while True:
            await trio.lowlevel.checkpoint()
            self.steps += 1
            self.largest_jump = max(self.largest_jump, self.look())


def ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def one_lease_per_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turns of one lease each, and more than 10 leases too many for one turn."""
    monkeypatch.setattr(leaseops, "STEP_BUDGET_S", 0.0)
    monkeypatch.setattr(leaseops, "RELEASES_PER_TURN", 10)


@pytest.mark.usefixtures("one_lease_per_turn")
async def test_a_release_job_of_many_leases_is_answered_over_turns_and_its_stops_start_a_few_at_a_time(
    tmp_path: Path,
) -> None:
    # A job "big" enough to need turns.
    async with running_engine(tmp_path) as (engine, peer, nursery):
        pids = await fill(engine, peer)
        params = protocol.ReleaseJobParams(job="big")
        assert not METHODS["release_job"].answers_now(engine, params)
        probe = StopProbe(engine)
        await nursery.start(probe.run)
        reply = await engine.release_job(peer, params)
        steps_during_release = probe.steps
        assert reply.result["released"] == TREES and len(reply.result["instances"]) == TREES
        assert engine.registry.leases_of_job("big") == []
        # Other tasks ran between the releases (a turn per lease here).
        assert steps_during_release >= TREES // 2, steps_during_release
        with trio.fail_after(20):
            while engine.instances.running:
                await trio.sleep(0.02)
        assert not any(alive(pid) for pid in pids)
        assert probe.largest_jump <= 2 * stopping.STOPS_PER_TURN, probe.largest_jump


async def test_a_release_job_over_turns_releases_nothing_if_one_lease_is_another_uids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leaseops, "RELEASES_PER_TURN", 10)
    async with running_engine(tmp_path) as (engine, owner, _):
        await fill(engine, owner)
        stranger = Peer(id=2, uid=owner.uid + 1)
        with pytest.raises(PermissionDenied):
            await engine.release_job(stranger, protocol.ReleaseJobParams(job="big"))
        assert len(engine.registry.leases_of_job("big")) == TREES
        assert all(running.stop_began is None for running in engine.instances.running.values())


async def test_a_shutdown_starts_the_stops_of_many_trees_a_few_at_a_time(tmp_path: Path) -> None:
    async with running_engine(tmp_path) as (engine, peer, nursery):
        pids = await fill(engine, peer)
        probe = StopProbe(engine)
        await nursery.start(probe.run)
        with trio.CancelScope(shield=True):
            await engine.shutdown()
        assert not engine.instances.running
        assert not any(alive(pid) for pid in pids)
        assert len(probe.begun) >= TREES // 2, "the probe saw too few of the stops begin"
        assert probe.largest_jump <= 2 * stopping.STOPS_PER_TURN, probe.largest_jump
        assert probe.steps >= TREES // stopping.STOPS_PER_TURN


@pytest.mark.usefixtures("one_lease_per_turn")
async def test_the_leases_of_a_connection_that_closes_holding_many_are_let_go_over_turns(tmp_path: Path) -> None:
    # The client holds bound leases on the trees of job "bound" and detached
    # ones on those of "kept": once it is gone, the bound ones are released
    # (their trees stop), the detached ones live on with no owner, and the
    # engine said it was busy (no upgrade) meanwhile.
    async with running_engine(tmp_path) as (engine, peer, nursery):
        bound = await fill(engine, peer, job="bound")
        for n in range(TREES):
            params = protocol.AcquireParams(job="kept", adapter=f"tool{n}", detach=True, ttl=600.0)
            await engine.acquire(peer, params, lambda: None)
        probe = StopProbe(engine)
        await nursery.start(probe.run)
        engine.disconnected(peer)
        assert engine.busy() is not None
        assert engine.registry.leases_of_job("bound"), "every lease was let go in the one call"
        with trio.fail_after(20):
            while engine.busy() is not None:
                await trio.sleep(0)
        assert engine.registry.leases_of_job("bound") == []
        # Other tasks ran between the leases let go (a turn per lease here).
        assert probe.steps >= TREES // 2, probe.steps
        kept = engine.registry.leases_of_job("kept")
        assert len(kept) == TREES and all(lease.owner is None for lease in kept)
        with trio.fail_after(20):
            while any(alive(pid) for pid in bound):
                await trio.sleep(0.02)


async def test_the_base_cgroup_goes_once_stops_that_outlast_the_shutdowns_bound_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With thousands of trees a shutdown's wait ends before every stop has
    # (they go on, shielded); the daemon's base cgroup is removed once the
    # last one is done, not left behind. Here one tree that ignores SIGTERM
    # and a bound shorter than its grace stand for them.
    monkeypatch.setattr(engine_module, "SHUTDOWN_MARGIN_S", -0.9)
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\nsweep_interval = 3600.0\n'
        """[adapters.stubborn]
command = ["/bin/sh", "-c", "trap '' TERM; exec sleep 60"]
stop_timeout = 1.0
""",
        str(tmp_path / "supervisor.toml"),
    )
    try:
        cgroups = CgroupManager.detect(name=f"test-{secrets.token_hex(6)}")
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable cgroup v2 hierarchy: {exc.reason}")
    engine = Engine(config, cgroups=cgroups)
    async with running_engine(tmp_path, engine) as (engine, peer, nursery):
        pid = (await engine.acquire(peer, protocol.AcquireParams(job="j", adapter="stubborn"), lambda: None)).result["pid"]
        # The acquire answers once the shell is exec'd, maybe before it ran
        # `trap`: a SIGTERM then would end it at once.
        with trio.fail_after(10):
            while not ignores_sigterm(pid):
                await trio.sleep(0.01)
        with trio.CancelScope(shield=True):
            await engine.shutdown()
        assert engine.instances.running, "the stop was meant to outlast the shutdown's bound"
        assert engine.cgroups.base.exists()
    assert not alive(pid)
    assert not engine.cgroups.base.exists()
