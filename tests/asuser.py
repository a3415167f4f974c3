"""Acting as another uid, for the tests of non-root deployments: a daemon
that serves as an unprivileged user, and a client that connects as one.

The test runs as root. The interpreter may live where other users cannot
read it, so each child starts as root, imports what it needs, and only then
drops to the uid and groups it was given (as a login or a user manager
would have set them).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON

NOBODY = 65534

# Runs as `python -c SERVE_AS UID GIDS_JSON ENV_JSON -- ARGV...`: imports every
# module of the daemon, becomes UID with primary gid UID and supplementary
# GIDS, replaces the environment's variables by ENV's, and runs the CLI on ARGV.
SERVE_AS = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, sys
    import supervisor
    for module in pkgutil.walk_packages(supervisor.__path__, "supervisor."):
        # (Not __main__, which runs the CLI; not the ctypes helper library.)
        if not module.name.endswith(("__main__", "_clonespawn")):
            importlib.import_module(module.name)
    from supervisor.cli import main
    uid, groups, env = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    os.setgroups(groups)
    os.setgid(uid)
    os.setuid(uid)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.exit(main(sys.argv[sys.argv.index("--") + 1:]))
    """
)

# Runs as `python -c CONNECT_AS PATH UID GIDS_JSON`: connects to PATH as UID
# (primary gid UID, supplementary GIDS), sends `hello`, and prints whether
# connect failed (its errno name) or what the daemon answered.
CONNECT_AS = textwrap.dedent(
    """
    import errno, json, os, socket, sys
    path, uid, groups = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    os.setgroups(groups)
    os.setgid(uid)
    os.setuid(uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except OSError as exc:
        print(json.dumps({"connect_error": errno.errorcode[exc.errno]}))
        sys.exit(0)
    try:
        sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{}}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused: the daemon's error line is waiting to be read
    data = b""
    while not data.endswith(b"\\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    print(json.dumps({"connect_error": None, "answer": json.loads(data) if data else None}))
    """
)


def serve_as(
    uid: int, argv: list[str], *, groups: tuple[int, ...] = (), env: dict[str, str | None] | None = None,
    log_path: Path, pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start `adapter-supervisor ARGV` as `uid` (with supplementary `groups`),
    its environment changed by `env` (None removes a variable), its output
    appended to `log_path`."""
    changes = {"NOTIFY_SOCKET": None, "LISTEN_FDS": None, "LISTEN_PID": None, **(env or {})}
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [PYTHON, "-c", SERVE_AS, str(uid), json.dumps(list(groups)), json.dumps(changes), "--", *argv],
            stdout=log_file, stderr=subprocess.STDOUT, cwd="/", pass_fds=pass_fds,
        )


def connect_as(path: str, uid: int = NOBODY, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """Connect to the daemon at `path` as `uid` with supplementary `groups`
    and say hello: `{"connect_error": "EACCES"}` if the socket file kept it
    out, else `{"connect_error": None, "answer": <the response>}`."""
    completed = subprocess.run(
        [PYTHON, "-c", CONNECT_AS, path, str(uid), json.dumps(list(groups))],
        check=False, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def owned_dir(path: Path, uid: int, mode: int = 0o755) -> Path:
    """`path` made (with its parents) and given to `uid` with `mode`."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path
