"""What the registry holds, and the indexes that keep each of its operations
O(1) or O(log n) in it: instances by id, the live instance of each
(job, adapter) pair, the dying tree each pair waits for and the successor
waiting for it, the instances each connection watches, the instances that
hold processes by adapter, leases (`LeaseIndex`) and one heap of deadlines
(`Deadlines`). `restore` derives them all from instances and leases.

`RegistryIndexes` is the base of `Registry` (core/registry.py), which holds
every lifecycle rule and reads and changes these as its rules say.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Self

from supervisor.core.deadlines import Deadlines
from supervisor.core.leaseindex import LeaseIndex, discard_from
from supervisor.core.states import LIVE_STATES, Instance, Lease, State, new_instance_id, new_token

# The two kinds of deadline in one heap, as the first half of its key: at
# equal times, leases expire before lingering instances stop.
LEASE_DEADLINE = 0
LINGER_DEADLINE = 1


class RegistryIndexes:
    """The instances and leases of a `Registry` and their indexes, with the
    queries they answer (never used alone)."""

    def __init__(
        self,
        *,
        new_token: Callable[[], str] = new_token,
        new_instance_id: Callable[[], str] = new_instance_id,
    ) -> None:
        self._new_token = new_token
        self._new_instance_id = new_instance_id
        self.instances: dict[str, Instance] = {}
        self._index = LeaseIndex()
        # Every lease held, by token (the index's own dict: read-only outside).
        self.leases: dict[str, Lease] = self._index.by_token
        self._live: dict[tuple[str, str], str] = {}
        # Instances whose tree is being stopped (STOPPING, or EXITED and not yet
        # reaped whole), by pair: a new instance of the pair waits for it.
        self._dying: dict[tuple[str, str], str] = {}
        # Set by `shutdown`: no new instance starts after it.
        self.closed = False
        # Grows whenever anything `status` or the state record shows changes:
        # an instance's revision (see `Instance.revision`), or which instances
        # there are. Equal values mean nothing they show changed in between.
        self.version = 0
        # Every deadline `tick` keeps: (LEASE_DEADLINE, token) of detached
        # leases and of leases waiting for `resume`, (LINGER_DEADLINE, id) of
        # LINGERING instances.
        self._deadlines: Deadlines[tuple[int, str]] = Deadlines()
        # Instances each connection watches (see `Instance.watchers`).
        self._watching: dict[int, dict[str, None]] = {}
        # The STARTING instance waiting for each dying tree, by the dying id.
        self._successor: dict[str, str] = {}
        # Instances that hold or may soon hold processes (tree not gone), by adapter.
        self._holding: collections.Counter[str] = collections.Counter()

    @classmethod
    def restore(
        cls,
        instances: Iterable[Instance],
        leases: Iterable[Lease],
        *,
        closed: bool = False,
        new_token: Callable[[], str] = new_token,
        new_instance_id: Callable[[], str] = new_instance_id,
    ) -> Self:
        """A registry holding exactly these instances and leases (as another
        registry had them: an in-place upgrade hands them over). The indexes
        are derived from their states. Raises ValueError if they do not fit
        together (a lease of an unknown instance, an instance naming a lease
        that is not given, two live instances of one pair)."""
        registry = cls(new_token=new_token, new_instance_id=new_instance_id)
        registry.closed = closed
        for instance in instances:
            registry.instances[instance.id] = instance
            if instance.state in LIVE_STATES:
                if instance.key in registry._live:
                    raise ValueError(f"two live instances of {instance.key}")
                registry._live[instance.key] = instance.id
            elif not instance.tree_gone:
                registry._dying[instance.key] = instance.id
            if instance.state is State.LINGERING and instance.linger_until is not None:
                registry._deadlines.set((LINGER_DEADLINE, instance.id), instance.linger_until)
            if instance.waiting_for is not None:
                registry._successor[instance.waiting_for] = instance.id
            if not instance.tree_gone:
                registry._holding[instance.adapter] += 1
            for connection in instance.watchers:
                registry._watching.setdefault(connection, {})[instance.id] = None
        for lease in leases:
            instance = registry.instances.get(lease.instance_id)
            if instance is None or lease.token not in instance.leases:
                raise ValueError(f"lease {lease.token[:8]} does not belong to a given instance")
            registry._add_lease(lease)
        for instance in registry.instances.values():
            if not instance.leases <= registry.leases.keys():
                raise ValueError(f"instance {instance.id} names leases that are not given")
        return registry

    # -- queries -------------------------------------------------------------

    def live_instance(self, job: str, adapter: str) -> Instance | None:
        instance_id = self._live.get((job, adapter))
        return self.instances[instance_id] if instance_id else None

    def lease(self, token: str) -> Lease | None:
        return self.leases.get(token)

    def acquire_waits(self, job: str, adapter: str) -> bool:
        """Whether an acquire of the pair now would have to wait: for the spawn
        of its live instance (still STARTING), or, with none live, for the stop
        of the pair's previous tree."""
        instance = self.live_instance(job, adapter)
        if instance is not None:
            return instance.state is State.STARTING
        return (job, adapter) in self._dying

    def count_instances(self, adapter: str) -> int:
        """Instances of `adapter` that hold or may soon hold processes."""
        return self._holding[adapter]

    def instances_by_adapter(self) -> dict[str, int]:
        """`count_instances` of every adapter that has any (a copy)."""
        return dict(self._holding)

    def leases_by_adapter(self) -> dict[str, int]:
        """How many leases each adapter that has any has (a copy)."""
        return dict(self._index.count_by_adapter)

    def count_live(self) -> int:
        """Live instances (STARTING, RUNNING or LINGERING): one per pair at most."""
        return len(self._live)

    def leases_of_job(self, job: str) -> list[Lease]:
        """Every lease of `job`, in the order they were taken."""
        return self._index.of_job(job)

    def leases_of_uid(self, uid: int) -> list[Lease]:
        """Every lease taken by `uid`, in the order they were taken."""
        return self._index.of_uid(uid)

    def next_deadline(self) -> float | None:
        """The earliest time at which `tick` has something to do, or None."""
        return self._deadlines.earliest()

    # -- keeping the indexes ----------------------------------------------

    def _unique_instance_id(self) -> str:
        while True:
            instance_id = self._new_instance_id()
            if instance_id not in self.instances:
                return instance_id

    def _touch(self, instance: Instance) -> None:
        """Note a change to `instance` or one of its leases (see `version`)."""
        instance.revision += 1
        self.version += 1

    def _add_lease(self, lease: Lease) -> None:
        """Hold a lease (its instance already names it) and index it."""
        self._touch(self.instances[lease.instance_id])
        self._index.add(lease)
        if lease.deadline is not None:
            self._deadlines.set((LEASE_DEADLINE, lease.token), lease.deadline)

    def _remove_lease(self, lease: Lease) -> None:
        """Forget a lease and every index entry of it (not its instance's)."""
        self._touch(self.instances[lease.instance_id])
        self._index.remove(lease)
        self._deadlines.discard((LEASE_DEADLINE, lease.token))

    def _release_key(self, instance: Instance) -> None:
        if self._live.get(instance.key) == instance.id:
            del self._live[instance.key]

    def _discard_leases(self, instance: Instance) -> None:
        for token in instance.leases:
            self._remove_lease(self.leases[token])
        instance.leases.clear()

    def _mark_tree_gone(self, instance: Instance) -> None:
        if not instance.tree_gone:
            self._touch(instance)
            instance.tree_gone = True
            self._holding[instance.adapter] -= 1
            if not self._holding[instance.adapter]:
                del self._holding[instance.adapter]

    def _remove(self, instance: Instance) -> None:
        """Drop an instance the registry is done with (its leases are gone)."""
        del self.instances[instance.id]
        self.version += 1
        for connection in instance.watchers:
            discard_from(self._watching, connection, instance.id)
        if instance.waiting_for is not None and self._successor.get(instance.waiting_for) == instance.id:
            del self._successor[instance.waiting_for]

    def _forget(self, instance: Instance) -> None:
        """Drop an instance that never had a tree, or whose spawn failed."""
        self._release_key(instance)
        self._mark_tree_gone(instance)
        self._remove(instance)
