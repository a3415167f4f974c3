"""The control protocol's wire codec (docs/protocol.md), without any I/O.

The wire is JSON-RPC 2.0, one message per line: UTF-8, terminated by ``\\n``.
`Decoder` turns the bytes of one connection into validated `Request` objects or
`BadMessage` objects that say which error to send back; `encode_result`,
`encode_error` and `encode_notification` turn answers into lines. Nothing here
touches a socket, a clock or a logger, so the whole codec can be fed plain bytes
in tests and fuzzing.

Decoding is two msgspec passes over a line: the envelope (``jsonrpc``, ``id``,
``method``, with ``params`` kept raw), then the params into the method's Struct.
Only when the first pass fails is the line decoded a second time, untyped, to
tell a parse error from a bad envelope and to recover the ``id`` for the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

from supervisor.core.errors import (
    InvalidParams,
    InvalidRequest,
    MessageTooLarge,
    MethodNotFound,
    ParseError,
    ProtocolError,
    SupervisorError,
)

PROTOCOL_VERSION = 1

# The only JSON-RPC version spoken; every message carries it.
JSONRPC_VERSION = "2.0"

# Job names end up in log events, instance tags and status output; 256 characters
# holds any UUID, slug or path-like id an orchestrator uses while keeping lines short.
MAX_JOB_CHARS = 256
# Adapter names are TOML table keys in the config, written by a person.
MAX_ADAPTER_CHARS = 64
# Adapter params are short names declared in the config ...
MAX_PARAM_NAME_CHARS = 64
# ... filled with values such as a working directory (PATH_MAX is 4096 on Linux).
MAX_PARAM_VALUE_CHARS = 4096
# A detached lease outliving a month is a leak, not a lease.
MAX_TTL_SECONDS = 30 * 24 * 3600.0
# A token of 128+ random bits is 22 (base64) to 32 (hex) characters; 128 leaves room
# for a prefix, and anything longer cannot be a token this daemon issued.
MAX_LEASE_CHARS = 128
# Instance ids may embed the job and adapter names (256 + 64) plus a suffix.
MAX_INSTANCE_CHARS = 512
# Caps one `reports` response: a sweep report can list hundreds of orphans, so a
# thousand reports is already a very long line.
MAX_REPORTS_LIMIT = 1000
# A tail of stderr larger than this does not fit a sensible response line.
MAX_LOG_LINES = 10_000

# Unicode category Cc is exactly C0 (U+0000-U+001F), DEL and C1 (U+007F-U+009F).
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")

# How a client would name the JSON value it sent in place of an object.
_JSON_TYPE_NAMES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}

# Appended to every envelope error: what a request must look like.
_ENVELOPE_HINT = (
    'a request is one JSON object per line with "jsonrpc": "2.0", a string '
    '"method", an "id" that is a string or an integer (ids are required: this '
    'server does not accept notifications), and optional object "params"'
)

Job = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_CHARS)]
AdapterName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ADAPTER_CHARS)]
ParamName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PARAM_NAME_CHARS)]
ParamValue = Annotated[str, msgspec.Meta(max_length=MAX_PARAM_VALUE_CHARS)]
Ttl = Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_SECONDS)]
LeaseToken = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LEASE_CHARS)]
InstanceId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_INSTANCE_CHARS)]
ReportsLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_REPORTS_LIMIT)]
LogLines = Annotated[int, msgspec.Meta(ge=1, le=MAX_LOG_LINES)]


def _refuse_control_characters(value: str, field: str) -> None:
    """Raise ValueError (which msgspec reports as a validation error at `field`)
    if `value` holds a Unicode control character."""
    found = _CONTROL_CHARACTER.search(value)
    if found is not None:
        raise ValueError(
            f"Expected `str` without control characters, found U+{ord(found.group()):04X}"
            f" at index {found.start()} - at `$.{field}`"
        )


class HelloParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`hello` takes no params."""


class AcquireParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`acquire`: a lease on the `(job, adapter)` instance."""

    job: Job
    adapter: AdapterName
    params: dict[ParamName, ParamValue] = {}
    fds: bool = False
    detach: bool = False
    ttl: Ttl | None = None

    def __post_init__(self) -> None:
        _refuse_control_characters(self.job, "job")
        if self.detach and self.ttl is None:
            raise ValueError(
                "Expected `ttl` (seconds) with `detach: true`: a detached lease must"
                " expire - at `$.ttl`"
            )
        if not self.detach and self.ttl is not None:
            raise ValueError(
                "ttl applies only to detached leases: set `detach: true` or drop `ttl`"
                " - at `$.ttl`"
            )


class ReleaseParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`release`: give back one lease."""

    lease: LeaseToken


class RenewParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`renew`: extend a detached lease, by `ttl` or by its original ttl."""

    lease: LeaseToken
    ttl: Ttl | None = None


class ReleaseJobParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`release_job`: release every lease of a job."""

    job: Job

    def __post_init__(self) -> None:
        _refuse_control_characters(self.job, "job")


InstanceState = Literal["starting", "running", "lingering", "stopping", "exited"]


class StatusParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`status`: the daemon and its instances, those that match every filter given."""

    job: Job | None = None
    adapter: AdapterName | None = None
    state: InstanceState | None = None
    # The uid that owns the instances (the one whose acquire spawned them).
    uid: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        if self.job is not None:
            _refuse_control_characters(self.job, "job")


class SweepParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`sweep`: `deep` also scans the whole process table for the daemon's tag
    (costs time in proportion to the host's processes)."""

    deep: bool = False


class ReportsParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`reports`: the most recent sweep reports."""

    limit: ReportsLimit = 10


class LogsParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`logs`: the stderr tail of an instance, named directly or through a lease."""

    instance: InstanceId | None = None
    lease: LeaseToken | None = None
    lines: LogLines = 100

    def __post_init__(self) -> None:
        if (self.instance is None) == (self.lease is None):
            given = "both" if self.instance is not None else "neither"
            raise ValueError(
                f"Expected exactly one of `instance` or `lease`, got {given} - at `$`"
            )


class MetricsParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`metrics` takes no params."""


class UpgradeParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`upgrade` takes no params."""


class AdaptersParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`adapters` takes no params."""


# Tokens one `resume` may name: far more than one client holds.
MAX_RESUME_LEASES = 4096


class ResumeParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`resume`: take back, on this connection, bound leases of a previous
    incarnation of the daemon."""

    leases: Annotated[list[LeaseToken], msgspec.Meta(max_length=MAX_RESUME_LEASES)]


Params = (
    HelloParams
    | AcquireParams
    | ReleaseParams
    | RenewParams
    | ReleaseJobParams
    | StatusParams
    | SweepParams
    | ReportsParams
    | LogsParams
    | MetricsParams
    | ResumeParams
    | UpgradeParams
    | AdaptersParams
)


class MethodParams:
    """The methods a decoder accepts, each with the Struct its params must
    decode into. Which methods exist is the server's to say (its method
    table); this builds their decoders once, for every connection."""

    def __init__(self, types: Mapping[str, type[Params]]) -> None:
        self.names = list(types)
        self._decoders = {method: msgspec.json.Decoder(params_type) for method, params_type in types.items()}

    def decoder(self, method: str) -> msgspec.json.Decoder[Params] | None:
        """The params decoder of `method`, or None if it is not one of them."""
        return self._decoders.get(method)


class Request(msgspec.Struct, frozen=True):
    """A well-formed request whose params passed validation."""

    id: int | str
    method: str
    params: Params


class BadMessage(msgspec.Struct, frozen=True):
    """A line that must be answered with `error` (sent with `id`, which is None when
    the line had no usable id). When `fatal` is true the connection must be closed
    after the answer."""

    id: int | str | None
    error: ProtocolError
    fatal: bool


Message = Request | BadMessage


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    jsonrpc: Literal["2.0"]
    method: str
    id: int | str
    params: msgspec.Raw = msgspec.Raw(b"{}")


_ENVELOPE_DECODER = msgspec.json.Decoder(_Envelope)
_ANY_DECODER = msgspec.json.Decoder()


def _params_error_detail(error: msgspec.ValidationError) -> str:
    """msgspec's description of a params error, with its path rooted at `params`."""
    detail = str(error).replace("`$", "`params")
    if " - at `" not in detail:
        detail += " - at `params`"
    return detail


def _usable_id(value: object) -> int | str | None:
    """`value` if it can be echoed as a request id, else None."""
    try:
        return msgspec.convert(value, int | str)
    except msgspec.ValidationError:
        return None


def _bad_envelope(text: str, error: msgspec.DecodeError) -> BadMessage:
    """Explain why `text` failed to decode as an envelope, with the id if it has one."""
    try:
        document = _ANY_DECODER.decode(text)
    except msgspec.DecodeError as exc:
        message = f"parse error: the line is not valid JSON ({exc})"
        return BadMessage(None, ParseError(message), False)
    if isinstance(document, list):
        message = "invalid request: batches (JSON arrays) are not supported; send one per line"
        return BadMessage(None, InvalidRequest(message), False)
    if not isinstance(document, dict):
        kind = _JSON_TYPE_NAMES.get(type(document), "a value")
        message = f"invalid request: expected a JSON object, got {kind}; {_ENVELOPE_HINT}"
        return BadMessage(None, InvalidRequest(message), False)
    detail = str(error).replace("`$.", "`")
    message = f"invalid request: {detail}; {_ENVELOPE_HINT}"
    return BadMessage(_usable_id(document.get("id")), InvalidRequest(message), False)


def _decode_text(text: str, methods: MethodParams) -> Message:
    """Decode one non-blank line that is known to be valid UTF-8."""
    try:
        envelope = _ENVELOPE_DECODER.decode(text)
    except msgspec.DecodeError as exc:
        return _bad_envelope(text, exc)
    params_decoder = methods.decoder(envelope.method)
    if params_decoder is None:
        known = methods.names
        error = MethodNotFound(
            f"unknown method {envelope.method!r}; known methods: {', '.join(known)}",
            data={"known_methods": known},
        )
        return BadMessage(envelope.id, error, False)
    try:
        params = params_decoder.decode(envelope.params)
    except msgspec.ValidationError as exc:
        detail = _params_error_detail(exc)
        error = InvalidParams(f"invalid params for {envelope.method!r}: {detail}")
        return BadMessage(envelope.id, error, False)
    return Request(envelope.id, envelope.method, params)


def _decode_line(line: bytearray, methods: MethodParams) -> Message | None:
    """Decode one line (without its ``\\n``); None for a blank line.

    A trailing ``\\r`` needs no special case: it is JSON whitespace.
    """
    if not line or line.isspace():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"parse error: the line is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        return BadMessage(None, ParseError(message), False)
    try:
        return _decode_text(text, methods)
    except RecursionError:
        message = "parse error: the JSON nests arrays or objects too deeply"
        return BadMessage(None, ParseError(message), False)


class Decoder:
    """Turns the byte stream of one connection into `Message` objects.

    Lines longer than `max_message_bytes` (not counting the ``\\n``) are fatal: the
    decoder reports `MessageTooLarge` once, as soon as a line is known to be too
    long, and from then on yields nothing.
    """

    def __init__(self, max_message_bytes: int, methods: MethodParams) -> None:
        """Accepts the requests of `methods`. Raises ValueError if
        `max_message_bytes` is not positive."""
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be at least 1, got {max_message_bytes}")
        self._max_message_bytes = max_message_bytes
        self._methods = methods
        self._buffer = bytearray()
        # The buffer's first `_scanned` bytes are known to hold no newline.
        self._scanned = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once a fatal error was reported; the connection must be closed."""
        return self._closed

    def unread(self) -> bytes:
        """The bytes fed that do not make a whole line yet (for a decoder
        that carries on the stream, fed them first)."""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Take the next bytes of the stream; return the messages they complete.

        Never raises for bad input: every problem becomes a `BadMessage`. The
        messages depend only on the concatenation of everything fed, never on how
        it was split. Returns nothing once `closed`.
        """
        if self._closed:
            return []
        buffer = self._buffer
        buffer += data
        limit = self._max_message_bytes
        messages: list[Message] = []
        start = 0
        search_from = self._scanned
        while True:
            # A newline further than `limit` bytes from `start` ends a line too long.
            newline = buffer.find(b"\n", search_from, start + limit + 1)
            if newline == -1:
                break
            message = _decode_line(buffer[start:newline], self._methods)
            if message is not None:
                messages.append(message)
            start = search_from = newline + 1
        del buffer[:start]
        if len(buffer) > limit:
            messages.append(self._fail_too_large())
        else:
            self._scanned = len(buffer)
        return messages

    def _fail_too_large(self) -> BadMessage:
        self._closed = True
        self._buffer = bytearray()
        error = MessageTooLarge(
            f"invalid request: a message is longer than {self._max_message_bytes} bytes"
            " (max_message_bytes); the connection will be closed"
        )
        return BadMessage(None, error, True)


class _ResultResponse(msgspec.Struct):
    jsonrpc: str
    id: int | str
    result: object


class _ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: object = None


class _ErrorResponse(msgspec.Struct):
    jsonrpc: str
    id: int | str | None
    error: _ErrorObject


class _Notification(msgspec.Struct):
    jsonrpc: str
    method: str
    params: object


# One encoder for the process: msgspec encoders are reusable and keep their buffer.
_ENCODER = msgspec.json.Encoder()


def encode_result(id: int | str, result: object) -> bytearray:
    """The response line for a successful request, ending in ``\\n``.

    `result` may be anything msgspec encodes (dicts, lists, Structs,
    dataclasses, `msgspec.Raw` pieces of JSON). Encoded into a bytearray that
    takes the newline without another copy of the line (megabytes for a
    `status` of 10,000 instances). Raises TypeError if it holds a value
    msgspec cannot encode.
    """
    line = bytearray()
    _ENCODER.encode_into(_ResultResponse(JSONRPC_VERSION, id, result), line)
    line += b"\n"
    return line


def encode_error(id: int | str | None, error: SupervisorError) -> bytes:
    """The error response line for `error`, ending in ``\\n``.

    Carries the error's code and message, and its data when not None. Raises
    TypeError if `error.data` holds a value msgspec cannot encode.
    """
    body = _ErrorObject(error.code, error.message, error.data)
    return _ENCODER.encode(_ErrorResponse(JSONRPC_VERSION, id, body)) + b"\n"


def encode_notification(method: str, params: object) -> bytes:
    """A server-to-client notification line (no id), ending in ``\\n``.

    Raises TypeError if `params` holds a value msgspec cannot encode.
    """
    return _ENCODER.encode(_Notification(JSONRPC_VERSION, method, params)) + b"\n"
