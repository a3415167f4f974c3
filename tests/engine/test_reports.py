"""reports: the sweep report's shape (the `sweep` method in docs/protocol.md) and
its bounded history, in memory and in `state_dir/reports.jsonl` on a real file system."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from supervisor.engine.reports import (
    MEMORY_REPORTS,
    REPORTS_FILE,
    Orphan,
    ReportStore,
    SweepReport,
    found_nothing,
    to_builtins,
)

REPORT_KEYS = {
    "id", "kind", "started_at", "duration_ms", "scanned", "orphans",
    "expired_leases", "over_memory", "reclaimed_rss_bytes", "errors", "adopted", "orphans_omitted", "errors_omitted",
}
ORPHAN_KEYS = {
    "pid", "ppid", "cmdline", "instance", "job", "adapter", "age_s", "rss_bytes", "action", "result", "cmdline_cut",
}


def a_report(number: int, **fields: object) -> SweepReport:
    return SweepReport(id=f"r{number:05d}", kind="periodic", started_at=1764000000.0 + number, duration_ms=3.2, scanned=412, **fields)


def an_orphan() -> Orphan:
    return Orphan(
        pid=123, ppid=1, cmdline=["node", "cli.js"], instance="i-1", job="job-1", adapter="claude-acp",
        age_s=812.5, rss_bytes=530_000_000, action="terminated", result="gone",
    )


def ids(reports: list[SweepReport]) -> list[str]:
    return [r.id for r in reports]


def read_lines(path: Path) -> list[SweepReport]:
    return [SweepReport(**json.loads(line)) for line in path.read_text().splitlines()]


# -- shape ---------------------------------------------------------------------------


def test_a_report_has_exactly_the_documented_keys_as_plain_json_values() -> None:
    report = a_report(
        1, orphans=[an_orphan()], expired_leases=["abcd1234"], over_memory=["i-2"], reclaimed_rss_bytes=530_000_000,
        errors=["pid 9 survived SIGKILL"],
    )
    plain = to_builtins(report)
    assert set(plain) == REPORT_KEYS
    assert set(plain["orphans"][0]) == ORPHAN_KEYS
    assert json.loads(json.dumps(plain)) == plain
    assert plain["orphans"][0]["cmdline"] == ["node", "cli.js"] and plain["orphans"][0]["action"] == "terminated"
    assert (plain["expired_leases"], plain["over_memory"], plain["errors"]) == (["abcd1234"], ["i-2"], ["pid 9 survived SIGKILL"])


def test_an_empty_report_still_has_every_key() -> None:
    plain = to_builtins(a_report(1))
    assert set(plain) == REPORT_KEYS
    assert (plain["orphans"], plain["expired_leases"], plain["over_memory"], plain["errors"]) == ([], [], [], [])
    assert plain["reclaimed_rss_bytes"] == 0


# -- in memory ---------------------------------------------------------------------


def test_memory_keeps_only_the_latest_reports_newest_first(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_file_bytes=4096)
    for number in range(MEMORY_REPORTS + 10):
        store.remember(a_report(number))
    assert len(store.recent) == MEMORY_REPORTS
    assert ids(store.latest(3)) == ["r00509", "r00508", "r00507"]
    everything = store.latest(10_000)
    assert len(everything) == MEMORY_REPORTS and everything[-1].id == "r00010"
    assert store.latest(0) == []


# -- on disk -------------------------------------------------------------------------


def test_reports_are_appended_one_json_line_each_and_read_back_oldest_first(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_file_bytes=1 << 20)
    assert store.read_history() == []
    reports = [a_report(1, orphans=[an_orphan()]), a_report(2), a_report(3)]
    for report in reports:
        store.append_to_file(report)
    lines = (tmp_path / REPORTS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [to_builtins(r) for r in reports]
    assert store.read_history() == reports


def test_the_file_is_rotated_before_it_would_pass_its_bound(tmp_path: Path) -> None:
    line_bytes = len(msgspec.json.encode(a_report(1))) + 1  # every report below is this long
    bound = 3 * line_bytes + line_bytes // 2  # room for three reports, not four
    store = ReportStore(tmp_path, max_file_bytes=bound)
    current, previous = tmp_path / REPORTS_FILE, tmp_path / (REPORTS_FILE + ".1")
    for number in range(1, 4):
        store.append_to_file(a_report(number))
    assert not previous.exists()
    store.append_to_file(a_report(4))
    assert ids(read_lines(previous)) == ["r00001", "r00002", "r00003"]
    assert ids(read_lines(current)) == ["r00004"]
    for number in range(5, 11):
        store.append_to_file(a_report(number))
    # One previous generation only, neither file past the bound, nothing out of order.
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORTS_FILE, REPORTS_FILE + ".1"]
    assert current.stat().st_size <= bound and previous.stat().st_size <= bound
    assert ids(read_lines(previous)) == ["r00007", "r00008", "r00009"]
    assert ids(read_lines(current)) == ["r00010"]
    assert ids(store.read_history()) == ["r00007", "r00008", "r00009", "r00010"]


def test_a_report_larger_than_the_bound_is_still_written(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_file_bytes=64)
    big = a_report(1, errors=["x" * 200])
    store.append_to_file(big)
    assert store.read_history() == [big]



def test_reading_history_skips_a_torn_last_line_and_garbage(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_file_bytes=1 << 20)
    for number in (1, 2):
        store.append_to_file(a_report(number))
    with open(tmp_path / REPORTS_FILE, "ab") as file:
        file.write(b"not json\n" + b'{"wrong": "shape"}\n' + b'{"id": "r00003", "kind": "peri')
    assert ids(store.read_history()) == ["r00001", "r00002"]


def test_a_report_appended_after_a_torn_line_is_read_back(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, max_file_bytes=1 << 20)
    store.append_to_file(a_report(1))
    with open(tmp_path / REPORTS_FILE, "ab") as file:
        file.write(b'{"id": "r00002", "kind": "peri')  # the previous run died mid-write
    store.append_to_file(a_report(3))
    assert ids(store.read_history()) == ["r00001", "r00003"]


def test_history_holds_at_most_what_memory_holds_the_newest_across_both_files(tmp_path: Path) -> None:
    (tmp_path / (REPORTS_FILE + ".1")).write_text(
        "".join(json.dumps(to_builtins(a_report(n))) + "\n" for n in range(300))
    )
    (tmp_path / REPORTS_FILE).write_text(
        "".join(json.dumps(to_builtins(a_report(n))) + "\n" for n in range(300, 600))
    )
    history = ReportStore(tmp_path, max_file_bytes=1 << 20).read_history()
    assert len(history) == MEMORY_REPORTS
    assert history[0].id == f"r{600 - MEMORY_REPORTS:05d}" and history[-1].id == "r00599"


@pytest.mark.parametrize(
    "fields",
    [{"orphans": [an_orphan()]}, {"expired_leases": ["abcd1234"]}, {"over_memory": ["i-1"]}, {"errors": ["x"]}, {"adopted": ["i-2"]}],
)
def test_a_report_found_nothing_only_when_every_list_is_empty(fields: dict[str, object]) -> None:
    assert found_nothing(a_report(1))
    assert found_nothing(a_report(1, reclaimed_rss_bytes=0))
    assert not found_nothing(a_report(1, **fields))


def test_a_report_is_bounded_in_orphans_command_lines_and_errors() -> None:
    from supervisor.engine.reports import (
        MAX_CMDLINE_BYTES, MAX_ERROR_CHARS, MAX_ERRORS, MAX_ORPHANS_IN_FULL, Orphan, SweepReport, bounded,
    )

    def orphan(pid: int, cmdline: list[str]) -> Orphan:
        return Orphan(pid=pid, ppid=1, cmdline=cmdline, instance=None, job=None, adapter=None, age_s=1.0,
                      rss_bytes=10, action="terminated", result="gone")

    huge = ["/usr/bin/x", "a" * (1 << 20)]  # a 1 MB argument
    report = SweepReport(
        id="r", kind="periodic", started_at=0.0, duration_ms=1.0, scanned=100,
        orphans=[orphan(n, huge) for n in range(MAX_ORPHANS_IN_FULL + 20)] + [orphan(9999, ["/bin/sleep", "5"])],
        errors=["e" * 10_000] * (MAX_ERRORS + 5), reclaimed_rss_bytes=710,
    )
    cut = bounded(report)
    assert len(cut.orphans) == MAX_ORPHANS_IN_FULL and cut.orphans_omitted == 21
    assert all(o.cmdline_cut and len("".join(o.cmdline).encode()) <= MAX_CMDLINE_BYTES for o in cut.orphans)
    assert cut.orphans[0].cmdline[0] == "/usr/bin/x"
    assert len(cut.errors) == MAX_ERRORS and cut.errors_omitted == 5
    assert all(len(e) == MAX_ERROR_CHARS for e in cut.errors)
    assert cut.reclaimed_rss_bytes == 710 and cut.scanned == 100  # totals kept
    assert len(report.orphans) == MAX_ORPHANS_IN_FULL + 21  # the original is left as it was
    small = orphan(1, ["/bin/sleep", "5"])
    assert bounded(SweepReport(id="s", kind="manual", started_at=0.0, duration_ms=1.0, scanned=1,
                               orphans=[small])).orphans == [small]
