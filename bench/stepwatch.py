"""What the trio thread's long steps are made of: `python -m bench.stepwatch`.

The daemon's own instrument (`engine/stalls.py`) times each task step by the
wall clock, which cannot tell the daemon's work from a wait: a sleep in the
kernel, a time slice lost to another process, the GIL held by a worker
thread. This runs one daemon under a wrapper that adds a second instrument
(diagnosis only, not part of the daemon): for every step longer than
`--threshold-ms` it writes the step's wall time, the trio thread's CPU time
(`CLOCK_THREAD_CPUTIME_ID`), the time spent in the collector, the thread's
voluntary context switches (each a sleep: a system call that blocked, a
wait for the GIL), the time it was runnable but waited for a CPU
(`waited`, from /proc/thread-self/schedstat: preempted by another process,
or woken and not yet run) and the task's name. Every full collection is written too,
with how many objects it looked at.

The workload is the fill cost's at one level: fill to `--instances` idle
instances with pipelined batches of 100 detached acquires on one connection,
`STATUS_SAMPLES` whole statuses, then `--windows` windows of 100 acquires and
their releases. At the end it prints, per phase, how many steps took over
5 ms of wall time and of CPU, the longest ones, and the collections.

Its wrapper costs two clock reads per step (CPU time is a system call here,
about 0.5 us), so its figures are not for comparing speed; the daemon's own
metric is.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import fillcost, systems, wire

# Steps longer than this are over the daemon's promise.
PROMISE_MS = 5.0

# Longest steps printed per phase.
SHOWN = 8


def _install(out_path: str, threshold_ns: int) -> None:
    """In the daemon's process, before trio.run: log long steps and full
    collections to `out_path` (one line each: monotonic time, then fields)."""
    import trio

    out = open(out_path, "w", buffering=1)
    collector = {"ns": 0, "began": 0, "objects": 0}

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            if info["generation"] == 2:
                collector["objects"] = sum(len(gc.get_objects(g)) for g in (0, 1, 2))
            collector["began"] = time.perf_counter_ns()
            return
        took = time.perf_counter_ns() - collector["began"]
        collector["ns"] += took
        if info["generation"] == 2:
            out.write(f"{time.monotonic():.4f} gc wall={took / 1e6:.2f} objects={collector['objects']}\n")

    # First, so that what other callbacks do is not counted as collection.
    gc.callbacks.insert(0, on_collection)

    # The trio thread's schedstat: its second field is the time it has spent
    # runnable but waiting for a CPU (preempted, or woken and not yet run).
    schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def run_delay_ns() -> int:
        return int(os.pread(schedstat, 128, 0).split()[1])

    class StepLog(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.wall = time.perf_counter_ns()
            self.cpu = time.thread_time_ns()
            self.collected = collector["ns"]
            self.switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
            self.delay = run_delay_ns()

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            wall = time.perf_counter_ns() - self.wall
            if wall < threshold_ns:
                return
            cpu = time.thread_time_ns() - self.cpu
            switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - self.switches
            delay = run_delay_ns() - self.delay
            out.write(
                f"{time.monotonic():.4f} step wall={wall / 1e6:.2f} cpu={cpu / 1e6:.2f} "
                f"gc={(collector['ns'] - self.collected) / 1e6:.2f} sleeps={switches} "
                f"waited={delay / 1e6:.2f} {task.name}\n"
            )

    run = trio.run

    def run_with_log(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["instruments"] = [*kwargs.get("instruments", ()), StepLog()]
        return run(*args, **kwargs)

    trio.run = run_with_log


class Watched(systems.Ours):
    """Our daemon, started under this module's wrapper."""

    def __init__(self, workdir: Path, env: dict[str, str], steps_path: Path, threshold_ms: float) -> None:
        super().__init__(workdir, env, sweep_interval=3600.0, name="watched")
        self.steps_path = steps_path
        self.threshold_ms = threshold_ms

    def command(self) -> list[str]:
        return [str(systems.PROJECT_PYTHON), "-m", "bench.stepwatch", "--daemon", str(self.steps_path),
                "--threshold-ms", str(self.threshold_ms), "--", "serve", "--config", str(self.config_path)]


def drive(daemon: Watched, instances: int, windows: int) -> list[tuple[str, float]]:
    """The workload; returns (phase, monotonic time it began), in order."""
    holder = fillcost.Holder(wire.OursClient(daemon.endpoint, timeout=300))
    phases = [("fill", time.monotonic())]
    fillcost.fill(holder, instances, "held")
    phases.append(("status", time.monotonic()))
    fillcost.status_ms(holder.client)
    phases.append(("windows", time.monotonic()))
    for window in range(windows):
        _, got = fillcost.acquire_batch(holder, [f"w{window}-{n}" for n in range(fillcost.BATCH)])
        fillcost.release_and_wait(holder, got)
    phases.append(("end", time.monotonic()))
    return phases


def summarize(log_path: Path, phases: list[tuple[str, float]]) -> str:
    records = []
    for line in log_path.read_text().splitlines():
        at, kind, rest = line.split(" ", 2)
        records.append((float(at), kind, rest))
    lines = []
    for (name, began), (_, ended) in zip(phases, phases[1:]):
        steps, collections = [], []
        for at, kind, rest in records:
            if began <= at < ended:
                (steps if kind == "step" else collections).append(rest)
        walls = [float(r.split()[0].split("=")[1]) for r in steps]
        cpus = [float(r.split()[1].split("=")[1]) for r in steps]
        lines.append(f"{name} ({ended - began:.1f} s): steps over {PROMISE_MS:g} ms of wall time "
                     f"{sum(w > PROMISE_MS for w in walls)}, of CPU time {sum(c > PROMISE_MS for c in cpus)}")
        for wall, rest in sorted(zip(walls, steps), reverse=True)[:SHOWN]:
            lines.append(f"  {rest}")
        pauses = sorted(float(r.split()[0].split("=")[1]) for r in collections)
        if pauses:
            lines.append(f"  full collections: {len(pauses)}, median {pauses[len(pauses) // 2]:.2f} ms, "
                         f"longest {pauses[-1]:.2f} ms, {sum(pauses):.0f} ms in all")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stepwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--threshold-ms", type=float, default=3.0)
    parser.add_argument("--daemon", metavar="LOG", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.daemon:
        # The wrapped daemon: the rest of the command line is the CLI's.
        _install(args.daemon, int(args.threshold_ms * 1e6))
        from supervisor.cli import main as cli

        sys.argv = ["adapter-supervisor", *[a for a in rest if a != "--"]]
        return cli()
    workdir = Path(tempfile.mkdtemp(prefix="adapter-stepwatch-"))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    log_path = workdir / "steps.log"
    daemon = Watched(workdir / "daemon", env, log_path, args.threshold_ms)
    daemon.start()
    try:
        daemon.wait_ready()
        phases = drive(daemon, args.instances, args.windows)
    finally:
        daemon.stop(300.0)
        subprocess.run(["rm", "-rf", str(workdir / "daemon" / "state")], check=False)
    print(summarize(log_path, phases))
    print(f"(step log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
