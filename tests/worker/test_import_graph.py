"""No import cycles inside the worker package, counting every import: module level, inside functions,
under `if TYPE_CHECKING:`, relative or absolute, and `from pkg import name` where the name is a module.

A cycle hidden behind a function-level import is still a cycle of responsibilities (STYLE.md): if two
modules need each other, the shared piece belongs in a third. The graph is read with `ast` (nothing is
imported), restricted to the package's own modules; `infergrid.worker.x` importing the package
itself is an edge to its `__init__` module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

import infergrid.worker

PACKAGE = "infergrid.worker"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (the directory of `package`)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def imports_of(module: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The package modules that `module` (at `path`) imports anywhere in its source."""
    known = set(modules)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # The longest known prefix: `import a.b.c` imports a.b.c (and runs a, a.b: their __init__s).
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in known:
                found.add(candidate)
                return

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = node.module if node.level == 0 else _resolve_relative(module, is_package, node.level,
                                                                             node.module)
            if target is None:
                continue
            for alias in node.names:  # `from pkg import mod` imports pkg.mod when it is a module
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                else:
                    add(target)
    found.discard(module)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; a module that
    imports itself is not counted (`imports_of` drops it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        # Iterative DFS: (node, iterator over its successors).
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, successors = work[-1]
            advanced = False
            for w in successors:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    """One module of a cycle and the edges inside it, for the failure message."""
    members = set(component)
    lines = [f"  {m} -> {', '.join(sorted(graph[m] & members))}" for m in component]
    return "\n".join(lines)


def test_worker_package_has_no_import_cycles():
    root = Path(infergrid.worker.__file__).parent
    graph = import_graph(root, PACKAGE)
    assert len(graph) > 50  # the whole package was read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in the worker package:\n" + "\n\n".join(describe(graph, c) for c in cycles)


def reachable(graph: dict[str, set[str]], starts: Iterable[str]) -> set[str]:
    """Every module imported, directly or not, by the modules `starts`."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_layers_point_one_way():
    """The runner and the samplers never reach speculative decoding nor the executors (they are handed
    a Speculator); speculative decoding reaches the runner, not the executors or the engine loop; and
    neither reaches the scheduler: they read its output (engine/scheduler_output.py), pure data."""
    graph = import_graph(Path(infergrid.worker.__file__).parent, PACKAGE)

    def under(*packages: str) -> set[str]:
        return {m for m in graph if any(m == p or m.startswith(p + ".") for p in packages)}

    executors = {f"{PACKAGE}.distributed.executor", f"{PACKAGE}.distributed.multiproc_executor",
                 f"{PACKAGE}.engine.llm_engine", f"{PACKAGE}.engine.async_llm"}
    runner, sample, spec = under(f"{PACKAGE}.runner"), under(f"{PACKAGE}.sample"), under(f"{PACKAGE}.spec_decode")
    assert not reachable(graph, runner | sample) & (spec | executors)
    assert not reachable(graph, sample) & runner
    assert not reachable(graph, spec) & executors
    assert f"{PACKAGE}.engine.scheduler" not in reachable(graph, runner | sample | spec)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("how", ["module_level", "in_function", "type_checking", "relative", "from_package"])
def test_cycle_finder_sees_every_kind_of_import(tmp_path, how):
    """A synthetic package whose a -> b edge is plain and whose b -> a edge is written `how`."""
    back = {
        "module_level": "import pkg.a\n",
        "in_function": "def f():\n    from pkg.a import X\n    return X\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
        "relative": "from .a import X\n",
        "from_package": "from pkg import a\n",
    }[how]
    _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "from pkg.b import Y\nX = 1\n", "b.py": back + "Y = 2\n",
                              "c.py": "from pkg.a import X\n"})
    graph = import_graph(tmp_path / "pkg", "pkg")
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]


def test_cycle_finder_counts_the_package_init_and_longer_cycles(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.sub.x import X\n",  # pkg -> pkg.sub.x
        "sub/__init__.py": "",
        "sub/x.py": "from ..y import Y\nX = 1\n",  # -> pkg.y
        "y.py": "import pkg\nY = 1\n",  # -> pkg (its __init__): a 3-cycle
        "z.py": "from pkg.sub import x\n",  # -> pkg.sub.x, outside the cycle
    })
    graph = import_graph(tmp_path / "pkg", "pkg")
    assert graph["pkg.sub.x"] == {"pkg.y"} and graph["pkg.z"] == {"pkg.sub.x"}
    assert find_cycles(graph) == [["pkg", "pkg.sub.x", "pkg.y"]]
    (tmp_path / "pkg" / "y.py").write_text("Y = 1\n")
    assert find_cycles(import_graph(tmp_path / "pkg", "pkg")) == []
