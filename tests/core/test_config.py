"""Tests for supervisor.core.config and the schema modules it gathers: the loader,
error messages, templates, defaults (the scalar parsers: test_configvalues.py)."""

from __future__ import annotations

import grp
import json
import os
import pathlib
import signal

import hypothesis
import hypothesis.strategies as st
import msgspec
import pytest

from supervisor.core import template
from supervisor.core.config import (
    check_config,
    check_config_file,
    AdapterConfig,
    Config,
    DaemonConfig,
    bundled_config_path,
    default_socket_path,
    default_state_dir,
    load_config,
    parse_config,
)
from supervisor.core.errors import ConfigError, InvalidParams

REPO = pathlib.Path(__file__).resolve().parents[2]
PATH = "/etc/x.toml"


def adapter_doc(*lines: str, command: str = '["/bin/true"]') -> str:
    """A document with one adapter `demo` whose table holds `lines`."""
    return "\n".join(["[adapters.demo]", f"command = {command}", *lines])


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    return info.value


def demo(*lines: str, command: str = '["/bin/true"]') -> AdapterConfig:
    return parse_config(adapter_doc(*lines, command=command), PATH).adapters["demo"]


# --- the bundled config ---------------------------------------------------------


def test_bundled_config_path_is_the_checkout_copy():
    assert bundled_config_path() == REPO / "config" / "supervisor.toml"


def test_bundled_config_loads_with_default_paths_and_demo_adapter():
    cfg = load_config(bundled_config_path())
    assert cfg.path == str(REPO / "config" / "supervisor.toml")
    assert cfg.daemon.socket == default_socket_path()
    assert cfg.daemon.state_dir == default_state_dir()
    assert cfg.daemon.sweep_interval == 30.0
    assert cfg.daemon.log_format == "auto"
    assert list(cfg.adapters) == ["demo"]
    demo_adapter = cfg.adapters["demo"]
    assert demo_adapter.stdio == "pipe"
    assert demo_adapter.stop_timeout == 2.0
    assert demo_adapter.command[0] == "/bin/sh"


def test_bundled_config_follows_the_user_when_not_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cfg = load_config(bundled_config_path())
    assert cfg.daemon.socket == str(tmp_path / "adapter-supervisor" / "control.sock")
    assert cfg.daemon.state_dir == str(tmp_path / "adapter-supervisor" / "state")


def test_commented_claude_acp_example_is_a_valid_adapter():
    text = bundled_config_path().read_text()
    block = text[text.index("# [adapters.claude-acp]") :]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    adapter = parse_config(uncommented, PATH).adapters["claude-acp"]
    assert adapter.params == ()
    assert adapter.memory_limit == 2**30 and adapter.stdio == "pipe"
    assert adapter.render_argv("j", {}) == ["npx", "-y", "@zed-industries/claude-agent-acp"]


# --- defaults ---------------------------------------------------------------------


def test_empty_document_gives_daemon_defaults_and_no_adapters():
    cfg = parse_config("")
    assert cfg == Config(path="<string>", daemon=DaemonConfig(), adapters={})


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("socket", "/run/adapter-supervisor/control.sock"),
        ("socket_mode", 0o660),
        ("state_dir", "/var/lib/adapter-supervisor"),
        ("sweep_interval", 30.0),
        ("max_connections", 1024),
        ("max_message_bytes", 65536),
        ("memory_budget", None),
        ("allowed_uids", ()),
        ("allowed_gids", ()),
        ("log_format", "auto"),
        ("spawner", "auto"),
        ("log_level", "info"),
    ],
)
def test_daemon_defaults(monkeypatch, field, expected):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert getattr(parse_config("[daemon]\n").daemon, field) == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("name", "demo"),
        ("command", ("/bin/true",)),
        ("params", ()),
        ("env", {}),
        ("cwd", None),
        ("stdio", "null"),
        ("stop_signal", signal.SIGTERM),
        ("stop_timeout", 5.0),
        ("linger", 0.0),
        ("max_instances", 64),
        ("memory_limit", None),
        ("max_pids", 512),
    ],
)
def test_adapter_defaults(field, expected):
    value = getattr(demo(), field)
    assert value == expected
    assert type(value) is type(expected)


def test_socket_group_is_a_group_name_of_this_host_or_a_gid():
    group = grp.getgrgid(os.getgid())
    assert parse_config(f'[daemon]\nsocket_group = "{group.gr_name}"').daemon.socket_group == group.gr_gid
    # A gid needs no name: the kernel knows groups by number.
    assert parse_config("[daemon]\nsocket_group = 4242").daemon.socket_group == 4242
    assert type(parse_config("[daemon]\nsocket_group = 4242").daemon.socket_group) is int
    assert parse_config("[daemon]\n").daemon.socket_group is None


def test_every_field_can_be_set():
    text = """
[daemon]
socket = "/run/s.sock"
socket_mode = "0600"
state_dir = "/var/lib/s"
sweep_interval = 5
max_connections = 8
max_message_bytes = "1MiB"
memory_budget = "6GiB"
allowed_uids = [0, 1000]
allowed_gids = [100]
log_format = "json"
log_level = "debug"

[adapters.claude-acp]
command = ["npx", "--cwd", "{param:workdir}"]
params = ["workdir"]
env = { NODE_OPTIONS = "--max-old-space-size=1024" }
cwd = "/srv/agents"
stdio = "pipe"
stop_signal = "INT"
stop_timeout = 1
linger = 2.5
max_instances = 3
memory_limit = "1.5GiB"
"""
    cfg = parse_config(text, PATH)
    assert cfg.daemon == DaemonConfig(
        socket="/run/s.sock",
        socket_mode=0o600,
        state_dir="/var/lib/s",
        sweep_interval=5.0,
        max_connections=8,
        max_message_bytes=2**20,
        memory_budget=6 * 2**30,
        allowed_uids=(0, 1000),
        allowed_gids=(100,),
        log_format="json",
        log_level="debug",
    )
    assert cfg.adapters == {
        "claude-acp": AdapterConfig(
            name="claude-acp",
            command=("npx", "--cwd", "{param:workdir}"),
            params=("workdir",),
            env={"NODE_OPTIONS": "--max-old-space-size=1024"},
            cwd="/srv/agents",
            stdio="pipe",
            stop_signal=signal.SIGINT,
            stop_timeout=1.0,
            linger=2.5,
            max_instances=3,
            memory_limit=3 * 2**29,
        )
    }
    # Plain values, not the loader's private helper types.
    assert type(cfg.daemon.max_message_bytes) is int
    assert type(cfg.adapters["claude-acp"].stdio) is str
    assert type(cfg.adapters["claude-acp"].params[0]) is str
    assert cfg.adapters["claude-acp"].stop_signal is signal.SIGINT


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        demo().linger = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        parse_config("").daemon.socket = "/x"  # type: ignore[misc]


# --- sizes and signals in a document (parse_size and parse_signal: test_configvalues.py) ---


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('memory_limit = "lots"', "adapters.demo.memory_limit", 'expected a size such as "512MiB" or "1GiB", got "lots"'),
        ('memory_limit = "-1GiB"', "adapters.demo.memory_limit", 'got "-1GiB"'),
        ("memory_limit = 0", "adapters.demo.memory_limit", "at least 1 byte,"),
        ("memory_limit = 1.5", "adapters.demo.memory_limit", "got 1.5"),
        ("max_pids = -1", "adapters.demo.max_pids", "expected an integer >= 0, got -1"),
        ("max_pids = 5000000", "adapters.demo.max_pids", "expected an integer <= 4194304, got 5000000"),
        ('max_pids = "64"', "adapters.demo.max_pids", 'expected an integer, got "64"'),
        ('stop_signal = "SIGFOO"', "adapters.demo.stop_signal", 'got "SIGFOO"'),
        ('stop_signal = "SIGSTOP"', "adapters.demo.stop_signal", "a signal that ends a process"),
        ("stop_signal = 0", "adapters.demo.stop_signal", "got 0"),
    ],
)
def test_bad_adapter_sizes_and_signals_name_the_key(line, key, expected):
    error = config_error(adapter_doc(line))
    assert (error.path, error.key) == (PATH, key)
    assert expected in error.expected
    assert str(error) == f"{PATH}: {key}: {error.expected}"


@pytest.mark.parametrize(("line", "expected"), [("max_pids = 64", 64), ("max_pids = 0", None), ("", 512)])
def test_max_pids_is_a_count_and_zero_turns_it_off(line, expected):
    assert parse_config(adapter_doc(line), PATH).adapters["demo"].max_pids == expected


def test_size_error_message_reads_as_documented():
    error = config_error(adapter_doc('memory_limit = "lots"'))
    assert str(error) == f'{PATH}: adapters.demo.memory_limit: expected a size such as "512MiB" or "1GiB", got "lots"'


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ('max_message_bytes = "64KiB"', "max_message_bytes", 65536),
        ("max_message_bytes = 1024", "max_message_bytes", 1024),
        ('memory_budget = "6GiB"', "memory_budget", 6 * 2**30),
        ("memory_budget = 1000000", "memory_budget", 10**6),
        ('socket_mode = "0660"', "socket_mode", 0o660),
        ('socket_mode = "600"', "socket_mode", 0o600),
        ('socket_mode = "0o640"', "socket_mode", 0o640),
        ("socket_mode = 0o640", "socket_mode", 0o640),
        ("socket_mode = 0", "socket_mode", 0),
    ],
)
def test_daemon_sizes_and_modes(line, field, expected):
    assert getattr(parse_config(f"[daemon]\n{line}").daemon, field) == expected


# --- rejected documents -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1", "colour"),
        ("[logging]\nlevel = 1", "logging"),
        ('[daemon]\ncolour = "red"', "daemon.colour"),
        ('[daemon]\nsocket_path = "/x"', "daemon.socket_path"),
        (adapter_doc('colour = "red"'), "adapters.demo.colour"),
        (adapter_doc('name = "other"'), "adapters.demo.name"),
        ('[adapters."a.b"]\ncommand = ["x"]\nx = 1', 'adapters."a.b".x'),
    ],
)
def test_unknown_keys_are_rejected(text, key):
    error = config_error(text)
    assert error.key == key
    assert error.expected.startswith("unknown key")


def test_unknown_key_message_reads_as_documented():
    error = config_error('[daemon]\ncolour = "red"')
    assert str(error).startswith(f"{PATH}: daemon.colour: unknown key")
    assert "log_level" in error.expected


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("daemon = 5", "daemon", "expected a table, got 5"),
        ("adapters = 5", "adapters", "expected a table, got 5"),
        ("[adapters]\ndemo = 5", "adapters.demo", "expected a table, got 5"),
        ("[adapters.demo]\n", "adapters.demo.command", "missing required key"),
        (adapter_doc(command="[]"), "adapters.demo.command", "expected an array of length >= 1, got an empty array"),
        (adapter_doc(command='"/bin/true"'), "adapters.demo.command", 'expected an array, got "/bin/true"'),
        (adapter_doc(command='["x", 3]'), "adapters.demo.command[1]", "expected a string, got 3"),
        (adapter_doc('params = "a"'), "adapters.demo.params", 'expected an array, got "a"'),
        (adapter_doc('params = ["1a"]'), "adapters.demo.params[0]", 'expected a param name'),
        (adapter_doc('params = ["a", "b", "a"]'), "adapters.demo.params", 'duplicate param "a"'),
        (adapter_doc("env = { A = 1 }"), "adapters.demo.env", "expected a string, got an integer"),
        (adapter_doc('env = { "A=B" = "1" }'), 'adapters.demo.env."A=B"', "expected a variable name"),
        (adapter_doc('env = { "" = "1" }'), 'adapters.demo.env.""', "expected a variable name"),
        (adapter_doc('env = { 1X = "1" }'), "adapters.demo.env.1X", "expected a variable name"),
        (adapter_doc('env = { A = "x\\u0000y" }'), "adapters.demo.env.A", "without NUL"),
        (adapter_doc('env = { ADAPTER_SUPERVISOR_INSTANCE = "x" }'), "adapters.demo.env.ADAPTER_SUPERVISOR_INSTANCE", "reserved"),
        (adapter_doc("cwd = 5"), "adapters.demo.cwd", "expected a string, got 5"),
        (adapter_doc('cwd = ""'), "adapters.demo.cwd", 'expected a path, got ""'),
        (adapter_doc('stdio = "tty"'), "adapters.demo.stdio", 'expected one of "pipe", "null", got "tty"'),
        (adapter_doc("stop_timeout = 0"), "adapters.demo.stop_timeout", "expected a number > 0, got 0"),
        (adapter_doc("stop_timeout = 3601"), "adapters.demo.stop_timeout", "expected a number <= 3600, got 3601"),
        (adapter_doc("stop_timeout = nan"), "adapters.demo.stop_timeout", "got nan"),
        (adapter_doc('stop_timeout = "5s"'), "adapters.demo.stop_timeout", 'expected a number, got "5s"'),
        (adapter_doc("linger = -1"), "adapters.demo.linger", "expected a number >= 0, got -1"),
        (adapter_doc("linger = inf"), "adapters.demo.linger", "got inf"),
        (adapter_doc("max_instances = 0"), "adapters.demo.max_instances", "expected an integer >= 1, got 0"),
        (adapter_doc("max_instances = 2.0"), "adapters.demo.max_instances", "expected an integer, got 2.0"),
        (adapter_doc("max_instances = true"), "adapters.demo.max_instances", "expected an integer, got true"),
        ('[adapters."bad name"]\ncommand = ["x"]', 'adapters."bad name"', "expected an adapter name"),
        ('[adapters.-x]\ncommand = ["x"]', "adapters.-x", "expected an adapter name"),
        (f'[adapters.{"a" * 65}]\ncommand = ["x"]', f"adapters.{'a' * 65}", "expected an adapter name"),
        ('[daemon]\nsocket_mode = "0999"', "daemon.socket_mode", 'expected octal permission bits such as "0660", got "0999"'),
        ('[daemon]\nsocket_mode = "1777"', "daemon.socket_mode", 'no higher than "0777"'),
        ('[daemon]\nsocket_mode = "rw"', "daemon.socket_mode", 'got "rw"'),
        ("[daemon]\nsocket_mode = 660", "daemon.socket_mode", "a bare integer is decimal"),
        ("[daemon]\nsocket_mode = -1", "daemon.socket_mode", "got -1"),
        ('[daemon]\nmax_message_bytes = "1000"', "daemon.max_message_bytes", "at least 1024 bytes"),
        ('[daemon]\nmemory_budget = "lots"', "daemon.memory_budget", 'got "lots"'),
        ("[daemon]\nmemory_budget = 0", "daemon.memory_budget", "at least 1 byte,"),
        ("[daemon]\nsweep_interval = 0", "daemon.sweep_interval", "expected a number > 0, got 0"),
        ("[daemon]\nsweep_interval = inf", "daemon.sweep_interval", "got inf"),
        ("[daemon]\nsweep_interval = 1979-05-27T07:32:00Z", "daemon.sweep_interval", "expected a number, got 1979-05-27"),
        ("[daemon]\nmax_connections = 0", "daemon.max_connections", "expected an integer >= 1, got 0"),
        ('[daemon]\nmax_connections = "many"', "daemon.max_connections", 'expected an integer, got "many"'),
        ('[daemon]\nallowed_uids = "root"', "daemon.allowed_uids", 'expected an array, got "root"'),
        ("[daemon]\nallowed_uids = [0, -1]", "daemon.allowed_uids[1]", "expected an integer >= 0, got -1"),
        ("[daemon]\nallowed_gids = [4294967295]", "daemon.allowed_gids[0]", "<= 4294967294"),
        ('[daemon]\nsocket_group = "no-such-group-here"', "daemon.socket_group", "expected a group that exists on this host"),
        ('[daemon]\nsocket_group = ""', "daemon.socket_group", 'expected a group name such as "agents" or a gid, got ""'),
        ("[daemon]\nsocket_group = -1", "daemon.socket_group", "expected a gid from 0 to 4294967294, got -1"),
        ("[daemon]\nsocket_group = true", "daemon.socket_group", "got true"),
        ('[daemon]\nlog_format = "xml"', "daemon.log_format", 'expected one of "auto", "json", "console", got "xml"'),
        ('[daemon]\nspawner = "fork"', "daemon.spawner", 'expected one of "auto", "subprocess", got "fork"'),
        ('[daemon]\nlog_level = "loud"', "daemon.log_level", 'got "loud"'),
        ("[daemon]\nsocket = 1", "daemon.socket", "expected a string, got 1"),
        ('[daemon]\nsocket = ""', "daemon.socket", "expected a path"),
        (f'[daemon]\nsocket = "/{"s" * 107}"', "daemon.socket", "at most 107 bytes"),
        ('[daemon]\nstate_dir = "/x\\u0000"', "daemon.state_dir", "expected a path"),
    ],
)
def test_invalid_values_name_the_key_and_what_was_expected(text, key, expected):
    error = config_error(text)
    assert (error.path, error.key) == (PATH, key)
    assert expected in error.expected


@pytest.mark.parametrize("name", ["claude-acp", "a.b", "A1_", "9", "x" * 64])
def test_valid_adapter_names(name):
    cfg = parse_config(f'[adapters."{name}"]\ncommand = ["x"]')
    assert cfg.adapters[name].name == name


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[daemon]\nsweep_interval = 30\nlog_level = \n", 3),
        ("[daemon]\n\nsocket = /run/x\n", 3),
        ('[daemon]\nlog_level = "info"\nlog_level = "debug"\n[x]\n', 3),
        ("[daemon", 1),
        ('[adapters.demo]\ncommand = ["a",\n', 2),
    ],
)
def test_bad_toml_names_the_line(text, line):
    error = config_error(text)
    assert error.key == f"line {line}"
    assert str(error).startswith(f"{PATH}: line {line}: invalid TOML: ")


def test_load_config_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nsocket = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line 2: invalid TOML: ")


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable bytes"])
def test_unreadable_files_are_config_errors(tmp_path, kind):
    path = tmp_path / "supervisor.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable bytes":
        path.write_bytes(b"[daemon]\nlog_level = \"\xff\"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_says_why(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file: No such file"):
        load_config(tmp_path / "nope.toml")


def test_load_config_records_the_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "s.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert load_config("s.toml").path == str(tmp_path / "s.toml")
    assert parse_config("").path == "<string>"


# --- command templates --------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        '["x", "{job}"]',
        '["x", "--job={job}", "{param:a}-{param:b_2}"]',
        '["x", "{{", "}}", "{{job}}", "{{{job}}}"]',
        '["/usr/bin/{{odd}}"]',
        '["x", "plain"]',
    ],
)
def test_valid_templates(command):
    assert demo('params = ["a", "b_2"]', command=command).command == tuple(json.loads(command))


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ('["x", "{param:w}"]', 'param "w" is not declared'),
        ('["x", "{param:a}{param:c}"]', 'param "c" is not declared'),
        ('["x", "{foo}"]', 'unknown placeholder "{foo}"'),
        ('["x", "{}"]', 'unknown placeholder "{}"'),
        ('["x", "{param:}"]', 'unknown placeholder "{param:}"'),
        ('["x", "{param:1a}"]', 'unknown placeholder "{param:1a}"'),
        ('["x", "{JOB}"]', 'unknown placeholder "{JOB}"'),
        ('["x", "{job"]', 'unmatched "{"'),
        ('["x", "a}b"]', 'unmatched "}"'),
        ('["x", "{a{job}"]', 'unmatched "{"'),
        ('["{job}"]', "no placeholders"),
        ('["{param:a}", "x"]', "no placeholders"),
        ('[""]', "non-empty program"),
        ('["x", "a\\u0000b"]', "no NUL"),
    ],
)
def test_invalid_templates_fail_at_the_command_key(command, reason):
    error = config_error(adapter_doc('params = ["a"]', command=command))
    assert error.key == "adapters.demo.command"
    assert reason in error.expected


@pytest.fixture
def templated() -> AdapterConfig:
    return demo(
        'params = ["workdir", "model", "unused"]',
        command='["agent", "--job", "{job}", "--cwd={param:workdir}", "{{literal}}", "{{{param:model}}}"]',
    )


def test_render_argv_substitutes_in_place(templated):
    argv = templated.render_argv("job-1", {"workdir": "/srv/w", "model": "m1"})
    assert argv == ["agent", "--job", "job-1", "--cwd=/srv/w", "{literal}", "{m1}"]


@pytest.mark.parametrize(
    "value",
    ["a b c", "it's \"quoted\"", "x; rm -rf /", "$(id) `id` $HOME", "*", "{job}", "{param:model}", "-", "é☃"],
)
def test_render_argv_values_stay_one_literal_element(templated, value):
    argv = templated.render_argv(value, {"workdir": value, "model": "m"})
    assert argv == ["agent", "--job", value, f"--cwd={value}", "{literal}", "{m}"]


def test_render_argv_does_not_touch_a_command_without_placeholders():
    adapter = demo(command='["/bin/sh", "-c", "echo $1; exit 0"]')
    assert adapter.render_argv("j", {}) == ["/bin/sh", "-c", "echo $1; exit 0"]


def test_render_argv_accepts_declared_unused_params_and_longest_value(templated):
    long_value = "v" * template.MAX_PARAM_CHARS
    argv = templated.render_argv("j", {"workdir": long_value, "model": "m", "unused": "u"})
    assert argv[3] == f"--cwd={long_value}"


@pytest.mark.parametrize(
    ("job", "params", "fragment"),
    [
        ("j", {"workdir": "/w", "model": "m", "other": "x"}, 'does not declare param "other"'),
        ("j", {"nope": "x"}, 'does not declare param "nope"'),
        ("j", {"model": "m"}, 'needs param "workdir", which was not given'),
        ("j", {"workdir": "/w"}, 'needs param "model"'),
        ("j", {"workdir": "", "model": "m"}, 'param "workdir" is empty'),
        ("j", {"workdir": "/w", "model": "m" * 4097}, 'param "model" is 4097 characters long, the limit is 4096'),
        ("j", {"workdir": "/w\0", "model": "m"}, 'param "workdir" contains the control character U+0000'),
        ("j", {"workdir": "/w\n", "model": "m"}, "U+000A"),
        ("j", {"workdir": "/w\x7f", "model": "m"}, "U+007F"),
        ("j", {"workdir": "/w\x9b", "model": "m"}, "U+009B"),
        ("j", {"workdir": "\ud800", "model": "m"}, "unpaired surrogate U+D800"),
        ("j", {"workdir": "/w", "model": 5}, 'param "model" is not a string'),
        ("j", {"workdir": "/w", "model": "m", "unused": ""}, 'param "unused" is empty'),
        ("", {"workdir": "/w", "model": "m"}, "job is empty"),
        ("j\tk", {"workdir": "/w", "model": "m"}, "job contains the control character U+0009"),
    ],
)
def test_render_argv_invalid_params(templated, job, params, fragment):
    with pytest.raises(InvalidParams) as info:
        templated.render_argv(job, params)
    assert fragment in info.value.message


def test_render_argv_rejects_params_for_an_adapter_without_params():
    with pytest.raises(InvalidParams, match=r'does not declare param "x" \(declared: none\)'):
        demo().render_argv("j", {"x": "1"})


# --- paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cwd", "expected"),
    [("work", "cfg/work"), ("./a/../b", "cfg/b"), ("../up", "up"), (".", "cfg")],
)
def test_relative_cwd_resolves_against_the_config_directory(tmp_path, cwd, expected):
    path = tmp_path / "cfg" / "supervisor.toml"
    path.parent.mkdir()
    path.write_text(adapter_doc(f'cwd = "{cwd}"'))
    assert load_config(path).adapters["demo"].cwd == str(tmp_path / expected)


def test_absolute_cwd_is_kept(tmp_path):
    path = tmp_path / "supervisor.toml"
    path.write_text(adapter_doc('cwd = "/srv/agents"'))
    assert load_config(path).adapters["demo"].cwd == "/srv/agents"


def test_relative_paths_in_a_string_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(adapter_doc('cwd = "w"') + '\n[daemon]\nsocket = "s.sock"\nstate_dir = "st"')
    assert cfg.adapters["demo"].cwd == str(tmp_path / "w")
    assert cfg.daemon.socket == str(tmp_path / "s.sock")
    assert cfg.daemon.state_dir == str(tmp_path / "st")


def test_relative_daemon_paths_resolve_against_the_config_directory(tmp_path):
    path = tmp_path / "supervisor.toml"
    path.write_text('[daemon]\nsocket = "run/c.sock"\nstate_dir = "state"\n')
    cfg = load_config(path)
    assert (cfg.daemon.socket, cfg.daemon.state_dir) == (str(tmp_path / "run/c.sock"), str(tmp_path / "state"))


@pytest.mark.parametrize(
    ("euid", "xdg", "socket", "state_dir"),
    [
        (0, None, "/run/adapter-supervisor/control.sock", "/var/lib/adapter-supervisor"),
        (0, "/run/user/0", "/run/adapter-supervisor/control.sock", "/var/lib/adapter-supervisor"),
        (1000, "/run/user/1000", "/run/user/1000/adapter-supervisor/control.sock", "/run/user/1000/adapter-supervisor/state"),
        (1000, None, "/tmp/adapter-supervisor-1000/control.sock", "/tmp/adapter-supervisor-1000/state"),
        (1000, "", "/tmp/adapter-supervisor-1000/control.sock", "/tmp/adapter-supervisor-1000/state"),
        (1001, "relative/dir", "/tmp/adapter-supervisor-1001/control.sock", "/tmp/adapter-supervisor-1001/state"),
    ],
)
def test_default_paths(monkeypatch, euid, xdg, socket, state_dir):
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    if xdg is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert (default_socket_path(), default_state_dir()) == (socket, state_dir)
    daemon = parse_config("").daemon
    assert (daemon.socket, daemon.state_dir) == (socket, state_dir)


# --- robustness -----------------------------------------------------------------------

_DAEMON_KEYS = [field for field in DaemonConfig.__struct_fields__] + ["colour"]
_ADAPTER_KEYS = [field for field in AdapterConfig.__struct_fields__ if field != "name"] + ["colour"]
_SCALARS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["0660", "1GiB", "SIGTERM", "pipe", "json", "{job}", "{param:a}", "a", "-1"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), _SCALARS, max_size=2))


def _toml(value: object) -> str:
    """`value` as a TOML value (json's string escapes are valid TOML escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else "inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) else str(value)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    daemon=st.dictionaries(st.sampled_from(_DAEMON_KEYS), _VALUES, max_size=4),
    adapter=st.dictionaries(st.sampled_from(_ADAPTER_KEYS), _VALUES, max_size=5),
    name=st.sampled_from(["demo", "bad name", "x.y"]),
)
def test_any_document_gives_a_config_or_a_config_error(daemon, adapter, name):
    text = "[daemon]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in daemon.items())
    text += f"[adapters.{json.dumps(name)}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in adapter.items())
    try:
        cfg = parse_config(text, PATH)
    except ConfigError as error:
        assert str(error).startswith(f"{PATH}: ")
        assert error.expected
    else:
        assert isinstance(cfg, Config)
        assert msgspec.json.decode(msgspec.json.encode(cfg.daemon), type=DaemonConfig) == cfg.daemon


@pytest.mark.parametrize("value", ["auto", "off", "/sys/fs/cgroup/unified"])
def test_cgroup_setting_accepts_auto_off_and_absolute_paths(value: str) -> None:
    loaded = parse_config(f"[daemon]\ncgroup = \"{value}\"\n", "/etc/x.toml")
    assert loaded.daemon.cgroup == value


def test_cgroup_setting_refuses_relative_paths() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[daemon]\ncgroup = "sys/fs"\n', "/etc/x.toml")
    assert info.value.key == "daemon.cgroup"
    assert "absolute path" in str(info.value)


# -- every error at once ---------------------------------------------------------

EVERY_ERROR = """\
colour = "red"
[daemon]
socket_mode = "9999"
sweep_interval = -1
nonsense = 1
[adapters.ok]
command = ["/bin/true"]
[adapters.empty]
command = []
stop_timeout = "soon"
[adapters.undeclared]
command = ["/bin/echo", "{param:dir}"]
[adapters."no good"]
command = ["/bin/true"]
[adapters.untabled]
[adapters.missing]
stdio = "pipe"
"""


def test_check_config_reports_every_error_with_its_key_path():
    checked = check_config(EVERY_ERROR.replace("[adapters.untabled]\n", ""), "/etc/x.toml")
    assert checked.config is None and checked.path == "/etc/x.toml"
    assert [error.key for error in checked.errors] == [
        "colour",
        "daemon.socket_mode", "daemon.sweep_interval", "daemon.nonsense",
        "adapters.empty.command", "adapters.empty.stop_timeout",
        "adapters.undeclared.command",
        'adapters."no good"',
        "adapters.missing.command",
    ]
    messages = {error.key: error.expected for error in checked.errors}
    assert messages["daemon.nonsense"].startswith("unknown key (allowed here: socket,")
    assert messages["adapters.empty.stop_timeout"] == 'expected a number, got "soon"'
    assert 'param "dir" is not declared' in messages["adapters.undeclared.command"]
    assert messages["adapters.missing.command"] == "missing required key"
    assert all(str(error).startswith("/etc/x.toml: ") for error in checked.errors)
    # parse_config raises the first of them.
    with pytest.raises(ConfigError) as raised:
        parse_config(EVERY_ERROR, "/etc/x.toml")
    assert raised.value.key == "colour"


def test_check_config_of_a_valid_document_has_the_config_and_no_error():
    checked = check_config('[adapters.ok]\ncommand = ["/bin/true"]\n')
    assert checked.errors == [] and checked.config == parse_config('[adapters.ok]\ncommand = ["/bin/true"]\n')


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("daemon = 5\n", "daemon", "expected a table, got 5"),
        ("adapters = []\n", "adapters", "expected a table, got an empty array"),
        ("[adapters]\nx = 1\n", "adapters.x", "expected a table, got 1"),
        ("[daemon\n", "line 1", "invalid TOML"),
    ],
)
def test_check_config_of_a_table_that_is_no_table(text, key, expected):
    (error,) = check_config(text).errors
    assert error.key == key and error.expected.startswith(expected)


def test_check_config_file_reports_an_unreadable_file_as_one_error(tmp_path):
    checked = check_config_file(tmp_path / "absent.toml")
    assert checked.config is None and [e.expected for e in checked.errors] == ["cannot read the file: No such file or directory"]
    assert checked.path == str(tmp_path / "absent.toml")
