"""Tests for supervisor.client.errors: each wire error code has its exception."""

from __future__ import annotations

import pytest

from supervisor.client.errors import (
    Conflict,
    DaemonError,
    InvalidParams,
    LimitReached,
    MethodNotFound,
    PermissionDenied,
    ShuttingDown,
    SpawnFailed,
    UnknownAdapter,
    UnknownLease,
    error_from_wire,
)


@pytest.mark.parametrize(
    ("code", "cls"),
    [(-32601, MethodNotFound), (-32602, InvalidParams), (1001, UnknownAdapter), (1002, UnknownLease),
     (1003, SpawnFailed), (1004, LimitReached), (1005, PermissionDenied), (1006, ShuttingDown), (1007, Conflict)],
)
def test_every_error_code_has_its_named_exception(code: int, cls: type[DaemonError]) -> None:
    error = error_from_wire({"code": code, "message": "what happened", "data": {"k": 1}})
    assert type(error) is cls and isinstance(error, DaemonError)
    assert (error.code, error.message, error.data) == (code, "what happened", {"k": 1})
    assert type(error_from_wire({"code": 4242, "message": "new"})) is DaemonError
