"""The state record made over several turns and kept per tree
(`continuity.RecordSnapshots`), against the record made whole from scratch
(`continuity.record_snapshot`), on an engine running real /bin/sleep roots:
after spawns, another lease, a renewal, a release and a stop, both say the
same, and an entry nothing changed is the very bytes object of the last
snapshot (entries are kept encoded).
A scan keeps the previous list of a tree whose figures did not change."""

from __future__ import annotations

from pathlib import Path

import trio

from supervisor.core import protocol
from supervisor.core.config import parse_config
from supervisor.engine import continuity, scans, staterecord
from supervisor.engine.engine import Engine
from tests.engine.peer import Peer


def normalized(record) -> dict:
    """Entries by instance, with their processes and leases in a fixed order."""
    return {
        entry.instance: (entry.job, entry.adapter, entry.state, entry.root, sorted(entry.processes, key=repr),
                         sorted(entry.leases, key=lambda lease: lease.token), entry.linger_until, entry.uid)
        for entry in record.instances
    }


def encoded_by_instance(record: staterecord.EncodedRecord) -> dict[str, bytes]:
    """The encoded entries of a kept record, by the instance each is of."""
    return {entry.instance: encoded for entry, encoded in zip(record.decoded().instances, record.entries)}


async def test_the_kept_record_says_what_a_whole_one_says(tmp_path: Path) -> None:
    config = parse_config(
        f'[daemon]\nstate_dir = "{tmp_path}"\ncgroup = "off"\nsweep_interval = 3600.0\n'
        '[adapters.tool]\ncommand = ["/bin/sleep", "30"]\nstop_timeout = 1.0\n',
        str(tmp_path / "supervisor.toml"),
    )
    engine = Engine(config)
    peer = Peer()
    engine.connected(peer)

    async def acquire(job: str, **options: object) -> dict:
        params = protocol.AcquireParams(job=job, adapter="tool", **options)  # type: ignore[arg-type]
        return (await engine.acquire(peer, params, lambda: None)).result

    def whole():
        return continuity.record_snapshot(engine.registry, engine.instances, daemon_pid=engine.pid,
                                          daemon_key=engine.daemon_key, generation=engine.generation)

    async def check() -> None:
        kept = await engine._record_snapshot()
        assert normalized(kept.decoded()) == normalized(whole())

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            first = await acquire("a")
            await acquire("b", detach=True, ttl=60.0)
            await check()
            # A scan keeps the previous scan's list of a tree whose figures are
            # the same (an idle sleep's), and makes a new one otherwise.
            ids = list(engine.instances.running)
            snapshots = scans.snapshot(engine.instances, ids)
            one = await trio.to_thread.run_sync(scans.scan_keeping, snapshots, {})
            two = await trio.to_thread.run_sync(scans.scan_keeping, snapshots, one)
            assert all(two[i] is one[i] for i in ids) and all(one[i] for i in ids)
            other = await trio.to_thread.run_sync(scans.scan_keeping, snapshots, {i: [] for i in ids})
            assert all(other[i] == one[i] and other[i] is not one[i] for i in ids)
            before = encoded_by_instance(await engine._record_snapshot())
            await acquire("a")  # a second lease on a's instance
            kept = encoded_by_instance(await engine._record_snapshot())
            b_id = next(i for i, entry in engine.registry.instances.items() if entry.job == "b")
            assert kept[b_id] is before[b_id], "an entry nothing changed was made again"
            assert kept[first["instance"]] is not before[first["instance"]]
            await check()
            b_lease = next(t for t, lease in engine.registry.leases.items() if lease.job == "b")
            engine.renew(peer, protocol.RenewParams(lease=b_lease, ttl=120.0))
            await check()
            engine.release(peer, protocol.ReleaseParams(lease=first["lease"]))
            await check()
            engine.release_job_now(peer, protocol.ReleaseJobParams(job="a"))
            with trio.fail_after(10):
                while first["instance"] in engine.instances.running:
                    await trio.sleep(0.02)
            await check()
            assert [entry.job for entry in (await engine._record_snapshot()).decoded().instances] == ["b"]
        finally:
            with trio.CancelScope(shield=True):
                await engine.shutdown()
            nursery.cancel_scope.cancel()
