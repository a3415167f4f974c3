"""The wheel, built from a copy of the source the way an installer builds
it: tagged for any Python 3 on this platform (the helper library is loaded
with ctypes, not as an extension module), the helper inside and needing no
glibc newer than 2.17, and the unit files inside exactly as systemd/ has
them, found and rendered by the installed package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import PYTHON

REPO = Path(__file__).resolve().parent.parent
# What a build reads (pyproject's readme and license included).
SOURCES = ("pyproject.toml", "hatch_build.py", "README.md", "LICENSE", "supervisor", "config", "systemd")
# The newest glibc symbol version the helper may need (see hatch_build.py).
GLIBC_BASELINE = (2, 17)

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="no C compiler: the wheel would be pure Python, without the helper library this test checks",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a clean copy of the source (no library built
    before, no caches), with the build backend already installed."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.so.partial", "*.pyc")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(base / "dist"), str(source)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert built.returncode == 0, built.stderr
    (found,) = (base / "dist").glob("*.whl")
    return found


def test_the_wheel_is_for_any_python_3_on_this_platform(wheel: Path) -> None:
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert platform.startswith("linux_")
    assert wheel.name == f"adapter_supervisor-0.1.0-py3-none-{platform}.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("adapter_supervisor-0.1.0.dist-info/WHEEL").decode()
    assert f"\nTag: py3-none-{platform}\n" in metadata and "Root-Is-Purelib: false" in metadata


def test_the_helper_is_inside_and_needs_no_glibc_newer_than_the_baseline(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        library = archive.read("supervisor/procs/_clonespawn.so")
    assert library.startswith(b"\x7fELF")
    # The versions of the symbols it imports are strings in the library.
    versions = {tuple(int(part) for part in match) for match in re.findall(rb"GLIBC_(\d+)\.(\d+)", library)}
    assert versions and max(versions) <= GLIBC_BASELINE, sorted(versions)


def test_the_unit_files_inside_are_systemds_own(wheel: Path) -> None:
    packaged_prefix = "supervisor/_bundled/systemd/"
    with zipfile.ZipFile(wheel) as archive:
        packaged = {
            name.removeprefix(packaged_prefix): archive.read(name)
            for name in archive.namelist() if name.startswith(packaged_prefix)
        }
    shipped = {
        str(path.relative_to(REPO / "systemd")): path.read_bytes()
        for path in (REPO / "systemd").rglob("*") if path.is_file()
    }
    assert set(shipped) >= {"adapter-supervisor.service", "user/adapter-supervisor.socket"}
    assert packaged == shipped


def test_the_installed_package_finds_its_units_and_its_helper(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as an installer would unpack it, away from the checkout,
    the package renders the same units as the checkout and loads the helper."""
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    for user in ([], ["--user"]):
        argv = [PYTHON, "-m", "supervisor", "install-units", "--print", *user]
        from_wheel = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False)
        from_checkout = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
        assert from_wheel.returncode == 0, from_wheel.stderr
        assert from_wheel.stdout == from_checkout.stdout
    probe = subprocess.run(
        [PYTHON, "-c", "from supervisor import units; from supervisor.procs import clonespawn;"
         " print(units.units_dir(), clonespawn.LIBRARY, clonespawn.load() is not None)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert probe.returncode == 0, probe.stderr
    units_dir, library, loaded = probe.stdout.split()
    assert units_dir == str(installed / "supervisor" / "_bundled" / "systemd")
    assert library == str(installed / "supervisor" / "procs" / "_clonespawn.so") and loaded == "True"
