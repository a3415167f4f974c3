"""The one method table: every other list of methods is derived from it, and
each row is consistent with how the server serves it."""

from __future__ import annotations

import pytest

from supervisor.core import protocol
from supervisor.server.methods import METHODS, PARAMS, Waits

# The methods of the protocol (docs/protocol.md) and which are still served
# while the daemon shuts down (they read state or give leases back).
PROTOCOL_METHODS = {
    "hello", "acquire", "release", "renew", "release_job", "status", "sweep", "reports", "logs", "metrics", "resume",
    "upgrade", "adapters",
}
SERVED_WHILE_STOPPING = {"hello", "status", "logs", "reports", "metrics", "adapters", "release", "release_job"}


def test_the_table_holds_the_protocol_and_the_codec_accepts_exactly_its_methods() -> None:
    assert set(METHODS) == PROTOCOL_METHODS
    assert set(PARAMS.names) == set(METHODS)
    for name, method in METHODS.items():
        assert PARAMS.decoder(name) is not None
        assert method.params in protocol.Params.__args__, f"{name}: params missing from protocol.Params"
    assert PARAMS.decoder("nonesuch") is None


def test_the_methods_served_while_stopping() -> None:
    assert {name for name, method in METHODS.items() if method.while_stopping} == SERVED_WHILE_STOPPING


@pytest.mark.parametrize("name", sorted(PROTOCOL_METHODS))
def test_each_row_can_be_answered_and_says_how_long_it_may_wait(name: str) -> None:
    method = METHODS[name]
    assert method.now is not None or method.wait is not None, "nothing answers it"
    if method.wait is None:
        assert method.waits is Waits.NEVER, "a method that never waits has no waiting form"
    else:
        assert method.waits is not Waits.NEVER
    if method.now is None:
        assert method.waits is Waits.LONG
