"""The lease operations of the engine's facade: `acquire` (and its `_now`
twin), `release`, `renew`, `release_job` and `resume`. Each asks the registry
what must happen and carries it out (`execute`). `LeaseOperations` is a base
class of `Engine`, whose state it works on (declared below), on the trio
thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio

from supervisor.core import protocol
from supervisor.core.config import AdapterConfig, Config
from supervisor.core.errors import Conflict, LimitReached, PermissionDenied, UnknownAdapter, UnknownLease
from supervisor.core.registry import ROOT_UID, Acquired, Action, Lease, Registry, State
from supervisor.engine.instances import AfterReply, Instances, run_after
from supervisor.engine.operation import Peer, Reply
from supervisor.engine.running import PendingSpawn
from supervisor.engine.stalls import STEP_BUDGET_S

if TYPE_CHECKING:
    from supervisor.engine.limitwatch import LimitWatch
    from supervisor.engine.metrics import Metrics
    from supervisor.engine.scans import ScanCache
    from supervisor.engine.staterecord import RecordKeeper

log = structlog.get_logger()

# A release_job of at most this many leases is answered in one turn (in the
# hub); a larger one over turns of STEP_BUDGET_S. The registry releases a
# lease in a few microseconds: 250 stay well under the 5 ms a request may
# hold the trio thread.
RELEASES_PER_TURN = 250


class LeaseOperations:
    """Acquiring and releasing leases, as part of `Engine` (see the module docstring)."""

    # Set up by `Engine.__init__`; `execute`, `now` and
    # `_deadlines_may_have_changed` are the engine's.
    config: Config
    registry: Registry
    instances: Instances
    scans: ScanCache
    limits: LimitWatch
    metrics: Metrics
    record: RecordKeeper
    execute: Callable[..., None]
    now: Callable[[], float]
    # Closed connections whose leases are being let go over turns.
    letting_go: int
    _deadlines_may_have_changed: Callable[[], None]

    def acquire_answers_now(self, params: protocol.AcquireParams) -> bool:
        """Whether `acquire_now` can answer: the instance is running, or the
        inline spawner starts it with no predecessor still stopping, no
        memory budget to measure first, and no client's groups to look up
        ("@peer")."""
        if self.registry.acquire_waits(params.job, params.adapter):
            return False
        if self.registry.live_instance(params.job, params.adapter) is not None:
            return True
        adapter = self.config.adapters.get(params.adapter)
        if adapter is not None and adapter.runs_as_peer:
            return False  # the client's groups are looked up first, off the thread
        return self.instances.spawner.inline and self.config.daemon.memory_budget is None

    def acquire_now(self, peer: Peer, params: protocol.AcquireParams) -> Reply:
        """An acquire that `acquire_answers_now`. Raises SupervisorError for
        the client's mistakes (having changed nothing)."""
        adapter = self._checked_adapter(peer, params)
        after: AfterReply = []
        acquired, refcount, pending = self._commit_acquire(peer, params, adapter, after)
        if pending is not None and not pending.settled.is_set():
            # Its root had not exec'd when the spawn returned: the lease is
            # taken, and the answer waits for the exec (not the thread).
            return Reply(None, later=partial(self._settled_reply, params, acquired, refcount, pending, after))
        return self._acquire_reply(params, acquired, refcount, pending, after)

    async def _settled_reply(
        self, params: protocol.AcquireParams, acquired: Acquired, refcount: int, pending: PendingSpawn,
        after: AfterReply,
    ) -> Reply:
        try:
            await pending.settled.wait()
        except BaseException:
            run_after(after)  # nobody will send the reply that would have run it
            raise
        return self._acquire_reply(params, acquired, refcount, pending, after)

    async def acquire(self, peer: Peer, params: protocol.AcquireParams, started: Callable[[], None]) -> Reply:
        """Take a lease, spawning the instance if none is live (concurrent
        acquires of one pair spawn one instance),
        and wait for its spawn to settle. Calls `started()` once the lease is
        taken, before any wait for the spawn, so that pipelined requests
        change state in arrival order. Raises SupervisorError: the client's
        mistakes (nothing changed), LimitReached, SpawnFailed, UnknownLease
        (released before its adapter started). Cancellation: raises Cancelled;
        a lease already taken stands, as if it had been answered."""
        adapter = self._checked_adapter(peer, params)
        if self.registry.live_instance(params.job, params.adapter) is None:
            await self._check_memory_budget(params.adapter)
            if adapter.runs_as_peer and self.instances.known_credentials(peer.uid, peer.gid) is None:
                await self.instances.look_up_credentials(peer.uid, peer.gid)
        after: AfterReply = []
        acquired, refcount, pending = self._commit_acquire(peer, params, adapter, after)
        started()
        if pending is not None and not pending.settled.is_set():
            # An inline spawn has settled already, inside execute (unless its
            # root had not exec'd yet): answering without a checkpoint sends
            # the reply before other tasks run.
            return await self._settled_reply(params, acquired, refcount, pending, after)
        return self._acquire_reply(params, acquired, refcount, pending, after)

    def _checked_adapter(self, peer: Peer, params: protocol.AcquireParams) -> AdapterConfig:
        """The acquire's adapter, once its params are known to be usable
        and `peer` may run it. Checked before any state changes, so that bad
        params leave nothing behind."""
        adapter = self.config.adapters.get(params.adapter)
        if adapter is None:
            known = ", ".join(sorted(self.config.adapters)) or "none"
            raise UnknownAdapter(f"no adapter named {params.adapter!r} is configured (known: {known})")
        daemon_uid = os.geteuid()
        if adapter.runs_as_peer and daemon_uid != ROOT_UID and peer.uid != daemon_uid:
            raise PermissionDenied(
                f'adapter {adapter.name!r} runs as the acquiring user (user = "@peer"), and this daemon runs as'
                f" uid {daemon_uid}, not root: it can run adapters only as itself, not as uid {peer.uid}"
                f" (acquire as uid {daemon_uid}, or run the daemon as root)"
            )
        if params.fds and adapter.stdio != "pipe":
            raise Conflict(f'adapter {adapter.name!r} has stdio = "{adapter.stdio}"; fds need stdio = "pipe"')
        adapter.render_argv(params.job, params.params)  # InvalidParams
        if params.fds:
            live = self.registry.live_instance(params.job, params.adapter)
            running = self.instances.running.get(live.id) if live is not None else None
            if running is not None and running.root.stdin_fd is None:
                raise self._no_pipes(live.id, adopted=running.adopted)
        return adapter

    @staticmethod
    def _no_pipes(instance_id: str, *, adopted: bool) -> Conflict:
        if adopted:
            return Conflict(
                f"instance {instance_id} was adopted after a crash of the daemon: its stdin and stdout "
                "pipes were lost with the previous incarnation (no file-descriptor store kept them: "
                "see FileDescriptorStoreMax= in the systemd unit); release it and acquire a new one"
            )
        return Conflict(f"instance {instance_id} has no pipes to pass (it is stopping)")

    def _commit_acquire(
        self, peer: Peer, params: protocol.AcquireParams, adapter: AdapterConfig, after: AfterReply
    ) -> tuple[Acquired, int, PendingSpawn | None]:
        """Take the lease and carry out what that starts. Returns the registry's
        answer, the refcount this acquire made (not whatever it is once a spawn is
        awaited), and the spawn to wait for, if the instance is still starting."""
        acquired = self.registry.acquire(
            job=params.job,
            adapter=params.adapter,
            connection=peer.id,
            uid=peer.uid,
            now=self.now(),
            params=params.params,
            detach=params.detach,
            ttl=params.ttl,
            linger=adapter.linger,
            max_instances=adapter.max_instances,
        )
        refcount = acquired.instance.refcount
        if acquired.spawned and adapter.runs_as_peer:
            self.instances.spawn_as_peer(acquired.instance.id, uid=peer.uid, gid=peer.gid)
        starting = acquired.instance.state is State.STARTING
        pending = self.instances.pending(acquired.instance.id) if starting else None
        self.execute(acquired.actions, after)
        self.record.mark_dirty()
        return acquired, refcount, pending

    def _acquire_reply(
        self,
        params: protocol.AcquireParams,
        acquired: Acquired,
        refcount: int,
        pending: PendingSpawn | None,
        after: AfterReply,
    ) -> Reply:
        """The acquire's answer once its instance's spawn has settled."""
        lease = acquired.lease
        if self.registry.lease(lease.token) is None:
            run_after(after)
            if pending is not None and pending.error is not None:
                raise pending.error
            raise UnknownLease("the lease was released (release_job or disconnect) before its adapter started")
        instance = self.registry.instances[lease.instance_id]
        result: dict[str, Any] = {
            "lease": lease.token,
            "instance": instance.id,
            "job": instance.job,
            "adapter": instance.adapter,
            "pid": instance.pid,
            "refcount": refcount,
            "spawned": acquired.spawned,
            "started_at": instance.started_at,
        }
        if lease.expires_at is not None:
            result["expires_at"] = lease.expires_at
        fds: tuple[int, ...] = ()
        if params.fds:
            pipes = self.instances.stdio_duplicates(instance.id)
            if pipes is None:
                # The lease was taken (its instance lost its pipes since, or
                # while it started): give it back, so the error changes nothing.
                run_after(after)
                released = self.registry.release(lease.token, connection=lease.owner or 0, uid=0, now=self.now())
                self.execute(released.actions)
                raise self._no_pipes(instance.id, adopted=instance.adopted)
            fds = pipes
        after.append(lambda: log.info(
            "lease.acquired", lease=lease.token[:8], instance=instance.id, job=instance.job,
            adapter=instance.adapter, refcount=refcount, detached=lease.detached,
        ))
        return Reply(result, fds, after)

    async def _check_memory_budget(self, adapter: str) -> None:
        """Raise LimitReached if the trees' total RSS is over `daemon.memory_budget`.
        Cancellation: may be cancelled while scanning; changes nothing."""
        budget = self.config.daemon.memory_budget
        if budget is None:
            return
        members = await self.scans.members()
        total = sum(sum(s.rss_bytes for s in stats) for stats in members.values())
        if total > budget:
            raise LimitReached(
                f"the adapter trees use {_mib(total)} of RSS, over the memory_budget of {_mib(budget)}; "
                f"no new instance of {adapter!r} starts until some are released"
            )

    def release(self, peer: Peer, params: protocol.ReleaseParams) -> Reply:
        """Give a lease back; at refcount zero the tree is stopped (after its
        linger). Raises UnknownLease, PermissionDenied."""
        lease = self.registry.lease(params.lease)
        released = self.registry.release(params.lease, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        self.record.mark_dirty()
        self.metrics.releases.inc("release")
        if lease is not None:
            log.info("lease.released", lease=params.lease[:8], instance=lease.instance_id, refcount=released.refcount)
        return Reply({"refcount": released.refcount, "stopping": released.stopping})

    def renew(self, peer: Peer, params: protocol.RenewParams) -> Reply:
        """Extend a detached lease. Raises UnknownLease, PermissionDenied, InvalidParams."""
        expires_at = self.registry.renew(params.lease, uid=peer.uid, now=self.now(), ttl=params.ttl)
        self._deadlines_may_have_changed()
        self.record.mark_dirty()
        return Reply({"expires_at": expires_at})

    def release_job_answers_now(self, params: protocol.ReleaseJobParams) -> bool:
        """Whether `release_job_now` can answer: the job has few enough
        leases to release in one turn."""
        return len(self.registry.leases_of_job(params.job)) <= RELEASES_PER_TURN

    def release_job_now(self, peer: Peer, params: protocol.ReleaseJobParams) -> Reply:
        """Release every lease of a job, whoever holds it (the one call for a
        job's terminal transition), in one turn: call it only when
        `release_job_answers_now`. Raises PermissionDenied (nothing released)."""
        released = self.registry.release_job(params.job, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        return self._job_released(params.job, released.released, released.instances)

    async def release_job(self, peer: Peer, params: protocol.ReleaseJobParams) -> Reply:
        """`release_job_now` for a job of any size: the leases it holds when
        called are released over turns that end once they have taken
        STEP_BUDGET_S (a lease released meanwhile by someone else is not
        counted; one taken meanwhile is not released). All or nothing: if any
        of them belongs to another uid and the peer is not root,
        PermissionDenied is raised and nothing is released. Cancellation:
        shielded, the release is finished (its work is bounded)."""
        leases = self.registry.job_leases_for(params.job, uid=peer.uid)
        released = 0
        instances: dict[str, None] = {}

        def release(lease: Lease) -> list[Action]:
            nonlocal released
            if self.registry.lease(lease.token) is not lease:
                return []  # released (or expired) between two turns
            released += 1
            instances[lease.instance_id] = None
            return self.registry.release(lease.token, connection=peer.id, uid=peer.uid, now=self.now()).actions

        with trio.CancelScope(shield=True):
            await self._leases_in_turns(leases, release)
        return self._job_released(params.job, released, list(instances))

    async def let_go_in_turns(self, connection: int, leases: list[Lease]) -> None:
        """The leases of a closed connection (`Engine.disconnected`), let go
        over turns that end once they have taken STEP_BUDGET_S: a client
        that held thousands (7 ms at 10,000) must not hold the trio thread
        for all of them at once. Meanwhile they show in `status` as they
        were. Cancellation: shielded, the work is bounded."""
        before = len(self.registry.leases)
        with trio.CancelScope(shield=True):
            try:
                await self._leases_in_turns(
                    leases, lambda lease: self.registry.let_go(lease, connection, now=self.now())
                )
            finally:
                self.letting_go -= 1
        self._let_go(before)

    async def _leases_in_turns(self, leases: list[Lease], each: Callable[[Lease], list[Action]]) -> None:
        """`each(lease)` for every lease, its actions carried out, over turns
        that end once they have taken STEP_BUDGET_S (the actions of a turn
        are carried out before the next). Cancellation: as a checkpoint
        between two turns; callers shield it."""
        turn_began = time.perf_counter()
        actions: list[Action] = []
        for lease in leases:
            if time.perf_counter() - turn_began > STEP_BUDGET_S:
                self.execute(actions)
                actions = []
                await trio.lowlevel.checkpoint()
                turn_began = time.perf_counter()
            actions += each(lease)
        self.execute(actions)

    def _let_go(self, leases_before: int) -> None:
        """A closed connection's leases are let go: count the released ones."""
        if len(self.registry.leases) < leases_before:
            self.metrics.releases.inc("disconnect", amount=leases_before - len(self.registry.leases))
        self.record.mark_dirty()

    def _job_released(self, job: str, released: int, instances: list[str]) -> Reply:
        self.record.mark_dirty()
        self.metrics.releases.inc("release_job", amount=released)
        log.info("job.released", job=job, released=released, instances=instances)
        return Reply({"released": released, "instances": instances})

    def resume(self, peer: Peer, params: protocol.ResumeParams) -> Reply:
        """Take back, bound to this connection, leases of a previous
        incarnation that wait for their holder after a crash: those of the
        peer's uid (any, for root). Answers which were resumed. Raises nothing."""
        resumed = self.registry.resume(params.leases, connection=peer.id, uid=peer.uid)
        if resumed.resumed:
            self.record.mark_dirty()
            self._deadlines_may_have_changed()
        log.info("leases.resumed", connection=peer.id, resumed=len(resumed.resumed), not_resumed=len(resumed.not_resumed))
        return Reply({"resumed": resumed.resumed, "not_resumed": resumed.not_resumed})


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"
