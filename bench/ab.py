"""`python -m bench.ab --old PATH`: this checkout's daemon against another's, in one run.

A change to the server, engine or spawner is judged against the code before
it on the same host at the same time: both daemons run side by side (the old
one from PATH, a checkout of the old commit with its `_clonespawn.so` built,
put first on PYTHONPATH), and each measurement alternates between them:

* `status`, 1 client on a raw socket, in interleaved rounds;
* `status`, 32 clients (4 load generators), old/new/old/new/...;
* cold `acquire` of the 7-process tree (the daemon's reply), interleaved trials.

It prints old, new and new/old for each, and PASS where new is within
`--tolerance` (default 10 %) of old or better. Exit status 0 if all pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench import control, lifecycle, procwatch, systems
from bench.runner import log, stop_control_tree
from bench.session import open_session

# Windows of 32 clients per daemon, in alternating order (old first, then
# new first, ...): whichever runs second in a pair must not always be the same.
CONCURRENT_REPEATS = 6
COLD_TRIALS = 30

# Longer than a quick run's rounds and windows: the host's slow and fast
# phases last seconds, and an A/B must see both daemons through several.
PLAN = control.ControlPlan(warmup=500, single=12000, rounds=12, pairs=0, load_warmup_s=0.5, load_duration_s=3.0,
                           load_start_slack_s=0.6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old code (with its .so built)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="how much slower new may be (default 0.10)")
    args = parser.parse_args(argv)
    old_path = args.old.resolve()
    if not (old_path / "supervisor" / "__main__.py").is_file():
        parser.error(f"{old_path} is not a checkout of this project")
    plan = PLAN
    rows: list[tuple[str, float, float, bool]] = []  # (what, old, new, higher is better)
    with open_session(log) as session:
        old = systems.Ours(session.workdir / "old", {**session.env, "PYTHONPATH": str(old_path)}, name="old")
        new = systems.Ours(session.workdir / "new", session.env, name="new")
        session.start_systems(old, new)
        agents = {"old": session.agent(old), "new": session.agent(new)}
        for name, system in (("old", old), ("new", new)):
            control.start_control_tree(system, agents[name])

        log("status, 1 client, raw socket, interleaved rounds")
        procwatch.wait_for_quiet_host(control.QUIET_BUSY_FRACTION, control.QUIET_TIMEOUT_S)
        single = control.run_single_interleaved(agents, plan)
        rows.append(("status, 1 client: median ms", single["old"]["median_ms"], single["new"]["median_ms"], False))

        log(f"status, 32 clients, {CONCURRENT_REPEATS} windows each, in alternating order")
        throughput: dict[str, list[float]] = {"old": [], "new": []}
        cpu_us: dict[str, list[float]] = {"old": [], "new": []}
        for repeat in range(CONCURRENT_REPEATS):
            pair = (("old", old), ("new", new)) if repeat % 2 == 0 else (("new", new), ("old", old))
            for name, system in pair:
                window = control.run_concurrent(session, system, plan)
                throughput[name].append(window["ops_per_s"])
                cpu_us[name].append(window["daemon_cpu_cores"] / window["ops_per_s"] * 1e6)
        log(f"32-client windows (ops/s): old {throughput['old']}, new {throughput['new']}")
        rows.append(("status, 32 clients: ops/s (median window)",
                     statistics.median(throughput["old"]), statistics.median(throughput["new"]), True))
        # The daemon's own CPU per request: what a change to the daemon moves,
        # without the share of two cores the load generators leave it.
        rows.append(("status, 32 clients: daemon CPU us per request",
                     statistics.median(cpu_us["old"]), statistics.median(cpu_us["new"]), False))

        for name, system in (("old", old), ("new", new)):
            stop_control_tree(session, system, agents[name])
        log(f"cold acquire: {COLD_TRIALS} trials each, interleaved")
        trials = lifecycle.run_interleaved(session, {
            name: (agents[name], str(system.pidfile), COLD_TRIALS) for name, system in (("old", old), ("new", new))
        })
        lifecycle.wait_leak_window([t for ts in trials.values() for t in ts])
        cold = {name: lifecycle.summarize(trials[name], None) for name in trials}
        rows.append(("cold acquire, reply: median ms",
                     cold["old"]["start_call"]["median_ms"], cold["new"]["start_call"]["median_ms"], False))
        leaked = {name: cold[name]["leaked_total"] for name in cold}
        for system in (old, new):
            session.stop_system(system)

    print(f"\n{'measure':44} {'old':>10} {'new':>10} {'new/old':>8}")
    passed = True
    for what, old_value, new_value, higher_is_better in rows:
        ratio = new_value / old_value
        ok = ratio >= 1 - args.tolerance if higher_is_better else ratio <= 1 + args.tolerance
        passed &= ok
        print(f"{what:44} {old_value:10.4g} {new_value:10.4g} {ratio:8.3f}  {'PASS' if ok else 'FAIL'}")
    print(f"leaked trees in the cold-acquire trials: old {leaked['old']}, new {leaked['new']}")
    passed &= leaked["new"] == 0
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
