"""The package layering of docs/ARCHITECTURE.md, checked on the source.

Every ``import`` of a project module counts, function-local ones included; imports under
``if TYPE_CHECKING:`` do not (they never run). The rules:

- no import cycle between project modules;
- ``node/`` (the always-on service) never imports ``workers``, except ``node/cli.py``, the
  composition root that wires the Celery workers in;
- serving code (``node``, ``workers``, ``dicom_sr``) never imports ``simulator``,
  ``modelkit``, ``harness`` or ``tests`` (the CLI again excepted: it offers
  ``sononode simulate`` and ``sononode model``);
- the simulator is a leaf: it imports no other project package;
- ``bench/`` imports installed packages, never ``tests``;
- no project module is imported through ``importlib`` (hidden edges).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "workers", "dicom_sr", "simulator", "modelkit", "harness")
SERVING = ("node", "workers", "dicom_sr")
TOOLING = ("simulator", "modelkit", "harness", "tests")
COMPOSITION_ROOT = "node.cli"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` denotes (a module, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(tree):
        targets: list[tuple[str, int]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            targets = [
                (f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base,
                 node.lineno)
                for alias in node.names
            ]
        for name, line in targets:
            target = _resolve(name, modules)
            if target is not None and target != module:
                yield Edge(module, target, line)


def _graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = _project_modules()
    edges = [edge for module, path in modules.items() for edge in _imports(module, path, modules)]
    return modules, edges


def _top(module: str) -> str:
    return module.split(".")[0]


def test_no_import_cycle() -> None:
    modules, edges = _graph()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        graph[edge.source].add(edge.target)
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_node_core_never_imports_workers() -> None:
    _, edges = _graph()
    bad = [
        f"{e.source}:{e.line} -> {e.target}"
        for e in edges
        if _top(e.source) == "node" and _top(e.target) == "workers"
        and e.source != COMPOSITION_ROOT
    ]
    assert bad == [], "node/ imports workers outside the composition root:\n" + "\n".join(bad)


def test_serving_code_never_imports_tooling() -> None:
    _, edges = _graph()
    bad = [
        f"{e.source}:{e.line} -> {e.target}"
        for e in edges
        if _top(e.source) in SERVING and _top(e.target) in TOOLING
        and e.source != COMPOSITION_ROOT
    ]
    assert bad == [], "serving code imports tooling:\n" + "\n".join(bad)


def test_simulator_is_a_leaf() -> None:
    _, edges = _graph()
    bad = [
        f"{e.source}:{e.line} -> {e.target}"
        for e in edges
        if _top(e.source) == "simulator" and _top(e.target) != "simulator"
    ]
    assert bad == [], "the simulator imports other project packages:\n" + "\n".join(bad)


def _source_files() -> list[Path]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    return files + sorted((ROOT / "bench").rglob("*.py"))


def test_no_importlib_of_project_modules() -> None:
    bad = []
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in ("import_module", "__import__"):
                continue
            first = node.args[0] if node.args else None
            text = first.value if isinstance(first, ast.Constant) else None
            if not isinstance(text, str) or _top(text) in (*PACKAGES, "tests"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == [], "importlib of project (or unknown) modules:\n" + "\n".join(bad)


def test_bench_does_not_reach_into_tests() -> None:
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            names: list[str]
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            if any(_top(n) in ("tests", "peers", "fixtures", "sr_fixtures") for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if "sys.path" in text:
            bad.append(f"{path.relative_to(ROOT)}: edits sys.path")
    assert bad == [], "bench/ imports tests or edits sys.path:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import workers.tasks\n", {"workers.tasks"}),
        ("from workers import tasks\n", {"workers.tasks"}),
        ("def f():\n    from workers.tasks import qc\n", {"workers.tasks"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import workers.tasks\n",
         set()),
    ],
)
def test_the_checker_sees_imports(source: str, expected: set[str],
                                  tmp_path: Path) -> None:
    """The rules above are only as good as the import finder: it must see every kind."""
    modules = {"node.example": tmp_path / "example.py", "workers": tmp_path / "w.py",
               "workers.tasks": tmp_path / "t.py"}
    path = tmp_path / "example.py"
    path.write_text(source, encoding="utf-8")
    found = {edge.target for edge in _imports("node.example", path, modules)}
    assert found == expected
