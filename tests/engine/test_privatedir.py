"""Which directories the daemon accepts for its state and its socket (real
directories, owners and modes; the test runs as root and hands directories
to other uids with chown)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from supervisor.engine.privatedir import UnsafeDirectory, check_private_dir, ensure_private_dir

STRANGER = 61001

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_missing_directories_are_created_with_the_mode_given_parents_too(tmp_path: Path) -> None:
    target = tmp_path / "runtime" / "state"
    old_umask = os.umask(0o022)
    try:
        ensure_private_dir(str(target), mode=0o700)
    finally:
        os.umask(old_umask)
    assert mode(tmp_path / "runtime") == 0o700 and mode(target) == 0o700
    ensure_private_dir(str(target), mode=0o700)  # an existing safe one is fine


def test_a_symlink_is_refused_even_to_a_good_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeDirectory, match="is a symlink"):
        ensure_private_dir(str(tmp_path / "link"))


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="writable by others"):
        check_private_dir(str(shared))
    shared.chmod(0o770)
    with pytest.raises(UnsafeDirectory, match="writable by others"):
        check_private_dir(str(shared))
    shared.chmod(0o755)
    check_private_dir(str(shared))


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        ensure_private_dir(str(tmp_path / "file"))


@needs_root
def test_a_directory_of_another_uid_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, STRANGER, STRANGER)
    with pytest.raises(UnsafeDirectory, match=f"belongs to uid {STRANGER}"):
        ensure_private_dir(str(theirs))


@needs_root
def test_a_directory_below_one_a_stranger_controls_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, STRANGER, STRANGER)
    mine = theirs / "mine"
    mine.mkdir(mode=0o700)  # ours, but they could rename it away and put their own
    with pytest.raises(UnsafeDirectory, match=f"{theirs} belongs to uid {STRANGER}"):
        check_private_dir(str(mine))


@needs_root
def test_below_a_world_writable_directory_only_a_sticky_root_one_will_do(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    mine = open_dir / "mine"
    mine.mkdir(mode=0o700)
    open_dir.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="without the sticky bit"):
        check_private_dir(str(mine))
    open_dir.chmod(0o1777)  # as /tmp
    check_private_dir(str(mine))


@needs_root
def test_a_strangers_symlink_above_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "mine").mkdir(parents=True, mode=0o700)
    link = tmp_path / "via"
    link.symlink_to(real)
    os.lchown(link, STRANGER, STRANGER)
    with pytest.raises(UnsafeDirectory, match="could point it elsewhere"):
        check_private_dir(str(link / "mine"))
    os.lchown(link, 0, 0)
    check_private_dir(str(link / "mine"))
