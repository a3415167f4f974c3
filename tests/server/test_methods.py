"""methods.answer_now against a Supervisor that spawns nothing: what it answers on
the spot, and that it refuses (WouldWait) before changing any state whatever
would have to wait. Through a daemon, these paths are the hub's (see
test_server.py and test_daemon_protocol.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from supervisor.server import methods
from supervisor.core import protocol
from supervisor.core.config import parse_config
from supervisor.engine.engine import Supervisor
from supervisor.core.errors import MethodNotFound, ShuttingDown, UnknownLease
from supervisor.core.registry import State


@dataclass
class Peer:
    id: int = 1
    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()

    def notify(self, method: str, params: object) -> None:
        pass


@pytest.fixture
def service(tmp_path: Path) -> Supervisor:
    # The subprocess spawner: a cold acquire would wait for its worker thread.
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\ncgroup = "off"\nspawner = "subprocess"\n'
        '[adapters.tool]\ncommand = ["/bin/sleep", "5"]\n',
        str(tmp_path / "supervisor.toml"),
    )
    return Supervisor(config)


def request(method: str, **params: object) -> protocol.Request:
    return protocol.Request(id=1, method=method, params=protocol.METHOD_PARAMS[method](**params))


def snapshot(service: Supervisor) -> tuple[object, ...]:
    registry = service.registry
    return (
        sorted(registry.instances),
        sorted(registry.leases),
        {i.id: (i.state, i.refcount) for i in registry.instances.values()},
    )


def running_instance(service: Supervisor, peer: Peer) -> str:
    """An instance of `tool` for job "j" that the registry believes running
    (its spawn reported, though nothing was spawned)."""
    acquired = service.registry.acquire(
        job="j", adapter="tool", connection=peer.id, uid=peer.uid, now=service.now(),
        params={}, detach=False, ttl=None, linger=0.0, max_instances=None,
    )
    service.registry.spawned(acquired.instance.id, pid=os.getpid(), now=service.now())
    assert acquired.instance.state is State.RUNNING
    return acquired.instance.id


async def test_what_would_wait_is_refused_before_anything_changes(service: Supervisor) -> None:
    peer = Peer()
    for waiting in (
        request("acquire", job="j", adapter="tool"),  # would spawn in a thread
        request("sweep"),
        request("status"),  # no scan yet
    ):
        before = snapshot(service)
        with pytest.raises(methods.WouldWait):
            methods.answer_now(service, peer, waiting)
        assert snapshot(service) == before, waiting.method


async def test_an_acquire_of_a_starting_instance_or_with_fds_would_wait(service: Supervisor) -> None:
    peer = Peer()
    service.registry.acquire(
        job="j", adapter="tool", connection=peer.id, uid=peer.uid, now=service.now(),
        params={}, detach=False, ttl=None, linger=0.0, max_instances=None,
    )
    before = snapshot(service)
    with pytest.raises(methods.WouldWait):
        methods.answer_now(service, peer, request("acquire", job="j", adapter="tool"))
    assert snapshot(service) == before


async def test_an_acquire_of_a_running_instance_is_answered_on_the_spot(service: Supervisor) -> None:
    peer = Peer()
    instance_id = running_instance(service, peer)
    result = methods.answer_now(service, peer, request("acquire", job="j", adapter="tool"))
    assert isinstance(result, dict)
    assert result["instance"] == instance_id and result["refcount"] == 2 and result["spawned"] is False
    assert service.registry.lease(result["lease"]) is not None
    with pytest.raises(methods.WouldWait):
        methods.answer_now(service, peer, request("acquire", job="j", adapter="tool", fds=True))
    assert service.registry.instances[instance_id].refcount == 2


async def test_status_is_answered_on_the_spot_once_a_scan_is_fresh(service: Supervisor, nursery: trio.Nursery) -> None:
    service._nursery = nursery  # where the scan runs (Supervisor.run sets it)
    members = await service.tree_members()
    result = methods.answer_now(service, Peer(), request("status"))
    assert isinstance(result, dict)
    assert result["daemon"]["pid"] == os.getpid()
    assert members == {}


async def test_errors_are_raised_as_they_are_by_handle(service: Supervisor) -> None:
    peer = Peer()
    with pytest.raises(UnknownLease):
        methods.answer_now(service, peer, request("release", lease="0" * 32))
    unknown = protocol.Request(id=1, method="nonesuch", params=None)
    with pytest.raises(MethodNotFound):
        methods.answer_now(service, peer, unknown)
    with pytest.raises(MethodNotFound):
        await methods.handle(service, peer, unknown, lambda: None)
    service.shutting_down = True
    with pytest.raises(ShuttingDown):
        methods.answer_now(service, peer, request("acquire", job="j", adapter="tool"))
    assert methods.answer_now(service, peer, request("hello"))["pid"] == os.getpid()
