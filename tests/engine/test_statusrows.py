"""`status` rows kept encoded (`supervisor.engine.statusrows`): after any
change to the registry or a new scan, the cached rows say exactly what rows
made from scratch say; tokens are whole only for their uid and root; rows
made over several turns are of one moment even when the registry changes
between the turns."""

from __future__ import annotations

import contextlib
import json
import random

import msgspec
import trio

from supervisor.core.errors import SupervisorError
from supervisor.core.registry import Registry
from supervisor.engine import statusrows
from supervisor.core import protocol
from supervisor.engine.statusrows import LEASE_PREFIX_CHARS, StatusRows
from supervisor.procs.process import ProcStat

ROOT = 0
UIDS = (1000, 1001)
PIDS = {1: 501, 2: 502}


def decoded(rows: list[msgspec.Raw]) -> list[dict]:
    return json.loads(msgspec.json.encode(rows))


def fresh_rows(registry: Registry, members: dict, uid: int) -> list[dict]:
    return decoded(StatusRows(registry, PIDS.get).rows(registry.instances.values(), members, uid)[0])


def scan(registry: Registry, rng: random.Random, previous: dict) -> dict:
    """A scan's members: most trees as the previous scan saw them (the same
    list), some with new figures."""
    members = {}
    for instance in registry.instances.values():
        if instance.pid is None:
            continue
        old = previous.get(instance.id)
        if old is not None and rng.random() < 0.7:
            members[instance.id] = old
        else:
            members[instance.id] = [ProcStat(instance.pid, 1, "S", 7, rng.randrange(1, 10) * 4096)]
    return members


def random_step(registry: Registry, rng: random.Random, now: float) -> None:
    instances = list(registry.instances.values())
    choice = rng.randrange(6)
    if choice <= 1 or not instances:
        with contextlib.suppress(SupervisorError):  # another uid's instance of the pair
            registry.acquire(job=f"job-{rng.randrange(8)}", adapter="a", connection=rng.choice((1, 2)),
                             uid=rng.choice(UIDS) if rng.random() < 0.8 else ROOT, now=now,
                             detach=rng.random() < 0.3, ttl=50.0)
        return
    instance = rng.choice(instances)
    if choice == 2 and instance.waiting_for is None and instance.pid is None and instance.state.value == "starting":
        registry.spawned(instance.id, pid=rng.randrange(1000, 9000), now=now)
    elif choice == 3 and instance.leases:
        token = rng.choice(sorted(instance.leases))
        registry.release(token, connection=0, uid=ROOT, now=now)
    elif choice == 4 and instance.pid is not None:
        registry.root_exited(instance.id, returncode=rng.choice((0, 1, -9)), now=now)
        registry.tree_gone(instance.id, now=now)
    else:
        detached = [registry.leases[t] for t in instance.leases if registry.leases[t].detached]
        if detached and detached[0].expires_at > now:
            registry.renew(detached[0].token, uid=ROOT, now=now, ttl=rng.choice((10.0, 20.0)))


def test_cached_rows_say_what_fresh_rows_say_after_every_change_and_scan() -> None:
    rng = random.Random(17)
    registry = Registry()
    rows = StatusRows(registry, PIDS.get)
    members: dict = {}
    for step in range(600):
        random_step(registry, rng, now=float(step))
        if step % 7 == 0:
            members = scan(registry, rng, members)
        for uid in (ROOT, *UIDS):
            cached, total = rows.rows(registry.instances.values(), members, uid)
            assert decoded(cached) == fresh_rows(registry, members, uid)
            assert total == sum(row["rss_bytes"] for row in decoded(cached))


def test_tokens_are_whole_only_for_their_uid_and_root() -> None:
    registry = Registry()
    mine = registry.acquire(job="j", adapter="a", connection=1, uid=1000, now=0.0)
    theirs = registry.acquire(job="j", adapter="a", connection=2, uid=ROOT, now=0.0)
    registry.acquire(job="k", adapter="a", connection=2, uid=1001, now=0.0)
    rows = StatusRows(registry, PIDS.get)
    seen = {uid: decoded(rows.rows(registry.instances.values(), {}, uid)[0]) for uid in (ROOT, 1000, 1001)}
    tokens = {uid: {lease["lease"] for row in rows_ for lease in row["leases"]} for uid, rows_ in seen.items()}
    assert set(registry.leases) == tokens[ROOT]
    assert mine.lease.token in tokens[1000] and theirs.lease.token[:LEASE_PREFIX_CHARS] in tokens[1000]
    assert theirs.lease.token not in tokens[1000]
    assert mine.lease.token not in tokens[1001] and mine.lease.token[:LEASE_PREFIX_CHARS] in tokens[1001]
    assert {lease["pid"] for row in seen[ROOT] for lease in row["leases"]} == {501, 502}


def test_rows_made_over_several_turns_are_of_one_moment(monkeypatch) -> None:
    # A turn of 10 rows at most.
    monkeypatch.setattr(statusrows, "ROWS_PER_LOOK", 10)
    monkeypatch.setattr(statusrows, "STEP_BUDGET_S", 0.0)
    registry = Registry()
    for n in range(95):
        registry.acquire(job=f"job-{n}", adapter="a", connection=1, uid=1000, now=0.0)
    rows = StatusRows(registry, PIDS.get)
    answers: list[list[dict]] = []

    async def changer() -> None:
        # Runs between the turns of the first passes: every pass sees a change.
        for n in range(2):
            await trio.lowlevel.checkpoint()
            registry.acquire(job=f"late-{n}", adapter="a", connection=1, uid=1000, now=0.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(changer)
            made, _ = await rows.rows_in_turns(None, {}, ROOT)
            answers.append(decoded(made))

    trio.run(main)
    # The passes the late acquires overtook were made again: the answer is
    # the registry as it is once they are done, late instances included.
    assert len(answers[0]) == 97
    assert answers[0] == fresh_rows(registry, {}, ROOT)


def test_a_filter_keeps_only_the_instances_it_accepts() -> None:
    registry = Registry()
    for n in range(5):
        registry.acquire(job=f"job-{n % 2}", adapter="a", connection=1, uid=1000, now=0.0)
    rows = StatusRows(registry, PIDS.get)

    async def main() -> list[dict]:
        made, _ = await rows.rows_in_turns(lambda i: i.job == "job-1", {}, ROOT)
        return decoded(made)

    assert {row["job"] for row in trio.run(main)} == {"job-1"}


def test_an_answer_carries_the_kept_rows_as_one_array_whatever_their_number() -> None:
    # The rows go into the answer's line as they are (msgspec.Raw), with the
    # newline that ends it.
    for count in (0, 1, 2, 300):
        rows = [msgspec.Raw(json.dumps({"n": n}).encode()) for n in range(count)]
        line = protocol.encode_result(7, {"instances": rows})
        assert line.endswith(b"}\n") and line.count(b"\n") == 1
        assert json.loads(line) == {"jsonrpc": "2.0", "id": 7, "result": {"instances": [{"n": n} for n in range(count)]}}