"""Continuity across incarnations of the daemon (adoption after a crash,
in-place upgrade): what
the durable record says of the engine, adopting from it after a crash, and
taking back what an in-place upgrade handed over.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import structlog

from supervisor.core.config import AdapterConfig
from supervisor.core.errors import Conflict
from supervisor.core.registry import Action, AdoptedInstance, AdoptedLease, Reason, Registry, State
from supervisor.engine import staterecord
from supervisor.engine.handoff import EngineState
from supervisor.engine.instances import Instances
from supervisor.engine.running import RunningInstance
from supervisor.engine.stalls import present_in_turns
from supervisor.procs import process
from supervisor.procs.stderrfile import StderrFiles

log = structlog.get_logger()


# Trees recorded between two looks at the clock (the snapshot lets other
# tasks run once a turn has taken STEP_BUDGET_S): an entry made again costs
# about 10 microseconds on a slow host, a kept one well under one.
RECORD_ROWS_PER_LOOK = 32

# Kept entries of trees that are gone are dropped once there are this many
# more than twice the trees running.
PRUNE_SLACK = 256


class RecordSnapshots:
    """`record_snapshot`, made over several turns, keeping each tree's entry
    while neither its instance's registry revision nor its members changed.

    Each entry is of one moment; the record as a whole spans the few turns it
    took (a record is a little behind the daemon anyway, by up to its write
    interval). Trio thread only.
    """

    def __init__(self, registry: Registry, instances: Callable[[], Instances]) -> None:
        """`instances()`: the shell's trees (made after the record keeper)."""
        self._registry = registry
        self._instances = instances
        # Per tree: its entry, encoded, with what it was made from (the
        # RunningInstance, compared by identity; the instance's revision,
        # members, stderr file).
        self._entries: dict[str, tuple[RunningInstance, int, frozenset[process.ProcessId], str | None, bytes]] = {}

    async def snapshot(self, *, daemon_pid: int, daemon_key: str, generation: int) -> staterecord.EncodedRecord:
        """The record of every running tree now. Cancellation: raises
        Cancelled, having changed nothing but what it keeps."""
        running_now = self._instances().running
        recorded = []
        entries = self._entries
        async for piece in present_in_turns(running_now, RECORD_ROWS_PER_LOOK):
            for instance_id, running in piece:
                instance = self._registry.instances.get(instance_id)
                members = frozenset({running.root.id, *running.tree.known})
                revision = instance.revision if instance is not None else -1
                stderr = running.stderr.path.name if running.stderr is not None else None
                kept = entries.get(instance_id)
                if (kept is not None and kept[0] is running and kept[1] == revision and kept[2] == members
                        and kept[3] == stderr):
                    recorded.append(kept[4])
                    continue
                entry = staterecord.encode_entry(record_entry(self._registry, instance_id, running, members))
                entries[instance_id] = (running, revision, members, stderr, entry)
                recorded.append(entry)
        if len(entries) > 2 * len(running_now) + PRUNE_SLACK:
            self._entries = {i: kept for i, kept in entries.items() if i in running_now}
        head = staterecord.StateRecord(
            daemon_pid=daemon_pid, daemon_key=daemon_key, version=staterecord.RECORD_VERSION,
            boot_id=staterecord.current_boot_id(), generation=generation,
        )
        return staterecord.EncodedRecord(head, recorded)


def record_snapshot(
    registry: Registry, instances: Instances, *, daemon_pid: int, daemon_key: str, generation: int
) -> staterecord.StateRecord:
    """The durable record of every running tree: enough to adopt it after a
    crash (its state, params, root, members, stderr file, leases)."""
    recorded = [
        record_entry(registry, instance_id, running, {running.root.id, *running.tree.known})
        for instance_id, running in instances.running.items()
    ]
    return staterecord.StateRecord(
        daemon_pid=daemon_pid, daemon_key=daemon_key, version=staterecord.RECORD_VERSION,
        boot_id=staterecord.current_boot_id(), generation=generation, instances=recorded,
    )


def record_entry(
    registry: Registry, instance_id: str, running: RunningInstance, members: Iterable[process.ProcessId]
) -> staterecord.RecordedInstance:
    """One running tree's entry in the record."""
    instance = registry.instances.get(instance_id)
    leases = []
    if instance is not None:
        for token in instance.leases:
            lease = registry.leases[token]
            leases.append(staterecord.RecordedLease(
                token=token, uid=lease.uid, detached=lease.detached, ttl=lease.ttl, expires_at=lease.expires_at,
            ))
    return staterecord.RecordedInstance(
        instance=instance_id,
        job=instance.job if instance else "",
        adapter=running.adapter.name,
        processes=[staterecord.RecordedProcess(m.pid, m.start_time) for m in members],
        state=instance.state.value if instance else State.STOPPING.value,
        params=dict(instance.params) if instance else {},
        root=staterecord.RecordedProcess(running.root.id.pid, running.root.id.start_time),
        started_at=instance.started_at if instance else None,
        linger=instance.linger if instance else 0.0,
        linger_until=instance.linger_until if instance else None,
        leases=leases,
        stderr_file=running.stderr.path.name if running.stderr is not None else None,
        uid=instance.uid if instance else None,
    )


def adopt_recorded(
    previous: staterecord.StateRecord | None,
    *,
    adapters: Mapping[str, AdapterConfig],
    registry: Registry,
    instances: Instances,
    stderr_files: StderrFiles,
    daemon_key: str,
    now: float,
    resume_grace: float,
    execute: Callable[[Iterable[Action]], None],
) -> list[str]:
    """Take over the instances of the previous incarnation after a crash
    that were running or lingering, whose adapter is still configured, and
    whose root is still the recorded (pid, start time) and carries this
    daemon's tag and the instance's; returns their ids. Anything else it left
    is for the startup sweep to reap. Raises nothing."""
    if previous is None or previous.version < 2:
        return []
    adopted: list[str] = []
    for recorded in previous.instances:
        if recorded.state not in (State.RUNNING.value, State.LINGERING.value) or recorded.root is None:
            continue
        adapter = adapters.get(recorded.adapter)
        if adapter is None:
            log.info("adapter.not_adopted", instance=recorded.instance, reason="its adapter is no longer configured")
            continue
        root = process.ProcessId(recorded.root.pid, recorded.root.start_time)
        try:
            pidfd = process.open_pidfd(root)
        except OSError as exc:
            log.warning("adapter.not_adopted", instance=recorded.instance, reason=f"no pidfd: {exc.strerror}")
            continue
        if pidfd is None:
            log.info("adapter.not_adopted", instance=recorded.instance, reason="its root is gone")
            continue
        if not carries_tag(root, daemon_key, recorded.instance):
            os.close(pidfd)
            log.warning("adapter.not_adopted", instance=recorded.instance,
                        reason="its recorded root does not carry this daemon's instance tag")
            continue
        leases = tuple(
            AdoptedLease(token=lease.token, uid=lease.uid, detached=lease.detached, ttl=lease.ttl,
                         expires_at=lease.expires_at)
            for lease in recorded.leases
        )
        try:
            actions = registry.adopt(AdoptedInstance(
                id=recorded.instance, job=recorded.job, adapter=recorded.adapter,
                params=tuple(sorted(recorded.params.items())), pid=root.pid,
                started_at=recorded.started_at if recorded.started_at is not None else now,
                linger=recorded.linger, linger_until=recorded.linger_until, leases=leases, uid=recorded.uid,
            ), now=now, resume_grace=resume_grace)
        except Conflict as exc:
            os.close(pidfd)
            log.warning("adapter.not_adopted", instance=recorded.instance, reason=exc.message)
            continue
        stderr = stderr_files.follow_existing(recorded.stderr_file) if recorded.stderr_file else None
        members = [process.ProcessId(p.pid, p.start_time) for p in recorded.processes]
        instances.adopt(recorded.instance, adapter, root, members, pidfd, stderr)
        execute(actions)
        adopted.append(recorded.instance)
        log.info("adapter.adopted", instance=recorded.instance, job=recorded.job, adapter=recorded.adapter,
                 pid=root.pid, leases=len(leases))
    return adopted


def carries_tag(root: process.ProcessId, daemon_key: str, instance_id: str) -> bool:
    """Whether `root` (pinned by a pidfd) has the daemon's tag and the
    instance's in its environment: the record alone is no proof (anyone who
    could write it could name any process)."""
    try:
        env = process.read_supervisor_env(root.pid)
    except OSError:
        return False
    stat = process.read_stat(root.pid)
    if stat is None or stat.start_time != root.start_time:
        return False  # the environment read may have been another process's
    return env.get(process.DAEMON_ENV) == daemon_key and env.get(process.INSTANCE_ENV) == instance_id


def take_back(
    handed: EngineState, *, adapters: Mapping[str, AdapterConfig], registry: Registry, instances: Instances
) -> None:
    """Rebuild the running trees the previous image handed over (the registry
    is restored already) and restart the stops it had under way. A tree whose
    adapter the config no longer has is kept, stopped with the defaults."""
    for tree in handed.trees:
        adapter = adapters.get(tree.adapter) or AdapterConfig(name=tree.adapter, command=("true",))
        instances.restore_tree(tree, adapter)
    for instance in registry.instances.values():
        if instance.state in (State.STOPPING, State.EXITED) and instance.id in instances.running:
            instances.stop(instance.id, instance.stop_reason or Reason.RELEASED)
