"""The engine's facade against an engine that spawns nothing: what it can
answer on the spot, and that it says so (`Method.answers_now`) before anything
changes whatever would have to wait. Through a daemon, these paths are the
hub's (see tests/server/test_listener.py and tests/test_daemon_protocol.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from supervisor.core import protocol
from supervisor.core.config import parse_config
from supervisor.core.errors import Conflict, MethodNotFound, ShuttingDown, UnknownLease
from supervisor.core.registry import State
from supervisor.engine.engine import Engine
from supervisor.server.methods import METHODS, method_for
from tests.engine.peer import Peer


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    # The subprocess spawner: a cold acquire would wait for its worker thread.
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\ncgroup = "off"\nspawner = "subprocess"\n'
        '[adapters.tool]\ncommand = ["/bin/sleep", "5"]\nstdio = "pipe"\n',
        str(tmp_path / "supervisor.toml"),
    )
    return Engine(config)


def request(method: str, **params: object) -> protocol.Request:
    return protocol.Request(id=1, method=method, params=METHODS[method].params(**params))


def snapshot(engine: Engine) -> tuple[object, ...]:
    registry = engine.registry
    return (
        sorted(registry.instances),
        sorted(registry.leases),
        {i.id: (i.state, i.refcount) for i in registry.instances.values()},
    )


def running_instance(engine: Engine, peer: Peer) -> str:
    """An instance of `tool` for job "j" that the registry believes running
    (its spawn reported, though nothing was spawned)."""
    acquired = engine.registry.acquire(
        job="j", adapter="tool", connection=peer.id, uid=peer.uid, now=engine.now(),
        params={}, detach=False, ttl=None, linger=0.0, max_instances=None,
    )
    engine.registry.spawned(acquired.instance.id, pid=os.getpid(), now=engine.now())
    assert acquired.instance.state is State.RUNNING
    return acquired.instance.id


def answers_now(engine: Engine, req: protocol.Request) -> bool:
    return method_for(engine, req).answers_now(engine, req.params)


async def test_what_would_wait_says_so_and_nothing_changes(engine: Engine) -> None:
    for waiting in (
        request("acquire", job="j", adapter="tool"),  # would spawn in a thread
        request("sweep"),
        request("status"),  # no scan yet
    ):
        before = snapshot(engine)
        assert not answers_now(engine, waiting), waiting.method
        assert snapshot(engine) == before, waiting.method


async def test_an_acquire_of_a_starting_instance_would_wait(engine: Engine) -> None:
    peer = Peer()
    engine.registry.acquire(
        job="j", adapter="tool", connection=peer.id, uid=peer.uid, now=engine.now(),
        params={}, detach=False, ttl=None, linger=0.0, max_instances=None,
    )
    before = snapshot(engine)
    assert not answers_now(engine, request("acquire", job="j", adapter="tool"))
    assert snapshot(engine) == before


async def test_an_acquire_of_a_running_instance_is_answered_on_the_spot(engine: Engine) -> None:
    peer = Peer()
    instance_id = running_instance(engine, peer)
    acquire = request("acquire", job="j", adapter="tool")
    assert answers_now(engine, acquire)
    reply = engine.acquire_now(peer, acquire.params)
    assert reply.result["instance"] == instance_id and reply.result["refcount"] == 2
    assert reply.result["spawned"] is False and reply.fds == ()
    assert engine.registry.lease(reply.result["lease"]) is not None
    # Its log line is left for after the reply, not written before it.
    assert len(reply.after) == 1


async def test_an_acquire_with_fds_of_an_instance_without_pipes_is_a_conflict_and_takes_no_lease(
    engine: Engine,
) -> None:
    peer = Peer()
    instance_id = running_instance(engine, peer)  # registered, but no root: no pipes
    leases = set(engine.registry.leases)
    with pytest.raises(Conflict):
        engine.acquire_now(peer, request("acquire", job="j", adapter="tool", fds=True).params)
    assert set(engine.registry.leases) == leases and engine.registry.instances[instance_id].refcount == 1


async def test_status_is_answered_on_the_spot_once_a_scan_is_fresh(engine: Engine, nursery: trio.Nursery) -> None:
    engine.scans.attach(nursery)  # where the scan runs (Engine.run does this)
    assert not engine.status_answers_now(protocol.StatusParams())
    members = await engine.scans.members()
    assert members == {}
    assert answers_now(engine, request("status"))
    reply = engine.status_now(Peer(), request("status").params)
    assert reply.result["daemon"]["pid"] == os.getpid()


async def test_renew_wakes_the_expiry_timer(engine: Engine) -> None:
    peer = Peer()
    acquired = engine.registry.acquire(
        job="j", adapter="tool", connection=peer.id, uid=peer.uid, now=engine.now(),
        params={}, detach=True, ttl=10.0, linger=0.0, max_instances=None,
    )
    changed = engine._deadline_changed
    reply = engine.renew(peer, request("renew", lease=acquired.lease.token, ttl=20.0).params)
    assert changed.is_set(), "the timer would sleep until the old deadline"
    assert reply.result["expires_at"] == pytest.approx(engine.now() + 20.0, abs=1.0)


async def test_errors_are_raised_before_anything_changes(engine: Engine) -> None:
    peer = Peer()
    before = snapshot(engine)
    with pytest.raises(UnknownLease):
        engine.release(peer, request("release", lease="0" * 32).params)
    assert snapshot(engine) == before
    unknown = protocol.Request(id=1, method="nonesuch", params=protocol.HelloParams())
    with pytest.raises(MethodNotFound):
        method_for(engine, unknown)
    engine.shutting_down = True
    with pytest.raises(ShuttingDown):
        method_for(engine, request("acquire", job="j", adapter="tool"))
    assert method_for(engine, request("hello")).now(engine, peer, protocol.HelloParams()).result["pid"] == os.getpid()
