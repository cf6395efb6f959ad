"""The tree is the architecture: no import circle among the project's modules, the engine stands on its own, and
no folder holds more modules than a reader takes in at a glance. Read from the source (AST), nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "worker", "schemas")
MAX_MODULES = 12  # per folder
MAX_ENGINE_MODULES = 16  # per folder of worker/engine/, where every file is one noun


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages (Alembic's migrations are scripts, not modules)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.relative_to(ROOT).parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports anywhere in its body (in functions too: a lazy import is still
    a dependency). `from package import module` counts the module; `from module import name`, the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base))
    found.discard(None)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_circle_finder_finds_a_circle():
    # Given a graph with one circle of three and a module outside it
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # Then exactly that circle is found
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_import_walk_sees_every_kind_of_import():
    # Given the real graph: a lazy import inside a function, a `from package import module`, a plain `import`
    graph = _graph()
    # Then each is an edge
    assert "worker.models.source" in graph["worker.models.info"]  # module level
    assert "worker.service.runtime" in graph["worker.telemetry.metrics"]  # from worker.service import runtime
    assert "worker.engine.paged.engine" in graph["worker.engine.builder"]  # inside a function
    assert len(graph) > 80


def test_no_import_circle_among_the_project_modules():
    assert _circles(_graph()) == []


def test_the_engine_imports_nothing_of_worker_outside_itself():
    outside = {name: sorted(i for i in imports if i.startswith("worker") and not i.startswith("worker.engine"))
               for name, imports in _graph().items() if name.startswith("worker.engine")}
    assert {name: imports for name, imports in outside.items() if imports} == {}


def test_the_engine_request_types_are_a_leaf():
    assert _graph()["worker.engine.request"] == set()


def test_no_folder_holds_more_modules_than_a_reader_takes_in():
    counts: dict[str, int] = {}
    for path in _modules().values():
        if path.name != "__init__.py":
            folder = str(path.parent.relative_to(ROOT))
            counts[folder] = counts.get(folder, 0) + 1
    crowded = {folder: n for folder, n in counts.items()
               if n > (MAX_ENGINE_MODULES if folder.startswith("worker/engine") else MAX_MODULES)}
    assert crowded == {}
    assert len(counts) >= 10
