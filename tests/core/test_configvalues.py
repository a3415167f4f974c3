"""Tests for supervisor.core.configvalues: the scalar values a config is written in."""

from __future__ import annotations

import signal

import pytest

from supervisor.core.configvalues import parse_signal, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("1GiB", 2**30),
        ("1.5GiB", 3 * 2**29),
        ("100MB", 100 * 10**6),
        ("64KiB", 65536),
        ("1KB", 1000),
        ("2TiB", 2 * 2**40),
        ("512M", 512 * 2**20),
        ("1g", 2**30),
        ("8 mib", 8 * 2**20),
        ("1024", 1024),
        ("10B", 10),
        ("0", 0),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", [-1, "-1", "lots", "", "1.5", "12XB", "1e9", "GiB", "1,5GiB", True, 1.5, None, [1]]
)
def test_parse_size_rejects(value):
    with pytest.raises(ValueError, match="expected"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("TERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        ("SIGINT", signal.SIGINT),
        ("KILL", signal.SIGKILL),
        (15, signal.SIGTERM),
        ("9", signal.SIGKILL),
        (signal.SIGHUP, signal.SIGHUP),
    ],
)
def test_parse_signal(value, expected):
    result = parse_signal(value)
    assert result is expected


@pytest.mark.parametrize("value", ["SIGFOO", "", "SIG", 0, 999, -15, True, 1.5, None])
def test_parse_signal_rejects(value):
    with pytest.raises(ValueError, match="expected a signal"):
        parse_signal(value)
