"""The package's import graph: no cycles, nothing below imports the package root, no MLX in
the bookkeeping half.

Module-level imports only (those under ``if TYPE_CHECKING:`` and inside functions are the
documented way to reach MLX or a heavier module late, and cannot form an import-time cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "kvpool"

# No MLX, mlx-lm or numpy-free guarantees needed here: these must not import mlx at all.
MLX_FREE = ("kvpool.cache", "kvpool.persist", "kvpool.tier", "kvpool.server", "kvpool.store",
            "kvpool.engine", "kvpool.pool", "kvpool.testing", "kvpool.grammar")  # fmt: skip


def module_name(path: Path) -> str:
    parts = ["kvpool", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
EXTENSIONS = {module_name(p) for p in PACKAGE.rglob("*.pyi")}  # compiled: import nothing of ours


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def top_level_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import that runs when the module is imported."""
    out: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return out


def edges(name: str) -> set[str]:
    """The kvpool modules ``name`` imports at import time. ``from kvpool.x import y``
    is an edge to ``kvpool.x.y`` when that is a module, else to ``kvpool.x``."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for module, names in top_level_imports(tree):
        if module != "kvpool" and not module.startswith("kvpool."):
            continue
        submodules = [
            f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES.keys() | EXTENSIONS
        ]
        if submodules:
            found.update(submodules)
        if len(submodules) < len(names) or not names:
            found.add(module)
    found.discard(name)
    return found


GRAPH = {name: edges(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in color and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    """Negative control: the check can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_imports_the_package_root() -> None:
    offenders = sorted(n for n, deps in GRAPH.items() if n != "kvpool" and "kvpool" in deps)
    assert offenders == []


@pytest.mark.parametrize("prefix", MLX_FREE)
def test_the_bookkeeping_half_never_imports_mlx(prefix: str) -> None:
    for name, path in MODULES.items():
        if name != prefix and not name.startswith(prefix + "."):
            continue
        imported = {m for m, _ in top_level_imports(ast.parse(path.read_text()))}
        assert not {m for m in imported if m.split(".")[0] in ("mlx", "mlx_lm")}, name
