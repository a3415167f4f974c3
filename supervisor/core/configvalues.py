"""The scalar values of the config schema and how TOML gives them: sizes
("512MiB"), signals ("SIGTERM", 15), ids and fixed words, each a small type
that decodes itself (`from_toml`, through `_dec_hook`), and the helpers that
turn a decoded raw table into the fields of a public struct."""

from __future__ import annotations

import json
import os
import re
import signal
from decimal import Decimal
from typing import Annotated, Any, Self

import msgspec
from msgspec import UNSET, Meta

from supervisor.core.configerrors import _format_key, _show
from supervisor.core.errors import ConfigError

# Size suffixes. SI and IEC units mean what they say; the bare letters follow systemd
# (MemoryMax=512M is 512 MiB), the convention an operator of a Linux host knows.
# Matching ignores case, so "512mib" and "512MiB" are the same size.
BYTES_UNITS: dict[str, int] = {
    "": 1, "B": 1,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
_UNITS_BY_LOWER = {unit.lower(): factor for unit, factor in BYTES_UNITS.items()}
_SIZE_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

# uid_t is 32 bits and (uid_t)-1 means "no change" to chown, so it is no one's id.
MAX_ID = 2**32 - 2
# Signals whose default action neither terminates nor kills: as a stop signal they
# would only make every stop wait out stop_timeout.
NON_TERMINATING_SIGNALS = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
    | {signal.SIGCONT, signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH}
)


def parse_size(value: str | int) -> int:
    """Return the number of bytes `value` denotes: an int, or text like "1.5GiB".

    A bare number is bytes and must be whole; a fraction with a unit is rounded down.
    Raises ValueError (saying what was expected) for negative numbers, booleans,
    unknown units and anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value}")
        return value
    expected = 'expected a size such as "512MiB" or "1GiB"'
    match = _SIZE_TEXT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{expected}, got {_show(value)}")
    number, unit = match.groups()
    factor = _UNITS_BY_LOWER.get(unit.lower())
    if factor is None:
        units = ", ".join(unit for unit in BYTES_UNITS if unit)
        raise ValueError(f"{expected} (units: {units}), got {_show(value)}")
    if factor == 1 and "." in number:
        raise ValueError(f"expected a whole number of bytes, got {_show(value)}")
    return int(Decimal(number) * factor)


def parse_signal(value: str | int) -> signal.Signals:
    """Return the signal named or numbered by `value`: "SIGTERM", "term", 15 or "15".

    Raises ValueError (saying what was expected) for anything that is not a signal
    of this platform.
    """
    expected = 'expected a signal such as "SIGTERM", "TERM" or 15'
    if isinstance(value, str) and value.strip().isdigit():
        number: object = int(value.strip())
    else:
        number = value
    if isinstance(number, int) and not isinstance(number, bool):
        try:
            return signal.Signals(number)
        except ValueError:
            raise ValueError(f"{expected}, got {_show(value)}") from None
    if isinstance(number, str):
        name = number.strip().upper()
        try:
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            pass
    raise ValueError(f"{expected}, got {_show(value)}")


# The raw schema. Each custom scalar type decodes itself in `from_toml`, raising
# ValueError with an "expected ..., got ..." message that msgspec places at its path.


class _Size(int):
    """A byte count written as an integer or a size string."""

    MINIMUM = 0

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        size = parse_size(value)
        if size < cls.MINIMUM:
            least = "1 byte" if cls.MINIMUM == 1 else f"{cls.MINIMUM} bytes"
            raise ValueError(f"expected a size of at least {least}, got {_show(value)}")
        return cls(size)


class _NonZeroSize(_Size):
    MINIMUM = 1


class _StopSignal(int):
    """A signal that ends a process by default, by name or number."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        sig = parse_signal(value)
        if sig in NON_TERMINATING_SIGNALS:
            raise ValueError(f"expected a signal that ends a process, got {sig.name}")
        return cls(sig)


class _Choice(str):
    """One of a fixed set of words."""

    CHOICES: tuple[str, ...] = ()

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, str) and value in cls.CHOICES:
            return cls(value)
        choices = ", ".join(json.dumps(choice) for choice in cls.CHOICES)
        raise ValueError(f"expected one of {choices}, got {_show(value)}")


def _dec_hook(type_: type, value: Any) -> Any:
    """msgspec's hook for the custom scalar types above."""
    from_toml = getattr(type_, "from_toml", None)
    if from_toml is None:
        raise NotImplementedError(f"no TOML decoding for {type_!r}")
    return from_toml(value)


_Id = Annotated[int, Meta(ge=0, le=MAX_ID)]


def _given_fields(raw: msgspec.Struct) -> dict[str, Any]:
    """The fields the document set, as plain values (custom scalars unwrapped)."""
    return {
        name: _plain(value)
        for name in raw.__struct_fields__
        if (value := getattr(raw, name)) is not UNSET
    }


def _plain(value: Any) -> Any:
    """`value` with the loader's custom scalar types turned into the public ones."""
    if isinstance(value, _StopSignal):
        return signal.Signals(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _resolve_path(value: str, base_dir: str, path: str, key: tuple[str, ...]) -> str:
    """`value` made absolute against `base_dir`; raises ConfigError if unusable."""
    if not value or "\0" in value:
        raise ConfigError(path, _format_key(key), f"expected a path, got {_show(value)}")
    if os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))
