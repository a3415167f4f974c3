"""The registry of instances and leases: every lifecycle rule, and nothing else.

This module is the pure core of the daemon. It knows no trio, no psutil, no clock
and no logger: each operation takes plain values (including ``now``) and returns
what the I/O shell must do next as small frozen action objects. It is only ever
called from the trio thread, so it needs no locks; it is tested synchronously.

Instance life::

    STARTING --spawned--> RUNNING --last lease gone--> LINGERING --linger over--> STOPPING --tree_gone--> (removed)
       |                    |  ^                           |                         ^
       |                    |  +------ acquire ------------+                         |
       |                    +--- last lease gone, linger == 0 -----------------------+
       |                    +--- root_exited / terminate --> EXITED --tree_gone, no leases--> (removed)
       +--spawn_failed--> (removed, its leases dropped)

At most one instance per ``(job, adapter)`` is *live* (STARTING, RUNNING or
LINGERING). A new instance for a pair whose previous tree is still being stopped
waits in STARTING until that tree is gone, so two trees of one pair never run at
once.

Cost: every operation is O(1) or O(log n) in the instances and leases held,
apart from what it must touch (the leases of the job released, of the
connection closed; the instances `shutdown` stops). Indexes by pair, job,
connection, uid and adapter, the successor waiting for each dying tree, and one
heap of deadlines (`Deadlines`) keep it so; they and `restore`, which derives
them all, are `registryindexes.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from supervisor.core.actions import (
    Acquired,
    Action,
    AdoptedInstance,
    AdoptedLease,
    InstanceSettled,
    JobReleased,
    NotifyExited,
    Released,
    Resumed,
    Spawn,
    StopTree,
    Ticked,
)
from supervisor.core.errors import (
    Conflict,
    InvalidParams,
    LimitReached,
    PermissionDenied,
    ShuttingDown,
    UnknownLease,
)
from supervisor.core.registryindexes import LEASE_DEADLINE, LINGER_DEADLINE, RegistryIndexes
from supervisor.core.states import (
    INSTANCE_ID_BYTES,
    LEASE_TOKEN_BYTES,
    LIVE_STATES,
    ROOT_UID,
    Instance,
    Lease,
    Reason,
    State,
    new_instance_id,
    new_token,
)

# The state types and actions live in their own modules; they are importable
# from here too, as the registry's vocabulary.
__all__ = [
    "INSTANCE_ID_BYTES", "LEASE_TOKEN_BYTES", "LIVE_STATES", "ROOT_UID",
    "Acquired", "Action", "AdoptedInstance", "AdoptedLease", "Instance", "InstanceSettled",
    "JobReleased", "Lease", "NotifyExited", "Reason", "Registry", "Released", "Resumed",
    "Spawn", "State", "StopTree", "Ticked", "new_instance_id", "new_token",
]


class Registry(RegistryIndexes):
    """Instances keyed by (job, adapter) and the leases that hold them.

    Every method runs to completion without waiting; none raises for a state it
    can be in, only for a client's mistake (unknown lease, permission, limits,
    conflicting params), and a method that raises has changed nothing.
    """

    # -- client operations ---------------------------------------------------

    def acquire(
        self,
        *,
        job: str,
        adapter: str,
        connection: int,
        uid: int,
        now: float,
        params: Mapping[str, str] | None = None,
        detach: bool = False,
        ttl: float | None = None,
        linger: float = 0.0,
        max_instances: int | None = None,
    ) -> Acquired:
        """Take a lease on the live instance of (job, adapter), creating it if needed.

        Raises `ShuttingDown` after `shutdown`, `Conflict` when a live instance runs
        with other params, `PermissionDenied` when it belongs to another uid
        (root may join any), `LimitReached` when a new instance would pass
        `max_instances`, `InvalidParams` for a detached lease without a ttl.
        """
        if self.closed:
            raise ShuttingDown("the daemon is shutting down and starts no new leases")
        if detach and ttl is None:
            raise InvalidParams("a detached lease needs a ttl (seconds)")
        frozen_params = tuple(sorted((params or {}).items()))
        actions: list[Action] = []
        instance = self.live_instance(job, adapter)
        spawned = False
        if instance is not None:
            if instance.uid is not None and uid not in (ROOT_UID, instance.uid):
                raise PermissionDenied(
                    f"instance {instance.id} of adapter {adapter!r} for job {job!r} belongs to uid {instance.uid}; "
                    "another uid cannot join it (use a job id of your own)"
                )
            if instance.params != frozen_params:
                raise Conflict(
                    f"instance {instance.id} of adapter {adapter!r} for job {job!r} is running "
                    f"with params {dict(instance.params)}; release it before asking for {dict(frozen_params)}"
                )
            if instance.state is State.LINGERING:
                self._touch(instance)
                instance.state = State.RUNNING
                instance.linger_until = None
                self._deadlines.discard((LINGER_DEADLINE, instance.id))
        else:
            if max_instances is not None and self.count_instances(adapter) >= max_instances:
                raise LimitReached(
                    f"adapter {adapter!r} already has {max_instances} instances (its max_instances); "
                    "release some or raise the limit"
                )
            instance = Instance(
                id=self._unique_instance_id(),
                job=job,
                adapter=adapter,
                params=frozen_params,
                state=State.STARTING,
                linger=linger,
                waiting_for=self._dying.get((job, adapter)),
                uid=uid,
            )
            self.instances[instance.id] = instance
            self.version += 1
            self._live[instance.key] = instance.id
            self._holding[adapter] += 1
            spawned = True
            if instance.waiting_for is None:
                actions.append(Spawn(instance.id))
            else:
                self._successor[instance.waiting_for] = instance.id
        lease = Lease(
            token=self._new_token(),
            instance_id=instance.id,
            job=job,
            adapter=adapter,
            uid=uid,
            owner=connection,
            detached=detach,
            ttl=ttl if detach else None,
            expires_at=now + ttl if detach and ttl is not None else None,
        )
        instance.leases.add(lease.token)
        self._add_lease(lease)
        return Acquired(lease=lease, instance=instance, spawned=spawned, actions=actions)

    def release(self, token: str, *, connection: int, uid: int, now: float) -> Released:
        """Drop one lease. Raises `UnknownLease`, or `PermissionDenied` for a lease
        held by another connection of another uid (root may release anything)."""
        lease = self._lease_or_raise(token)
        if lease.owner != connection:
            self._check_may_touch(lease, uid)
        instance = self.instances[lease.instance_id]
        actions = self._drop_lease(lease, now, by_other=lease.owner != connection, reason=Reason.RELEASED)
        return Released(
            refcount=instance.refcount,
            stopping=instance.state in (State.STOPPING, State.EXITED) or instance.id not in self.instances,
            actions=actions,
        )

    def renew(self, token: str, *, uid: int, now: float, ttl: float | None = None) -> float:
        """Push a detached lease's expiry to now + ttl (default: its own ttl); returns it.

        Raises `UnknownLease` for a lease that does not exist or is due for expiry,
        `PermissionDenied` for a lease of another uid (unless root), `InvalidParams`
        for a lease bound to its connection.
        """
        lease = self._lease_or_raise(token)
        self._check_may_touch(lease, uid)
        if lease.expires_at is not None and lease.expires_at <= now:
            # Due for expiry; `tick` releases it. Renewing it now would race that.
            raise UnknownLease("the lease has expired; acquire a new one")
        if not lease.detached:
            raise InvalidParams(
                f"lease {token[:6]}… is bound to its connection and does not expire; only detached leases renew"
            )
        self._touch(self.instances[lease.instance_id])
        lease.ttl = ttl if ttl is not None else lease.ttl
        assert lease.ttl is not None
        lease.expires_at = now + lease.ttl
        self._deadlines.set((LEASE_DEADLINE, token), lease.expires_at)
        return lease.expires_at

    def release_job(self, job: str, *, connection: int, uid: int, now: float) -> JobReleased:
        """Drop every lease of `job`, whoever holds it.

        All or nothing: if any lease belongs to another uid and the caller is not
        root, `PermissionDenied` is raised and nothing is released.
        """
        leases = self.job_leases_for(job, uid=uid)
        actions: list[Action] = []
        instance_ids: dict[str, None] = {}
        for lease in leases:
            instance_ids[lease.instance_id] = None
            actions += self._drop_lease(lease, now, by_other=lease.owner != connection, reason=Reason.RELEASED)
        return JobReleased(released=len(leases), instances=list(instance_ids), actions=actions)

    def job_leases_for(self, job: str, *, uid: int) -> list[Lease]:
        """The leases of `job`, if `uid` may release every one of them (root,
        or the uid of each); else raises `PermissionDenied`. Changes nothing:
        the rule `release_job` applies, for a caller that releases them
        one at a time."""
        leases = self.leases_of_job(job)
        for lease in leases:
            self._check_may_touch(lease, uid)
        return leases

    def connection_closed(self, connection: int, *, now: float) -> list[Action]:
        """Release every lease bound to `connection`; its detached leases live on."""
        actions: list[Action] = []
        for lease in self.connection_gone(connection):
            actions += self.let_go(lease, connection, now=now)
        return actions

    def connection_gone(self, connection: int) -> list[Lease]:
        """`connection` has closed: it watches nothing from now on (a stop its
        close causes must not notify it). Returns the leases it owns, for
        `let_go` one at a time; `connection_closed` does both at once."""
        for instance_id in self._watching.pop(connection, ()):
            self.instances[instance_id].watchers.discard(connection)
        return self._index.of_owner(connection)

    def let_go(self, lease: Lease, connection: int, *, now: float) -> list[Action]:
        """What becomes of a lease of the closed `connection`: a bound one is
        released, a detached one lives on with no owner. Nothing for a lease
        gone meanwhile (released, expired) or owned by another connection now."""
        if self.leases.get(lease.token) is not lease or lease.owner != connection:
            return []
        if lease.detached:
            self._touch(self.instances[lease.instance_id])
            self._index.set_owner(lease, None)
            return []
        return self._drop_lease(lease, now, by_other=False, reason=Reason.RELEASED)

    # -- feedback from the shell ---------------------------------------------

    def spawned(self, instance_id: str, *, pid: int, now: float) -> list[Action]:
        """The root of a STARTING instance runs as `pid`.

        Only for an instance this registry asked to spawn; any other id is a bug
        in the shell and fails (KeyError, AssertionError).
        """
        instance = self.instances[instance_id]
        assert instance.state is State.STARTING, instance.state
        self._touch(instance)
        instance.state = State.RUNNING
        instance.pid = pid
        instance.started_at = now
        actions: list[Action] = [InstanceSettled(instance_id, running=True)]
        if self.closed:
            actions += self._end(instance, Reason.SHUTDOWN)
        elif not instance.leases:
            # Every acquirer went away while the root was starting.
            actions += self._last_lease_gone(instance, now)
        return actions

    def spawn_failed(self, instance_id: str) -> list[Action]:
        """The root of a STARTING instance could not be started: forget it and its leases.

        Only for an instance this registry asked to spawn, as for `spawned`.
        """
        instance = self.instances[instance_id]
        assert instance.state is State.STARTING, instance.state
        self._discard_leases(instance)
        self._forget(instance)
        return [InstanceSettled(instance_id, running=False)]

    def root_exited(self, instance_id: str, *, returncode: int | None, now: float) -> list[Action]:
        """The root process was reaped (or, for an adopted root the daemon is
        not the parent of, seen gone: `returncode` None). Unless we were
        stopping it, that is the end of the instance: reap the rest of its
        tree and tell its holders."""
        instance = self.instances.get(instance_id)
        if instance is None:
            return []
        self._touch(instance)
        instance.returncode = returncode
        if instance.state in (State.STOPPING, State.EXITED):
            return []
        reason = Reason.KILLED if returncode is not None and returncode < 0 else Reason.EXITED
        return self._end(instance, reason)

    def terminate(self, instance_id: str, *, reason: Reason) -> list[Action]:
        """End a live instance from outside the lease rules (memory limit, sweep, shutdown).

        Holders keep their leases (releasing them later succeeds) and are told.
        """
        instance = self.instances.get(instance_id)
        if instance is None or instance.state not in (State.RUNNING, State.LINGERING):
            return []
        return self._end(instance, reason)

    def tree_gone(self, instance_id: str, *, now: float) -> list[Action]:
        """No process of the instance's tree is left. Frees the pair for a waiting successor."""
        instance = self.instances.get(instance_id)
        if instance is None:
            return []
        self._mark_tree_gone(instance)
        if self._dying.get(instance.key) == instance_id:
            del self._dying[instance.key]
        if instance.state is State.STOPPING or not instance.leases:
            self._remove(instance)
        successor_id = self._successor.pop(instance_id, None)
        if successor_id is None:
            return []
        successor = self.instances[successor_id]
        self._touch(successor)
        successor.waiting_for = None
        return [Spawn(successor_id)]

    def tick(self, now: float) -> Ticked:
        """Expire detached leases, drop leases nobody resumed in time (as a
        disconnect would), and end lingering past their linger."""
        expired: list[str] = []
        unresumed: list[str] = []
        actions: list[Action] = []
        # Earliest first. Nothing a drop or a stop does here is due by `now`
        # (a new linger ends after it), so this ends.
        while (due := self._deadlines.pop_due(now)) is not None:
            kind, key = due
            if kind == LINGER_DEADLINE:
                instance = self.instances[key]
                assert instance.state is State.LINGERING, instance.state
                actions += self._stop(instance, Reason.RELEASED)
                continue
            lease = self.leases[key]
            if lease.resume_by is not None:
                unresumed.append(lease.token)
                actions += self._drop_lease(lease, now, by_other=False, reason=Reason.RELEASED)
            else:
                expired.append(lease.token)
                actions += self._drop_lease(lease, now, by_other=True, reason=Reason.LEASE_EXPIRED)
        return Ticked(expired_leases=expired, actions=actions, unresumed_leases=unresumed)

    def adopt(self, adopted: AdoptedInstance, *, now: float, resume_grace: float) -> list[Action]:
        """Take back an instance of a previous incarnation whose tree still
        runs, after a crash: RUNNING (or LINGERING, if it was and its linger is
        not over) with its id, job, adapter, params, pid and leases. Detached
        leases keep their expiry (one already past expires at the next
        `tick`); bound leases wait, held by no connection, until
        `now + resume_grace` for `resume`. An adopted instance with no lease
        lingers out or stops as a released one would.

        Raises `Conflict` (nothing changed) if its id or its (job, adapter)
        pair is already taken, or a lease token is.
        """
        if adopted.id in self.instances or (adopted.job, adopted.adapter) in self._live:
            raise Conflict(f"instance {adopted.id} (job {adopted.job!r}, adapter {adopted.adapter!r}) is already known")
        taken = [lease.token for lease in adopted.leases if lease.token in self.leases]
        if taken or len({lease.token for lease in adopted.leases}) != len(adopted.leases):
            raise Conflict(f"instance {adopted.id} has lease tokens already in use")
        instance = Instance(
            id=adopted.id,
            job=adopted.job,
            adapter=adopted.adapter,
            params=adopted.params,
            state=State.RUNNING,
            linger=adopted.linger,
            pid=adopted.pid,
            started_at=adopted.started_at,
            adopted=True,
            uid=adopted.uid,
        )
        self.instances[instance.id] = instance
        self.version += 1
        self._live[instance.key] = instance.id
        self._holding[instance.adapter] += 1
        for recorded in adopted.leases:
            lease = Lease(
                token=recorded.token,
                instance_id=instance.id,
                job=instance.job,
                adapter=instance.adapter,
                uid=recorded.uid,
                owner=None,
                detached=recorded.detached,
                ttl=recorded.ttl if recorded.detached else None,
                expires_at=recorded.expires_at if recorded.detached else None,
                resume_by=None if recorded.detached else now + resume_grace,
            )
            instance.leases.add(lease.token)
            self._add_lease(lease)
        if instance.leases:
            return []
        if adopted.linger_until is not None and adopted.linger_until > now:
            instance.state = State.LINGERING
            instance.linger_until = adopted.linger_until
            self._deadlines.set((LINGER_DEADLINE, instance.id), adopted.linger_until)
            return []
        return self._stop(instance, Reason.RELEASED)

    def resume(self, tokens: Iterable[str], *, connection: int, uid: int) -> Resumed:
        """Bind to `connection` the leases among `tokens` that wait for their
        holder after a restart (see `adopt`) and that `uid` may hold (the
        acquirer's uid, or root). The rest are listed as not resumed: unknown,
        not waiting (detached, or bound to a live connection), or another
        uid's. Raises nothing."""
        resumed: list[str] = []
        not_resumed: list[str] = []
        for token in tokens:
            lease = self.leases.get(token)
            if lease is None or lease.resume_by is None or uid not in (ROOT_UID, lease.uid) or token in resumed:
                not_resumed.append(token)
                continue
            self._touch(self.instances[lease.instance_id])
            self._index.set_owner(lease, connection)
            lease.resume_by = None
            self._deadlines.discard((LEASE_DEADLINE, token))
            resumed.append(token)
        return Resumed(resumed=resumed, not_resumed=not_resumed)

    def shutdown(self) -> list[Action]:
        """Stop every instance that may hold processes (daemon shutdown).

        A root still being spawned is ended by `spawned` when it reports in.
        """
        self.closed = True
        actions: list[Action] = []
        for instance in list(self.instances.values()):
            if instance.state is State.STARTING and instance.waiting_for is not None:
                # Never spawned: nothing to stop.
                self._discard_leases(instance)
                self._forget(instance)
                actions.append(InstanceSettled(instance.id, running=False))
            elif instance.state in (State.RUNNING, State.LINGERING):
                actions += self._end(instance, Reason.SHUTDOWN)
        return actions

    # -- internals -----------------------------------------------------------

    def _lease_or_raise(self, token: str) -> Lease:
        lease = self.leases.get(token)
        if lease is None:
            raise UnknownLease(
                "no such lease: it was never issued, was already released, or expired"
            )
        return lease

    @staticmethod
    def _check_may_touch(lease: Lease, uid: int) -> None:
        if uid != ROOT_UID and uid != lease.uid:
            raise PermissionDenied(
                f"a lease of job {lease.job!r} is held by uid {lease.uid}; only that uid or root may release it"
            )

    def _drop_lease(self, lease: Lease, now: float, *, by_other: bool, reason: Reason) -> list[Action]:
        self._remove_lease(lease)
        instance = self.instances[lease.instance_id]
        instance.leases.discard(lease.token)
        if by_other and lease.owner is not None:
            instance.watchers.add(lease.owner)
            self._watching.setdefault(lease.owner, {})[instance.id] = None
        if instance.leases:
            return []
        return self._last_lease_gone(instance, now, reason)

    def _last_lease_gone(self, instance: Instance, now: float, reason: Reason = Reason.RELEASED) -> list[Action]:
        if instance.state is State.STARTING:
            if instance.waiting_for is not None:
                # Never spawned, and nobody wants it any more.
                self._forget(instance)
                return [InstanceSettled(instance.id, running=False)]
            return []  # `spawned` decides once the root is up.
        if instance.state is State.RUNNING:
            if instance.linger > 0:
                self._touch(instance)
                instance.state = State.LINGERING
                instance.linger_until = now + instance.linger
                self._deadlines.set((LINGER_DEADLINE, instance.id), instance.linger_until)
                return []
            return self._stop(instance, reason)
        if instance.state is State.EXITED and instance.tree_gone:
            self._remove(instance)
        return []

    def _begin_dying(self, instance: Instance, state: State, reason: Reason) -> None:
        """Leave the live states for STOPPING or EXITED: the pair is free for a
        successor, which waits until this tree is gone."""
        self._release_key(instance)
        self._touch(instance)
        instance.state = state
        instance.stop_reason = reason
        instance.linger_until = None
        self._deadlines.discard((LINGER_DEADLINE, instance.id))
        self._dying[instance.key] = instance.id

    def _stop(self, instance: Instance, reason: Reason) -> list[Action]:
        """RUNNING/LINGERING with no leases -> STOPPING."""
        self._begin_dying(instance, State.STOPPING, reason)
        actions: list[Action] = [StopTree(instance.id, reason)]
        if instance.watchers:
            actions.append(self._notify(instance, instance.watchers, reason))
        return actions

    def _end(self, instance: Instance, reason: Reason) -> list[Action]:
        """RUNNING/LINGERING -> EXITED: the tree goes, leases stay until released."""
        self._begin_dying(instance, State.EXITED, reason)
        holders = {self.leases[token].owner for token in instance.leases} | instance.watchers
        connections = {c for c in holders if c is not None}
        actions: list[Action] = [StopTree(instance.id, reason)]
        if connections:
            actions.append(self._notify(instance, connections, reason))
        return actions

    @staticmethod
    def _notify(instance: Instance, connections: Iterable[int], reason: Reason) -> NotifyExited:
        return NotifyExited(
            connections=tuple(sorted(connections)),
            instance_id=instance.id,
            job=instance.job,
            adapter=instance.adapter,
            pid=instance.pid,
            returncode=instance.returncode,
            reason=reason,
        )
