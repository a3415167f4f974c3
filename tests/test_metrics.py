"""Metrics in the Prometheus text format: they parse with prometheus_client's own
parser, and they move when the daemon does the work they count."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from supervisor.client import DaemonError
from tests.conftest import eventually, read_pidfile, tree_adapter, wait_all_gone

STOP_TIMEOUT = 0.5


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_parse_and_move_with_the_work_they_count(start_daemon, tmp_path: Path) -> None:
    textfile = tmp_path / "supervisor.prom"
    pidfile = tmp_path / "pids"
    adapters = tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    adapters += '[adapters.broken]\ncommand = ["/nonexistent/binary"]\n'
    daemon = start_daemon(adapters, metrics_textfile=str(textfile))
    client = daemon.client()

    def scrape() -> dict:
        return samples(client.call("metrics")["text"])

    before = scrape()
    assert before.get(("adapter_supervisor_spawns_total", (("adapter", "tree"),)), 0) == 0

    lease = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    second = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    client.call("status")  # refreshes the trees' RSS
    live = scrape()
    assert live[("adapter_supervisor_spawns_total", (("adapter", "tree"),))] == 1
    assert live[("adapter_supervisor_instances", (("adapter", "tree"),))] == 1
    assert live[("adapter_supervisor_leases", (("adapter", "tree"),))] == 2
    assert live[("adapter_supervisor_tree_rss_bytes", (("adapter", "tree"),))] > 0

    for bad in ({"job": "j", "adapter": "broken"}, {"job": "j", "adapter": "nope"}):
        try:
            client.call("acquire", bad)
        except DaemonError:
            pass
    try:
        client.call("no_such_method")
    except DaemonError:
        pass
    client.call("release", {"lease": lease["lease"]})
    client.call("release_job", {"job": "job-1"})
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}

    def reaped() -> dict | None:
        after = scrape()
        key = ("adapter_supervisor_tree_reaps_total", (("adapter", "tree"), ("reason", "released")))
        return after if after.get(key) == 1 else None

    after = eventually(reaped, timeout=2.0)
    assert after, "the reap was not counted"
    assert after[("adapter_supervisor_releases_total", (("how", "release"),))] == 1
    assert after[("adapter_supervisor_releases_total", (("how", "release_job"),))] == 1
    assert after[("adapter_supervisor_spawn_failures_total", (("adapter", "broken"),))] == 1
    assert after[("adapter_supervisor_protocol_errors_total", (("code", "1003"),))] == 1
    assert after[("adapter_supervisor_protocol_errors_total", (("code", "1001"),))] == 1
    assert after[("adapter_supervisor_protocol_errors_total", (("code", "-32601"),))] == 1
    assert after.get(("adapter_supervisor_leases", (("adapter", "tree"),)), 0) == 0
    assert second["refcount"] == 2

    sweeps_before = after.get(("adapter_supervisor_sweep_duration_seconds_count", (("kind", "manual"),)), 0)
    client.call("sweep")
    assert scrape()[("adapter_supervisor_sweep_duration_seconds_count", (("kind", "manual"),))] == sweeps_before + 1
    # The sweep also refreshed the node_exporter text file, which parses too.
    on_disk = samples(textfile.read_text())
    assert on_disk[("adapter_supervisor_spawns_total", (("adapter", "tree"),))] == 1
