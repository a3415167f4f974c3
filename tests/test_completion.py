"""Shell completion generated from the parser, run by the real shells: bash
through its completion function and `COMPREPLY`, zsh through an interactive
shell on a pseudo-terminal that is sent a TAB."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor import cli, completion

ZSH = shutil.which("zsh")


def script(shell: str) -> str:
    completed = subprocess.run(
        [cli.sys.executable, "-m", "supervisor", "completion", shell], check=True, capture_output=True, text=True, timeout=20,
    )
    return completed.stdout


def test_the_grammar_holds_every_command_and_option_of_the_parser() -> None:
    spec = completion.grammar(cli.build_parser())
    names = [command.name for command in spec.commands]
    assert names[:3] == ["serve", "check-config", "status"] and "completion" in names and "metrics" in names
    logs = next(command for command in spec.commands if command.name == "logs")
    flags = {flag for option in logs.options for flag in option.flags}
    assert {"--lines", "-f", "--follow", "--json", "--socket"} <= flags
    assert [p.name for p in logs.positionals] == ["INSTANCE|LEASE"]
    socket = next(option for option in spec.options if "--socket" in option.flags)
    assert socket.takes_value and socket.files


# The words typed so far (the last one being completed) -> what bash offers.
BASH_CASES = [
    (["st"], ["status"]),
    (["--json", "re"], ["release", "release-job", "renew", "reports"]),
    (["--socket", "/x", "me"], ["metrics"]),
    (["logs", "--"], ["--follow", "--help", "--json", "--lines", "--socket"]),
    (["status", "--w"], ["--watch"]),
    (["completion", ""], ["bash", "zsh"]),
    (["acquire", "job", "demo", "--d"], ["--detach"]),
    (["status", "--watch", ""], []),
    (["-"], ["--help", "--json", "--socket", "--version", "-h"]),
]


@pytest.mark.parametrize(("words", "offered"), BASH_CASES)
def test_bash_completes_commands_options_and_choices(tmp_path: Path, words: list[str], offered: list[str]) -> None:
    path = tmp_path / "adapter-supervisor.bash"
    path.write_text(script("bash"))
    typed = " ".join(f"'{word}'" for word in ["adapter-supervisor", *words])
    completed = subprocess.run(
        ["bash", "-c", f'source {path}; COMP_WORDS=({typed}); COMP_CWORD={len(words)}; _adapter_supervisor; printf "%s\\n" "${{COMPREPLY[@]}}"'],
        check=True, capture_output=True, text=True, timeout=20,
    )
    assert sorted(line for line in completed.stdout.splitlines() if line) == offered


def test_bash_completes_paths_for_the_options_and_arguments_that_take_one(tmp_path: Path) -> None:
    path = tmp_path / "adapter-supervisor.bash"
    path.write_text(script("bash"))
    (tmp_path / "supervisor.toml").write_text("")
    for words in (["--socket", f"{tmp_path}/sup"], ["check-config", f"{tmp_path}/sup"], ["serve", "--config", f"{tmp_path}/sup"]):
        typed = " ".join(["adapter-supervisor", *words])
        completed = subprocess.run(
            ["bash", "-c", f"source {path}; COMP_WORDS=({typed}); COMP_CWORD={len(words)}; _adapter_supervisor; echo \"${{COMPREPLY[@]}}\""],
            check=True, capture_output=True, text=True, timeout=20,
        )
        assert completed.stdout.split() == [f"{tmp_path}/supervisor.toml"], words


def test_bash_registers_the_function_for_the_program(tmp_path: Path) -> None:
    path = tmp_path / "adapter-supervisor.bash"
    path.write_text(script("bash"))
    completed = subprocess.run(["bash", "-c", f"source {path}; complete -p adapter-supervisor"], check=True, capture_output=True, text=True)
    assert completed.stdout.strip() == "complete -F _adapter_supervisor adapter-supervisor"


# An interactive zsh on a pseudo-terminal: each line is typed with a TAB at
# its end, then the edited line is printed back behind a marker.
ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty shell zsh -f -i
zpty -w shell "fpath=($FPATH_DIR \$fpath); autoload -U compinit; compinit -u -d $DUMP; PS1='> '"
sleep 1
for typed in "$@"; do
    zpty -w -n shell "$typed"$'\t'
    sleep 0.5
    zpty -w -n shell $'\x01print -r -- COMPLETED:\x05\n'
    sleep 0.5
done
out=''
while zpty -r -t shell chunk; do out+=$chunk; done
print -r -- "$out" | tr -d '\r' | grep -a '^COMPLETED:'
zpty -d shell
"""


@pytest.mark.skipif(ZSH is None, reason="zsh is not installed")
def test_zsh_completes_commands_options_and_choices_from_fpath(tmp_path: Path) -> None:
    fpath = tmp_path / "functions"
    fpath.mkdir()
    (fpath / "_adapter-supervisor").write_text(script("zsh"))
    assert subprocess.run([ZSH, "-n", str(fpath / "_adapter-supervisor")], check=False).returncode == 0
    typed = [
        "adapter-supervisor sta",
        "adapter-supervisor --json release-j",
        "adapter-supervisor logs --fol",
        "adapter-supervisor completion z",
        "adapter-supervisor status --js",
        "adapter-supervisor acquire --det",
    ]
    completed = subprocess.run(
        [ZSH, "-f", "-c", ZSH_DRIVER, "driver", *typed],
        check=False, capture_output=True, text=True, timeout=60,
        env={"FPATH_DIR": str(fpath), "DUMP": str(tmp_path / "zcompdump"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    lines = [line.removeprefix("COMPLETED:").rstrip() for line in completed.stdout.splitlines()]
    assert lines == [
        "adapter-supervisor status",
        "adapter-supervisor --json release-job",
        "adapter-supervisor logs --follow",
        "adapter-supervisor completion zsh",
        "adapter-supervisor status --json",
        "adapter-supervisor acquire --detach",
    ], completed.stdout + completed.stderr
