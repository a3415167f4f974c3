"""The exposition written by `supervisor.engine.metrics`, without a daemon:
it parses with prometheus_client's reference parser to the values counted,
escapes what must be escaped, and survives a handover of its counters."""

from __future__ import annotations

from collections import Counter

import pytest
from supervisor.engine.metrics import LiveState, Metrics
from tests.test_metrics import samples as parse


def live(**rss: int) -> LiveState:
    return LiveState(instances=Counter({"a": 2}), leases=Counter({"a": 3}), rss_bytes=Counter(rss))


def test_counters_gauges_and_histograms_parse_to_what_was_counted() -> None:
    metrics = Metrics(lambda: live(a=1024))
    metrics.spawns.inc("a")
    metrics.spawns.inc("a")
    metrics.releases.inc("release_job", amount=5)
    metrics.reaps.inc("a", "released")
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        metrics.sweep_duration.observe("periodic", seconds)
    text = metrics.exposition()
    samples = parse(text)
    assert samples[("adapter_supervisor_spawns_total", (("adapter", "a"),))] == 2
    assert samples[("adapter_supervisor_releases_total", (("how", "release_job"),))] == 5
    assert samples[("adapter_supervisor_tree_reaps_total", (("adapter", "a"), ("reason", "released")))] == 1
    assert samples[("adapter_supervisor_instances", (("adapter", "a"),))] == 2
    assert samples[("adapter_supervisor_leases", (("adapter", "a"),))] == 3
    assert samples[("adapter_supervisor_tree_rss_bytes", (("adapter", "a"),))] == 1024
    bucket = "adapter_supervisor_sweep_duration_seconds_bucket"
    assert samples[(bucket, (("kind", "periodic"), ("le", "0.001")))] == 1
    assert samples[(bucket, (("kind", "periodic"), ("le", "0.005")))] == 3
    assert samples[(bucket, (("kind", "periodic"), ("le", "10.0")))] == 3
    assert samples[(bucket, (("kind", "periodic"), ("le", "+Inf")))] == 4
    assert samples[("adapter_supervisor_sweep_duration_seconds_count", (("kind", "periodic"),))] == 4
    assert samples[("adapter_supervisor_sweep_duration_seconds_sum", (("kind", "periodic"),))] == pytest.approx(20.0065)
    assert metrics.sweep_duration.count("periodic") == 4


def test_label_values_and_help_are_escaped() -> None:
    metrics = Metrics(lambda: live())
    hostile = 'we"ird\\name\nline'
    metrics.spawns.inc(hostile)
    samples = parse(metrics.exposition())
    assert samples[("adapter_supervisor_spawns_total", (("adapter", hostile),))] == 1


def test_counters_survive_a_handover_and_bad_ones_are_ignored() -> None:
    old = Metrics(lambda: live())
    old.spawns.inc("a", amount=3)
    old.protocol_errors.inc("1003")
    new = Metrics(lambda: live())
    new.spawns.inc("a")
    handed = old.counters() + [("no_such", {"x": "y"}, 1.0), ("spawns", {"wrong": "label"}, 1.0)]
    new.add_counters(handed)
    assert new.spawns.value("a") == 4
    assert new.protocol_errors.value("1003") == 1
    assert sorted(new.counters()) == sorted([("spawns", {"adapter": "a"}, 4), ("protocol_errors", {"code": "1003"}, 1)])


def test_wrong_labels_and_negative_increments_are_refused() -> None:
    metrics = Metrics(lambda: live())
    with pytest.raises(ValueError):
        metrics.spawns.inc("a", "b")
    with pytest.raises(ValueError):
        metrics.spawns.inc("a", amount=-1)


def test_the_frozen_objects_are_counted_at_most_every_recount_interval(monkeypatch) -> None:
    import gc

    from supervisor.engine import metrics as metrics_module

    frozen_gauge = ("adapter_supervisor_gc_frozen_objects", ())
    metrics = Metrics(lambda: live())
    kept = [object() for _ in range(10)]
    gc.freeze()
    try:
        first = parse(metrics.exposition())[frozen_gauge]
        assert first == gc.get_freeze_count()
        # Frozen since: not walked again within FROZEN_RECOUNT_S (the walk is
        # O(frozen objects)), so the gauge stays as counted.
        more = [[] for _ in range(1000)]
        gc.freeze()
        assert gc.get_freeze_count() >= first + len(more)
        assert parse(metrics.exposition())[frozen_gauge] == first
        monkeypatch.setattr(metrics_module, "FROZEN_RECOUNT_S", 0.0)
        assert parse(metrics.exposition())[frozen_gauge] == gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert kept
