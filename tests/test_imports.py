"""Imports run one way: ``compat`` builds on ``notifyd``, never the reverse."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTIFYD_MODULES = sorted((ROOT / "notifyd").rglob("*.py"))


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute name) of everything ``source``, a module of ``package``, imports.

    ``from pkg import name`` counts as importing ``pkg`` and ``pkg.name``
    (name may be a module); relative imports are resolved against ``package``.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module:
                found.append((node.lineno, module))
            found += [(node.lineno, ".".join(filter(None, [module, a.name]))) for a in node.names]
    return found


def compat_imports(source: str, package: str) -> list[str]:
    return [
        f"line {line}: {name}"
        for line, name in imported_modules(source, package)
        if name == "compat" or name.startswith("compat.")
    ]


def test_the_check_finds_absolute_relative_and_from_imports() -> None:
    source = (
        "import os\n"
        "import compat.demo\n"
        "from compat.inotify_shim import demo\n"
        "from .. import compat\n"
        "from .abi import Record\n"
        "def f():\n"
        "    import compat\n"
    )
    assert compat_imports(source, "notifyd") == [
        "line 2: compat.demo",
        "line 3: compat.inotify_shim",
        "line 3: compat.inotify_shim.demo",
        "line 4: compat",
        "line 7: compat",
    ]


def test_notifyd_has_modules_to_check() -> None:
    assert any(p.name == "daemon.py" for p in NOTIFYD_MODULES)


@pytest.mark.parametrize("path", NOTIFYD_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_notifyd_never_imports_compat(path: Path) -> None:
    package = ".".join(path.relative_to(ROOT).parent.parts)
    bad = compat_imports(path.read_text(), package)
    assert not bad, f"{path.relative_to(ROOT)} imports compat (compat builds on notifyd): {bad}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports.

    ``from . import abi`` names the submodule ``abi``, not the package's
    ``__init__`` (Python runs that first whatever the importer, so it is no
    edge a module could remove).
    """
    names = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = {m for _, m in imported_modules(path.read_text(), package)} & names.keys()
        graph[name] = {
            m for m in found if m != name and not any(o.startswith(m + ".") for o in found)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per edge that lies on a loop: [a, b, ..., a]."""
    found = []
    for start in sorted(graph):
        for first in sorted(graph[start]):
            path, todo = {first: [start, first]}, [first]
            while todo:
                node = todo.pop()
                if node == start:
                    found.append(path[node])
                    break
                for nxt in sorted(graph.get(node, ())):
                    if nxt not in path:
                        path[nxt] = [*path[node], nxt]
                        todo.append(nxt)
    return found


def test_the_loop_check_finds_a_loop_and_ignores_the_package_itself() -> None:
    graph = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.b"}}
    assert cycles(graph) == [["p.a", "p.b", "p.a"], ["p.b", "p.a", "p.b"]]
    assert cycles({"p": {"p.a"}, "p.a": set()}) == []


def test_notifyd_modules_import_each_other_without_a_loop() -> None:
    loops = cycles(import_graph(NOTIFYD_MODULES))
    assert not loops, "import loops in notifyd: " + "; ".join(" -> ".join(c) for c in loops)


def test_the_daemon_starts_without_asyncio() -> None:
    """The daemon is trio only: asyncio was a quarter of its import time.

    Under tcg (the VM tests attach a daemon to every mount) each import costs
    seconds of the guest's one vCPU, taken from the tests beside it.
    """
    probe = "import sys, notifyd.daemon; print(sorted(m for m in sys.modules if m == 'asyncio'))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", "notifyd.daemon imports asyncio"
