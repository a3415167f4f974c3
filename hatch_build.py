"""Build hook: compile supervisor/_clonespawn.c into a shared library.

The library makes spawning fast in cgroup mode (see the C file). It is
optional: without a C compiler (or off Linux) the build goes on without it and
the daemon spawns with `subprocess` instead, which it says in its log.

A wheel with the library is tagged `py3-none-linux_<arch>`: the library is
loaded with ctypes, so it depends on neither the Python version nor its ABI,
only on the platform. It asks nothing of glibc newer than 2.17 (the C file
keeps to that), so it loads on any glibc Linux the daemon supports (clone3
needs Linux 5.3); where it does not load, spawning falls back to subprocess.
A wheel without it is pure Python (`py3-none-any`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("supervisor", "procs", "_clonespawn.c")
LIBRARY = Path("supervisor", "procs", "_clonespawn.so")


class CloneSpawnHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not sys.platform.startswith("linux") or compiler is None:
            self.app.display_warning("no C compiler: building without the clone3 spawner (spawning falls back to subprocess)")
            return
        partial = root / LIBRARY.with_suffix(".so.partial")
        # No stack protector: the spawned child runs in the daemon's memory
        # alongside its thread and is to call nothing of the C library, which
        # a protector's failure path would.
        command = [compiler, "-O2", "-Wall", "-Wextra", "-fno-stack-protector", "-fPIC", "-shared", "-o", str(partial),
                   str(root / SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            self.app.display_warning(f"the clone3 spawner did not compile; spawning falls back to subprocess:\n{result.stderr}")
            return
        os.replace(partial, root / LIBRARY)
        if version != "editable":
            # An editable install finds the library in the source tree itself.
            build_data["force_include"][str(root / LIBRARY)] = str(LIBRARY)
            build_data["pure_python"] = False
            build_data["tag"] = f"py3-none-{platform_tag()}"


def platform_tag() -> str:
    """The wheel platform tag of the machine the library is built for:
    `linux_x86_64`, `linux_aarch64`, ..."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")
