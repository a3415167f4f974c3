"""How a config's mistakes are reported: msgspec's validation messages and
TOML's syntax errors turned into `ConfigError`s that name the file, the key
path and what was expected, and values shown the way TOML writes them."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import msgspec

from supervisor.core.errors import ConfigError

# Longest value shown back in an error message; a pasted blob must not flood a log.
_SHOW_LIMIT = 60

_AT_PATH = re.compile(r"(?P<message>.*) - at `\$(?P<path>[^`]*)`", re.DOTALL)
_PATH_SEGMENT = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")
_EXPECTED_TYPE = re.compile(r"Expected `(\w+)`(?P<rest>.*?)(?:, got `(?P<got>\w+)`)?", re.DOTALL)
_FIELD_MESSAGE = re.compile(r"Object (?P<what>contains unknown|missing required) field `(?P<field>[^`]*)`")
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "an array",
    "object": "a table",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}


def _validation_error(
    message: str, data: Any, type_: type[Any], path: str, prefix: tuple[str, ...]
) -> ConfigError:
    """Translate one msgspec ValidationError message into a ConfigError."""
    match = _AT_PATH.fullmatch(message)
    text, where = (match["message"], match["path"]) if match else (message, "")
    segments: list[str | int] = []
    in_entry = False
    for segment in _PATH_SEGMENT.finditer(where):
        if segment[0] == "[...]":
            in_entry = True
            break
        segments.append(segment[1] if segment[1] is not None else int(segment[2]))
    field = _FIELD_MESSAGE.fullmatch(text)
    if field is not None:
        key = _format_key(prefix + tuple(segments) + (field["field"],))
        if field["what"] == "missing required":
            return ConfigError(path, key, "missing required key")
        known = ", ".join(_struct_at(type_, segments).__struct_fields__)
        return ConfigError(path, key, f"unknown key (allowed here: {known})")
    found, value = _value_at(data, segments) if not in_entry else (False, None)
    expected = _EXPECTED_TYPE.fullmatch(text)
    if expected is not None:
        rest = re.sub(r"-?\d+\.\d+", lambda number: f"{float(number[0]):g}", expected["rest"])
        got = _show(value) if found else _TYPE_WORDS.get(expected["got"] or "", expected["got"])
        text = f"expected {_TYPE_WORDS.get(expected[1], expected[1])}{rest}"
        text += f", got {got}" if got else ""
    if in_entry:
        text += " (in one of its entries)"
    return ConfigError(path, _format_key(prefix + tuple(segments)), text)


def _struct_at(type_: type[Any], names: list[str | int]) -> type[Any]:
    """The raw struct type reached from `type_` by following field `names`."""
    for name in names:
        type_ = next(field.type for field in msgspec.structs.fields(type_) if field.name == name)
    return type_


def _value_at(data: Any, segments: list[str | int]) -> tuple[bool, Any]:
    """(True, value) at `segments` inside the parsed TOML `data`, else (False, None)."""
    for segment in segments:
        if isinstance(segment, str) and isinstance(data, dict) and segment in data:
            data = data[segment]
        elif isinstance(segment, int) and isinstance(data, list) and segment < len(data):
            data = data[segment]
        else:
            return False, None
    return True, data


def _format_key(segments: tuple[str | int, ...]) -> str:
    """A dotted TOML key path; segments that are not bare keys are quoted."""
    key = ""
    for segment in segments:
        if isinstance(segment, int):
            key += f"[{segment}]"
        else:
            bare = re.fullmatch(r"[A-Za-z0-9_-]+", segment)
            key += ("." if key else "") + (segment if bare else json.dumps(segment))
    return key


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, path: str) -> ConfigError:
    """A ConfigError naming the line of a TOML syntax error."""
    message = str(exc)
    position = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if position is not None:
        reason = message[: position.start()]
        return ConfigError(path, f"line {position[1]}", f"invalid TOML: {reason} (column {position[2]})")
    if message.endswith(" (at end of document)"):
        reason = message.removesuffix(" (at end of document)")
        last_line = len(text.rstrip().splitlines()) or 1
        return ConfigError(path, f"line {last_line}", f"invalid TOML: {reason} at the end of the file")
    return ConfigError(path, "", f"invalid TOML: {message}")


def _show(value: object) -> str:
    """`value` written the way TOML would, shortened to _SHOW_LIMIT characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."
