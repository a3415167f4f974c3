"""Prometheus metrics of one daemon.

Counters are bumped where the thing they count happens; gauges of live state
(instances, leases, tree RSS per adapter) are read from the service when a
scrape asks, so they can never drift from the registry. The exposition is
served by the `metrics` method and, if `daemon.metrics_textfile` is set,
written atomically to that file for node_exporter's textfile collector.
Everything here runs on the trio thread except `write_textfile`.

The counters are plain dicts and the text format (version 0.0.4) is written
here: a metrics library would add tens of milliseconds to every start of the
daemon, and an in-place upgrade answers no request until its new image has
imported everything (docs/performance.md, "Upgrade latency").
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import Counter as Tally
from collections.abc import Callable

import msgspec

from supervisor.engine.stalls import THRESHOLDS_NS, StallWatch

PREFIX = "adapter_supervisor"

# Sweep durations: from a cheap cgroup-mode sweep (a millisecond) to a deep scan
# of a busy host with orphans given their grace (seconds).
SWEEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LiveState(msgspec.Struct, frozen=True):
    """What the gauges report, per adapter."""

    instances: Tally[str]
    leases: Tally[str]
    rss_bytes: Tally[str]


# The frozen-objects gauge is counted at most this often: counting walks
# every frozen object (gc.get_freeze_count), which at thousands of instances
# holds the trio thread for tens of milliseconds, and a leak it would show
# grows over hours.
FROZEN_RECOUNT_S = 300.0

# The live gauges: (name, help, the LiveState field they show).
LIVE_GAUGES = (
    ("instances", "Instances holding or about to hold processes, per adapter.", "instances"),
    ("leases", "Live leases, per adapter.", "leases"),
    ("tree_rss_bytes", "Resident memory of the adapter trees at the last scan, per adapter.", "rss_bytes"),
)


class LabelledCounter:
    """A counter family: one monotonic value per tuple of label values."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        """Add `amount` (not negative) to the series of `label_values`."""
        if len(label_values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {label_values!r}")
        if amount < 0:
            raise ValueError(f"{self.name} only goes up, not by {amount}")
        self.values[label_values] = self.values.get(label_values, 0) + amount

    def value(self, *label_values: str) -> float:
        return self.values.get(label_values, 0)

    def lines(self) -> list[str]:
        out = [f"# HELP {PREFIX}_{self.name} {_escape_help(self.help_text)}", f"# TYPE {PREFIX}_{self.name} counter"]
        for label_values, value in sorted(self.values.items()):
            out.append(f"{PREFIX}_{self.name}_total{_labels(self.labels, label_values)} {_number(value)}")
        return out


class LabelledHistogram:
    """A histogram family with fixed buckets, one series per label value."""

    def __init__(self, name: str, help_text: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help_text = help_text
        self.label = label
        self.buckets = buckets
        # Per label value: counts per bucket (not cumulative; +Inf last), and the sum.
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, label_value: str, value: float) -> None:
        counts = self.counts.setdefault(label_value, [0] * (len(self.buckets) + 1))
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        counts[index] += 1
        self.sums[label_value] = self.sums.get(label_value, 0.0) + value

    def count(self, label_value: str) -> int:
        return sum(self.counts.get(label_value, ()))

    def lines(self) -> list[str]:
        full = f"{PREFIX}_{self.name}"
        out = [f"# HELP {full} {_escape_help(self.help_text)}", f"# TYPE {full} histogram"]
        for label_value, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                cumulative += count
                labels = _labels((self.label, "le"), (label_value, _number(bound)))
                out.append(f"{full}_bucket{labels} {cumulative}")
            labels = _labels((self.label,), (label_value,))
            out.append(f"{full}_count{labels} {cumulative}")
            out.append(f"{full}_sum{labels} {_number(self.sums[label_value])}")
        return out


# The attributes of `Metrics` that are counters (an upgrade hands them over).
COUNTERS = ("spawns", "spawn_failures", "spawns_awaited", "releases", "reaps", "orphans", "protocol_errors")


class Metrics:
    """The daemon's metrics."""

    def __init__(self, read_live_state: Callable[[], LiveState], stalls: StallWatch | None = None) -> None:
        """`read_live_state` is called at each `exposition`, not before.
        `stalls`: the watch of the trio thread whose figures the exposition
        shows (none shown without one)."""
        self._read_live_state = read_live_state
        self.stalls = stalls
        self.spawns = LabelledCounter("spawns", "Instance roots started.", ("adapter",))
        self.spawn_failures = LabelledCounter("spawn_failures", "Instance roots that could not be started.", ("adapter",))
        self.spawns_awaited = LabelledCounter(
            "spawns_awaited_exec",
            "Instance roots that had not exec'd within the spawn's bound (a busy host, a slow exec), awaited off the"
            " daemon's thread.",
            ("adapter",),
        )
        self.releases = LabelledCounter(
            "releases", "Leases released, by how (release, release_job, disconnect, expired).", ("how",)
        )
        self.reaps = LabelledCounter("tree_reaps", "Instance trees stopped, by reason.", ("adapter", "reason"))
        self.orphans = LabelledCounter("sweep_orphans", "Orphan processes the sweep reaped, by action.", ("action",))
        self.sweep_duration = LabelledHistogram(
            "sweep_duration_seconds", "Duration of sweeps.", "kind", SWEEP_BUCKETS
        )
        self.protocol_errors = LabelledCounter(
            "protocol_errors", "Requests answered with an error, by code.", ("code",)
        )
        # The frozen-objects gauge as last counted, and when (monotonic seconds).
        self._frozen: tuple[int, float] | None = None

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        """Every counter's value per label set: (attribute, labels, value)."""
        values = []
        for attribute in COUNTERS:
            counter: LabelledCounter = getattr(self, attribute)
            for label_values, value in counter.values.items():
                values.append((attribute, dict(zip(counter.labels, label_values)), value))
        return values

    def add_counters(self, values: list[tuple[str, dict[str, str], float]]) -> None:
        """Add what `counters` returned (of another instance); unknown names
        and label sets that do not fit are ignored."""
        for attribute, labels, value in values:
            if attribute not in COUNTERS or value <= 0:
                continue
            counter: LabelledCounter = getattr(self, attribute)
            if set(labels) == set(counter.labels):
                counter.inc(*(labels[name] for name in counter.labels), amount=value)

    def exposition(self) -> str:
        """The Prometheus text format of every metric now."""
        state = self._read_live_state()
        out: list[str] = []
        for name, help_text, field_name in LIVE_GAUGES:
            out += [f"# HELP {PREFIX}_{name} {_escape_help(help_text)}", f"# TYPE {PREFIX}_{name} gauge"]
            values: Tally[str] = getattr(state, field_name)
            for adapter, value in sorted(values.items()):
                out.append(f"{PREFIX}_{name}{_labels(('adapter',), (adapter,))} {_number(value)}")
        for attribute in COUNTERS:
            out += getattr(self, attribute).lines()
        out += self.sweep_duration.lines()
        if self.stalls is not None:
            out += _stall_lines(self.stalls)
        frozen = f"{PREFIX}_gc_frozen_objects"
        out += [
            f"# HELP {frozen} Objects the garbage collector no longer examines (start-up's, and what survived"
            f" each full collection), counted at most every {FROZEN_RECOUNT_S:g} s; growth at a steady number"
            " of instances would be a leak.",
            f"# TYPE {frozen} gauge",
            f"{frozen} {_number(self._frozen_objects())}",
        ]
        return "\n".join(out) + "\n"

    def _frozen_objects(self) -> int:
        """`gc.get_freeze_count()`, counted again only once the last count is
        FROZEN_RECOUNT_S old."""
        now = time.monotonic()
        if self._frozen is None or now - self._frozen[1] >= FROZEN_RECOUNT_S:
            self._frozen = (gc.get_freeze_count(), now)
        return self._frozen[0]


def _stall_lines(stalls: StallWatch) -> list[str]:
    """The trio-thread stall figures; starts the watch's next "since the last
    scrape" period."""
    recent_ns, _ = stalls.take_recent()
    longest = f"{PREFIX}_longest_stall_seconds"
    recent = f"{PREFIX}_longest_stall_since_scrape_seconds"
    slow = f"{PREFIX}_slow_task_steps"
    out = [
        f"# HELP {longest} The longest time one task step held the trio thread since the daemon's image started"
        " (label: the task).",
        f"# TYPE {longest} gauge",
        f"{longest}{_labels(('task',), (stalls.longest_task,))} {_number(stalls.longest_ns / 1e9)}",
        f"# HELP {recent} The longest time one task step held the trio thread since the previous scrape.",
        f"# TYPE {recent} gauge",
        f"{recent} {_number(recent_ns / 1e9)}",
        f"# HELP {slow} Task steps that held the trio thread at least `over` seconds.",
        f"# TYPE {slow} counter",
    ]
    for threshold_ns, count in zip(THRESHOLDS_NS, stalls.over):
        out.append(f"{slow}_total{_labels(('over',), (_number(threshold_ns / 1e9),))} {_number(count)}")
    return out


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    pairs = ",".join(f'{name}="{_escape_label(value)}"' for name, value in zip(names, values))
    return "{" + pairs + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return f"{float(value):.1f}"
    return repr(float(value))


def write_textfile(path: str, text: str) -> None:
    """Blocking: replace `path` atomically with `text` (for node_exporter). Raises OSError."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)
