"""Synchronous tests of the pure lifecycle core, `supervisor.registry`.

Every test drives a `Registry` with deterministic token and instance-id factories
and explicit `now` values, and checks both what the registry returns (the actions
the I/O shell must carry out) and the state it is left in.
"""

from __future__ import annotations

import collections
import copy
import itertools
import random
import re
from collections.abc import Iterable

import pytest

from supervisor.core.errors import (
    Conflict,
    InvalidParams,
    LimitReached,
    PermissionDenied,
    ShuttingDown,
    UnknownLease,
)
from supervisor.core.registry import (
    LEASE_TOKEN_BYTES,
    Action,
    Instance,
    InstanceSettled,
    NotifyExited,
    Reason,
    Registry,
    Spawn,
    State,
    StopTree,
)

UID = 1000
OTHER_UID = 1001
ROOT = 0

JOB = "job-1"
ADAPTER = "acp"


class Numbered:
    """A deterministic id factory: prefix-1, prefix-2, ..."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._numbers = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._numbers)}"


def make_registry() -> Registry:
    return Registry(new_token=Numbered("lease"), new_instance_id=Numbered("inst"))


def acquire(
    registry: Registry,
    *,
    job: str = JOB,
    adapter: str = ADAPTER,
    connection: int = 1,
    uid: int = UID,
    now: float = 0.0,
    **options,
):
    return registry.acquire(job=job, adapter=adapter, connection=connection, uid=uid, now=now, **options)


def running(registry: Registry, *, now: float = 0.0, pid: int = 4242, **options):
    """Acquire a new pair and report its root as started; returns the Acquired."""
    acquired = acquire(registry, now=now, **options)
    assert acquired.actions == [Spawn(acquired.instance.id)]
    registry.spawned(acquired.instance.id, pid=pid, now=now)
    return acquired


def of_type(actions: Iterable[Action], kind: type) -> list:
    return [action for action in actions if isinstance(action, kind)]


def snapshot(registry: Registry) -> dict:
    """Everything a raising method must leave untouched."""
    return copy.deepcopy(
        {
            "instances": registry.instances,
            "leases": registry.leases,
            "closed": registry.closed,
            "deadline": registry.next_deadline(),
        }
    )


# ----------------------------------------------------------------------------
# Tokens


def test_default_tokens_are_distinct_and_carry_at_least_128_bits() -> None:
    assert LEASE_TOKEN_BYTES * 8 >= 128
    registry = Registry()
    tokens = set()
    instance_ids = set()
    for index in range(200):
        acquired = acquire(registry, job=f"job-{index % 50}", connection=index)
        token = acquired.lease.token
        # 128 bits in urlsafe base64 (6 bits a character) is at least 22 characters.
        assert len(token) >= 22
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
        tokens.add(token)
        instance_ids.add(acquired.instance.id)
    assert len(tokens) == 200
    assert len(instance_ids) == 50


def test_default_tokens_never_start_with_a_dash() -> None:
    # A token is a command-line argument; "-x..." would read as an option. One
    # urlsafe token in 64 starts with "-", so 5000 draws would show a regression.
    registry = Registry()
    tokens = [acquire(registry, job=JOB, connection=index).lease.token for index in range(5000)]
    assert [token for token in tokens if token.startswith("-")] == []


def test_injected_factories_are_used() -> None:
    registry = make_registry()
    acquired = acquire(registry)
    assert acquired.lease.token == "lease-1"
    assert acquired.instance.id == "inst-1"


def test_colliding_instance_id_is_drawn_again() -> None:
    ids = iter(["same", "same", "other"])
    registry = Registry(new_token=Numbered("lease"), new_instance_id=lambda: next(ids))
    first = acquire(registry, job="a")
    second = acquire(registry, job="b")
    assert (first.instance.id, second.instance.id) == ("same", "other")


# ----------------------------------------------------------------------------
# Acquire


def test_first_acquire_spawns_a_starting_instance() -> None:
    registry = make_registry()
    acquired = acquire(registry, connection=7, uid=UID, now=3.0, params={"workdir": "/w"})
    instance = acquired.instance
    assert acquired.spawned is True
    assert acquired.actions == [Spawn(instance.id)]
    assert instance.state is State.STARTING
    assert instance.refcount == 1
    assert (instance.job, instance.adapter) == (JOB, ADAPTER)
    assert instance.params == (("workdir", "/w"),)
    assert registry.live_instance(JOB, ADAPTER) is instance
    lease = acquired.lease
    assert registry.lease(lease.token) is lease
    assert (lease.instance_id, lease.job, lease.adapter) == (instance.id, JOB, ADAPTER)
    assert (lease.uid, lease.owner, lease.detached, lease.expires_at) == (UID, 7, False, None)


@pytest.mark.parametrize("spawned_first", [False, True], ids=["while-starting", "while-running"])
def test_second_acquire_of_a_pair_reuses_the_instance(spawned_first: bool) -> None:
    registry = make_registry()
    first = acquire(registry, connection=1)
    if spawned_first:
        assert registry.spawned(first.instance.id, pid=100, now=1.0) == [
            InstanceSettled(first.instance.id, running=True)
        ]
    second = acquire(registry, connection=2, now=2.0)
    assert second.spawned is False
    assert second.actions == []
    assert second.instance is first.instance
    assert second.instance.refcount == 2
    assert second.lease.token != first.lease.token
    assert second.instance.state is (State.RUNNING if spawned_first else State.STARTING)


def test_forty_concurrent_acquires_of_one_pair_spawn_exactly_one() -> None:
    registry = make_registry()
    results = []
    spawns: list[Action] = []
    for connection in range(1, 41):
        acquired = acquire(registry, connection=connection, now=connection * 0.01)
        results.append(acquired)
        spawns += of_type(acquired.actions, Spawn)
        if connection == 20:
            settled = registry.spawned(acquired.instance.id, pid=555, now=0.2)
            assert settled == [InstanceSettled(acquired.instance.id, running=True)]
    instance_ids = {acquired.instance.id for acquired in results}
    assert len(instance_ids) == 1
    assert spawns == [Spawn(instance_ids.pop())]
    assert [acquired.spawned for acquired in results] == [True] + [False] * 39
    assert len({acquired.lease.token for acquired in results}) == 40
    instance = results[0].instance
    assert instance.refcount == 40
    assert instance.state is State.RUNNING
    assert instance.pid == 555


def test_different_pairs_get_different_instances() -> None:
    registry = make_registry()
    pairs = [("j1", "a"), ("j1", "b"), ("j2", "a")]
    acquired = [acquire(registry, job=job, adapter=adapter) for job, adapter in pairs]
    assert len({result.instance.id for result in acquired}) == 3
    assert all(result.spawned for result in acquired)
    for (job, adapter), result in zip(pairs, acquired):
        assert registry.live_instance(job, adapter) is result.instance


# ----------------------------------------------------------------------------
# Release and linger


def test_release_to_zero_without_linger_stops_the_tree() -> None:
    registry = make_registry()
    first = running(registry)
    second = acquire(registry, connection=2)
    instance = first.instance

    partial = registry.release(first.lease.token, connection=1, uid=UID, now=1.0)
    assert (partial.refcount, partial.stopping, partial.actions) == (1, False, [])
    assert instance.state is State.RUNNING

    last = registry.release(second.lease.token, connection=2, uid=UID, now=2.0)
    assert (last.refcount, last.stopping) == (0, True)
    assert last.actions == [StopTree(instance.id, Reason.RELEASED)]
    assert instance.state is State.STOPPING
    assert registry.live_instance(JOB, ADAPTER) is None
    assert registry.leases == {}

    assert registry.tree_gone(instance.id, now=3.0) == []
    assert registry.instances == {}


def test_release_with_linger_lingers_then_tick_stops() -> None:
    registry = make_registry()
    acquired = running(registry, linger=10.0)
    instance = acquired.instance
    released = registry.release(acquired.lease.token, connection=1, uid=UID, now=5.0)
    assert (released.refcount, released.stopping, released.actions) == (0, False, [])
    assert instance.state is State.LINGERING
    assert instance.linger_until == 15.0
    assert registry.next_deadline() == 15.0
    # The pair stays live while lingering.
    assert registry.live_instance(JOB, ADAPTER) is instance

    early = registry.tick(14.99)
    assert (early.expired_leases, early.actions) == ([], [])
    assert instance.state is State.LINGERING

    late = registry.tick(15.0)
    assert late.expired_leases == []
    assert late.actions == [StopTree(instance.id, Reason.RELEASED)]
    assert instance.state is State.STOPPING
    assert registry.next_deadline() is None
    assert registry.live_instance(JOB, ADAPTER) is None
    # A second tick does not stop it again.
    assert registry.tick(30.0).actions == []


def test_acquire_during_linger_reuses_the_instance() -> None:
    registry = make_registry()
    acquired = running(registry, linger=10.0)
    instance = acquired.instance
    registry.release(acquired.lease.token, connection=1, uid=UID, now=5.0)
    assert instance.state is State.LINGERING

    again = acquire(registry, connection=2, now=8.0)
    assert again.instance is instance
    assert again.spawned is False
    assert again.actions == []
    assert instance.state is State.RUNNING
    assert instance.linger_until is None
    assert registry.next_deadline() is None
    assert registry.tick(100.0).actions == []
    assert instance.state is State.RUNNING

    # Lingering starts afresh from the next release.
    registry.release(again.lease.token, connection=2, uid=UID, now=50.0)
    assert instance.linger_until == 60.0


def test_next_deadline_is_the_earliest_of_linger_and_ttl() -> None:
    registry = make_registry()
    assert registry.next_deadline() is None
    lingering = running(registry, job="linger", linger=4.0)
    registry.release(lingering.lease.token, connection=1, uid=UID, now=10.0)
    assert registry.next_deadline() == 14.0

    acquire(registry, job="ttl", detach=True, ttl=30.0, now=0.0)
    assert registry.next_deadline() == 14.0
    short = acquire(registry, job="ttl", detach=True, ttl=2.0, now=10.0)
    assert registry.next_deadline() == 12.0
    registry.release(short.lease.token, connection=1, uid=UID, now=11.0)
    assert registry.next_deadline() == 14.0
    registry.tick(14.0)
    assert registry.next_deadline() == 30.0


def test_bound_lease_has_no_deadline_and_ignores_ttl() -> None:
    registry = make_registry()
    acquired = acquire(registry, ttl=5.0)
    assert acquired.lease.expires_at is None
    assert registry.next_deadline() is None
    assert registry.tick(1000.0).expired_leases == []
    assert registry.lease(acquired.lease.token) is acquired.lease


# ----------------------------------------------------------------------------
# The last lease goes while the root is starting


def _drop_by_release(registry: Registry, token: str) -> list[Action]:
    return registry.release(token, connection=1, uid=UID, now=1.0).actions


def _drop_by_disconnect(registry: Registry, token: str) -> list[Action]:
    return registry.connection_closed(1, now=1.0)


def _drop_by_release_job(registry: Registry, token: str) -> list[Action]:
    return registry.release_job(JOB, connection=1, uid=UID, now=1.0).actions


DROPS = [
    pytest.param(_drop_by_release, id="release"),
    pytest.param(_drop_by_disconnect, id="connection_closed"),
    pytest.param(_drop_by_release_job, id="release_job"),
]


@pytest.mark.parametrize("drop", DROPS)
def test_last_lease_gone_during_spawn_stops_once_spawned(drop) -> None:
    registry = make_registry()
    acquired = acquire(registry, connection=1)
    instance = acquired.instance
    assert drop(registry, acquired.lease.token) == []
    assert instance.state is State.STARTING
    assert registry.leases == {}

    actions = registry.spawned(instance.id, pid=77, now=2.0)
    assert actions == [
        InstanceSettled(instance.id, running=True),
        StopTree(instance.id, Reason.RELEASED),
    ]
    assert instance.state is State.STOPPING
    assert instance.pid == 77
    assert registry.live_instance(JOB, ADAPTER) is None
    assert registry.tree_gone(instance.id, now=3.0) == []
    assert registry.instances == {}


def test_last_lease_gone_during_spawn_with_linger_lingers() -> None:
    registry = make_registry()
    acquired = acquire(registry, linger=5.0)
    registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    actions = registry.spawned(acquired.instance.id, pid=77, now=2.0)
    assert actions == [InstanceSettled(acquired.instance.id, running=True)]
    assert acquired.instance.state is State.LINGERING
    assert registry.next_deadline() == 7.0


def test_acquire_after_release_during_spawn_keeps_the_instance() -> None:
    registry = make_registry()
    first = acquire(registry, connection=1)
    registry.release(first.lease.token, connection=1, uid=UID, now=1.0)
    second = acquire(registry, connection=2, now=1.5)
    assert second.instance is first.instance
    assert (second.spawned, second.actions) == (False, [])
    actions = registry.spawned(first.instance.id, pid=77, now=2.0)
    assert actions == [InstanceSettled(first.instance.id, running=True)]
    assert first.instance.state is State.RUNNING
    assert first.instance.refcount == 1


def test_spawn_failed_drops_every_lease_and_frees_the_pair() -> None:
    registry = make_registry()
    first = acquire(registry, connection=1)
    second = acquire(registry, connection=2)
    detached = acquire(registry, connection=3, detach=True, ttl=60.0)
    instance = first.instance

    assert registry.spawn_failed(instance.id) == [InstanceSettled(instance.id, running=False)]
    assert instance.id not in registry.instances
    assert registry.leases == {}
    assert registry.live_instance(JOB, ADAPTER) is None
    assert registry.next_deadline() is None
    for token, connection in [(first.lease.token, 1), (second.lease.token, 2), (detached.lease.token, 3)]:
        with pytest.raises(UnknownLease):
            registry.release(token, connection=connection, uid=UID, now=1.0)
    assert registry.connection_closed(1, now=1.0) == []

    again = acquire(registry, connection=1, now=2.0)
    assert again.spawned is True
    assert again.instance.id != instance.id
    assert again.actions == [Spawn(again.instance.id)]


# ----------------------------------------------------------------------------
# Acquire while the previous tree of the pair is still being stopped


def _stopping_instance(registry: Registry) -> Instance:
    acquired = running(registry)
    actions = registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0).actions
    assert actions == [StopTree(acquired.instance.id, Reason.RELEASED)]
    return acquired.instance


def test_acquire_waits_tells_when_an_acquire_of_the_pair_would_park() -> None:
    registry = make_registry()
    assert registry.acquire_waits(JOB, ADAPTER) is False  # nothing: a plain spawn
    starting = acquire(registry)
    assert registry.acquire_waits(JOB, ADAPTER) is True  # its spawn is not settled
    registry.spawned(starting.instance.id, pid=7, now=0.0)
    assert registry.acquire_waits(JOB, ADAPTER) is False  # running: joins at once
    registry.release(starting.lease.token, connection=1, uid=UID, now=1.0)
    assert registry.acquire_waits(JOB, ADAPTER) is True  # the old tree still stops
    registry.tree_gone(starting.instance.id, now=2.0)
    assert registry.acquire_waits(JOB, ADAPTER) is False
    assert registry.acquire_waits(JOB, "other") is False


def test_acquire_during_stop_waits_for_the_old_tree() -> None:
    registry = make_registry()
    old = _stopping_instance(registry)

    new = acquire(registry, connection=2, now=2.0)
    assert new.spawned is True
    assert new.actions == []
    assert new.instance.id != old.id
    assert new.instance.state is State.STARTING
    assert new.instance.waiting_for == old.id
    assert registry.live_instance(JOB, ADAPTER) is new.instance
    # A second acquire joins the waiting instance.
    joined = acquire(registry, connection=3, now=2.5)
    assert joined.instance is new.instance
    assert (joined.spawned, joined.actions) == (False, [])

    assert registry.tree_gone(old.id, now=3.0) == [Spawn(new.instance.id)]
    assert old.id not in registry.instances
    assert new.instance.waiting_for is None
    assert registry.spawned(new.instance.id, pid=9, now=4.0) == [
        InstanceSettled(new.instance.id, running=True)
    ]
    assert new.instance.refcount == 2


@pytest.mark.parametrize("drop", DROPS)
def test_waiting_instance_whose_leases_all_go_is_forgotten(drop) -> None:
    registry = make_registry()
    old = _stopping_instance(registry)
    new = acquire(registry, connection=1, now=2.0)
    assert new.actions == []

    assert drop(registry, new.lease.token) == [InstanceSettled(new.instance.id, running=False)]
    assert new.instance.id not in registry.instances
    assert registry.live_instance(JOB, ADAPTER) is None
    assert registry.tree_gone(old.id, now=3.0) == []
    assert registry.instances == {}
    # The pair is entirely free again.
    fresh = acquire(registry, connection=1, now=4.0)
    assert fresh.actions == [Spawn(fresh.instance.id)]


# ----------------------------------------------------------------------------
# release_job


def test_release_job_while_acquires_are_in_flight() -> None:
    registry = make_registry()
    leases = [acquire(registry, connection=connection) for connection in (1, 2, 3)]
    instance = leases[0].instance
    assert instance.state is State.STARTING

    result = registry.release_job(JOB, connection=9, uid=UID, now=1.0)
    assert result.released == 3
    assert result.instances == [instance.id]
    assert result.actions == []
    assert registry.leases == {}
    assert instance.refcount == 0
    for acquired in leases:
        with pytest.raises(UnknownLease):
            registry.release(acquired.lease.token, connection=acquired.lease.owner, uid=UID, now=2.0)

    actions = registry.spawned(instance.id, pid=12, now=2.0)
    assert actions[:2] == [
        InstanceSettled(instance.id, running=True),
        StopTree(instance.id, Reason.RELEASED),
    ]
    # The holders lost their leases to connection 9, so they hear that it stopped.
    assert actions[2:] == [
        NotifyExited(
            connections=(1, 2, 3),
            instance_id=instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=12,
            returncode=None,
            reason=Reason.RELEASED,
        )
    ]


def test_release_job_covers_every_adapter_of_the_job_only() -> None:
    registry = make_registry()
    a = running(registry, adapter="a")
    a2 = acquire(registry, adapter="a", connection=2)
    b = running(registry, adapter="b", pid=4343)
    other_job = running(registry, job="job-2", adapter="a", pid=4444)
    detached = acquire(registry, adapter="b", connection=3, detach=True, ttl=60.0)

    result = registry.release_job(JOB, connection=1, uid=UID, now=1.0)
    assert result.released == 4
    assert sorted(result.instances) == sorted([a.instance.id, b.instance.id])
    stops = of_type(result.actions, StopTree)
    assert sorted(stops, key=lambda stop: stop.instance_id) == sorted(
        [StopTree(a.instance.id, Reason.RELEASED), StopTree(b.instance.id, Reason.RELEASED)],
        key=lambda stop: stop.instance_id,
    )
    # Connections 2 and 3 lost their leases to connection 1.
    notified = {(notify.instance_id, notify.connections) for notify in of_type(result.actions, NotifyExited)}
    assert notified == {(a.instance.id, (2,)), (b.instance.id, (3,))}
    for token in (a.lease.token, a2.lease.token, b.lease.token, detached.lease.token):
        assert registry.lease(token) is None
    assert other_job.instance.state is State.RUNNING
    assert other_job.instance.refcount == 1
    assert registry.lease(other_job.lease.token) is other_job.lease


def test_release_job_of_an_unknown_job_releases_nothing() -> None:
    registry = make_registry()
    running(registry)
    result = registry.release_job("no-such-job", connection=1, uid=UID, now=1.0)
    assert (result.released, result.instances, result.actions) == (0, [], [])
    assert len(registry.leases) == 1


@pytest.mark.parametrize(
    ("caller_uid", "allowed"),
    [(UID, False), (OTHER_UID, False), (ROOT, True)],
    ids=["one-of-the-uids", "a-third-uid", "root"],
)
def test_release_job_across_uids_is_all_or_nothing(caller_uid: int, allowed: bool) -> None:
    # Two uids' instances of one job (another uid cannot join an instance).
    registry = make_registry()
    mine = running(registry, connection=1, uid=UID)
    theirs = running(registry, connection=2, uid=2002, adapter="other", pid=4343)
    before = snapshot(registry)
    if not allowed:
        with pytest.raises(PermissionDenied):
            registry.release_job(JOB, connection=1, uid=caller_uid, now=1.0)
        assert snapshot(registry) == before
        assert mine.instance.refcount == 1 and theirs.instance.refcount == 1
        return
    result = registry.release_job(JOB, connection=5, uid=caller_uid, now=1.0)
    assert result.released == 2
    assert registry.leases == {}
    assert StopTree(mine.instance.id, Reason.RELEASED) in result.actions
    assert theirs.instance.state is State.STOPPING


def test_release_job_of_own_uid_from_another_connection_is_allowed() -> None:
    registry = make_registry()
    acquired = running(registry, connection=1, uid=UID)
    result = registry.release_job(JOB, connection=2, uid=UID, now=1.0)
    assert result.released == 1
    assert registry.lease(acquired.lease.token) is None


# ----------------------------------------------------------------------------
# The root exits on its own


@pytest.mark.parametrize(
    ("returncode", "reason"),
    [(0, Reason.EXITED), (3, Reason.EXITED), (-9, Reason.KILLED), (-15, Reason.KILLED)],
)
def test_root_exit_ends_the_instance_and_notifies_every_holder(returncode: int, reason: Reason) -> None:
    registry = make_registry()
    first = running(registry, connection=1, pid=321)
    second = acquire(registry, connection=2)
    third = acquire(registry, connection=2)
    detached_gone = acquire(registry, connection=3, detach=True, ttl=100.0)
    registry.connection_closed(3, now=0.5)
    instance = first.instance

    actions = registry.root_exited(instance.id, returncode=returncode, now=1.0)
    assert actions == [
        StopTree(instance.id, reason),
        NotifyExited(
            connections=(1, 2),
            instance_id=instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=321,
            returncode=returncode,
            reason=reason,
        ),
    ]
    assert instance.state is State.EXITED
    assert instance.returncode == returncode
    assert registry.live_instance(JOB, ADAPTER) is None
    # The holders keep their leases until they release them.
    assert instance.refcount == 4
    for acquired in (first, second, third, detached_gone):
        assert registry.lease(acquired.lease.token) is not None


def test_acquire_after_root_exit_spawns_anew_once_the_old_tree_is_gone() -> None:
    registry = make_registry()
    old = running(registry, connection=1)
    old_second = acquire(registry, connection=2)
    registry.root_exited(old.instance.id, returncode=1, now=1.0)

    new = acquire(registry, connection=3, now=2.0)
    assert new.spawned is True
    assert new.actions == []
    assert new.instance.waiting_for == old.instance.id

    assert registry.tree_gone(old.instance.id, now=3.0) == [Spawn(new.instance.id)]
    # The old record stays while its leases are held.
    assert old.instance.id in registry.instances
    assert old.instance.state is State.EXITED

    released = registry.release(old.lease.token, connection=1, uid=UID, now=4.0)
    assert (released.refcount, released.stopping, released.actions) == (1, True, [])
    assert old.instance.id in registry.instances
    released = registry.release(old_second.lease.token, connection=2, uid=UID, now=4.0)
    assert (released.refcount, released.stopping, released.actions) == (0, True, [])
    assert old.instance.id not in registry.instances
    # The new instance was not touched.
    assert registry.live_instance(JOB, ADAPTER) is new.instance
    assert new.instance.refcount == 1


def test_old_leases_released_before_the_tree_is_gone() -> None:
    registry = make_registry()
    old = running(registry, connection=1)
    registry.root_exited(old.instance.id, returncode=0, now=1.0)
    released = registry.release(old.lease.token, connection=1, uid=UID, now=2.0)
    assert (released.refcount, released.stopping, released.actions) == (0, True, [])
    # Still being reaped: the record stays and counts.
    assert old.instance.id in registry.instances
    assert registry.count_instances(ADAPTER) == 1
    assert registry.tree_gone(old.instance.id, now=3.0) == []
    assert registry.instances == {}
    assert registry.count_instances(ADAPTER) == 0


def test_root_exit_while_stopping_or_exited_yields_nothing() -> None:
    registry = make_registry()
    stopping = _stopping_instance(registry)
    assert registry.root_exited(stopping.id, returncode=-15, now=2.0) == []
    assert stopping.state is State.STOPPING

    exited = running(registry, job="job-2")
    registry.root_exited(exited.instance.id, returncode=0, now=1.0)
    assert registry.root_exited(exited.instance.id, returncode=0, now=2.0) == []
    assert exited.instance.state is State.EXITED

    assert registry.root_exited("no-such-instance", returncode=0, now=2.0) == []


def test_root_exit_while_lingering_notifies_nobody_but_stops_the_tree() -> None:
    registry = make_registry()
    acquired = running(registry, linger=10.0)
    registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    actions = registry.root_exited(acquired.instance.id, returncode=0, now=2.0)
    assert actions == [StopTree(acquired.instance.id, Reason.EXITED)]
    assert registry.next_deadline() is None
    assert registry.tree_gone(acquired.instance.id, now=3.0) == []
    assert registry.instances == {}


# ----------------------------------------------------------------------------
# Bound and detached leases


def test_a_closed_connections_leases_let_go_one_at_a_time_skip_what_changed_meanwhile() -> None:
    # `connection_gone` + `let_go` per lease (what the engine does over turns
    # for a connection that held many): a lease released meanwhile is left
    # alone, and a lease let go once is not let go again.
    registry = make_registry()
    kept = running(registry, connection=1)
    released = running(registry, job="job-2", connection=1, pid=4343)
    detached = acquire(registry, job="job-3", connection=1, detach=True, ttl=30.0, now=0.0)
    leases = registry.connection_gone(1)
    assert [lease.token for lease in leases] == [kept.lease.token, released.lease.token, detached.lease.token]
    registry.release(released.lease.token, connection=1, uid=UID, now=1.0)
    revision = released.instance.revision
    actions = [action for lease in leases for action in registry.let_go(lease, 1, now=2.0)]
    assert actions == [StopTree(kept.instance.id, Reason.RELEASED)]
    assert released.instance.revision == revision
    assert registry.lease(kept.lease.token) is None
    assert detached.lease.owner is None and registry.lease(detached.lease.token) is detached.lease
    revision = detached.instance.revision
    assert [registry.let_go(lease, 1, now=3.0) for lease in leases] == [[], [], []]
    assert detached.instance.revision == revision
    # The connection owns and watches nothing any more.
    assert registry.connection_gone(1) == [] and registry.connection_closed(1, now=3.0) == []


def test_connection_closed_releases_bound_leases_only() -> None:
    registry = make_registry()
    bound = running(registry, connection=1)
    detached = acquire(registry, connection=1, detach=True, ttl=30.0, now=0.0)
    other = running(registry, job="job-2", connection=1, pid=4343)
    instance = bound.instance

    actions = registry.connection_closed(1, now=5.0)
    assert actions == [StopTree(other.instance.id, Reason.RELEASED)]
    assert registry.lease(bound.lease.token) is None
    assert registry.lease(detached.lease.token) is detached.lease
    assert detached.lease.owner is None
    assert instance.state is State.RUNNING
    assert instance.refcount == 1

    # A second close of the same connection is harmless.
    assert registry.connection_closed(1, now=6.0) == []

    assert registry.next_deadline() == 30.0
    early = registry.tick(29.0)
    assert (early.expired_leases, early.actions) == ([], [])
    expired = registry.tick(31.0)
    assert expired.expired_leases == [detached.lease.token]
    # Its owner is gone, so nobody is notified.
    assert expired.actions == [StopTree(instance.id, Reason.LEASE_EXPIRED)]
    assert registry.lease(detached.lease.token) is None


def test_renew_pushes_the_expiry() -> None:
    registry = make_registry()
    acquired = running(registry, detach=True, ttl=10.0, now=0.0)
    token = acquired.lease.token
    assert acquired.lease.expires_at == 10.0

    assert registry.renew(token, uid=UID, now=8.0) == 18.0
    assert registry.next_deadline() == 18.0
    assert registry.tick(10.0).expired_leases == []
    assert registry.renew(token, uid=UID, now=12.0, ttl=100.0) == 112.0
    # The new ttl becomes the lease's own.
    assert registry.renew(token, uid=ROOT, now=20.0) == 120.0
    assert registry.tick(119.0).expired_leases == []
    ticked = registry.tick(120.0)
    assert ticked.expired_leases == [token]
    assert ticked.actions[0] == StopTree(acquired.instance.id, Reason.LEASE_EXPIRED)
    with pytest.raises(UnknownLease):
        registry.renew(token, uid=UID, now=121.0)


def test_renew_of_a_bound_lease_is_invalid() -> None:
    registry = make_registry()
    acquired = acquire(registry)
    before = snapshot(registry)
    with pytest.raises(InvalidParams):
        registry.renew(acquired.lease.token, uid=UID, now=1.0, ttl=5.0)
    assert snapshot(registry) == before


def test_renew_of_another_uids_lease_is_denied() -> None:
    registry = make_registry()
    acquired = acquire(registry, detach=True, ttl=10.0)
    with pytest.raises(PermissionDenied):
        registry.renew(acquired.lease.token, uid=OTHER_UID, now=1.0)
    assert acquired.lease.expires_at == 10.0


def test_renew_of_an_unknown_lease() -> None:
    with pytest.raises(UnknownLease):
        make_registry().renew("junk", uid=UID, now=0.0)


def test_detach_without_ttl_is_invalid_and_changes_nothing() -> None:
    registry = make_registry()
    with pytest.raises(InvalidParams):
        acquire(registry, detach=True)
    assert registry.instances == {}
    assert registry.leases == {}
    assert registry.live_instance(JOB, ADAPTER) is None


def test_detached_lease_of_a_closed_connection_can_be_released_by_its_uid() -> None:
    registry = make_registry()
    acquired = running(registry, connection=1, detach=True, ttl=30.0)
    registry.connection_closed(1, now=1.0)
    with pytest.raises(PermissionDenied):
        registry.release(acquired.lease.token, connection=2, uid=OTHER_UID, now=2.0)
    released = registry.release(acquired.lease.token, connection=2, uid=UID, now=2.0)
    assert released.actions == [StopTree(acquired.instance.id, Reason.RELEASED)]


def test_holders_of_leases_released_by_release_job_are_told_at_once() -> None:
    registry = make_registry()
    first = running(registry, connection=1, pid=500)
    keeper = acquire(registry, job="job-2", connection=2)  # another job, untouched
    acquire(registry, connection=3, uid=ROOT)
    acquire(registry, connection=9)  # the caller's own lease: no notice to itself
    result = registry.release_job(JOB, connection=9, uid=ROOT, now=1.0)
    assert result.released == 3
    assert result.actions == [
        StopTree(first.instance.id, Reason.RELEASED),
        NotifyExited(
            connections=(1, 3),
            instance_id=first.instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=500,
            returncode=None,
            reason=Reason.RELEASED,
        ),
    ]
    assert registry.lease(keeper.lease.token) is keeper.lease


def test_watcher_is_notified_when_the_instance_stops_later() -> None:
    registry = make_registry()
    lost = running(registry, connection=1, pid=500)
    kept = acquire(registry, connection=2, job=JOB)
    # Connection 2 (same uid) releases connection 1's lease.
    released = registry.release(lost.lease.token, connection=2, uid=UID, now=1.0)
    assert (released.refcount, released.actions) == (1, [])

    # Connection 1 hears nothing until the instance stops.
    actions = registry.release(kept.lease.token, connection=2, uid=UID, now=2.0).actions
    assert actions == [
        StopTree(lost.instance.id, Reason.RELEASED),
        NotifyExited(
            connections=(1,),
            instance_id=lost.instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=500,
            returncode=None,
            reason=Reason.RELEASED,
        ),
    ]


def test_owner_of_an_expired_lease_is_notified() -> None:
    registry = make_registry()
    expiring = running(registry, connection=1, detach=True, ttl=5.0, now=0.0)
    kept = acquire(registry, connection=2)
    ticked = registry.tick(5.0)
    assert ticked.expired_leases == [expiring.lease.token]
    assert ticked.actions == []

    actions = registry.connection_closed(2, now=6.0)
    assert actions == [
        StopTree(expiring.instance.id, Reason.RELEASED),
        NotifyExited(
            connections=(1,),
            instance_id=expiring.instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=4242,
            returncode=None,
            reason=Reason.RELEASED,
        ),
    ]
    assert kept.instance.state is State.STOPPING


def test_expiry_of_the_last_lease_notifies_its_connected_owner() -> None:
    registry = make_registry()
    expiring = running(registry, connection=1, detach=True, ttl=5.0, now=0.0)
    ticked = registry.tick(6.0)
    assert ticked.expired_leases == [expiring.lease.token]
    assert ticked.actions == [
        StopTree(expiring.instance.id, Reason.LEASE_EXPIRED),
        NotifyExited(
            connections=(1,),
            instance_id=expiring.instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=4242,
            returncode=None,
            reason=Reason.LEASE_EXPIRED,
        ),
    ]


def test_a_watcher_that_closes_with_its_last_lease_is_not_notified() -> None:
    registry = make_registry()
    lost = running(registry, connection=1)
    acquire(registry, connection=1)
    registry.release(lost.lease.token, connection=2, uid=UID, now=1.0)
    # Connection 1 is now a watcher and still a holder; closing it drops its
    # last lease and stops the instance, and nobody is left to tell.
    actions = registry.connection_closed(1, now=2.0)
    assert actions == [StopTree(lost.instance.id, Reason.RELEASED)]


def test_a_closed_watcher_is_not_notified() -> None:
    registry = make_registry()
    lost = running(registry, connection=1)
    kept = acquire(registry, connection=2)
    registry.release(lost.lease.token, connection=2, uid=UID, now=1.0)
    registry.connection_closed(1, now=2.0)
    actions = registry.release(kept.lease.token, connection=2, uid=UID, now=3.0).actions
    assert actions == [StopTree(lost.instance.id, Reason.RELEASED)]


# ----------------------------------------------------------------------------
# Permissions and client errors


@pytest.mark.parametrize(
    ("connection", "uid", "allowed"),
    [
        (1, UID, True),  # the holder itself
        (2, UID, True),  # another connection of the same uid
        (2, OTHER_UID, False),  # another uid
        (2, ROOT, True),  # root
    ],
    ids=["holder", "same-uid", "other-uid", "root"],
)
def test_release_of_a_lease_by_connection_and_uid(connection: int, uid: int, allowed: bool) -> None:
    registry = make_registry()
    acquired = running(registry, connection=1, uid=UID)
    acquire(registry, connection=3)  # keeps the instance alive
    before = snapshot(registry)
    if not allowed:
        with pytest.raises(PermissionDenied):
            registry.release(acquired.lease.token, connection=connection, uid=uid, now=1.0)
        assert snapshot(registry) == before
        return
    released = registry.release(acquired.lease.token, connection=connection, uid=uid, now=1.0)
    assert (released.refcount, released.stopping, released.actions) == (1, False, [])
    assert registry.lease(acquired.lease.token) is None


@pytest.mark.parametrize("token", ["", "junk", "lease-999", "lease-1 "])
def test_release_of_a_junk_token_is_an_unknown_lease(token: str) -> None:
    registry = make_registry()
    running(registry)
    before = snapshot(registry)
    with pytest.raises(UnknownLease):
        registry.release(token, connection=1, uid=ROOT, now=1.0)
    assert snapshot(registry) == before


def test_double_release_is_an_unknown_lease() -> None:
    registry = make_registry()
    acquired = running(registry)
    acquire(registry, connection=2)
    registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    with pytest.raises(UnknownLease):
        registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    assert acquired.instance.refcount == 1


@pytest.mark.parametrize(
    ("live", "asked", "conflict"),
    [
        ({"workdir": "/a"}, {"workdir": "/b"}, True),
        ({"workdir": "/a"}, None, True),
        (None, {"workdir": "/a"}, True),
        ({"workdir": "/a", "mode": "x"}, {"mode": "x", "workdir": "/a"}, False),
        (None, {}, False),
        ({"workdir": "/a"}, {"workdir": "/a"}, False),
    ],
)
@pytest.mark.parametrize("state", ["starting", "running", "lingering"])
def test_conflicting_params_on_a_live_instance(live, asked, conflict: bool, state: str) -> None:
    registry = make_registry()
    first = acquire(registry, params=live, linger=5.0)
    if state != "starting":
        registry.spawned(first.instance.id, pid=1, now=0.0)
    if state == "lingering":
        registry.release(first.lease.token, connection=1, uid=UID, now=0.0)
    assert first.instance.state.value == state
    before = snapshot(registry)
    if conflict:
        with pytest.raises(Conflict):
            acquire(registry, connection=2, params=asked, now=1.0)
        assert snapshot(registry) == before
    else:
        assert acquire(registry, connection=2, params=asked, now=1.0).instance is first.instance


def test_other_params_are_fine_once_the_instance_is_gone() -> None:
    registry = make_registry()
    old = _stopping_instance(registry)
    new = acquire(registry, params={"workdir": "/b"}, now=2.0)
    assert new.instance.id != old.id
    assert new.instance.params == (("workdir", "/b"),)


def test_limit_reached_at_max_instances() -> None:
    registry = make_registry()
    first = running(registry, job="j1", max_instances=2)
    running(registry, job="j2", max_instances=2)
    before = snapshot(registry)
    with pytest.raises(LimitReached):
        acquire(registry, job="j3", max_instances=2)
    assert snapshot(registry) == before
    # Joining an existing instance creates none.
    assert acquire(registry, job="j1", connection=2, max_instances=2).instance is first.instance
    # The limit is per adapter.
    assert acquire(registry, job="j3", adapter="other", max_instances=2).spawned is True


def test_a_stopping_instance_counts_until_its_tree_is_gone() -> None:
    registry = make_registry()
    stopping = _stopping_instance(registry)
    assert registry.count_instances(ADAPTER) == 1
    with pytest.raises(LimitReached):
        acquire(registry, job="j2", max_instances=1)
    with pytest.raises(LimitReached):
        acquire(registry, max_instances=1)
    registry.tree_gone(stopping.id, now=2.0)
    assert registry.count_instances(ADAPTER) == 0
    assert acquire(registry, job="j2", max_instances=1).spawned is True


def test_an_exited_instance_counts_until_its_tree_is_gone_even_while_leased() -> None:
    registry = make_registry()
    exited = running(registry)
    registry.root_exited(exited.instance.id, returncode=0, now=1.0)
    with pytest.raises(LimitReached):
        acquire(registry, job="j2", max_instances=1)
    registry.tree_gone(exited.instance.id, now=2.0)
    assert exited.instance.id in registry.instances  # still leased
    assert acquire(registry, job="j2", max_instances=1).spawned is True


# ----------------------------------------------------------------------------
# terminate and shutdown


def test_terminate_for_memory_limit_ends_the_instance_and_notifies_holders() -> None:
    registry = make_registry()
    first = running(registry, connection=1, pid=900)
    second = acquire(registry, connection=2)
    actions = registry.terminate(first.instance.id, reason=Reason.MEMORY_LIMIT)
    assert actions == [
        StopTree(first.instance.id, Reason.MEMORY_LIMIT),
        NotifyExited(
            connections=(1, 2),
            instance_id=first.instance.id,
            job=JOB,
            adapter=ADAPTER,
            pid=900,
            returncode=None,
            reason=Reason.MEMORY_LIMIT,
        ),
    ]
    assert first.instance.state is State.EXITED
    assert registry.live_instance(JOB, ADAPTER) is None
    # Terminating again, or the root's death that follows, adds nothing.
    assert registry.terminate(first.instance.id, reason=Reason.MEMORY_LIMIT) == []
    assert registry.root_exited(first.instance.id, returncode=-9, now=1.0) == []
    # Holders release later without error.
    assert registry.release(first.lease.token, connection=1, uid=UID, now=2.0).stopping is True
    registry.tree_gone(first.instance.id, now=3.0)
    assert first.instance.id in registry.instances
    registry.release(second.lease.token, connection=2, uid=UID, now=4.0)
    assert registry.instances == {}


def test_terminate_of_a_lingering_instance() -> None:
    registry = make_registry()
    acquired = running(registry, linger=10.0)
    registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    actions = registry.terminate(acquired.instance.id, reason=Reason.MEMORY_LIMIT)
    assert actions == [StopTree(acquired.instance.id, Reason.MEMORY_LIMIT)]
    assert registry.tick(100.0).actions == []


def test_terminate_ignores_instances_that_are_not_running() -> None:
    registry = make_registry()
    starting = acquire(registry, job="starting")
    stopping = _stopping_instance(registry)
    for instance_id in (starting.instance.id, stopping.id, "no-such-instance"):
        assert registry.terminate(instance_id, reason=Reason.MEMORY_LIMIT) == []
    assert starting.instance.state is State.STARTING
    assert stopping.state is State.STOPPING


def test_shutdown_stops_everything_and_refuses_new_acquires() -> None:
    registry = make_registry()
    run = running(registry, job="run", connection=1, pid=10)
    linger = running(registry, job="linger", connection=2, pid=11, linger=30.0)
    registry.release(linger.lease.token, connection=2, uid=UID, now=1.0)
    in_flight = acquire(registry, job="in-flight", connection=3)
    old = _stopping_instance(registry)  # job JOB
    waiting = acquire(registry, connection=4, now=2.0)
    assert waiting.instance.waiting_for == old.id

    actions = registry.shutdown()
    assert registry.closed is True
    assert sorted(of_type(actions, StopTree), key=lambda stop: stop.instance_id) == sorted(
        [StopTree(run.instance.id, Reason.SHUTDOWN), StopTree(linger.instance.id, Reason.SHUTDOWN)],
        key=lambda stop: stop.instance_id,
    )
    assert of_type(actions, InstanceSettled) == [InstanceSettled(waiting.instance.id, running=False)]
    assert [(notify.instance_id, notify.connections) for notify in of_type(actions, NotifyExited)] == [
        (run.instance.id, (1,))
    ]
    assert len(actions) == 4
    assert waiting.instance.id not in registry.instances
    assert registry.lease(waiting.lease.token) is None
    assert registry.next_deadline() is None

    for job in ("run", "new-job", "in-flight"):
        with pytest.raises(ShuttingDown):
            acquire(registry, job=job, connection=5, now=3.0)

    # The spawn in flight reports in after shutdown: it is ended at once.
    actions = registry.spawned(in_flight.instance.id, pid=12, now=4.0)
    assert actions == [
        InstanceSettled(in_flight.instance.id, running=True),
        StopTree(in_flight.instance.id, Reason.SHUTDOWN),
        NotifyExited(
            connections=(3,),
            instance_id=in_flight.instance.id,
            job="in-flight",
            adapter=ADAPTER,
            pid=12,
            returncode=None,
            reason=Reason.SHUTDOWN,
        ),
    ]
    # The tree of the old instance going does not start the forgotten successor.
    assert registry.tree_gone(old.id, now=5.0) == []

    # Everything drains: clients close, trees go.
    for connection in (1, 2, 3, 4):
        assert of_type(registry.connection_closed(connection, now=6.0), Spawn) == []
    for instance_id in (run.instance.id, linger.instance.id, in_flight.instance.id):
        assert registry.tree_gone(instance_id, now=7.0) == []
    assert registry.instances == {}
    assert registry.leases == {}


def test_shutdown_with_an_unleased_spawn_in_flight() -> None:
    registry = make_registry()
    acquired = acquire(registry)
    registry.release(acquired.lease.token, connection=1, uid=UID, now=1.0)
    assert registry.shutdown() == []
    actions = registry.spawned(acquired.instance.id, pid=5, now=2.0)
    assert actions == [
        InstanceSettled(acquired.instance.id, running=True),
        StopTree(acquired.instance.id, Reason.SHUTDOWN),
    ]
    assert registry.tree_gone(acquired.instance.id, now=3.0) == []
    assert registry.instances == {}


# ----------------------------------------------------------------------------
# Random interleavings

JOBS = ("j1", "j2")
ADAPTERS = ("a", "b")
UID_CHOICES = (UID, UID, OTHER_UID, ROOT)


class Shell:
    """A model of the I/O shell: carries out actions and reports back, in any order.

    It checks each action against the registry as it arrives and keeps what it must
    later report (spawns in flight, live roots, trees being stopped).
    """

    def __init__(self, registry: Registry, rng: random.Random) -> None:
        self.registry = registry
        self.rng = rng
        self.now = 0.0
        self.spawning: set[str] = set()
        self.roots: set[str] = set()
        self.stopping: set[str] = set()
        self.ever_spawned: set[str] = set()
        self.removed: set[str] = set()
        self.tokens: list[str] = []
        self.connections: dict[int, int] = {}
        self._next_connection = itertools.count(1)
        self._next_pid = itertools.count(1000)
        # What each instance showed at the last check, with its revision, and
        # the registry's version then (see `check_revisions`).
        self.shown: dict[str, tuple[object, int]] = {}
        self.shown_version = registry.version
        for _ in range(4):
            self.open_connection()

    def check_revisions(self) -> None:
        """An instance whose fields or leases changed since the last check
        has a new revision, and the registry a new version if anything it
        shows changed (an instance came, went or changed)."""
        registry = self.registry
        shown = {instance_id: (shown_fields(registry, instance), instance.revision)
                 for instance_id, instance in registry.instances.items()}
        for instance_id, (fields, revision) in shown.items():
            before = self.shown.get(instance_id)
            if before is not None and before[0] != fields:
                assert revision != before[1], f"instance {instance_id} changed without a new revision"
        if {i: f for i, (f, _) in shown.items()} != {i: f for i, (f, _) in self.shown.items()}:
            assert registry.version != self.shown_version, "the registry changed without a new version"
        self.shown, self.shown_version = shown, registry.version

    def open_connection(self) -> None:
        self.connections[next(self._next_connection)] = self.rng.choice(UID_CHOICES)

    def apply(self, actions: list[Action]) -> None:
        registry = self.registry
        for action in actions:
            if isinstance(action, Spawn):
                instance = registry.instances[action.instance_id]
                assert instance.state is State.STARTING
                assert instance.waiting_for is None
                assert action.instance_id not in self.ever_spawned, "spawned twice"
                self.spawning.add(action.instance_id)
                self.ever_spawned.add(action.instance_id)
            elif isinstance(action, StopTree):
                instance = registry.instances[action.instance_id]
                assert instance.state in (State.STOPPING, State.EXITED)
                assert action.instance_id in self.ever_spawned, "stop of a tree never spawned"
                assert action.instance_id not in self.spawning
                assert action.instance_id not in self.stopping, "stopped twice"
                self.stopping.add(action.instance_id)
            elif isinstance(action, NotifyExited):
                assert action.connections
                closed = set(action.connections) - self.connections.keys()
                assert not closed, f"notice to closed connections {closed}"
                assert list(action.connections) == sorted(set(action.connections))
                assert action.instance_id in self.ever_spawned
            else:
                assert isinstance(action, InstanceSettled)

    def check(self) -> None:
        registry = self.registry
        instances = registry.instances
        self.removed |= {instance_id for instance_id in self.ever_spawned if instance_id not in instances}
        assert not (self.removed & instances.keys()), "a removed instance came back"
        by_instance: dict[str, set[str]] = {instance_id: set() for instance_id in instances}
        for token, lease in registry.leases.items():
            assert lease.token == token
            assert lease.instance_id in instances, "lease on a missing instance"
            assert lease.instance_id not in self.removed
            by_instance[lease.instance_id].add(token)
            assert (lease.job, lease.adapter) == instances[lease.instance_id].key
            assert lease.detached == (lease.expires_at is not None)
            assert lease.owner is None or lease.owner in self.connections
        live_pairs: dict[tuple[str, str], str] = {}
        for instance_id, instance in instances.items():
            assert instance.id == instance_id
            assert instance.leases == by_instance[instance_id]
            assert instance.refcount == len(by_instance[instance_id])
            if instance.state in (State.STARTING, State.RUNNING, State.LINGERING):
                assert instance.key not in live_pairs, "two live instances of one pair"
                live_pairs[instance.key] = instance_id
            if instance.state is State.STOPPING:
                assert not instance.leases, "lease on a stopping instance"
                assert instance_id in self.stopping
            if instance.state is State.LINGERING:
                assert not instance.leases
                assert instance.linger_until is not None
            if instance.state is State.EXITED:
                assert instance.tree_gone or instance_id in self.stopping
                assert instance.tree_gone or instance.leases or instance_id in self.stopping
            if instance.state is State.STARTING:
                if instance.waiting_for is None:
                    assert instance_id in self.spawning
                else:
                    assert instance.leases, "an unleased waiting instance should be forgotten"
                    assert instance.waiting_for in self.stopping
                    assert instance_id not in self.ever_spawned
        for job in JOBS:
            for adapter in ADAPTERS:
                live = registry.live_instance(job, adapter)
                assert (live.id if live else None) == live_pairs.get((job, adapter))
        for instance_id in self.spawning:
            assert instances[instance_id].state is State.STARTING
        for instance_id in self.stopping:
            assert instances[instance_id].state in (State.STOPPING, State.EXITED)
            assert not instances[instance_id].tree_gone
        for instance_id in self.roots:
            assert instances[instance_id].state is not State.STARTING
        check_indexes(registry)
        self.check_revisions()

    # -- steps ---------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        self.now += rng.choice((0.0, 0.1, 0.5, 1.0, 3.0))
        choice = rng.choices(
            [
                self.do_acquire,
                self.do_release,
                self.do_release_job,
                self.do_connection_closed,
                self.do_renew,
                self.do_spawned,
                self.do_spawn_failed,
                self.do_root_exited,
                self.do_tree_gone,
                self.do_tick,
                self.do_terminate,
            ],
            weights=[10, 5, 1, 2, 1, 3, 1, 1, 3, 2, 1],
        )[0]
        choice()
        self.check()

    def do_acquire(self) -> None:
        rng = self.rng
        connection = rng.choice(list(self.connections))
        uid = self.connections[connection]
        job = rng.choice(JOBS)
        adapter = rng.choice(ADAPTERS)
        detach = rng.random() < 0.25
        options = dict(
            params=rng.choice([None, None, None, {"w": "1"}]),
            detach=detach,
            ttl=rng.choice((1.0, 4.0, 20.0)) if detach else None,
            linger=rng.choice((0.0, 0.0, 2.0)),
            max_instances=rng.choice((None, None, 2)),
        )
        before = snapshot(self.registry)
        live = self.registry.live_instance(job, adapter)
        try:
            acquired = self.registry.acquire(
                job=job, adapter=adapter, connection=connection, uid=uid, now=self.now, **options
            )
        except (Conflict, LimitReached, ShuttingDown, PermissionDenied) as error:
            assert snapshot(self.registry) == before
            if isinstance(error, PermissionDenied):
                # Another uid's instance: only root joins it.
                assert live is not None and uid not in (ROOT, live.uid)
            elif isinstance(error, Conflict):
                assert live is not None
            elif isinstance(error, LimitReached):
                assert live is None
            else:
                assert self.registry.closed
            return
        assert not self.registry.closed
        assert live is None or uid in (ROOT, live.uid)
        assert acquired.spawned == (live is None)
        if live is not None:
            assert acquired.instance is live
        assert acquired.instance is self.registry.live_instance(job, adapter)
        assert self.registry.lease(acquired.lease.token) is acquired.lease
        self.tokens.append(acquired.lease.token)
        self.apply(acquired.actions)

    def _pick_token(self) -> str:
        if self.tokens and self.rng.random() < 0.9:
            return self.rng.choice(self.tokens)
        return "junk"

    def do_release(self) -> None:
        token = self._pick_token()
        connection = self.rng.choice(list(self.connections))
        uid = self.connections[connection]
        lease = self.registry.lease(token)
        before = snapshot(self.registry)
        try:
            released = self.registry.release(token, connection=connection, uid=uid, now=self.now)
        except UnknownLease:
            assert lease is None
            assert snapshot(self.registry) == before
            return
        except PermissionDenied:
            assert lease is not None
            assert lease.owner != connection and uid not in (ROOT, lease.uid)
            assert snapshot(self.registry) == before
            return
        assert lease is not None
        assert lease.owner == connection or uid in (ROOT, lease.uid)
        assert self.registry.lease(token) is None
        instance = self.registry.instances.get(lease.instance_id)
        assert released.refcount == (instance.refcount if instance else 0)
        self.apply(released.actions)

    def do_release_job(self) -> None:
        job = self.rng.choice(JOBS)
        connection = self.rng.choice(list(self.connections))
        uid = self.connections[connection]
        leases = [lease for lease in self.registry.leases.values() if lease.job == job]
        before = snapshot(self.registry)
        try:
            result = self.registry.release_job(job, connection=connection, uid=uid, now=self.now)
        except PermissionDenied:
            assert uid != ROOT and any(lease.uid != uid for lease in leases)
            assert snapshot(self.registry) == before
            return
        assert result.released == len(leases)
        assert set(result.instances) == {lease.instance_id for lease in leases}
        assert not any(lease.job == job for lease in self.registry.leases.values())
        self.apply(result.actions)

    def do_connection_closed(self) -> None:
        connection = self.rng.choice(list(self.connections))
        del self.connections[connection]
        self.open_connection()
        kept = {
            token
            for token, lease in self.registry.leases.items()
            if lease.owner != connection or lease.detached
        }
        self.apply(self.registry.connection_closed(connection, now=self.now))
        assert set(self.registry.leases) == kept
        assert all(lease.owner != connection for lease in self.registry.leases.values())

    def do_renew(self) -> None:
        token = self._pick_token()
        lease = self.registry.lease(token)
        uid = self.rng.choice(UID_CHOICES)
        try:
            expires_at = self.registry.renew(token, uid=uid, now=self.now)
        except UnknownLease:
            # Unknown, or due for expiry and not yet ticked.
            assert lease is None or (lease.expires_at is not None and lease.expires_at <= self.now)
            return
        except PermissionDenied:
            assert lease is not None and uid not in (ROOT, lease.uid)
            return
        except InvalidParams:
            assert lease is not None and not lease.detached
            return
        assert lease is not None and lease.detached
        assert expires_at == lease.expires_at > self.now

    def do_spawned(self) -> None:
        if not self.spawning:
            return
        instance_id = self.rng.choice(sorted(self.spawning))
        self.spawning.remove(instance_id)
        self.roots.add(instance_id)
        actions = self.registry.spawned(instance_id, pid=next(self._next_pid), now=self.now)
        assert actions[0] == InstanceSettled(instance_id, running=True)
        self.apply(actions)

    def do_spawn_failed(self) -> None:
        if not self.spawning:
            return
        instance_id = self.rng.choice(sorted(self.spawning))
        self.spawning.remove(instance_id)
        tokens = set(self.registry.instances[instance_id].leases)
        actions = self.registry.spawn_failed(instance_id)
        assert actions == [InstanceSettled(instance_id, running=False)]
        assert instance_id not in self.registry.instances
        assert not tokens & self.registry.leases.keys()
        self.apply(actions)

    def do_root_exited(self) -> None:
        if not self.roots:
            return
        instance_id = self.rng.choice(sorted(self.roots))
        self.roots.remove(instance_id)
        state = self.registry.instances[instance_id].state
        actions = self.registry.root_exited(
            instance_id, returncode=self.rng.choice((0, 1, -9)), now=self.now
        )
        if state in (State.STOPPING, State.EXITED):
            assert actions == []
        else:
            assert isinstance(actions[0], StopTree)
            assert self.registry.instances[instance_id].state is State.EXITED
        self.apply(actions)

    def do_tree_gone(self) -> None:
        if not self.stopping:
            return
        instance_id = self.rng.choice(sorted(self.stopping))
        if instance_id in self.roots:
            # The reaper sees the root die before the rest of the tree.
            self.roots.remove(instance_id)
            assert self.registry.root_exited(instance_id, returncode=-15, now=self.now) == []
        self.stopping.remove(instance_id)
        actions = self.registry.tree_gone(instance_id, now=self.now)
        assert all(isinstance(action, Spawn) for action in actions)
        self.apply(actions)

    def do_tick(self) -> None:
        due = sorted(
            token
            for token, lease in self.registry.leases.items()
            if lease.expires_at is not None and lease.expires_at <= self.now
        )
        lingering_due = sorted(
            instance.id
            for instance in self.registry.instances.values()
            if instance.state is State.LINGERING and instance.linger_until is not None and instance.linger_until <= self.now
        )
        ticked = self.registry.tick(self.now)
        assert sorted(ticked.expired_leases) == due
        stopped = sorted(a.instance_id for a in ticked.actions if isinstance(a, StopTree) and a.instance_id in lingering_due)
        assert stopped == lingering_due
        assert not set(due) & self.registry.leases.keys()
        deadline = self.registry.next_deadline()
        assert deadline is None or deadline > self.now
        self.apply(ticked.actions)

    def do_terminate(self) -> None:
        if not self.registry.instances:
            return
        instance_id = self.rng.choice(sorted(self.registry.instances))
        state = self.registry.instances[instance_id].state
        actions = self.registry.terminate(instance_id, reason=Reason.MEMORY_LIMIT)
        if state in (State.RUNNING, State.LINGERING):
            assert actions[0] == StopTree(instance_id, Reason.MEMORY_LIMIT)
        else:
            assert actions == []
        self.apply(actions)

    def do_shutdown(self) -> None:
        self.apply(self.registry.shutdown())
        self.check()

    # -- the end ---------------------------------------------------------------

    def drain(self) -> None:
        """Release everything and let every spawn and stop complete."""
        registry = self.registry
        for token in list(registry.leases):
            self.apply(registry.release(token, connection=0, uid=ROOT, now=self.now).actions)
            self.check()
        for _ in range(1000):
            if self.spawning:
                self.do_spawned()
            elif self.stopping:
                self.do_tree_gone()
            elif registry.instances:
                self.now += 1000.0
                self.do_tick()
            else:
                break
            self.check()
        assert registry.instances == {}
        assert registry.leases == {}
        assert registry.next_deadline() is None
        for job in JOBS:
            for adapter in ADAPTERS:
                assert registry.live_instance(job, adapter) is None
        for adapter in ADAPTERS:
            assert registry.count_instances(adapter) == 0
        if not registry.closed:
            # No stale record of a dying tree holds back a new instance.
            for job in JOBS:
                for adapter in ADAPTERS:
                    acquired = acquire(registry, job=job, adapter=adapter, now=self.now)
                    assert acquired.actions == [Spawn(acquired.instance.id)]


def shown_fields(registry: Registry, instance: Instance) -> tuple[object, ...]:
    """Every field of an instance and of its leases but its watchers: what
    a revision must follow."""
    leases = tuple(sorted(
        (t, lease.owner, lease.detached, lease.ttl, lease.expires_at, lease.resume_by, lease.uid)
        for t in instance.leases for lease in [registry.leases[t]]
    ))
    return (instance.state, instance.pid, instance.started_at, instance.linger_until, instance.waiting_for,
            instance.returncode, instance.stop_reason, instance.tree_gone, instance.adopted, instance.uid, leases)


def check_indexes(registry: Registry) -> None:
    """Every index the registry keeps to answer in O(log n) equals what a walk
    of all its instances and leases finds (the brute-force reference)."""
    leases = list(registry.leases.values())
    instances = list(registry.instances.values())
    for job in {lease.job for lease in leases} | set(JOBS):
        assert registry.leases_of_job(job) == [lease for lease in leases if lease.job == job]
    for uid in {lease.uid for lease in leases} | set(UID_CHOICES):
        assert registry.leases_of_uid(uid) == [lease for lease in leases if lease.uid == uid]
    by_owner: dict[int, list[str]] = {}
    for lease in leases:
        if lease.owner is not None:
            by_owner.setdefault(lease.owner, []).append(lease.token)
    assert {owner: list(tokens) for owner, tokens in registry._index.by_owner.items()} == by_owner
    watching: dict[int, set[str]] = {}
    for instance in instances:
        for connection in instance.watchers:
            watching.setdefault(connection, set()).add(instance.id)
    assert {c: set(ids) for c, ids in registry._watching.items()} == watching
    assert registry._successor == {i.waiting_for: i.id for i in instances if i.waiting_for is not None}
    for adapter in {i.adapter for i in instances} | set(ADAPTERS):
        assert registry.count_instances(adapter) == sum(1 for i in instances if i.adapter == adapter and not i.tree_gone)
    assert registry.count_live() == sum(1 for i in instances if i.state in (State.STARTING, State.RUNNING, State.LINGERING))
    assert registry.instances_by_adapter() == dict(collections.Counter(i.adapter for i in instances if not i.tree_gone))
    assert registry.leases_by_adapter() == dict(collections.Counter(lease.adapter for lease in leases))
    deadlines = [lease.deadline for lease in leases if lease.deadline is not None]
    deadlines += [i.linger_until for i in instances if i.state is State.LINGERING and i.linger_until is not None]
    assert registry.next_deadline() == min(deadlines, default=None)


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    registry = make_registry()
    shell = Shell(registry, rng)
    shell.check()
    shutdown_at = rng.randrange(300) if seed % 4 == 3 else None
    for step in range(300):
        if step == shutdown_at:
            shell.do_shutdown()
        shell.step()
    shell.drain()
    # The walk reached the interesting states at least once across the run.
    assert shell.ever_spawned


def test_a_lease_past_its_expiry_cannot_be_renewed_before_the_tick() -> None:
    registry = make_registry()
    acquired = acquire(registry, detach=True, ttl=5.0, now=0.0)
    with pytest.raises(UnknownLease):
        registry.renew(acquired.lease.token, uid=acquired.lease.uid, now=5.0)
    assert registry.tick(5.0).expired_leases == [acquired.lease.token]


# -- adoption after a crash, and resume ------------------------------------------

from supervisor.core.registry import AdoptedInstance, AdoptedLease  # noqa: E402

GRACE = 30.0


def adopted(*leases: AdoptedLease, id: str = "old-1", linger: float = 0.0, linger_until: float | None = None):
    return AdoptedInstance(
        id=id, job=JOB, adapter=ADAPTER, params=(("workdir", "/w"),), pid=777, started_at=5.0,
        linger=linger, linger_until=linger_until, leases=tuple(leases),
    )


def test_an_adopted_instance_runs_with_its_id_pid_and_leases_held_by_nobody() -> None:
    registry = make_registry()
    detached = AdoptedLease("tok-d", uid=UID, detached=True, ttl=600.0, expires_at=700.0)
    bound = AdoptedLease("tok-b", uid=UID, detached=False)
    assert registry.adopt(adopted(detached, bound), now=100.0, resume_grace=GRACE) == []
    instance = registry.instances["old-1"]
    assert (instance.state, instance.pid, instance.started_at, instance.adopted) == (State.RUNNING, 777, 5.0, True)
    assert registry.live_instance(JOB, ADAPTER) is instance and instance.refcount == 2
    assert registry.lease("tok-d").expires_at == 700.0 and registry.lease("tok-d").owner is None
    assert registry.lease("tok-b").resume_by == 100.0 + GRACE and registry.lease("tok-b").owner is None
    assert registry.next_deadline() == 100.0 + GRACE
    # A new acquire of the pair joins the adopted instance.
    joined = acquire(registry, now=101.0, params={"workdir": "/w"})
    assert joined.instance is instance and joined.actions == [] and instance.refcount == 3


def test_a_bound_lease_nobody_resumes_is_released_after_the_grace_as_on_a_disconnect() -> None:
    registry = make_registry()
    registry.adopt(adopted(AdoptedLease("tok-b", uid=UID, detached=False)), now=100.0, resume_grace=GRACE)
    assert registry.tick(100.0 + GRACE - 0.001).actions == []
    ticked = registry.tick(100.0 + GRACE)
    assert ticked.unresumed_leases == ["tok-b"] and ticked.expired_leases == []
    assert ticked.actions == [StopTree("old-1", Reason.RELEASED)]
    assert registry.lease("tok-b") is None and registry.instances["old-1"].state is State.STOPPING


def test_resume_binds_waiting_leases_of_the_same_uid_or_root_and_says_which() -> None:
    registry = make_registry()
    registry.adopt(adopted(
        AdoptedLease("tok-1", uid=UID, detached=False),
        AdoptedLease("tok-2", uid=OTHER_UID, detached=False),
        AdoptedLease("tok-d", uid=UID, detached=True, ttl=600.0, expires_at=700.0),
    ), now=100.0, resume_grace=GRACE)
    result = registry.resume(["tok-1", "tok-2", "tok-d", "nope", "tok-1"], connection=9, uid=UID)
    assert result.resumed == ["tok-1"]
    assert result.not_resumed == ["tok-2", "tok-d", "nope", "tok-1"]
    assert registry.lease("tok-1").owner == 9 and registry.lease("tok-1").resume_by is None
    assert registry.resume(["tok-2"], connection=3, uid=ROOT).resumed == ["tok-2"]
    # Resumed leases are bound again: no deadline, released with their connection.
    assert registry.tick(100.0 + GRACE).unresumed_leases == []
    assert registry.instances["old-1"].refcount == 3
    registry.connection_closed(9, now=200.0)
    assert registry.lease("tok-1") is None and registry.lease("tok-2") is not None


def test_an_adopted_detached_lease_past_its_expiry_expires_at_the_next_tick() -> None:
    registry = make_registry()
    registry.adopt(adopted(AdoptedLease("tok-d", uid=UID, detached=True, ttl=10.0, expires_at=90.0)),
                   now=100.0, resume_grace=GRACE)
    ticked = registry.tick(100.0)
    assert ticked.expired_leases == ["tok-d"]
    assert ticked.actions == [StopTree("old-1", Reason.LEASE_EXPIRED)]


def test_an_adopted_instance_without_leases_lingers_out_or_stops() -> None:
    registry = make_registry()
    registry.adopt(adopted(linger=10.0, linger_until=105.0), now=100.0, resume_grace=GRACE)
    assert registry.instances["old-1"].state is State.LINGERING and registry.next_deadline() == 105.0
    assert registry.tick(105.0).actions == [StopTree("old-1", Reason.RELEASED)]
    other = make_registry()
    assert other.adopt(adopted(linger=10.0, linger_until=90.0), now=100.0, resume_grace=GRACE) == [
        StopTree("old-1", Reason.RELEASED)
    ]


def test_adopting_a_taken_id_pair_or_token_changes_nothing() -> None:
    registry = make_registry()
    acquired = running(registry, params={"workdir": "/w"})
    before = copy.deepcopy((registry.instances, registry.leases))
    with pytest.raises(Conflict):
        registry.adopt(adopted(id="other"), now=1.0, resume_grace=GRACE)  # the pair is live
    with pytest.raises(Conflict):
        registry.adopt(adopted(AdoptedLease(acquired.lease.token, uid=UID, detached=False), id=acquired.instance.id),
                       now=1.0, resume_grace=GRACE)
    fresh = make_registry()
    with pytest.raises(Conflict):
        fresh.adopt(adopted(AdoptedLease("t", uid=UID, detached=False), AdoptedLease("t", uid=UID, detached=False)),
                    now=1.0, resume_grace=GRACE)
    assert fresh.instances == {} and fresh.leases == {}
    assert (registry.instances, registry.leases) == before


def test_an_adopted_root_seen_gone_without_a_status_ends_the_instance_as_exited() -> None:
    registry = make_registry()
    registry.adopt(adopted(AdoptedLease("tok-b", uid=UID, detached=False)), now=100.0, resume_grace=GRACE)
    registry.resume(["tok-b"], connection=4, uid=UID)
    actions = registry.root_exited("old-1", returncode=None, now=101.0)
    assert actions[0] == StopTree("old-1", Reason.EXITED)
    notify = actions[1]
    assert isinstance(notify, NotifyExited) and notify.returncode is None and notify.connections == (4,)


# -- restore: what an in-place upgrade hands over ---------------------------------


def restored(registry: Registry) -> Registry:
    return Registry.restore(
        copy.deepcopy(list(registry.instances.values())), copy.deepcopy(list(registry.leases.values())),
        closed=registry.closed, new_token=Numbered("after"), new_instance_id=Numbered("after-inst"),
    )


def indexes(registry: Registry) -> tuple[object, ...]:
    return (
        registry._live, registry._dying, registry._deadlines.as_dict(), registry._index.by_job, registry._index.by_owner,
        registry._index.by_uid, registry._watching, registry._successor, registry._holding, registry.closed,
    )


def test_a_restored_registry_has_the_same_indexes_and_behaves_the_same() -> None:
    registry = make_registry()
    running(registry, job="a", detach=True, ttl=50.0)
    lingering = running(registry, job="b", linger=30.0)
    registry.release(lingering.lease.token, connection=1, uid=UID, now=1.0)
    stopping = running(registry, job="c")
    registry.release(stopping.lease.token, connection=1, uid=UID, now=1.0)
    waiting = acquire(registry, job="c", now=2.0)  # waits for the stopping tree of job c
    assert waiting.actions == []
    exited = running(registry, job="d")
    registry.root_exited(exited.instance.id, returncode=3, now=3.0)
    registry.adopt(adopted(AdoptedLease("tok-b", uid=UID, detached=False), id="old-1"), now=4.0, resume_grace=GRACE)
    copy_ = restored(registry)
    assert indexes(copy_) == indexes(registry)
    assert copy_.instances == registry.instances and copy_.leases == registry.leases
    # The same operations give the same answers on both.
    assert copy_.next_deadline() == registry.next_deadline() == 31.0  # the linger of job b
    assert registry.tick(60.0) == copy_.tick(60.0)
    assert registry.tree_gone(stopping.instance.id, now=61.0) == copy_.tree_gone(stopping.instance.id, now=61.0)
    assert indexes(copy_) == indexes(registry)


def test_restore_refuses_pieces_that_do_not_fit() -> None:
    registry = make_registry()
    acquired = running(registry)
    instance, lease = copy.deepcopy(acquired.instance), copy.deepcopy(acquired.lease)
    with pytest.raises(ValueError):
        Registry.restore([instance], [])  # the instance names a lease not given
    with pytest.raises(ValueError):
        Registry.restore([], [lease])  # a lease of no instance
    twin = copy.deepcopy(instance)
    twin.id = "twin"
    twin.leases = set()
    with pytest.raises(ValueError):
        Registry.restore([instance, twin], [lease])  # two live instances of one pair


def test_an_instance_belongs_to_the_uid_that_spawned_it() -> None:
    registry = make_registry()
    first = acquire(registry, uid=UID)
    assert first.instance.uid == UID
    before = snapshot(registry)
    with pytest.raises(PermissionDenied, match=f"belongs to uid {UID}"):
        acquire(registry, uid=OTHER_UID, connection=2)
    assert snapshot(registry) == before  # refused before anything changed
    assert acquire(registry, uid=UID, connection=3).instance.id == first.instance.id
    assert acquire(registry, uid=ROOT, connection=4).instance.id == first.instance.id
    # Root's own instances are root's alone.
    root_owned = acquire(registry, job="job-2", uid=ROOT)
    with pytest.raises(PermissionDenied):
        acquire(registry, job="job-2", uid=UID)
    assert root_owned.instance.uid == ROOT
