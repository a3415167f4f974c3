"""Tests for supervisor.client.session: the client's side of the wire, without I/O."""

from __future__ import annotations

import json

import pytest

from supervisor.client.errors import ConnectionLost, PermissionDenied, UnknownAdapter
from supervisor.client.session import Notice, Refusal, Reply, Session, Stray


def response(request_id: int, result: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode() + b"\n"



def test_session_matches_out_of_order_answers_and_passes_notifications_through() -> None:
    session = Session()
    first, line = session.request("status", {"job": "j"})
    assert json.loads(line) == {"jsonrpc": "2.0", "id": first, "method": "status", "params": {"job": "j"}}
    second, _ = session.request("hello")
    note = b'{"jsonrpc":"2.0","method":"adapter_exited","params":{"instance":"i1","reason":"exited"}}\n'
    data = response(second, {"server": "s"}) + note + response(first, {"instances": []})
    # Split anywhere: the answers do not depend on how the bytes arrive.
    incoming = session.receive(data[:7]) + session.receive(data[7:50]) + session.receive(data[50:])
    assert [type(i) for i in incoming] == [Reply, Notice, Reply]
    assert (incoming[0].id, incoming[0].result) == (second, {"server": "s"})
    assert incoming[1].method == "adapter_exited" and incoming[1].params["instance"] == "i1"
    assert (incoming[2].id, incoming[2].method) == (first, "status")


def test_session_reads_whole_messages_and_pieces_alike() -> None:
    # One whole message per read (the usual case) takes a shorter path than a
    # split one; blank lines are skipped either way.
    session = Session()
    ids = [session.request("hello")[0] for _ in range(4)]
    assert [r.id for r in session.receive(response(ids[0], 1))] == [ids[0]]
    assert session.receive(b"  \n") == [] and session.receive(b"\n") == []
    split = response(ids[1], 2)
    assert session.receive(split[:5]) == []
    assert [r.result for r in session.receive(split[5:] + response(ids[2], 3))] == [2, 3]
    assert [r.result for r in session.receive(response(ids[3], 4))] == [4]


def test_session_hands_fds_to_fds_acquires_in_order_and_none_to_errors() -> None:
    session = Session()
    plain, _ = session.request("acquire", {"job": "j", "adapter": "a"})
    failing, _ = session.request("acquire", {"job": "j", "adapter": "b", "fds": True})
    piped, _ = session.request("acquire", {"job": "j", "adapter": "c", "fds": True})
    error = {"jsonrpc": "2.0", "id": failing, "error": {"code": 1001, "message": "no adapter named 'b'"}}
    # The fds come with the first byte of their line, which may share a read with earlier lines.
    incoming = session.receive(response(plain, {"lease": "L1"}) + json.dumps(error).encode() + b"\n", [])
    incoming += session.receive(response(piped, {"lease": "L3"}), [10, 11])
    assert [(i.id, i.fds) for i in incoming] == [(plain, ()), (failing, ()), (piped, (10, 11))]
    assert isinstance(incoming[1].error, UnknownAdapter) and incoming[1].error.message == "no adapter named 'b'"
    assert session.leftover_fds() == []


def test_session_turns_an_abandoned_acquire_into_a_stray_to_release() -> None:
    session = Session()
    request_id, _ = session.request("acquire", {"job": "j", "adapter": "a", "fds": True})
    session.abandon(request_id)
    [stray] = session.receive(response(request_id, {"lease": "L1", "instance": "i"}), [5, 6])
    assert stray == Stray("L1", (5, 6))
    other, _ = session.request("status")
    session.abandon(other)
    assert session.receive(response(other, {"instances": []})) == [Stray(None, ())]


def test_session_reports_a_refusal_and_rejects_garbage() -> None:
    session = Session()
    refusal = b'{"jsonrpc":"2.0","id":null,"error":{"code":1005,"message":"uid 1 may not use this daemon"}}\n'
    [incoming] = session.receive(refusal)
    assert isinstance(incoming, Refusal) and isinstance(incoming.error, PermissionDenied)
    with pytest.raises(ConnectionLost, match="not JSON"):
        session.receive(b"<html>\n")
    with pytest.raises(ConnectionLost, match="never sent"):
        Session().receive(response(99, {}))
