"""The repository stands alone: its docs hold the whole contract (every
method of the protocol, every key of the config), nothing points outside it,
and the license pyproject names is there."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from supervisor.core.config import AdapterConfig, DaemonConfig
from supervisor.server.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# What is not the project's own text: tools' caches (any hidden directory
# but .ci) and installed packages.
NOT_OURS = {"__pycache__", "results"}
OURS_HIDDEN = {".ci"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".c", ".service", ".socket", ".cfg", ".yaml", ".yml", ""}


def project_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in NOT_OURS or p.endswith(".egg-info") or (p.startswith(".") and p not in OURS_HIDDEN) for p in parts[:-1]):
            continue
        # (A worktree's .git is a file naming where its repository lives.)
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.name != ".git":
            found.append(path)
    return found


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_its_section_in_the_protocol_doc(method: str) -> None:
    assert f"### `{method}`" in (DOCS / "protocol.md").read_text()


@pytest.mark.parametrize(
    "key",
    [f"daemon.{f.name}" for f in msgspec.structs.fields(DaemonConfig)]
    # `credentials` is what the loader resolves `user` and `group` into.
    + [f"adapters.{f.name}" for f in msgspec.structs.fields(AdapterConfig) if f.name not in ("name", "credentials")]
    + ["adapters.group"],
)
def test_every_config_key_has_its_row_in_the_configuration_doc(key: str) -> None:
    table, name = key.split(".")
    text = (DOCS / "configuration.md").read_text()
    section = text.split("## `[daemon]`")[1].split("## `[adapters.NAME]`")
    rows = section[0] if table == "daemon" else section[1]
    assert f"\n| `{name}` |" in rows


def test_nothing_refers_to_files_outside_the_repository() -> None:
    # Built from pieces, so that this file does not match itself.
    outside = re.compile(r"\b" + "SP" + r"EC\b|\.\./" + "shared|/wo" + "rk/")
    files = project_files()
    assert len(files) > 50
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []


def test_the_license_is_the_one_pyproject_names() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n") and "the adapter-supervisor authors" in license_text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
