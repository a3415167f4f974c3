"""Real users and groups for the tests of `user`, `group` and "@peer":
made with useradd/groupadd for one test and removed after it. Needs root;
the fixtures skip (saying why) otherwise."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NEEDS_ROOT = "creating users (useradd) and running processes as them needs root"


@dataclass(frozen=True)
class SystemUser:
    """A system user made for one test, with a group of its own and one
    supplementary group."""

    name: str
    uid: int
    gid: int
    extra_group: str
    extra_gid: int
    home: str


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


@pytest.fixture
def test_user() -> Iterator[SystemUser]:
    """A fresh system user (no home directory made) in a supplementary group."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip(NEEDS_ROOT)
    suffix = secrets.token_hex(4)
    name, extra = f"ast-u{suffix}", f"ast-g{suffix}"
    _run("groupadd", "--system", extra)
    try:
        _run("useradd", "--system", "--no-create-home", "--user-group", "--groups", extra,
             "--shell", "/usr/sbin/nologin", name)
        try:
            entry = pwd.getpwnam(name)
            yield SystemUser(name, entry.pw_uid, entry.pw_gid, extra, grp.getgrnam(extra).gr_gid, entry.pw_dir)
        finally:
            _run("userdel", name)
    finally:
        _run("groupdel", extra)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every uid can reach and write (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="as-user-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)
