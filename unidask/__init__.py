"""unidask: millions of unitary matrices on a cluster, in per-node SQLite shards merged into one
database."""

__version__ = "0.1.0"

from .config import Spec, load_config  # noqa: E402
from .dataset import Dataset  # noqa: E402
from .driver import run  # noqa: E402
from .errors import InputError, RunError, UnidaskError  # noqa: E402
from .merge import merge  # noqa: E402
from .status import status  # noqa: E402

__all__ = ["Dataset", "InputError", "RunError", "Spec", "UnidaskError", "load_config", "merge", "run",
           "status", "__version__"]
