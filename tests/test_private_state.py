"""The hijack of a non-root daemon's default directory, tried as a hostile
local user would: another uid pre-creates /tmp/adapter-supervisor-<uid>, open
to all, with symlinks into the victim's files. The victim's daemon refuses
to start (69, naming the directory) and touches nothing. Real uids (the test
runs as root and drops to them in the daemon's process)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON

ATTACKER, VICTIM = 61011, 61012

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to other uids needs root")

# Imports every module of the daemon while the interpreter's files are still
# readable, then becomes the victim and serves with the default paths.
SERVE_AS = textwrap.dedent(
    """
    import importlib, os, pkgutil, sys
    import supervisor
    for module in pkgutil.walk_packages(supervisor.__path__, "supervisor."):
        # (Not __main__, which runs the CLI; not the ctypes helper library.)
        if not module.name.endswith(("__main__", "_clonespawn")):
            importlib.import_module(module.name)
    from supervisor.cli import main
    uid = int(sys.argv[1])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ.pop("XDG_RUNTIME_DIR", None)
    sys.exit(main(["serve", "--config", sys.argv[2]]))
    """
)

CONFIG = """
[daemon]
log_format = "json"
cgroup = "off"

[adapters.sleeper]
command = ["/bin/sleep", "60"]
"""


@pytest.fixture
def victim_runtime_dir():
    path = Path(f"/tmp/adapter-supervisor-{VICTIM}")
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def world_readable(tmp_path: Path) -> Path:
    """A directory the victim can read (pytest's tmp_path is root's alone)."""
    shared = Path(f"/tmp/adapter-supervisor-test-{os.getpid()}-{tmp_path.name}")
    shared.mkdir(mode=0o755)
    (shared / "supervisor.toml").write_text(CONFIG)
    return shared


def serve_as_victim(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-c", SERVE_AS, str(VICTIM), str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
        env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")},
    )


def run_to_exit(daemon: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """What the daemon printed until it exited; killed (and the test failed)
    if it is still running after `timeout`."""
    try:
        out, _ = daemon.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon.kill()
        out, _ = daemon.communicate()
        raise AssertionError(f"the daemon kept running: {out.decode()[-2000:]}") from None
    return out.decode()


def test_a_default_directory_pre_created_by_another_user_is_refused(tmp_path: Path, victim_runtime_dir: Path) -> None:
    shared = world_readable(tmp_path)
    try:
        home = shared / "victim-home"
        home.mkdir(mode=0o700)
        bashrc = home / ".bashrc"
        bashrc.write_text("# the victim's own\n")
        for path in (home, bashrc):
            os.chown(path, VICTIM, VICTIM)
        # The attacker's trap, as the attacker would set it.
        state = victim_runtime_dir / "state"
        state.mkdir(parents=True)
        for directory in (victim_runtime_dir, state):
            directory.chmod(0o777)
            os.chown(directory, ATTACKER, ATTACKER)
        for name, target in (("daemon.lock", bashrc), ("reports.jsonl", bashrc)):
            (state / name).symlink_to(target)
            os.lchown(state / name, ATTACKER, ATTACKER)

        daemon = serve_as_victim(shared / "supervisor.toml")
        text = run_to_exit(daemon)
        assert daemon.returncode == 69, text
        assert str(victim_runtime_dir) in text and f"uid {ATTACKER}" in text, text
        assert "Traceback" not in text
        assert bashrc.read_text() == "# the victim's own\n"
        assert sorted(p.name for p in state.iterdir()) == ["daemon.lock", "reports.jsonl"]
        assert not list(victim_runtime_dir.glob("*.sock"))
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_default_directories_are_made_private(tmp_path: Path, victim_runtime_dir: Path) -> None:
    shared = world_readable(tmp_path)
    try:
        daemon = serve_as_victim(shared / "supervisor.toml")
        sock = victim_runtime_dir / "control.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert daemon.poll() is None, daemon.communicate()[0].decode()
            assert time.monotonic() < deadline, "the daemon never bound its socket"
            time.sleep(0.05)
        for directory in (victim_runtime_dir, victim_runtime_dir / "state"):
            info = os.lstat(directory)
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (VICTIM, 0o700), directory
        lock = os.lstat(victim_runtime_dir / "state" / "daemon.lock")
        assert (lock.st_uid, stat.S_IMODE(lock.st_mode)) == (VICTIM, 0o600)
        daemon.send_signal(signal.SIGTERM)
        text = run_to_exit(daemon, timeout=30)
        assert daemon.returncode == 0, text
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_an_empty_default_directory_of_another_user_is_refused_too(tmp_path: Path, victim_runtime_dir: Path) -> None:
    """Even with nothing in it: whoever owns it could later swap what the
    daemon made there (its state, its socket) for their own."""
    shared = world_readable(tmp_path)
    try:
        victim_runtime_dir.mkdir(mode=0o777)
        victim_runtime_dir.chmod(0o777)
        os.chown(victim_runtime_dir, ATTACKER, ATTACKER)
        daemon = serve_as_victim(shared / "supervisor.toml")
        text = run_to_exit(daemon)
        assert daemon.returncode == 69, text
        assert f"{victim_runtime_dir} belongs to uid {ATTACKER}" in text
        assert list(victim_runtime_dir.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)
