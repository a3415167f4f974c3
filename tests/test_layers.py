"""The package's layers, checked from the source: imports point one way
(core <- procs <- engine <- server <- serve/cli; the client beside them,
on the core only), the pure core does no I/O through trio or a logger, and
no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "supervisor"

# What each layer may import of the package (besides itself and the package
# root, which holds only the version).
MAY_IMPORT = {
    "core": {"core"},
    "procs": {"core", "procs"},
    "engine": {"core", "procs", "engine"},
    "server": {"core", "procs", "engine", "server"},
    "client": {"core", "client"},
    "top": {"core", "procs", "engine", "server", "client", "top"},
}

# Third-party modules the pure core must not touch: it does no I/O but
# reading a config file, keeps no clock and logs nothing.
NOT_IN_CORE = {"trio", "structlog", "psutil", "socket", "subprocess", "anyio"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT):
        return parts[1]
    return "top"


def imports_of(path: Path) -> set[str]:
    """Every module of the package, or top-level module, `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from supervisor.engine import metrics` imports a module too.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def package_imports(module: str) -> set[str]:
    return {name for name in imports_of(MODULES[module]) if name in MODULES and name not in ("supervisor", module)}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    allowed = MAY_IMPORT[layer(module)]
    wrong = sorted(name for name in package_imports(module) if layer(name) not in allowed)
    assert not wrong, f"{module} ({layer(module)}) imports {wrong} against the layers"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "core"))
def test_the_core_is_pure(module: str) -> None:
    touched = sorted({name.split(".")[0] for name in imports_of(MODULES[module])} & NOT_IN_CORE)
    assert not touched, f"{module} imports {touched}"


def test_no_import_cycles() -> None:
    graph = {module: package_imports(module) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                loop = path[path.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(loop))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checks above read real imports: a core module importing the engine
    would be caught."""
    source = tmp_path / "bad.py"
    source.write_text("from supervisor.engine import engine\nimport trio\n")
    found = imports_of(source)
    assert "supervisor.engine.engine" in found and "trio" in found
    assert layer("supervisor.engine.engine") not in MAY_IMPORT["core"]


def test_serve_starts_without_the_client_library() -> None:
    """`serve` is also the new image of an in-place upgrade, whose start is a
    pause for every client: the command line loads the client library, the
    client commands and the completion scripts only for the commands that
    use them."""
    import subprocess
    import sys

    probe = (
        "import sys, supervisor.cli, supervisor.serve\n"
        "print(sorted(m for m in sys.modules if m.startswith(('supervisor.client', 'supervisor.commands', "
        "'supervisor.completion', 'supervisor.display'))))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
