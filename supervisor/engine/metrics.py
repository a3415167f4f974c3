"""Prometheus metrics of one daemon.

Counters are bumped where the thing they count happens; gauges of live state
(instances, leases, tree RSS per adapter) are read from the service when a
scrape asks, so they can never drift from the registry. The exposition is
served by the `metrics` method and, if `daemon.metrics_textfile` is set,
written atomically to that file for node_exporter's textfile collector.
Everything here runs on the trio thread except `write_textfile`.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "adapter_supervisor"

# Sweep durations: from a cheap cgroup-mode sweep (a millisecond) to a deep scan
# of a busy host with orphans given their grace (seconds).
SWEEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class LiveState:
    """What the gauges report, per adapter."""

    instances: Tally[str]
    leases: Tally[str]
    rss_bytes: Tally[str]


# The live gauges: (name, help, the LiveState field they show).
LIVE_GAUGES = (
    ("instances", "Instances holding or about to hold processes, per adapter.", "instances"),
    ("leases", "Live leases, per adapter.", "leases"),
    ("tree_rss_bytes", "Resident memory of the adapter trees at the last scan, per adapter.", "rss_bytes"),
)


class _LiveCollector(Collector):
    """The gauges read at each scrape; `read` is first called then, never at
    registration (`describe` names the gauges without reading them)."""

    def __init__(self, read: Callable[[], LiveState]) -> None:
        self._read = read

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, help_text, _ in LIVE_GAUGES:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["adapter"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._read()
        for name, help_text, field_name in LIVE_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["adapter"])
            values: Tally[str] = getattr(state, field_name)
            for adapter, value in sorted(values.items()):
                family.add_metric([adapter], value)
            yield family


# The attributes of `Metrics` that are counters (an upgrade hands them over).
COUNTERS = ("spawns", "spawn_failures", "releases", "reaps", "orphans", "protocol_errors")


class Metrics:
    """The daemon's metrics, in a registry of its own (not the process-global one)."""

    def __init__(self, read_live_state: Callable[[], LiveState]) -> None:
        """`read_live_state` is called at each `exposition`, not before."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_LiveCollector(read_live_state))
        self.spawns = Counter(f"{PREFIX}_spawns", "Instance roots started.", ["adapter"], registry=self.registry)
        self.spawn_failures = Counter(
            f"{PREFIX}_spawn_failures", "Instance roots that could not be started.", ["adapter"], registry=self.registry
        )
        self.releases = Counter(
            f"{PREFIX}_releases",
            "Leases released, by how (release, release_job, disconnect, expired).",
            ["how"],
            registry=self.registry,
        )
        self.reaps = Counter(
            f"{PREFIX}_tree_reaps", "Instance trees stopped, by reason.", ["adapter", "reason"], registry=self.registry
        )
        self.orphans = Counter(
            f"{PREFIX}_sweep_orphans", "Orphan processes the sweep reaped, by action.", ["action"], registry=self.registry
        )
        self.sweep_duration = Histogram(
            f"{PREFIX}_sweep_duration_seconds", "Duration of sweeps.", ["kind"],
            buckets=SWEEP_BUCKETS, registry=self.registry,
        )
        self.protocol_errors = Counter(
            f"{PREFIX}_protocol_errors", "Requests answered with an error, by code.", ["code"], registry=self.registry
        )

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        """Every counter's value per label set: (attribute, labels, value)."""
        values = []
        for attribute in COUNTERS:
            for family in getattr(self, attribute).collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        values.append((attribute, dict(sample.labels), sample.value))
        return values

    def add_counters(self, values: list[tuple[str, dict[str, str], float]]) -> None:
        """Add what `counters` returned (of another instance); unknown names
        are ignored."""
        for attribute, labels, value in values:
            if attribute in COUNTERS and value > 0:
                getattr(self, attribute).labels(**labels).inc(value)

    def exposition(self) -> str:
        """The Prometheus text format of every metric now."""
        return generate_latest(self.registry).decode()


def write_textfile(path: str, text: str) -> None:
    """Blocking: replace `path` atomically with `text` (for node_exporter). Raises OSError."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)
