"""Where our daemon's time goes, per request: `python -m bench.profile WORKLOAD`.

Drives one workload at our daemon twice, for a few seconds each:

1. plain: wall time and daemon CPU per operation, split by thread (the trio
   thread, and the worker threads `trio.to_thread` runs scans in) and into
   user / system time, from /proc/<pid>/task: the real cost;
2. under cProfile (which sees the trio thread only): its self time grouped
   by layer (codec, server, handlers and registry, process and cgroup reads,
   spawning, logging, trio, socket calls), and the functions with the most
   self and cumulative time.

cProfile slows pure-Python code more than system calls, so the shares in 2.
are a map, not a stopwatch; the figures in 1. are. Workloads: `status` (one client), `status32` (32 clients),
`acquire` (cold acquire + release of the bench tree), `pairs` (warm acquire +
release), `sweep` (manual sweeps with 1000 idle instances), `fill` (acquires of
idle instances, pipelined, until `FILL_INSTANCES` are held).
"""

from __future__ import annotations

import argparse
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from bench import control, fillcost, procwatch, stats, sweepcost, systems, wire
from bench.session import Session, open_session

WORKLOADS = ("status", "status32", "acquire", "pairs", "sweep", "fill")

# First match wins: (layer, substring of the profiled function's file or name).
LAYERS = (
    ("start-up and imports (not per request)",
     ("builtins.compile", "marshal.loads", "builtins.exec", "__build_class__", "<frozen importlib")),
    ("codec (core/protocol.py, msgspec, json)", ("supervisor/core/protocol.py", "msgspec", "/json/")),
    ("control server (server/)", ("supervisor/server/",)),
    ("engine + registry (engine/, core/registry.py)",
     ("supervisor/engine/engine.py", "supervisor/engine/instances.py", "supervisor/engine/scans.py",
      "supervisor/core/registry.py", "supervisor/engine/reports.py")),
    ("process and cgroup reads (procs/, engine/sweep.py)",
     ("supervisor/procs/process.py", "supervisor/procs/tree.py", "supervisor/procs/cgroup.py",
      "supervisor/engine/sweep.py", "io.open", "posix.scandir", "_io.", "<frozen os>", "pathlib", "posixpath", "codecs")),
    ("spawning (procs/spawner.py, subprocess)", ("supervisor/procs/", "subprocess", "posix.read", "fork_exec")),
    ("logging (structlog)", ("structlog", "supervisor/logconfig.py")),
    ("socket syscalls", ("_socket.socket",)),
    ("waiting in epoll (idle)", ("select.epoll",)),
    ("trio scheduler and threads", ("trio/", "outcome", "contextvars", "threading", "_thread.", "contextlib")),
)


# Instances the sweep workload holds (the target's figure).
SWEEP_INSTANCES = 1000

# Instances the fill workload ends with: enough for any walk of every
# instance per acquire to stand out.
FILL_INSTANCES = 5000

# No periodic sweep while profiling: only the workload's own requests count.
NO_PERIODIC_SWEEP_S = 3600.0


class Profiled(systems.Ours):
    """Our daemon, run under cProfile when `output` is given."""

    def __init__(self, workdir: Path, env: dict[str, str], *, cgroup: str, output: Path | None) -> None:
        super().__init__(workdir, env, cgroup=cgroup, sweep_interval=NO_PERIODIC_SWEEP_S)
        self.output = output

    def command(self) -> list[str]:
        if self.output is None:
            return super().command()
        return [str(systems.PROJECT_PYTHON), "-m", "cProfile", "-o", str(self.output),
                "-m", "supervisor", "serve", "--config", str(self.config_path)]


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of `pid`, by thread name."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                data = stat.read()
        except FileNotFoundError:
            continue
        name = data[data.find(b"(") + 1 : data.rfind(b")")].decode(errors="replace")
        name = "trio thread" if tid == str(pid) else f"worker ({name})"
        fields = data[data.rfind(b")") + 2 :].split()
        user, system = found.get(name, (0.0, 0.0))
        found[name] = (user + int(fields[11]) / ticks, system + int(fields[12]) / ticks)
    return found


def prepare(session: Session, daemon: systems.Ours, workload: str) -> systems.Agent:
    """Bring the daemon into the workload's state (not measured)."""
    agent = session.agent(daemon)
    if workload in ("status", "status32", "pairs"):
        control.start_control_tree(daemon, agent)
    elif workload == "sweep":
        client = wire.OursClient(daemon.endpoint, timeout=120)
        try:
            sweepcost.fill_to(client, sweepcost.Fill(leases={}), SWEEP_INSTANCES)
        finally:
            client.close()
    return agent


def drive(session: Session, daemon: systems.Ours, agent: systems.Agent, workload: str, seconds: float) -> int:
    """Run `workload` for about `seconds`; returns the number of operations."""
    done = 0
    deadline = time.monotonic() + seconds
    if workload in ("status", "pairs"):
        kind = "status" if workload == "status" else "acquire_release"
        while time.monotonic() < deadline:
            agent.request("loop", kind=kind, n=200, job="control")
            done += 200
    elif workload == "status32":
        plan = control.ControlPlan(warmup=0, single=0, rounds=1, pairs=0, load_warmup_s=0.0, load_duration_s=seconds,
                                   load_start_slack_s=0.5)
        done = control.run_concurrent(session, daemon, plan)["n"]
    elif workload == "acquire":
        while time.monotonic() < deadline:
            job = f"profile-{done}"
            if daemon.pidfile.exists():
                daemon.pidfile.unlink()
            agent.request("start", job=job)
            procwatch.wait_for_members(str(daemon.pidfile), 7, timeout=15)
            agent.request("stop", job=job, pids=[])
            time.sleep(0.05)
            done += 1
    elif workload == "fill":
        holder = fillcost.Holder(wire.OursClient(daemon.endpoint, timeout=120))
        try:
            for start in range(0, FILL_INSTANCES, fillcost.BATCH):
                seconds, _ = fillcost.acquire_batch(holder, [f"fill-{n}" for n in range(start, start + fillcost.BATCH)])
                done += fillcost.BATCH
                if done % 1000 == 0:
                    print(f"fill: {seconds * 1000:.3f} ms per acquire at {done} instances")
        finally:
            holder.client.close()
    elif workload == "sweep":
        durations = []
        while time.monotonic() < deadline:
            durations.append(agent.request("call", method="sweep")["result"]["duration_ms"])
            done += 1
        print(f"sweep with {SWEEP_INSTANCES} instances: daemon-reported duration_ms "
              f"{stats.summarize(durations, unit='ms')}")
    return done


def layer_of(key: tuple[str, int, str]) -> str:
    filename, _, function = key
    where = f"{filename}:{function}"
    for layer, needles in LAYERS:
        if any(needle in where for needle in needles):
            return layer
    return "other"


def print_profile(path: Path, operations: int, top: int) -> None:
    profile = pstats.Stats(str(path))
    table: dict[tuple[str, int, str], Any] = profile.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())
    idle = ("waiting", "start-up")
    busy = total - sum(entry[2] for key, entry in table.items() if layer_of(key).startswith(idle))
    layers: dict[str, float] = {}
    for key, entry in table.items():
        layers[layer_of(key)] = layers.get(layer_of(key), 0.0) + entry[2]
    print(f"\ntrio thread under cProfile: {busy:.3f} s busy for {operations} operations "
          f"({busy / max(1, operations) * 1e6:.0f} us each, profiler overhead included), self time by layer:")
    for layer, seconds in sorted(layers.items(), key=lambda item: -item[1]):
        if layer.startswith(idle):
            continue
        print(f"  {seconds / busy * 100:5.1f}%  {seconds / max(1, operations) * 1e6:8.1f} us/op  {layer}")
    print(f"\ntop {top} by self time")
    profile.sort_stats("tottime").print_stats(top)
    print(f"top {top} by cumulative time (supervisor/ only)")
    profile.sort_stats("cumulative").print_stats("supervisor/", top)


def measure_plain(session: Session, workload: str, cgroup: str, seconds: float) -> None:
    daemon = Profiled(session.workdir / "plain", session.env, cgroup=cgroup, output=None)
    session.start_systems(daemon)
    agent = prepare(session, daemon, workload)
    before = thread_cpu(daemon.pid)
    started = time.monotonic()
    operations = drive(session, daemon, agent, workload, seconds)
    wall = time.monotonic() - started
    after = thread_cpu(daemon.pid)
    session.stop_system(daemon)
    print(f"{workload}, {daemon.name} without profiler: {operations} operations in {wall:.2f} s, "
          f"{wall / max(1, operations) * 1e6:.0f} us each (wall)")
    print("daemon CPU per operation, by thread:")
    for name in sorted(after):
        user = after[name][0] - before.get(name, (0.0, 0.0))[0]
        system = after[name][1] - before.get(name, (0.0, 0.0))[1]
        if user + system > 0:
            print(f"  {name:<28} user {user / operations * 1e6:8.1f} us  system {system / operations * 1e6:8.1f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--mode", choices=("cgroup", "process-table"), default="cgroup")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, help="keep the cProfile data here")
    args = parser.parse_args(argv)
    cgroup = "auto" if args.mode == "cgroup" else "off"

    with open_session(lambda message: print(f"profile: {message}", file=sys.stderr)) as session:
        measure_plain(session, args.workload, cgroup, args.seconds)
        output = args.output or session.workdir / "daemon.prof"
        daemon = Profiled(session.workdir / "profiled", session.env, cgroup=cgroup, output=output)
        session.start_systems(daemon)
        operations = drive(session, daemon, prepare(session, daemon, args.workload), args.workload, args.seconds)
        session.stop_system(daemon)
        if args.workload in ("sweep", "acquire", "fill"):
            print("(the profile below includes setting up: for these workloads read the cumulative times of "
                  "api.sweep / Supervisor.sweep and api.acquire / Supervisor._spawn)")
        print_profile(output, operations, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
