"""The package's shape: layers that import only downwards, and no import cycle."""

import ast
from pathlib import Path

import unidask

PACKAGE = Path(unidask.__file__).parent
# bottom to top: a module imports only from its own layer and those before it. The top, the
# package's own modules (its API, the command line, the scheduler's preload), may import anything;
# nothing imports them but each other (``_version`` is the one exception: nothing in it).
LAYERS = ["core", "spec", "store", "cost", "views", "execute"]
TOP = {"unidask", "unidask.cli", "unidask.preload"}


def module_imports() -> dict[str, set[str]]:
    """unidask module -> the unidask modules it imports, anywhere in it (local imports too; the
    package itself where a module imports a name from ``unidask``)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                elif (node.module or "").split(".")[0] == "unidask":
                    target = node.module
                else:
                    continue
                # `from pkg import name`: the submodule where it is one, else pkg itself
                deps |= {f"{target}.{a.name}" if is_module(f"{target}.{a.name}") else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "unidask"}
        graph[name] = deps - {name}
    return graph


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(tree: ast.AST):
    """Every import statement, local ones too, but not those only for type checkers."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from imports(node)


def layer(module: str) -> int:
    """A module's layer: its index in LAYERS; the top is above them all, ``_version`` below."""
    parts = module.split(".")
    if module == "unidask._version":
        return -1
    if module in TOP:
        return len(LAYERS)
    assert len(parts) > 1 and parts[1] in LAYERS, f"{module} is in no layer: put it in one of {LAYERS}"
    return LAYERS.index(parts[1])


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer (the package ``unidask`` counted: it is the top)."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))


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


def test_the_folders_are_the_layers():
    """Every folder of the package is a layer, every module is in one (or is the top)."""
    folders = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert folders == sorted(LAYERS)
    for module in module_imports():
        layer(module)


def test_layers_import_only_downwards():
    graph = module_imports()
    assert {"unidask.spec.config", "unidask.store.rundir", "unidask.store.shard", "unidask.execute.driver"} <= set(graph)
    assert "unidask.store.rundir" in graph["unidask.store.staging"]     # the graph sees relative imports
    assert "unidask.core.errors" in graph["unidask.spec.generators.circuits"]   # and `..` ones
    assert upward(graph) == []


def test_no_import_cycle():
    """No cycle among the modules, the package's ``__init__`` counted."""
    graph = module_imports()
    assert "unidask._version" in graph["unidask"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_wrong_import_is_found():
    """The checks can fail: a cycle, an import of a higher layer, a module importing the package."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    graph = module_imports()
    graph["unidask.store.shard"] |= {"unidask.execute.slurm"}
    graph["unidask.core.files"] |= {"unidask"}
    assert upward(graph) == ["unidask.core.files -> unidask", "unidask.store.shard -> unidask.execute.slurm"]


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
    assert unidask.Dataset.__module__ == "unidask.store.dataset" and unidask.run.__module__ == "unidask.execute.driver"
    import importlib

    for name in ("store.export", "store.merge", "views.verify"):   # a module of a function's name
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


def test_the_public_api_type_checks():
    """mypy, as pyproject.toml configures it: the API's names and the modules that define them, as
    a user's type checker reads them."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", "/dev/null"],
                          cwd=PACKAGE.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
