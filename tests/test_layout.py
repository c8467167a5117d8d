"""The package's shape: its modules import each other without a cycle."""

import ast
from pathlib import Path

import unidask

PACKAGE = Path(unidask.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """unidask module -> the unidask modules it imports, anywhere in it (the package's
    ``__init__`` left out: it imports the API from every module)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name == "unidask":
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                deps |= {f"{target}.{a.name}" if not node.module else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("unidask.")}
        graph[name] = {d for d in deps if d != "unidask"}
    return graph


def imports(tree: ast.AST):
    """Every import statement, local ones too, but not those only for type checkers."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from imports(node)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (cycle := visit(dep, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle():
    graph = module_imports()
    assert {"unidask.config", "unidask.rundir", "unidask.shard", "unidask.driver"} <= set(graph)
    assert "unidask.rundir" in graph["unidask.staging"]     # the graph sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


READER = """
import resource, sys
import numpy as np
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import unidask
from unidask import Dataset
with Dataset(sys.argv[1]) as ds:
    assert ds[np.arange(0, 1000, 7)].shape == (143, 4, 4) and ds[5, 0, 0] == ds[5][0, 0]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"dask", "distributed", "scipy", "bokeh", "tornado", "click"})
print(grown, *heavy)
"""


def test_reading_a_database_imports_no_dask(haar_run):
    """A process that imports unidask and reads a database (a DataLoader's worker) loads neither
    Dask nor distributed, scipy or bokeh, and grows by less than 30 MB beyond numpy: the package's
    names load their modules on first use."""
    import subprocess
    import sys

    _, db = haar_run
    done = subprocess.run([sys.executable, "-c", READER, str(db)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    grown, *heavy = done.stdout.split()
    assert heavy == [] and int(grown) < 30, done.stdout


def test_the_package_names_what_it_offers():
    """Every public name of `unidask` resolves (each to its module's object), and nothing else does."""
    import pytest

    for name in unidask.__all__:
        assert getattr(unidask, name) is not None, name
    assert unidask.Dataset.__module__ == "unidask.dataset" and unidask.run.__module__ == "unidask.driver"
    import importlib

    for name in ("export", "merge", "verify"):   # a submodule of a function's name: the name stays the function's
        importlib.import_module(f"unidask.{name}")

    assert all(callable(f) and f.__name__ == name for name, f in
               (("export", unidask.export), ("merge", unidask.merge), ("verify", unidask.verify)))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        unidask.nothing


def test_the_code_passes_the_linter():
    """ruff, as pyproject.toml configures it (pyflakes and pycodestyle): no unused or undefined
    name, no line over 120 characters in the package."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("ruff")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(PACKAGE.parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
