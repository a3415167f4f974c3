"""The systemd unit files shipped with the package, and installing them.

The units' source is the repository's `systemd/` directory (the system
units) and `systemd/user/` (the user units); the wheel carries that same
directory as `supervisor/_bundled/systemd`, so an installed package and a
checkout read the same files. `render_units` gives them as they are to be
installed: `ExecStart=` runs the `adapter-supervisor` this installation
runs (`console_command`), not the path the shipped file assumes.
`adapter-supervisor install-units` prints or writes them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVICE = "adapter-supervisor.service"
SOCKET = "adapter-supervisor.socket"
UNIT_NAMES = (SERVICE, SOCKET)
COMMAND_NAME = "adapter-supervisor"

# Where systemd reads an administrator's units, and a user's (below
# $XDG_CONFIG_HOME, ~/.config by default).
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
USER_UNIT_SUBDIR = Path("systemd", "user")

# The service's ExecStart= line: its program, then the rest.
_EXEC_START = re.compile(r"^ExecStart=\S+(?P<rest>.*)$", re.MULTILINE)
# What makes systemd split or unquote an ExecStart= word unless it is quoted.
_NEEDS_QUOTES = re.compile(r"""[\s"'\\]""")


class UnitsError(Exception):
    """The units cannot be found or written; the message says which and why."""


@dataclass(frozen=True)
class Written:
    """One unit file `install_units` handled: what it did with it."""

    path: Path
    # "written" (new), "replaced" (it differed), or "unchanged".
    action: str


def units_dir(user: bool = False) -> Path:
    """The directory of the shipped units: `systemd/` (or `systemd/user/`)
    of the checkout this package runs from, else the copy packaged in the
    wheel. Returned whether or not it exists; `shipped_units` says if not."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "systemd" / SERVICE).is_file():
        base = checkout / "systemd"
    else:
        base = package / "_bundled" / "systemd"
    return base / "user" if user else base


def shipped_units(user: bool = False) -> dict[str, str]:
    """The shipped unit files by name, as they are. Raises UnitsError if
    one is missing (a package built without them)."""
    directory = units_dir(user)
    units = {}
    for name in UNIT_NAMES:
        try:
            units[name] = (directory / name).read_text()
        except OSError as exc:
            raise UnitsError(f"cannot read the shipped unit {directory / name}: {exc.strerror or exc}") from None
    return units


def console_command(argv0: str | None = None) -> list[str]:
    """The command that runs this installation's `adapter-supervisor`, as
    an absolute path: `argv0` (default sys.argv[0]) when that is the console
    script, else the one beside this interpreter (a virtual environment's
    bin/), else the one on PATH, else this interpreter with `-m supervisor`."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) == COMMAND_NAME and os.path.isfile(argv0):
        return [os.path.abspath(argv0)]
    beside = Path(sys.executable).parent / COMMAND_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(COMMAND_NAME)
    if found is not None:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "supervisor"]


def render_units(user: bool = False, command: Sequence[str] | None = None) -> dict[str, str]:
    """The shipped units with the service's ExecStart= running `command`
    (default: `console_command()`) in place of the program the shipped file
    names; the arguments and everything else unchanged. Raises UnitsError if
    the shipped service has not exactly one ExecStart= line."""
    units = shipped_units(user)
    program, *arguments = command if command is not None else console_command()
    words = " ".join([systemd_word(program, program=True), *(systemd_word(word) for word in arguments)])
    service = units[SERVICE]
    if len(_EXEC_START.findall(service)) != 1:
        raise UnitsError(f"the shipped {SERVICE} must have exactly one ExecStart= line")
    units[SERVICE] = _EXEC_START.sub(lambda match: f"ExecStart={words}{match['rest']}", service)
    return units


def systemd_word(word: str, *, program: bool = False) -> str:
    """`word` written so that systemd's ExecStart= reads it back as one
    argument, itself: `%` (specifiers) doubled, `$` (variables) doubled
    unless the word is the `program` (systemd expands no variable there),
    and in double quotes, with `\\` and `"` escaped, if it holds spaces,
    quotes or backslashes."""
    escaped = word.replace("%", "%%")
    if not program:
        escaped = escaped.replace("$", "$$")
    if _NEEDS_QUOTES.search(word):
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def default_unit_dir(user: bool = False) -> Path:
    """Where `install-units` writes without --dir: /etc/systemd/system, or
    with `user` $XDG_CONFIG_HOME/systemd/user (~/.config/systemd/user)."""
    if not user:
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config_home):
        config_home = os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / USER_UNIT_SUBDIR


def install_units(units: dict[str, str], directory: Path) -> list[Written]:
    """Write `units` into `directory` (made if missing), each file replaced
    atomically (mode 0644) and only if its content differs. Raises
    UnitsError naming the file that could not be written."""
    written = []
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise UnitsError(f"cannot create {directory}: {exc.strerror or exc}") from None
    for name, text in units.items():
        path = directory / name
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise UnitsError(f"cannot read {path}: {exc.strerror or exc}") from None
        if old == text:
            written.append(Written(path, "unchanged"))
            continue
        partial = path.with_name(f".{name}.partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as file:
                file.write(text)
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise UnitsError(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(Written(path, "written" if old is None else "replaced"))
    return written
