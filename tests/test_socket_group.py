"""`socket_group`: the control socket file is given to a group, whose
members may then connect; a daemon that may not give it to that group
refuses to start. Real gids and uids: the test runs as root, the daemon runs
as root or as an unprivileged uid, and clients connect as uid 65534 with and
without the group among their supplementary groups."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.asuser import NOBODY, connect_as, owned_dir, serve_as
from tests.conftest import DAEMON_START_TIMEOUT_S, wait_for_socket

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other uids and gids needs root")

# Ids no account of a test host uses: the kernel needs no name for them.
AGENTS_GID = 61020
OTHER_GID = 61021
DAEMON_UID = 61022


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every uid can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="as-group-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hello_served(outcome: dict[str, object]) -> bool:
    answer = outcome.get("answer")
    return isinstance(answer, dict) and answer.get("result", {}).get("protocol") == 1


def test_members_of_socket_group_get_in_and_nobody_else(start_daemon, public_dir: Path) -> None:
    path = str(public_dir / "control.sock")
    daemon = start_daemon(wait=False, socket=path, socket_mode="0660", socket_group=AGENTS_GID)
    wait_for_socket(path, daemon.popen, daemon.log_path, DAEMON_START_TIMEOUT_S)
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, AGENTS_GID, 0o660)
    # A member (a supplementary group, as `usermod -aG` makes it) is let in
    # by the file and then by the daemon, with allowed_gids left empty.
    assert hello_served(connect_as(path, NOBODY, groups=(AGENTS_GID,)))
    # Anyone else is kept out by the file itself.
    assert connect_as(path, NOBODY) == {"connect_error": "EACCES"}
    # allowed_gids alone does not open the file: it is the daemon's check
    # after the file's, for sockets whose mode lets more in.
    assert connect_as(path, NOBODY, groups=(OTHER_GID,)) == {"connect_error": "EACCES"}


def test_allowed_gids_admits_where_the_socket_mode_lets_the_peer_reach_the_daemon(start_daemon, public_dir: Path) -> None:
    path = str(public_dir / "control.sock")
    daemon = start_daemon(
        wait=False, socket=path, socket_mode="0666", socket_group=AGENTS_GID, allowed_gids=[OTHER_GID],
    )
    wait_for_socket(path, daemon.popen, daemon.log_path, DAEMON_START_TIMEOUT_S)
    assert hello_served(connect_as(path, NOBODY, groups=(OTHER_GID,)))
    assert hello_served(connect_as(path, NOBODY, groups=(AGENTS_GID,)))
    refused = connect_as(path, NOBODY)
    assert refused["connect_error"] is None and refused["answer"]["error"]["code"] == 1005
    assert "socket_group" in refused["answer"]["error"]["message"]


def write_config(directory: Path, **daemon: object) -> Path:
    config = directory / "supervisor.toml"
    config.write_text(
        "[daemon]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in daemon.items())
        + '\n[adapters.sleeper]\ncommand = ["/bin/sleep", "60"]\n'
    )
    return config


def test_an_unprivileged_daemon_gives_the_socket_to_a_group_it_belongs_to(public_dir: Path) -> None:
    home = owned_dir(public_dir / "daemon", DAEMON_UID)
    # A directory the daemon makes: open to others to enter (0755), since
    # members of socket_group must reach the socket in it.
    path = str(home / "run" / "control.sock")
    config = write_config(
        public_dir, socket=path, state_dir=str(home / "state"), socket_group=AGENTS_GID, log_format="json",
    )
    daemon = serve_as(
        DAEMON_UID, ["serve", "--config", str(config)], groups=(AGENTS_GID,), log_path=public_dir / "daemon.log",
    )
    try:
        wait_for_socket(path, daemon, public_dir / "daemon.log", DAEMON_START_TIMEOUT_S)
        info = os.stat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (DAEMON_UID, AGENTS_GID, 0o660)
        assert stat.S_IMODE(os.stat(home / "run").st_mode) == 0o755
        assert hello_served(connect_as(path, NOBODY, groups=(AGENTS_GID,)))
        assert connect_as(path, NOBODY) == {"connect_error": "EACCES"}
    finally:
        daemon.terminate()
        assert daemon.wait(20) == 0, (public_dir / "daemon.log").read_text()
    assert not os.path.lexists(path)


def test_a_daemon_outside_socket_group_refuses_to_start_and_says_why(public_dir: Path) -> None:
    home = owned_dir(public_dir / "daemon", DAEMON_UID)
    path = str(home / "control.sock")
    config = write_config(
        public_dir, socket=path, state_dir=str(home / "state"), socket_group=AGENTS_GID, log_format="json",
    )
    daemon = serve_as(DAEMON_UID, ["serve", "--config", str(config)], log_path=public_dir / "daemon.log")
    assert daemon.wait(DAEMON_START_TIMEOUT_S) == 69
    text = (public_dir / "daemon.log").read_text()
    failed = next(json.loads(line) for line in text.splitlines() if '"daemon.start_failed"' in line)
    assert "daemon.socket_group" in failed["error"] and f"gid {AGENTS_GID}" in failed["error"]
    assert f"uid {DAEMON_UID}" in failed["error"] and "Traceback" not in text
    # Nothing is left listening, nor a file for a later start to trip over.
    assert not os.path.lexists(path)
