"""The package's imports form no cycle (loaders import the Pipeline; the Pipeline imports no loader)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"sdjax": ROOT / "sdjax", "sdjax.convert": ROOT / "convert"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = file
    return found


def _imports(file: Path, modules: set[str]) -> set[str]:
    """Every module ``file`` imports, at module level or inside functions (a lazy import still closes a cycle);
    only imports under ``if TYPE_CHECKING:`` (annotations, never run) are left out."""
    tree = ast.parse(file.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    out = set()
    for sub in ast.walk(tree):
        if id(sub) in skipped:
            continue
        if isinstance(sub, ast.Import):
            out |= {a.name for a in sub.names if a.name in modules}
        elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
            out |= {f"{sub.module}.{a.name}" for a in sub.names if f"{sub.module}.{a.name}" in modules}
            if sub.module in modules:
                out.add(sub.module)
    return out


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(file, set(modules)) if m != name and not name.startswith(m + ".")}
             for name, file in modules.items()}  # a package's own __init__ runs first anyway: not an edge
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                stack = path + [node]
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "sdjax.loaders" not in graph["sdjax.pipeline"]
