"""Command templates: `{job}` and `{param:NAME}` inside argv elements.

A template is checked once, when the config is loaded (`parse_template`), and
rendered for each spawn (`render`). No shell is ever involved: a value stays
inside the one argv element that names it, whatever it holds.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from supervisor.core.errors import InvalidParams

# Parameter names are identifiers so that `{param:NAME}` can never be ambiguous.
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A parameter value is a path, an id or a short option: 4096 is PATH_MAX, ample for
# those and far below ARG_MAX however many parameters an adapter declares.
MAX_PARAM_CHARS = 4096


class Placeholder(NamedTuple):
    """`{job}` (param is None) or `{param:NAME}` inside a command element."""

    param: str | None


_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]")


@functools.lru_cache(maxsize=1024)
def parse_template(element: str) -> tuple[str | Placeholder, ...]:
    """Split one argv element into literal text and placeholders (remembered:
    every acquire renders its adapter's command).

    `{{` and `}}` stand for literal braces. Raises ValueError naming the offending
    text for an unknown placeholder or an unmatched brace.
    """
    pieces: list[str | Placeholder] = []
    literal: list[str] = []
    position = 0
    for match in _TEMPLATE_TOKEN.finditer(element):
        literal.append(element[position : match.start()])
        position = match.end()
        token = match.group()
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if token in ("{", "}"):
            raise ValueError(f'unmatched "{token}" (write "{token}{token}" for a literal brace)')
        inner = token[1:-1]
        if inner == "job":
            placeholder = Placeholder(None)
        elif inner.startswith("param:") and PARAM_NAME.fullmatch(inner[6:]):
            placeholder = Placeholder(inner[6:])
        else:
            raise ValueError(f'unknown placeholder "{token}" (known: {{job}}, {{param:NAME}})')
        pieces.extend(["".join(literal), placeholder])
        literal = []
    pieces.append("".join(literal + [element[position:]]))
    return tuple(piece for piece in pieces if piece != "")


def value_problem(value: object) -> str | None:
    """Why `value` cannot go into an argv element, or None if it can."""
    if not isinstance(value, str):
        return "is not a string"
    if not value:
        return "is empty"
    if len(value) > MAX_PARAM_CHARS:
        return f"is {len(value)} characters long, the limit is {MAX_PARAM_CHARS}"
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":
            return f"contains the control character U+{ord(char):04X}"
        if category == "Cs":
            return f"contains the unpaired surrogate U+{ord(char):04X}"
    return None


def render(
    command: Sequence[str], job: str, params: Mapping[str, str], *, adapter: str, declared: Sequence[str]
) -> list[str]:
    """The argv for `job`: each `{job}` and `{param:NAME}` replaced in place.

    Raises InvalidParams for a param the adapter does not declare (used or not),
    a declared param the command uses but `params` lacks, or a job or value that
    is not a non-empty string of at most MAX_PARAM_CHARS characters free of
    control characters. Raises ValueError for a command that is not a valid
    template (only one built by hand rather than by the config loader can be).
    """
    undeclared = sorted(set(params) - set(declared))
    if undeclared:
        known = ", ".join(declared) or "none"
        raise InvalidParams(
            f'adapter "{adapter}" does not declare param "{undeclared[0]}" (declared: {known})',
            data={"param": undeclared[0]},
        )
    for name, value in params.items():
        problem = value_problem(value)
        if problem is not None:
            raise InvalidParams(f'param "{name}" {problem}', data={"param": name})
    problem = value_problem(job)
    if problem is not None:
        raise InvalidParams(f"job {problem}")
    argv = []
    for element in command:
        parts = []
        for piece in parse_template(element):
            if isinstance(piece, str):
                parts.append(piece)
            elif piece.param is None:
                parts.append(job)
            elif piece.param in params:
                parts.append(params[piece.param])
            else:
                raise InvalidParams(
                    f'adapter "{adapter}" needs param "{piece.param}", which was not given',
                    data={"param": piece.param},
                )
        argv.append("".join(parts))
    return argv
