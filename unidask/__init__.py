"""unidask: millions of unitary matrices on a cluster, in per-node SQLite shards merged into one
database.

The flow, one module each: config -> plan -> (worker -> shard) -> rundir -> merge -> dataset.
Importing unidask changes nothing outside it: its Dask settings apply only to the clusters it starts.
"""

__version__ = "0.1.0"

from .config import Spec, load_config  # noqa: E402
from .dataset import Dataset  # noqa: E402
from .driver import run  # noqa: E402
from .errors import InputError, RunError, UnidaskError  # noqa: E402
from .export import export  # noqa: E402
from .generators import law  # noqa: E402
from .merge import merge  # noqa: E402
from .report import report  # noqa: E402
from .rundir import RunDir  # noqa: E402
from .slurm import submit  # noqa: E402
from .status import status  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = ["Dataset", "InputError", "RunDir", "RunError", "Spec", "UnidaskError", "export", "law",
           "load_config", "merge", "report", "run", "status", "submit", "verify", "__version__"]
