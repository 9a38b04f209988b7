"""The code map of docs/overview.md, enforced: imports flow one way (cli → hosted/demo →
coordinator/agent → protocol/native/procfs), the policy and the protocol stay pure, ctypes lives
in native/ alone, nothing on the snapshot path imports what only tests, the demo or the bench
use, and no module or class outgrows what a reader can hold (~600 / ~300 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import uffdsnap

PACKAGE = Path(uffdsnap.__file__).resolve().parent  # the one under test, wherever installed


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from x import y` counts as x and x.y)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}
SNAPSHOT_PATH = ("uffdsnap.coordinator", "uffdsnap.agent", "uffdsnap.protocol", "uffdsnap.native",
                 "uffdsnap.procfs", "uffdsnap.tracker", "uffdsnap.channel", "uffdsnap.image",
                 "uffdsnap.inject", "uffdsnap.hosted", "uffdsnap.enlist")
TEST_ONLY = ("uffdsnap.workload", "uffdsnap.bench", "uffdsnap.testing", "uffdsnap.demo")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offenders(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {i}" for m, imps in IMPORTS.items() if _under(m, importers)
                  for i in imps if _under(i, forbidden))


@pytest.mark.parametrize("importers,forbidden", [
    # the layers, top to bottom
    (("uffdsnap.coordinator", "uffdsnap.agent"), ("uffdsnap.cli", "uffdsnap.hosted")),
    (("uffdsnap.coordinator",), ("uffdsnap.agent",)),
    (("uffdsnap.agent",), ("uffdsnap.coordinator",)),
    (("uffdsnap.protocol", "uffdsnap.native", "uffdsnap.procfs", "uffdsnap.image"),
     ("uffdsnap.coordinator", "uffdsnap.agent", "uffdsnap.cli", "uffdsnap.channel",
      "uffdsnap.hosted", "uffdsnap.tracker", "uffdsnap.inject")),
    (("uffdsnap.native",), ("uffdsnap.protocol", "uffdsnap.procfs", "uffdsnap.image")),
    # pure: no I/O framework, no kernel, no processes
    (("uffdsnap.protocol", "uffdsnap.coordinator._policy"),
     ("trio", "ctypes", "socket", "uffdsnap.native", "uffdsnap.procfs", "subprocess")),
    # what only tests, the demo and the bench use stays off the snapshot path
    (SNAPSHOT_PATH, TEST_ONLY),
])
def test_imports_flow_one_way(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _offenders(importers, forbidden) == []


def test_ctypes_lives_in_native_alone() -> None:
    users = sorted(m for m, imps in IMPORTS.items() if "ctypes" in imps)
    assert [m for m in users if not _under(m, ("uffdsnap.native",))] == []


def test_no_import_cycles_between_parts() -> None:
    """Parts are the subpackages and top-level modules; a cycle between two means neither can
    be read, or changed, without the other."""
    def part(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, imps in IMPORTS.items():
        graph.setdefault(part(module), set()).update(
            part(i) for i in imps if i.startswith("uffdsnap.") and part(i) != part(module)
            and part(i) in {part(m) for m in MODULES})
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _under(m, SNAPSHOT_PATH)))
def test_modules_and_classes_stay_readable(name: str) -> None:
    path = MODULES[name]
    text = path.read_text()
    assert text.count("\n") <= 600, f"{path.name}: {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= 300, f"{name}.{node.name}: {size} lines"
