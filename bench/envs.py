"""The peers' virtualenvs: supervisord and circus, each in its own.

supervisord's distribution is also called `supervisor`, the name of our package,
so it must never be installed next to ours; circus is kept apart too, so that
neither peer's dependencies (pyzmq, tornado, psutil) can change our daemon's.
The environments live in bench/.venvs/ (git-ignored) and are reused while they
import; a broken or missing one is rebuilt with pip from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENVS_DIR = BENCH_DIR / ".venvs"

# Pinned so that a rerun measures the same peers; bump deliberately.
SUPERVISORD_REQUIREMENT = "supervisor==4.3.0"
CIRCUS_REQUIREMENT = "circus==0.19.0"

# A pip install on a slow mirror can take minutes; past this something is wrong.
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class PeerEnv:
    name: str
    path: Path
    requirement: str
    # Run with the env's python; must exit 0 once the peer is usable.
    check: str

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.path / "bin" / name


SUPERVISORD = PeerEnv(
    "supervisord", VENVS_DIR / "supervisord", SUPERVISORD_REQUIREMENT,
    "import supervisor.supervisord, supervisor.xmlrpc",
)
CIRCUS = PeerEnv("circus", VENVS_DIR / "circus", CIRCUS_REQUIREMENT, "import circus.arbiter, zmq")


def base_python() -> str:
    """The interpreter the project's venv was made from (not the venv itself)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _usable(env: PeerEnv) -> bool:
    if not env.python.exists():
        return False
    # Not from the checkout: its `supervisor` package would shadow supervisord's.
    result = subprocess.run([str(env.python), "-c", env.check], capture_output=True, timeout=60, cwd=env.path,
                            check=False)
    return result.returncode == 0


def ensure(env: PeerEnv, log: Callable[[str], None]) -> float:
    """Make `env` usable; returns the seconds spent installing (0 if it was)."""
    if _usable(env):
        return 0.0
    started = time.monotonic()
    log(f"installing {env.requirement} into {env.path} (first run only) ...")
    shutil.rmtree(env.path, ignore_errors=True)
    env.path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base_python(), "-m", "venv", str(env.path)], check=True, timeout=INSTALL_TIMEOUT_S)
    subprocess.run(
        [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", env.requirement],
        check=True, timeout=INSTALL_TIMEOUT_S,
    )
    if not _usable(env):
        raise RuntimeError(f"{env.requirement} installed into {env.path} but `{env.check}` fails")
    return time.monotonic() - started


def compile_ours() -> None:
    """Bring the bytecode of this checkout's package up to date before any
    daemon starts: with PYTHONDONTWRITEBYTECODE set (or a read-only cache)
    every daemon start, and every upgrade's new image, would otherwise compile
    the modules changed since the last write, a first upgrade of 280 ms of
    CPU instead of 180."""
    import compileall

    compileall.compile_dir(str(REPO_DIR / "supervisor"), quiet=2)


def check_ours_is_ours() -> None:
    """Refuse to run if the project venv's `supervisor` is not this checkout's
    package (supervisord leaked into it). Raises RuntimeError."""
    import importlib.util

    spec = importlib.util.find_spec("supervisor")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is None or REPO_DIR not in origin.parents:
        raise RuntimeError(
            f"`supervisor` in {sys.prefix} is {origin}, not this checkout's package: "
            "supervisord must not be installed into the project's virtualenv"
        )
