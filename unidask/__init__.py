"""unidask: millions of unitary matrices on a cluster, in per-node SQLite shards merged into one
database.

The flow, one module each: config -> plan -> (worker -> shard) -> rundir -> merge -> dataset.
Importing unidask changes nothing outside it: its Dask settings apply only to the clusters it starts.
Nor does it import Dask: each name below loads its module on first use, so a process that only
reads a database (a DataLoader's worker) never pays for Dask and distributed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

# name -> the module that defines it
_API = {
    "Dataset": "dataset", "InputError": "errors", "RunError": "errors", "UnidaskError": "errors",
    "RunDir": "rundir", "Spec": "config", "export": "export", "law": "generators", "load_config": "config",
    "merge": "merge", "report": "report", "run": "driver", "status": "status", "submit": "slurm",
    "verify": "verify",
}

__all__ = [*sorted(_API), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'unidask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value   # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # importing a submodule binds it on the package: where a function of the API has its name
        # (unidask.merge, .verify, .export, ...), the name stays the function's
        if isinstance(value, types.ModuleType) and _API.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from .config import Spec, load_config
    from .dataset import Dataset
    from .driver import run
    from .errors import InputError, RunError, UnidaskError
    from .export import export
    from .generators import law
    from .merge import merge
    from .report import report
    from .rundir import RunDir
    from .slurm import submit
    from .status import status
    from .verify import verify
