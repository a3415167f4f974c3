"""The README's quick path runs as written: its Python snippets and its
command-line session against a daemon on the bundled config, and the
examples' commands, from the repository's root, on the example config, whose
socket and state directory are its own (so its daemon runs beside the
quick-start one)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.client import Client
from supervisor.core.config import bundled_config_path, load_config, parse_config
from tests.conftest import PYTHON, DaemonProcess, kill_tagged_leftovers, wait_for_socket

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = ROOT / "examples"
# The quick start installs the project into this venv, and the README's
# commands name its programs.
VENV_BIN = ROOT / ".venv" / "bin"

# The commands the README gives for the examples, in its order.
EXAMPLE_DAEMON = ".venv/bin/adapter-supervisor serve --config examples/supervisor.toml"
EXAMPLE_COMMANDS = [
    ".venv/bin/python examples/orchestrator.py",
    '.venv/bin/python examples/acp_orchestrator.py "hello there"',
]


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.M | re.S)


def command_lines() -> list[str]:
    """Every line of the README's shell blocks, without its trailing comment."""
    return [re.sub(r"\s+#.*$", "", line).strip() for block in blocks("sh") for line in block.splitlines()]


def bundled_adapters() -> str:
    text = bundled_config_path().read_text()
    return text[text.index("[adapters."):]


def needs_the_quick_start_venv() -> None:
    if not (VENV_BIN / "adapter-supervisor").exists():
        pytest.skip(f"the README's commands use the quick start's venv, and {VENV_BIN} has no adapter-supervisor")


def test_the_python_snippets_run_as_written_against_the_bundled_config(start_daemon, tmp_path: Path) -> None:
    snippets = blocks("python")
    daemon = start_daemon(bundled_adapters())
    env = dict(os.environ, ADAPTER_SUPERVISOR_SOCKET=daemon.socket)
    # The README says the async snippet runs the same under Trio: so it does.
    snippets += [
        snippet.replace("asyncio.run(main())", "import trio\ntrio.run(main)") for snippet in snippets if "asyncio.run(main())" in snippet
    ]
    assert len(snippets) >= 3
    printed = ""
    for number, snippet in enumerate(snippets):
        script = tmp_path / f"snippet{number}.py"
        script.write_text(snippet)
        run = subprocess.run([PYTHON, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"README snippet {number} failed:\n{snippet}\n{run.stderr}"
        if 'b"hello\\n"' in snippet:
            assert "b'hello\\n'" in run.stdout, run.stdout  # the demo adapter echoed
        printed += run.stdout
    # The async snippet caught the error as itself.
    assert "no adapter named 'no-such-adapter'" in printed
    status = daemon.client().status()
    assert status["daemon"]["leases"] == 0 and status["instances"] == []


def test_the_command_line_session_runs_as_written_against_the_bundled_config(start_daemon) -> None:
    needs_the_quick_start_venv()
    (block,) = [block for block in blocks("sh") if " acquire job-1 demo " in block]
    session = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    assert [shlex.split(line)[1] for line in session] == ["acquire", "status", "logs", "release"]
    daemon = start_daemon(bundled_adapters())
    env = dict(os.environ, ADAPTER_SUPERVISOR_SOCKET=daemon.socket)
    filled: dict[str, str] = {}
    outputs = []
    for line in session:
        argv = [filled.get(word, word) for word in shlex.split(line)]
        deadline = time.monotonic() + 5
        while True:
            run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            # The daemon follows the adapter's stderr as it comes: the demo's line may trail the spawn.
            if argv[1] != "logs" or "demo adapter for job" in run.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert run.returncode == 0, f"{line}:\n{run.stderr}"
        outputs.append(run.stdout)
        if argv[1] == "acquire":
            filled["<lease>"] = re.search(r"^lease (\S+)$", run.stdout, re.M).group(1)  # type: ignore[union-attr]
            filled["<instance>"] = re.search(r"instance (\S+)", run.stdout).group(1)  # type: ignore[union-attr]
    assert filled["<instance>"] in outputs[1] and "demo adapter for job job-1" in outputs[2]
    assert daemon.client().status()["daemon"]["leases"] == 0


def test_the_example_daemon_has_a_socket_and_state_dir_of_its_own() -> None:
    bundled = load_config(bundled_config_path()).daemon
    example = load_config(EXAMPLES / "supervisor.toml").daemon
    assert Path(example.socket).parent == Path(example.state_dir).parent == EXAMPLES / ".run"
    assert example.socket != bundled.socket and example.state_dir != bundled.state_dir


def test_claudes_adapter_is_a_valid_adapter_written_out_in_the_example_config() -> None:
    (snippet,) = [block for block in blocks("toml") if "claude-agent-acp" in block]
    config = parse_config(snippet)
    assert config.adapters["claude"].stdio == "pipe" and config.adapters["claude"].command[:2] == ("npx", "-y")
    commented = "\n".join(
        line.removeprefix("# ") for line in (EXAMPLES / "supervisor.toml").read_text().splitlines() if line.startswith("# ")
    )
    assert snippet.strip() in commented


def test_the_example_commands_run_as_written_from_the_repository_root(tmp_path: Path) -> None:
    needs_the_quick_start_venv()
    lines = command_lines()
    assert [lines.index(command) for command in [EXAMPLE_DAEMON, *EXAMPLE_COMMANDS]] == sorted(
        lines.index(command) for command in [EXAMPLE_DAEMON, *EXAMPLE_COMMANDS]
    )
    config = load_config(EXAMPLES / "supervisor.toml").daemon
    assert not Path(config.socket).exists() or not _answers(config.socket), (
        f"an example daemon already runs on {config.socket}: stop it first"
    )
    log_path = tmp_path / "example-daemon.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(shlex.split(EXAMPLE_DAEMON), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = DaemonProcess(popen, config.socket, Path(config.state_dir), EXAMPLES / "supervisor.toml", log_path)
    try:
        wait_for_socket(config.socket, popen, log_path, 20.0)
        runs = [subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=120) for command in EXAMPLE_COMMANDS]
    finally:
        popen.send_signal(signal.SIGTERM)
        returncode = popen.wait(30)
    for command, run in zip(EXAMPLE_COMMANDS, runs):
        assert run.returncode == 0, f"{command}:\n{run.stdout}\n{run.stderr}"
    assert "adapter instances left: 0" in runs[0].stdout
    assert "acp-job-1 heard: hello there" in runs[1].stdout and ": gone" in runs[1].stdout
    assert returncode == 0 and kill_tagged_leftovers(daemon) == []


def _answers(path: str) -> bool:
    try:
        with Client(path, timeout=2) as client:
            client.hello()
    except OSError:
        return False
    return True
