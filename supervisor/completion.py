"""Shell completion for the command line, generated from its argparse parser.

`bash_script` and `zsh_script` read the parser (its commands, their options,
which options take a value, which arguments name files, which have a fixed
set of choices) and write a completion script for that shell, so completion
can never drift from the parser. `adapter-supervisor completion bash|zsh`
prints them.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass

# Destinations of arguments whose value is a path: completed with file names.
PATH_DESTS = frozenset({"socket", "config", "path", "dir"})



@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    # The value may be left out (nargs="?").
    value_optional: bool
    files: bool
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Positional:
    name: str
    help: str
    files: bool
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]


@dataclass(frozen=True)
class Grammar:
    """What completion needs to know of a parser."""

    program: str
    options: tuple[Option, ...]
    commands: tuple[Command, ...]


def grammar(parser: argparse.ArgumentParser) -> Grammar:
    """The options and commands of `parser` (one level of subcommands).
    Raises ValueError if it has no subcommands."""
    options, positionals, subparsers = _read(parser)
    if subparsers is None:
        raise ValueError(f"{parser.prog} has no subcommands to complete")
    helps = {action.dest: action.help or "" for action in subparsers._choices_actions}
    commands = []
    for name, subparser in subparsers.choices.items():
        sub_options, sub_positionals, _ = _read(subparser)
        commands.append(Command(name, helps.get(name, ""), sub_options, sub_positionals))
    return Grammar(parser.prog, options, tuple(commands))


def _read(
    parser: argparse.ArgumentParser,
) -> tuple[tuple[Option, ...], tuple[Positional, ...], argparse._SubParsersAction[argparse.ArgumentParser] | None]:
    options: list[Option] = []
    positionals: list[Positional] = []
    subparsers = None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subparsers = action
        elif action.help == argparse.SUPPRESS:
            continue
        elif action.option_strings:
            options.append(Option(
                flags=tuple(action.option_strings),
                help=action.help or "",
                takes_value=action.nargs != 0,
                value_optional=action.nargs == argparse.OPTIONAL,
                files=action.dest in PATH_DESTS,
                choices=tuple(str(c) for c in action.choices or ()),
            ))
        else:
            positionals.append(Positional(
                name=str(action.metavar or action.dest),
                help=action.help or "",
                files=action.dest in PATH_DESTS,
                choices=tuple(str(c) for c in action.choices or ()),
            ))
    return tuple(options), tuple(positionals), subparsers


def _function_name(program: str) -> str:
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", program)


# -- bash ---------------------------------------------------------------------------


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for `parser`'s program: `source` it, or put it
    in bash-completion's completions directory under the program's name."""
    spec = grammar(parser)
    function = _function_name(spec.program)
    valued = sorted({flag for option in _all_options(spec) if option.takes_value for flag in option.flags})
    files = sorted({flag for option in _all_options(spec) if option.files for flag in option.flags})
    lines = [
        f"# bash completion for {spec.program}, generated from its argument parser.",
        f"{function}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    local command='' word i=1 position=0",
        "    # Find the command and how many positionals precede the cursor, skipping",
        "    # options and the values they take.",
        "    while (( i < COMP_CWORD )); do",
        '        word="${COMP_WORDS[i]}"',
        '        case "$word" in',
    ]
    if valued:
        lines.append(f"            {'|'.join(valued)}) (( i++ )) ;;")
    lines += [
        "            -*) ;;",
        '            *) if [[ -z "$command" ]]; then command="$word"; else (( position++ )); fi ;;',
        "        esac",
        "        (( i++ ))",
        "    done",
        '    case "$prev" in',
    ]
    if files:
        lines.append(f"        {'|'.join(files)}) COMPREPLY=( $(compgen -f -- \"$cur\") ); return ;;")
    for option in _all_options(spec):
        if option.choices:
            lines.append(
                f"        {'|'.join(option.flags)}) COMPREPLY=( $(compgen -W {_bash_words(option.choices)} -- \"$cur\") ); return ;;"
            )
    other_valued = sorted(
        {flag for option in _all_options(spec) if option.takes_value and not option.files and not option.choices
         for flag in option.flags}
    )
    if other_valued:
        # A value no list can offer (seconds, a job name): offer nothing.
        lines.append(f"        {'|'.join(other_valued)}) return ;;")
    global_flags = [flag for option in spec.options for flag in option.flags]
    lines += [
        "    esac",
        '    if [[ -z "$command" ]]; then',
        '        if [[ "$cur" == -* ]]; then',
        f'            COMPREPLY=( $(compgen -W {_bash_words(global_flags)} -- "$cur") )',
        "        else",
        f'            COMPREPLY=( $(compgen -W {_bash_words([c.name for c in spec.commands])} -- "$cur") )',
        "        fi",
        "        return",
        "    fi",
        '    case "$command" in',
    ]
    for command in spec.commands:
        flags = [flag for option in command.options for flag in option.flags]
        lines += [
            f"        {command.name})",
            '            if [[ "$cur" == -* ]]; then',
            f'                COMPREPLY=( $(compgen -W {_bash_words(flags)} -- "$cur") )',
            "                return",
            "            fi",
        ]
        cases = [
            f"                {index}) COMPREPLY=( $(compgen {_bash_positional(positional)} -- \"$cur\") ) ;;"
            for index, positional in enumerate(command.positionals)
            if positional.files or positional.choices
        ]
        if cases:
            lines += ['            case "$position" in', *cases, "            esac"]
        lines.append("            ;;")
    lines += [
        "    esac",
        "}",
        f"complete -F {function} {spec.program}",
        "",
    ]
    return "\n".join(lines)


def _all_options(spec: Grammar) -> list[Option]:
    return [*spec.options, *(option for command in spec.commands for option in command.options)]


def _bash_words(words: list[str] | tuple[str, ...]) -> str:
    return shlex.quote(" ".join(words))


def _bash_positional(positional: Positional) -> str:
    return "-f" if positional.files else f"-W {_bash_words(positional.choices)}"


# -- zsh ----------------------------------------------------------------------------


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """A zsh completion script for `parser`'s program: put it on $fpath as
    `_<program>`, or `source` it after `compinit`."""
    spec = grammar(parser)
    function = _function_name(spec.program)
    lines = [
        f"#compdef {spec.program}",
        f"# zsh completion for {spec.program}, generated from its argument parser.",
        "",
        f"{function}() {{",
        '    local curcontext="$curcontext" context state state_descr line',
        "    typeset -A opt_args",
        "    local -a commands=(",
        *(f"        {_zsh_quote(_zsh_escape_colons(c.name) + ':' + c.help)}" for c in spec.commands),
        "    )",
        "    _arguments -C \\",
        *(f"        {spec_}" + " \\" for spec_ in (_zsh_option(option) for option in spec.options)),
        "        '1:command:->command' \\",
        "        '*::argument:->argument'",
        '    case "$state" in',
        "        command) _describe -t commands command commands ;;",
        "        argument)",
        '            case "${line[1]}" in',
    ]
    for command in spec.commands:
        specs = [_zsh_option(option) for option in command.options]
        specs += [_zsh_positional(index, positional) for index, positional in enumerate(command.positionals, 1)]
        lines.append(f"                {command.name}) _arguments {' '.join(specs)} ;;")
    lines += [
        "            esac",
        "            ;;",
        "    esac",
        "}",
        "",
        # Autoloaded from $fpath, the file is the body of a function named
        # after it; sourced, it registers the function instead.
        f'if [[ "$funcstack[1]" == "_{spec.program}" ]]; then',
        f'    {function} "$@"',
        "else",
        f"    compdef {function} {spec.program}",
        "fi",
        "",
    ]
    return "\n".join(lines)


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_escape_colons(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


def _zsh_description(text: str) -> str:
    """Help text as an `_arguments` description: brackets escaped, one line."""
    return " ".join(text.split()).replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def _zsh_action(files: bool, choices: tuple[str, ...]) -> str:
    if files:
        return "_files"
    # "( )" offers nothing; an empty action would also keep `_arguments` from
    # offering the options while a positional argument is due.
    return "(" + " ".join(choices) + ")" if choices else "( )"


def _zsh_option(option: Option) -> str:
    description = f"[{_zsh_description(option.help)}]"
    value = ""
    if option.takes_value:
        separator = "::" if option.value_optional else ":"
        value = f"{separator}{option.flags[-1].lstrip('-')}:{_zsh_action(option.files, option.choices)}"
    if len(option.flags) == 1:
        return _zsh_quote(option.flags[0] + description + value)
    exclusive = "(" + " ".join(option.flags) + ")"
    return _zsh_quote(exclusive) + "{" + ",".join(option.flags) + "}" + _zsh_quote(description + value)


def _zsh_positional(index: int, positional: Positional) -> str:
    message = _zsh_escape_colons(positional.name.lower())
    return _zsh_quote(f"{index}:{message}:{_zsh_action(positional.files, positional.choices)}")
