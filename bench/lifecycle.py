"""Start, stop and leaks of the 7-process tree (bench/tree.py), per system.

One trial: remove the pid file; send the system's start (ours: a cold `acquire`
of a fresh job; supervisord: `startProcess(tree, wait)`; circus: `start`
waiting; raw: `posix_spawn`); wait until all 7 members have recorded
themselves; open a pidfd on each member (checked against its start time); send
the system's stop (ours: the last `release`; supervisord: `stopProcess(tree,
wait)`; circus: `stop` waiting; raw: SIGTERM to each member, the ideal); then
wait until every member has exited, or until `LEAK_WINDOW_S` after the stop
call returned. Members alive then are leaks; they are SIGKILLed so the next
trial starts clean.

Reported per system:
* start `call`: request sent -> reply received, at the socket (raw:
  posix_spawn called -> returned);
* start `client`: the same call as the benchmark's client made it, with its
  own encoding of the request and decoding of the answer (shown, not judged:
  the benchmark's clients are not the systems under test);
* start `ready`: request sent -> the last member recorded itself;
* stop `call`: request sent -> reply received;
* stop `gone`: request sent -> the last member exited (only trials where all did);
* leaks: members alive `LEAK_WINDOW_S` after the stop returned, and zombies
  the daemon left unreaped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from bench import procwatch, stats, systems
from bench.session import Session

TREE_SIZE = 7

# "Still alive 2 s after stop" is a leak.
LEAK_WINDOW_S = 2.0

# Pause between "tree up" and the stop, so every system has settled (its own
# bookkeeping after a start) and no signal lands before a member's exec.
SETTLE_S = 0.05

# A tree that has not come up in this long means the system failed to start it.
READY_TIMEOUT_S = 20.0

# Bound on one stop even for a system whose stop call hangs.
STOP_TIMEOUT_S = systems.STOP_GRACE_S + LEAK_WINDOW_S + 10.0


@dataclass
class Trial:
    members: list[procwatch.Member]
    start_call_ns: int
    start_client_ns: int
    ready_ns: int
    stop_call_ns: int
    stopped_at_ns: int
    gone_ns: int | None
    partial_ns: int | None
    leaked_roles: list[str]


def run_trial(session: Session, agent: systems.Agent, pidfile: str, job: str) -> Trial:
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass
    started = agent.request("start", job=job)
    members = procwatch.wait_for_members(pidfile, TREE_SIZE, READY_TIMEOUT_S)
    ready_ns = max(m.recorded_ns for m in members) - started["t0"]
    time.sleep(SETTLE_S)
    watch = session.watch(members)
    agent.send("stop", job=job, pids=[(m.pid, m.start_time) for m in members])
    reply = None
    hard_deadline = time.monotonic_ns() + int(STOP_TIMEOUT_S * 1e9)
    leak_deadline = hard_deadline
    while True:
        now = time.monotonic_ns()
        if watch.all_exited and reply is not None:
            break
        if now >= leak_deadline:
            break
        wait_s = (leak_deadline - now) / 1e9
        if reply is None:
            if watch.poll(min(wait_s, 0.5), agent.stdout_fd):
                reply = agent.receive()
                leak_deadline = min(hard_deadline, reply["t1"] + int(LEAK_WINDOW_S * 1e9))
        else:
            watch.poll(wait_s)
    if reply is None:
        raise RuntimeError(f"stop of job {job} got no reply within {STOP_TIMEOUT_S}s")
    exits = list(watch.exited_ns.values())
    leaked = watch.alive()
    watch.kill_alive()
    watch.close()
    return Trial(
        members=members,
        start_call_ns=started["t1"] - started["t0"],
        start_client_ns=started["c1"] - started["c0"],
        ready_ns=ready_ns,
        stop_call_ns=reply["t1"] - reply["t0"],
        stopped_at_ns=reply["t1"],
        gone_ns=max(exits) - reply["t0"] if not leaked else None,
        partial_ns=max(exits) - reply["t0"] if exits else None,
        leaked_roles=sorted(m.role for m in leaked),
    )


def run_interleaved(
    session: Session, systems_under_test: dict[str, tuple[systems.Agent, str, int]]
) -> dict[str, list[Trial]]:
    """Start/stop trials of several systems in rounds, each round visiting
    every system that has a trial in it (`systems_under_test`: name ->
    (agent, pid file, trials)). There are as many rounds as the largest count,
    and a system with fewer trials has them spread evenly over the rounds, not
    bunched in the first ones: a slow stretch of the host falls on all of them
    alike, and the floor is measured under the same conditions as the rest."""
    results: dict[str, list[Trial]] = {name: [] for name in systems_under_test}
    rounds = max(trials for _, _, trials in systems_under_test.values())
    schedule = {name: trial_rounds(trials, rounds) for name, (_, _, trials) in systems_under_test.items()}
    for i in range(rounds):
        for name, (agent, pidfile, _) in systems_under_test.items():
            if i in schedule[name]:
                results[name].append(run_trial(session, agent, pidfile, f"cold-{name}-{i}"))
                session.reap()
    return results


def trial_rounds(trials: int, rounds: int) -> frozenset[int]:
    """The rounds (of `rounds`) in which a system with `trials` trials has one:
    evenly spaced from the first round on."""
    return frozenset(k * rounds // trials for k in range(trials))


def summarize(trials: list[Trial], daemon_pid: int | None) -> dict[str, Any]:
    """Start, stop and leak figures of one system. Call once `LEAK_WINDOW_S`
    has passed since the last stop (see `wait_leak_window`): zombies the daemon
    left unreaped are counted now, since an exit is seen before a daemon had
    its chance to reap."""
    zombies = 0
    if daemon_pid is not None:
        zombies = sum(1 for t in trials for m in t.members if procwatch.zombie_parent(m) == daemon_pid)
    gone = [t.gone_ns for t in trials if t.gone_ns is not None]
    leaked = [len(t.leaked_roles) for t in trials]
    roles: dict[str, int] = {}
    for t in trials:
        for role in t.leaked_roles:
            roles[role] = roles.get(role, 0) + 1
    return {
        "trials": len(trials),
        "start_call": stats.summarize_ms([t.start_call_ns for t in trials]),
        "start_client": stats.summarize_ms([t.start_client_ns for t in trials]),
        "start_ready": stats.summarize_ms([t.ready_ns for t in trials]),
        "stop_call": stats.summarize_ms([t.stop_call_ns for t in trials]),
        "stop_gone": stats.summarize_ms(gone),
        "stop_partial": stats.summarize_ms([t.partial_ns for t in trials if t.partial_ns is not None]),
        "trees_fully_gone": len(gone),
        "leaked_per_trial": leaked,
        "leaked_total": sum(leaked),
        "leaked_roles": roles,
        "zombies_left": zombies,
    }


def wait_leak_window(trials: list[Trial]) -> None:
    """Sleep until `LEAK_WINDOW_S` after the last of these stops returned."""
    if not trials:
        return
    last = max(t.stopped_at_ns for t in trials)
    wait_s = (last + int(LEAK_WINDOW_S * 1e9) - time.monotonic_ns()) / 1e9
    if wait_s > 0:
        time.sleep(wait_s)


def ratios(result: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours against the raw floor and each peer, by median."""
    def median(system: str, metric: str) -> float | None:
        return result.get(system, {}).get(metric, {}).get("median_ms")

    out: dict[str, Any] = {}
    for ours in ("ours", "ours-process-table"):
        if ours not in result:
            continue
        out[ours] = {
            "start_call_vs_raw_x": stats.ratio(median(ours, "start_call"), median("raw", "start_call")),
            "start_client_vs_raw_x": stats.ratio(median(ours, "start_client"), median("raw", "start_call")),
            "start_ready_vs_raw_x": stats.ratio(median(ours, "start_ready"), median("raw", "start_ready")),
        }
        for peer in ("supervisord", "circus"):
            if peer in result:
                out[ours][f"start_call_vs_{peer}_x"] = stats.ratio(median(ours, "start_call"), median(peer, "start_call"))
                out[ours][f"start_ready_vs_{peer}_x"] = stats.ratio(median(ours, "start_ready"), median(peer, "start_ready"))
                out[ours][f"stop_gone_vs_{peer}_x"] = stats.ratio(median(ours, "stop_gone"), median(peer, "stop_gone"))
                # A peer that leaves survivors never has a "gone" time; against
                # the last exit of what it does stop, ours is measured for all 7.
                out[ours][f"stop_gone_vs_{peer}_last_exit_x"] = stats.ratio(
                    median(ours, "stop_gone"), median(peer, "stop_partial")
                )
    return out
