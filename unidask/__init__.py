"""unidask: millions of unitary matrices on a cluster, in per-node SQLite shards merged into one
database.

The data flows config -> plan -> shards -> merge -> dataset; the code stands in layers, each a folder
that imports only the ones below it: core, spec, store, cost, views, execute (CONTRIBUTING.md).
Importing unidask changes nothing outside it: its Dask settings apply only to the clusters it starts.
Nor does it import Dask: each name below loads its module on first use, so a process that only
reads a database (a DataLoader's worker) never pays for Dask and distributed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# name -> the module that defines it
_API = {
    "Dataset": "store.dataset", "InputError": "core.errors", "RunError": "core.errors",
    "UnidaskError": "core.errors", "RunDir": "store.rundir", "Spec": "spec.config", "export": "store.export",
    "law": "spec.generators", "load_config": "spec.config", "merge": "store.merge", "report": "views.report",
    "run": "execute.driver", "status": "views.status", "submit": "execute.slurm", "verify": "views.verify",
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


if TYPE_CHECKING:
    from .core.errors import InputError, RunError, UnidaskError
    from .execute.driver import run
    from .execute.slurm import submit
    from .spec.config import Spec, load_config
    from .spec.generators import law
    from .store.dataset import Dataset
    from .store.export import export
    from .store.merge import merge
    from .store.rundir import RunDir
    from .views.report import report
    from .views.status import status
    from .views.verify import verify
