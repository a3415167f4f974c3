"""Tests for the sans-IO wire codec: plain bytes in, messages out; values in, lines out."""

from __future__ import annotations

import dataclasses
import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.core.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Conflict,
    InvalidParams,
    InvalidRequest,
    MessageTooLarge,
    MethodNotFound,
    ParseError,
    UnknownLease,
)
from supervisor.core.protocol import (
    MAX_TTL_SECONDS,
    PROTOCOL_VERSION,
    AcquireParams,
    AdaptersParams,
    BadMessage,
    Decoder,
    HelloParams,
    LogsParams,
    MetricsParams,
    ResumeParams,
    UpgradeParams,
    ReleaseJobParams,
    ReleaseParams,
    RenewParams,
    ReportsParams,
    Request,
    StatusParams,
    SweepParams,
    encode_error,
    encode_notification,
    encode_result,
)
from supervisor.server.methods import METHODS, PARAMS

# The protocol's methods are the server's table's; the codec is given them.
METHOD_PARAMS = {name: method.params for name, method in METHODS.items()}

LIMIT = 65536
DAY = 24 * 3600.0

_ABSENT = object()


def request(method: str, params: object = _ABSENT, id: object = 1) -> dict:
    """A request envelope; `params` and `id` are left out when `_ABSENT`."""
    envelope: dict = {"jsonrpc": "2.0", "method": method}
    if id is not _ABSENT:
        envelope["id"] = id
    if params is not _ABSENT:
        envelope["params"] = params
    return envelope


def line(document: object) -> bytes:
    return json.dumps(document).encode() + b"\n"


def decode(data: bytes, limit: int = LIMIT) -> list:
    return Decoder(limit, PARAMS).feed(data)


def decode_one(data: bytes, limit: int = LIMIT):
    messages = decode(data, limit)
    assert len(messages) == 1, messages
    return messages[0]


def summary(message) -> tuple:
    """A comparable form of a message (exceptions do not compare equal)."""
    if isinstance(message, Request):
        return ("request", message.id, message.method, message.params)
    return (
        "bad",
        message.id,
        type(message.error),
        message.error.code,
        message.error.message,
        message.fatal,
    )


def feed_in_chunks(data: bytes, cuts: list[int], limit: int = LIMIT) -> list:
    decoder = Decoder(limit, PARAMS)
    messages = []
    previous = 0
    for cut in sorted(cuts) + [len(data)]:
        messages += decoder.feed(data[previous:cut])
        previous = cut
    return messages


def assert_bad(message, error_type: type, code: int, id: object, *fragments: str) -> None:
    assert isinstance(message, BadMessage), message
    assert type(message.error) is error_type
    assert message.error.code == code
    assert message.id == id
    assert message.fatal is False
    for fragment in fragments:
        assert fragment in message.error.message


# --- framing -----------------------------------------------------------------------


def test_protocol_version_is_one():
    assert PROTOCOL_VERSION == 1


def test_hello_decodes_to_a_request():
    assert decode(line(request("hello", {}, id=7))) == [Request(7, "hello", HelloParams())]


def test_absent_params_mean_an_empty_object():
    assert decode(line(request("sweep", id="s"))) == [Request("s", "sweep", SweepParams())]
    assert decode(line(request("reports", id=1))) == [Request(1, "reports", ReportsParams(limit=10))]


def test_pipelined_lines_in_one_feed_come_out_in_order():
    data = (
        line(request("hello", id=1))
        + line(request("release", {"lease": "L"}, id="two"))
        + b"not json\n"
        + line(request("status", {"job": "j"}, id=3))
    )
    messages = decode(data)
    assert [m.id for m in messages] == [1, "two", None, 3]
    assert messages[1] == Request("two", "release", ReleaseParams(lease="L"))
    assert_bad(messages[2], ParseError, PARSE_ERROR, None)
    assert messages[3] == Request(3, "status", StatusParams(job="j"))


def test_a_partial_line_yields_nothing_until_its_newline():
    decoder = Decoder(LIMIT, PARAMS)
    data = line(request("hello"))
    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [Request(1, "hello", HelloParams())]


def test_split_at_every_byte_offset_gives_the_same_messages():
    data = (
        line(request("acquire", {"job": "ジョブ-😀", "adapter": "a", "params": {"k": "v"}}))
        + b"\r\n"
        + b'{"broken\n'
        + line(request("logs", {"lease": "L", "lines": 5}, id="x"))
    )
    expected = [summary(m) for m in decode(data)]
    assert [s[0] for s in expected] == ["request", "bad", "request"]
    for cut in range(len(data) + 1):
        assert [summary(m) for m in feed_in_chunks(data, [cut])] == expected, cut
    byte_by_byte = feed_in_chunks(data, list(range(len(data))))
    assert [summary(m) for m in byte_by_byte] == expected


def test_crlf_line_endings_are_tolerated():
    data = json.dumps(request("hello", id=2)).encode() + b"\r\n"
    assert decode(data) == [Request(2, "hello", HelloParams())]


def test_blank_lines_are_ignored():
    hello = line(request("hello"))
    assert decode(b"\n\r\n   \n\t\n") == []
    assert decode(b"\n" + hello + b"\r\n\n" + hello) == [Request(1, "hello", HelloParams())] * 2


# --- size limit --------------------------------------------------------------------


def test_a_line_exactly_at_the_limit_is_accepted():
    data = line(request("hello"))
    limit = len(data) - 1  # the newline is not counted
    assert decode(data, limit) == [Request(1, "hello", HelloParams())]
    decoder = Decoder(limit, PARAMS)
    assert decoder.feed(data[:-1]) == []  # at the limit without a newline: still waiting
    assert not decoder.closed
    assert decoder.feed(b"\n") == [Request(1, "hello", HelloParams())]


def test_a_complete_line_over_the_limit_is_fatal_and_ends_decoding():
    hello = line(request("hello"))
    limit = len(hello) - 2
    decoder = Decoder(limit, PARAMS)
    too_long = json.dumps(request("hello", id=12)).encode() + b"\n"
    messages = decoder.feed(b"\n" + b"{}\n" + too_long + hello)
    assert len(messages) == 2
    assert_bad(messages[0], InvalidRequest, INVALID_REQUEST, None)  # the line before it
    fatal = messages[1]
    assert type(fatal.error) is MessageTooLarge
    assert fatal.error.code == INVALID_REQUEST
    assert fatal.id is None
    assert fatal.fatal is True
    assert str(limit) in fatal.error.message
    assert decoder.closed
    assert decoder.feed(hello) == []
    assert decoder.closed


def test_a_partial_line_past_the_limit_is_fatal_before_its_newline():
    decoder = Decoder(100, PARAMS)
    assert decoder.feed(b"x" * 100) == []
    assert not decoder.closed
    messages = decoder.feed(b"x")
    assert len(messages) == 1
    assert type(messages[0].error) is MessageTooLarge
    assert messages[0].fatal is True
    assert decoder.closed
    assert decoder.feed(b"\n" + line(request("hello"))) == []


def test_a_trailing_carriage_return_counts_toward_the_limit():
    body = json.dumps(request("hello")).encode()
    messages = decode(body + b"\r\n", limit=len(body))
    assert len(messages) == 1
    assert type(messages[0].error) is MessageTooLarge


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError):
        Decoder(0, PARAMS)


# --- parse errors and the envelope ------------------------------------------------------


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"not json\n", "not valid JSON"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "hello"\n', "not valid JSON"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "hello"} {}\n', "trailing characters"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "h\xffllo"}\n', "not valid UTF-8"),
        (b'\xc3\n', "not valid UTF-8"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "hello", "params": {"a": "\xed\xa0\x80"}}\n',
         "not valid UTF-8"),
        (b'{"jsonrpc": "1.0", "id": 1, "method": ' + b"[" * 10 + b"\n", "not valid JSON"),
        (b'{"id": 1, "params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "too deeply"),
    ],
    ids=["garbage", "truncated", "trailing", "bad-utf8", "lone-lead-byte", "utf8-surrogate",
         "bad-envelope-then-bad-json", "deep-nesting"],
)
def test_parse_errors_carry_a_null_id(data, fragment):
    assert_bad(decode_one(data, limit=1 << 20), ParseError, PARSE_ERROR, None, fragment)


@pytest.mark.parametrize("data", [b"[]\n", line([request("hello")]), line([request("hello"), 1])])
def test_batches_are_refused(data):
    assert_bad(decode_one(data), InvalidRequest, INVALID_REQUEST, None, "batch")


@pytest.mark.parametrize(
    "document, id, fragment",
    [
        ("hello", None, "expected a JSON object, got a string"),
        (42, None, "got a number"),
        (None, None, "got null"),
        (True, None, "got a boolean"),
        ({"id": 7, "method": "hello"}, 7, "jsonrpc"),
        ({"jsonrpc": "1.0", "id": "abc", "method": "hello"}, "abc", "jsonrpc"),
        ({"jsonrpc": 2.0, "id": 3, "method": "hello"}, 3, "jsonrpc"),
        ({"jsonrpc": "2.0", "id": 4, "method": 5}, 4, "`method`"),
        ({"jsonrpc": "2.0", "id": 4, "method": None}, 4, "`method`"),
        ({"jsonrpc": "2.0", "id": 5}, 5, "method"),
        ({"jsonrpc": "2.0", "id": 6, "method": "hello", "extra": 1}, 6, "unknown field `extra`"),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "hello"}, None, "`id`"),
        ({"jsonrpc": "2.0", "id": True, "method": "hello"}, None, "`id`"),
        ({"jsonrpc": "2.0", "id": None, "method": "hello"}, None, "`id`"),
        ({"jsonrpc": "2.0", "id": [1], "method": "hello"}, None, "`id`"),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "hello"}, None, "`id`"),
        ({"jsonrpc": "2.0", "method": "hello"}, None, "missing required field `id`"),
        ({"jsonrpc": "2.0", "method": "nope"}, None, "missing required field `id`"),
        ({"jsonrpc": "2.0", "method": "acquire", "params": {"job": ""}}, None, "`id`"),
        ({"jsonrpc": "2.0", "id": False, "method": "nope"}, None, "`id`"),
    ],
)
def test_bad_envelopes_are_invalid_requests(document, id, fragment):
    message = decode_one(line(document))
    assert_bad(message, InvalidRequest, INVALID_REQUEST, id, fragment)
    assert "ids are required" in message.error.message


def test_unknown_method_names_it_and_lists_the_known_ones():
    for id in (9, "nine"):
        message = decode_one(line(request("frobnicate", {"x": 1}, id=id)))
        assert_bad(message, MethodNotFound, METHOD_NOT_FOUND, id, "'frobnicate'")
        for method in METHOD_PARAMS:
            assert method in message.error.message
        assert message.error.data == {"known_methods": list(METHOD_PARAMS)}


def test_a_big_integer_id_is_echoed():
    id = 2**70
    message = decode_one(line(request("hello", id=id)))
    assert message == Request(id, "hello", HelloParams())
    assert json.loads(encode_result(message.id, {}))["id"] == id


@pytest.mark.parametrize("params", [[], ["job"], None, "x", 3, True])
def test_params_that_are_not_an_object_are_invalid_params(params):
    message = decode_one(line(request("acquire", params, id="p")))
    assert_bad(message, InvalidParams, INVALID_PARAMS, "p", "Expected `object`", "`params`")


def test_params_errors_without_an_id_are_invalid_requests():
    message = decode_one(line(request("release", {"lease": ""}, id=_ABSENT)))
    assert_bad(message, InvalidRequest, INVALID_REQUEST, None, "`id`")


# --- params, method by method ----------------------------------------------------------

ACCEPTED = [
    ("hello", {}, HelloParams()),
    ("acquire", {"job": "j", "adapter": "a"}, AcquireParams(job="j", adapter="a")),
    (
        "acquire",
        {"job": "j", "adapter": "a", "params": {"workdir": "/srv/x"}, "fds": True},
        AcquireParams(job="j", adapter="a", params={"workdir": "/srv/x"}, fds=True),
    ),
    (
        "acquire",
        {"job": "j", "adapter": "a", "detach": True, "ttl": 60},
        AcquireParams(job="j", adapter="a", detach=True, ttl=60.0),
    ),
    (
        "acquire",
        {"job": "j" * 256, "adapter": "a" * 64, "detach": True, "ttl": MAX_TTL_SECONDS},
        AcquireParams(job="j" * 256, adapter="a" * 64, detach=True, ttl=MAX_TTL_SECONDS),
    ),
    (
        "acquire",
        {"job": "j", "adapter": "a", "params": {"k" * 64: "v" * 4096, "e": ""}},
        AcquireParams(job="j", adapter="a", params={"k" * 64: "v" * 4096, "e": ""}),
    ),
    (
        "acquire",
        {"job": "j", "adapter": "a", "detach": True, "ttl": 0.001},
        AcquireParams(job="j", adapter="a", detach=True, ttl=0.001),
    ),
    ("acquire", {"job": "j", "adapter": "a", "detach": False}, AcquireParams(job="j", adapter="a")),
    ("release", {"lease": "L" * 128}, ReleaseParams(lease="L" * 128)),
    ("renew", {"lease": "L"}, RenewParams(lease="L")),
    ("renew", {"lease": "L", "ttl": 1.5}, RenewParams(lease="L", ttl=1.5)),
    ("renew", {"lease": "L", "ttl": None}, RenewParams(lease="L")),
    ("release_job", {"job": "job-1"}, ReleaseJobParams(job="job-1")),
    ("status", {}, StatusParams()),
    ("status", {"job": "j"}, StatusParams(job="j")),
    ("status", {"job": None}, StatusParams()),
    ("sweep", {}, SweepParams()),
    ("sweep", {"deep": True}, SweepParams(deep=True)),
    ("metrics", {}, MetricsParams()),
    ("resume", {"leases": ["a" * 24, "b" * 24]}, ResumeParams(leases=["a" * 24, "b" * 24])),
    ("resume", {"leases": []}, ResumeParams(leases=[])),
    ("upgrade", {}, UpgradeParams()),
    ("adapters", {}, AdaptersParams()),
    ("reports", {}, ReportsParams(limit=10)),
    ("reports", {"limit": 1}, ReportsParams(limit=1)),
    ("reports", {"limit": 1000}, ReportsParams(limit=1000)),
    ("logs", {"instance": "i"}, LogsParams(instance="i", lines=100)),
    ("logs", {"lease": "L", "lines": 10000}, LogsParams(lease="L", lines=10000)),
    ("logs", {"lease": "L", "lines": 1, "instance": None}, LogsParams(lease="L", lines=1)),
]


@pytest.mark.parametrize("method, params, expected", ACCEPTED)
def test_valid_params_are_accepted(method, params, expected):
    assert decode_one(line(request(method, params, id=5))) == Request(5, method, expected)


REFUSED = [
    ("hello", {"client": "x"}, "unknown field `client`"),
    ("acquire", {}, "missing required field `job`"),
    ("acquire", {"job": "j"}, "missing required field `adapter`"),
    ("acquire", {"job": "", "adapter": "a"}, "`params.job`"),
    ("acquire", {"job": "j" * 257, "adapter": "a"}, "length <= 256 - at `params.job`"),
    ("acquire", {"job": 5, "adapter": "a"}, "Expected `str`, got `int` - at `params.job`"),
    ("acquire", {"job": "j", "adapter": ""}, "length >= 1 - at `params.adapter`"),
    ("acquire", {"job": "j", "adapter": "a" * 65}, "length <= 64 - at `params.adapter`"),
    ("acquire", {"job": "j", "adapter": "a", "params": {"k": 1}}, "`params.params[...]`"),
    ("acquire", {"job": "j", "adapter": "a", "params": {"k": "v" * 4097}}, "length <= 4096"),
    ("acquire", {"job": "j", "adapter": "a", "params": {"": "v"}}, "at `key` in `params.params`"),
    ("acquire", {"job": "j", "adapter": "a", "params": {"k" * 65: "v"}}, "length <= 64"),
    ("acquire", {"job": "j", "adapter": "a", "params": ["k"]}, "at `params.params`"),
    ("acquire", {"job": "j", "adapter": "a", "fds": "yes"}, "at `params.fds`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": 1}, "at `params.detach`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True}, "`ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": None}, "`ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "ttl": 5}, "ttl applies only to detached leases"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": 0}, "> 0.0 - at `params.ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": -1}, "at `params.ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": 30 * DAY + 1}, "`params.ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": "5"}, "`params.ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "detach": True, "ttl": True}, "`params.ttl`"),
    ("acquire", {"job": "j", "adapter": "a", "lease": "L"}, "unknown field `lease`"),
    ("release", {}, "missing required field `lease`"),
    ("release", {"lease": ""}, "length >= 1 - at `params.lease`"),
    ("release", {"lease": "L" * 129}, "length <= 128 - at `params.lease`"),
    ("release", {"lease": 1}, "at `params.lease`"),
    ("renew", {}, "missing required field `lease`"),
    ("renew", {"lease": "L", "ttl": 0}, "at `params.ttl`"),
    ("renew", {"lease": "L", "ttl": 31 * DAY}, "at `params.ttl`"),
    ("renew", {"lease": "L", "detach": True}, "unknown field `detach`"),
    ("release_job", {}, "missing required field `job`"),
    ("release_job", {"job": ""}, "at `params.job`"),
    ("release_job", {"job": "a\nb"}, "control characters"),
    ("status", {"job": ""}, "at `params.job`"),
    ("status", {"job": "x\x00"}, "control characters"),
    ("status", {"jobs": "x"}, "unknown field `jobs`"),
    ("sweep", {"kind": "manual"}, "unknown field `kind`"),
    ("sweep", {"deep": "yes"}, "Expected `bool`"),
    ("metrics", {"format": "openmetrics"}, "unknown field `format`"),
    ("resume", {}, "missing required field `leases`"),
    ("resume", {"leases": ["x"] * 4097}, "Expected `array` of length <= 4096"),
    ("resume", {"leases": [""]}, "Expected `str` of length >= 1"),
    ("upgrade", {"version": "2"}, "unknown field `version`"),
    ("adapters", {"name": "demo"}, "unknown field `name`"),
    ("reports", {"limit": 0}, ">= 1 - at `params.limit`"),
    ("reports", {"limit": 1001}, "<= 1000 - at `params.limit`"),
    ("reports", {"limit": 1.5}, "at `params.limit`"),
    ("reports", {"limit": "5"}, "at `params.limit`"),
    ("logs", {}, "exactly one of `instance` or `lease`, got neither"),
    ("logs", {"instance": "i", "lease": "L"}, "exactly one of `instance` or `lease`, got both"),
    ("logs", {"lines": 5}, "got neither"),
    ("logs", {"instance": "i", "lines": 0}, ">= 1 - at `params.lines`"),
    ("logs", {"instance": "i", "lines": 10001}, "<= 10000 - at `params.lines`"),
    ("logs", {"instance": ""}, "at `params.instance`"),
    ("logs", {"lease": "L" * 129}, "at `params.lease`"),
]


@pytest.mark.parametrize("method, params, fragment", REFUSED)
def test_invalid_params_are_refused_with_the_key_path(method, params, fragment):
    message = decode_one(line(request(method, params, id="r")))
    assert_bad(message, InvalidParams, INVALID_PARAMS, "r", fragment, f"'{method}'")


def test_every_method_has_accepted_and_refused_cases():
    assert {case[0] for case in ACCEPTED} == set(METHOD_PARAMS)
    assert {case[0] for case in REFUSED} == set(METHOD_PARAMS)


@pytest.mark.parametrize(
    "job",
    ["ジョブ", "😀" * 256, "e\u0301te\u0301", "a b/c:d", "\u00a0nbsp", "zero\u200bwidth", "\u2028"],
)
def test_unicode_job_names_are_accepted(job):
    expected = AcquireParams(job=job, adapter="a")
    assert decode_one(line(request("acquire", {"job": job, "adapter": "a"}))).params == expected
    raw = json.dumps(request("acquire", {"job": job, "adapter": "a"}), ensure_ascii=False)
    assert decode_one(raw.encode() + b"\n").params == expected


@pytest.mark.parametrize("control", ["\x00", "\n", "\t", "\r", "\x1b", "\x7f", "\x85", "\x9f"])
def test_control_characters_in_job_names_are_refused(control):
    job = "job" + control + "x"
    message = decode_one(line(request("acquire", {"job": job, "adapter": "a"}, id=3)))
    assert_bad(
        message,
        InvalidParams,
        INVALID_PARAMS,
        3,
        f"control characters, found U+{ord(control):04X} at index 3",
        "`params.job`",
    )


def test_a_257_character_job_is_refused_even_when_short_in_bytes():
    message = decode_one(line(request("acquire", {"job": "j" * 257, "adapter": "a"})))
    assert_bad(message, InvalidParams, INVALID_PARAMS, 1, "`params.job`")


# --- encoding --------------------------------------------------------------------------


class Lease(msgspec.Struct):
    lease: str
    refcount: int


@dataclasses.dataclass
class Released:
    released: int
    instances: list[str]


@pytest.mark.parametrize(
    "result, expected",
    [
        ({"refcount": 0, "stopping": True}, {"refcount": 0, "stopping": True}),
        ([1, "two", None, 2.5], [1, "two", None, 2.5]),
        (Lease("tok", 2), {"lease": "tok", "refcount": 2}),
        (Released(1, ["i"]), {"released": 1, "instances": ["i"]}),
        (None, None),
        ({"s": "line\nbreak\r\u2028 ジョブ"}, {"s": "line\nbreak\r\u2028 ジョブ"}),
    ],
)
def test_encode_result_round_trips(result, expected):
    for id in (1, "abc"):
        data = encode_result(id, result)
        assert data.endswith(b"\n")
        assert data.count(b"\n") == 1
        assert json.loads(data) == {"jsonrpc": "2.0", "id": id, "result": expected}


@pytest.mark.parametrize("id", [None, 0, "req-1"])
def test_encode_error_round_trips(id):
    data = encode_error(id, UnknownLease("no such lease 'x'; it may have expired"))
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": 1002, "message": "no such lease 'x'; it may have expired"},
    }


def test_encode_error_carries_data_when_given():
    data = encode_error(4, Conflict("params differ", data={"params": {"workdir": "/a"}}))
    assert json.loads(data)["error"] == {
        "code": 1007,
        "message": "params differ",
        "data": {"params": {"workdir": "/a"}},
    }


def test_decoder_errors_encode_with_their_id():
    message = decode_one(line(request("nope", id=11)))
    assert json.loads(encode_error(message.id, message.error)) == {
        "jsonrpc": "2.0",
        "id": 11,
        "error": {
            "code": METHOD_NOT_FOUND,
            "message": message.error.message,
            "data": {"known_methods": list(METHOD_PARAMS)},
        },
    }


def test_encode_notification_round_trips():
    params = {"instance": "i", "job": "j", "adapter": "a", "pid": 10, "returncode": -9,
              "reason": "killed"}
    data = encode_notification("adapter_exited", params)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    decoded = json.loads(data)
    assert decoded == {"jsonrpc": "2.0", "method": "adapter_exited", "params": params}
    assert "id" not in decoded
    assert json.loads(encode_notification("shutting_down", {}))["params"] == {}


def test_encoding_an_unencodable_result_raises_type_error():
    with pytest.raises(TypeError):
        encode_result(1, {"x": object()})


# --- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "id": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.booleans()),
        "method": st.sampled_from([*METHOD_PARAMS, "nope", 3]),
        "params": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "job": st.text(max_size=4),
                    "adapter": st.text(max_size=4),
                    "lease": st.text(max_size=4),
                    "instance": st.text(max_size=4),
                    "detach": st.booleans(),
                    "ttl": st.floats(allow_nan=False, allow_infinity=False),
                    "limit": st.integers(-2, 2000),
                    "lines": st.integers(-2, 20000),
                },
            ),
        ),
    },
)
wire_lines = st.one_of(
    envelopes.map(lambda document: json.dumps(document).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b" ", b"\r", b"[", b"\xff", b'{"id": 1']),
)
streams = st.one_of(
    st.binary(max_size=400),
    st.lists(
        st.tuples(wire_lines, st.sampled_from([b"\n", b"\r\n", b""])).map(b"".join), max_size=8
    ).map(b"".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams, limit=st.integers(1, 300), choices=st.data())
def test_any_bytes_in_any_chunking_decode_the_same_and_never_raise(data, limit, choices):
    cuts = choices.draw(st.lists(st.integers(0, len(data)), max_size=12))
    whole = Decoder(limit, PARAMS).feed(data)
    chunked = feed_in_chunks(data, cuts, limit)
    assert [summary(m) for m in chunked] == [summary(m) for m in whole]
    for index, message in enumerate(whole):
        if isinstance(message, BadMessage):
            assert message.error.code in (PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND,
                                          INVALID_PARAMS)
            assert message.fatal == isinstance(message.error, MessageTooLarge)
            assert message.fatal is False or index == len(whole) - 1
            json.loads(encode_error(message.id, message.error))


acquire_dicts = st.fixed_dictionaries(
    {
        "job": st.text(
            st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=256
        ),
        "adapter": st.text(min_size=1, max_size=64),
    },
    optional={
        "params": st.dictionaries(
            st.text(min_size=1, max_size=64), st.text(max_size=4096), max_size=4
        ),
        "fds": st.booleans(),
    },
).flatmap(
    lambda base: st.one_of(
        st.just(base),
        st.just({**base, "detach": False}),
        st.floats(min_value=0, max_value=MAX_TTL_SECONDS, exclude_min=True).map(
            lambda ttl: {**base, "detach": True, "ttl": ttl}
        ),
    )
)


@settings(max_examples=150, deadline=None)
@given(
    params=acquire_dicts,
    id=st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=16)),
    ascii_only=st.booleans(),
)
def test_any_valid_acquire_params_decode_back_equal(params, id, ascii_only):
    data = json.dumps(request("acquire", params, id=id), ensure_ascii=ascii_only).encode() + b"\n"
    assert Decoder(1 << 20, PARAMS).feed(data) == [Request(id, "acquire", AcquireParams(**params))]
