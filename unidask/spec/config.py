"""Run configs: a TOML file (or run.json's record) in, a validated and frozen :class:`Spec` out.

Defaults live in ``unidask.yaml`` under dask.config's ``unidask`` namespace, so a site can set
them once (e.g. the node-local scratch dir); the run's TOML and the overrides win over them.
This module is the one place where input errors about a run's config are made.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pwd
import re
import shlex
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import dask.config
import yaml

from ..core.errors import InputError, RunError
from . import generators, plan

_defaults_file = Path(__file__).with_name("unidask.yaml")
# only unidask's own namespace: Dask's settings for the clusters unidask starts sit under
# unidask.dask and are applied to those clusters alone (dask_settings), never to the process
dask.config.update_defaults(yaml.safe_load(_defaults_file.read_text()))

SECTIONS = ("run", "generator", "storage", "cluster")
PAGE_SIZES = tuple(2 ** k for k in range(9, 17))  # what SQLite accepts
SUBMIT_WALLTIME = "01:00:00"
# dask-jobqueue's words (and Dask's) for what unidask's config spells otherwise
SPELLED_OTHERWISE = {"cluster": {"queue": "partition", "processes": "workers", "cores": "workers",
                                 "n_workers": "workers", "jobs": "nodes", "time": "walltime",
                                 "job_extra": "job_extra_directives", "job-extra-directives": "job_extra_directives",
                                 "job_extra_directive": "job_extra_directives", "project": "account"}}


# -- checks of one value: return it (normalised) or raise ValueError saying what it must be ----------

# ids are task * task_size + index, SQLite's 64-bit integers: counts and sizes stay well below
MAX_COUNT = 2 ** 53
MAX_BYTES = 2 ** 50
MAX_SECONDS = 10 ** 7   # about four months: a longer wait or interval is a typo


def integer(minimum: int = 1, maximum: int = MAX_COUNT) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ValueError(f"must be an integer from {minimum} to {maximum:,}")
        return value
    return check


def seconds(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 < value <= MAX_SECONDS):
        raise ValueError(f"must be a number of seconds > 0 and at most {MAX_SECONDS:,}")
    return value


def one_of(*options: str, upper: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = str(value).upper() if upper else value
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def text(example: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a string, e.g. {example}")
        return value
    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def auto_or(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def either(value: Any) -> Any:
        if value == "auto":
            return value
        try:
            return check(value)
        except ValueError as e:
            raise ValueError(f'{e} or "auto"') from None
    return either


def directives(value: Any) -> tuple[str, ...]:
    """Extra ``#SBATCH`` options: each one option (``--qos=high``), on one line."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of sbatch options, e.g. ["--qos=high", "--constraint=avx2"]')
    for v in value:
        if not v.startswith("-") or any(c in v for c in "\n\r\0"):
            raise ValueError(f"{v!r}: each must be one sbatch option on one line, e.g. \"--qos=high\"")
    return tuple(value)


def page_size(value: Any) -> int | str:
    if value != "auto" and (value not in PAGE_SIZES or isinstance(value, (bool, float))):
        raise ValueError("must be \"auto\" or a power of 2 from 512 to 65536 bytes")
    return value


def walltime_seconds(value: Any) -> int:
    """A SLURM walltime (``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS``) in seconds; ValueError if not one."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", value) if isinstance(value, str) else None
    if not m:
        raise ValueError('must be a walltime, HH:MM:SS or D-HH:MM:SS, e.g. "01:00:00"')
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def walltime(value: Any) -> str:
    walltime_seconds(value)
    return value


def address(value: Any) -> str:
    """``HOST:PORT`` or ``:PORT`` (every interface), the port 0 (any free one) to 65535."""
    host, colon, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not colon or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise ValueError('must be HOST:PORT or :PORT, the port 0 (any free one) to 65535, e.g. "127.0.0.1:8787"')
    return value


def name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ValueError("must be letters, digits, '_', '-' or '.'")
    return value


def checked(check: Callable[[Any], Any]) -> Any:
    return field(metadata={"check": check})


@dataclass(frozen=True)
class Storage:
    """``[storage]``: where and how shards are written (see unidask.yaml for each key's meaning)."""

    local_dir: str = checked(text('"/scratch/$USER"'))
    synchronous: str = checked(one_of("NORMAL", "FULL", "OFF", upper=True))
    stage_every: float = checked(seconds)
    stage_behind: int = checked(integer(0, MAX_BYTES))
    shard_per: str = checked(one_of("node", "process"))
    page_size: int | str = checked(page_size)
    busy_timeout: float = checked(seconds)
    allow_network_fs: bool = checked(boolean)


@dataclass(frozen=True)
class Cluster:
    """``[cluster]``: where the workers come from."""

    mode: str = checked(one_of("local", "scheduler_file", "slurm"))
    workers: int | str = checked(auto_or(integer()))
    nodes: int = checked(integer())
    scheduler_file: str | None = checked(optional(text('"scheduler.json"')))
    dashboard_address: str = checked(address)
    interface: str | None = checked(optional(text('"ib0"')))
    max_in_flight: int | None = checked(optional(integer()))
    security: str = checked(one_of("tls", "none"))
    backups: bool = checked(boolean)
    worker_timeout: float = checked(seconds)
    stop_before: int = checked(integer())
    max_resubmits: int = checked(integer(0))
    memory: str | None = checked(optional(text('"4GB"')))
    walltime: str | None = checked(optional(walltime))
    partition: str | None = checked(optional(text('"short"')))
    account: str | None = checked(optional(text('"myproject"')))
    job_extra_directives: tuple[str, ...] = checked(directives)

    def workers_per_node(self, cores: int) -> int:
        """Worker processes on a node of ``cores`` cores: ``workers``, or with "auto" one per core."""
        return cores if self.workers == "auto" else int(self.workers)

    def job_walltime(self) -> str:
        """The generation job's walltime (``unidask submit``): ``walltime``, else one hour."""
        return self.walltime or SUBMIT_WALLTIME

    def cores_warning(self, cores: int) -> str | None:
        """What a fixed ``workers`` does on nodes of ``cores`` cores, where not one per core."""
        workers = self.workers_per_node(cores)
        if workers < cores:
            return (f"cluster.workers = {workers} runs {workers} worker process(es) on each node's {cores} "
                    "cores: cluster.workers = \"auto\" runs one per core")
        if workers > cores:
            return (f"cluster.workers = {workers} on nodes of {cores} core(s): the processes share the cores, "
                    f"and each task takes {workers / cores:.1f}x the time it takes alone")
        return None

    def in_flight(self, threads: int) -> int:
        """Tasks submitted ahead for ``threads`` worker threads: ``max_in_flight``, else 2 each + 4."""
        return self.max_in_flight or 2 * threads + 4

    def local_cores(self) -> int:
        """Cores of each simulated node of a local run: this machine's, shared out."""
        return max(1, (os.cpu_count() or 1) // self.nodes)

    def local_per_node(self) -> int:
        """Worker processes of each simulated node of a local run (``auto``: one per its cores)."""
        return self.workers_per_node(self.local_cores())


def _section(cls: type, section: str, values: Mapping[str, Any], where: str):
    return cls(**{f.name: _check(f.metadata["check"], section, f.name, values[f.name], where)
                  for f in fields(cls)})


@dataclass(frozen=True)
class Spec:
    """A validated run: what to generate (run, generator), where to store it, where to run it."""

    name: str
    count: int
    task_size: int   # or "auto" until the run sizes it (sizing.resolve)
    seed: int
    run_dir: Path
    kind: str
    dtype: str
    params: Mapping[str, Any]
    storage: Storage
    cluster: Cluster
    code: str = ""   # a plugin generator's identity (generators.code_identity); "" for built-ins
    law: str = "none"   # the law its generator states (generators.LAWS): not part of the data
    source: str = field(default="", compare=False)

    def __reduce__(self):
        # mappingproxy does not pickle; rebuild with a plain dict (for multiprocessing, Dask)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _rebuild_spec, ({**values, "params": dict(self.params)},)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config", *, recorded: bool = False) -> "Spec":
        """Validate nested plain data (a config's sections with every key present, or
        :meth:`to_dict`'s output). ``recorded``: data a run recorded (run.json, a database's meta):
        its generator parameters were checked when it was made, so a ``module:function`` is not
        imported again and ``local_dir`` is not expanded here (it is, on each node)."""
        run, gen = data["run"], dict(data["generator"])
        if run["count"] is None:
            raise InputError(f"{where}: run.count is required")
        values = {"name": _check(name, "run", "name", run["name"], where)}
        # a seed of any size is SeedSequence's entropy (e.g. 128 bits from SeedSequence().entropy)
        for key, check in (("count", integer(1)), ("seed", integer(0, 2 ** 256))):
            values[key] = _check(check, "run", key, run[key], where)
        values["task_size"] = _check(auto_or(integer(1)), "run", "task_size", run["task_size"], where)
        run_dir = Path(expand_vars(str(run["run_dir"] or f"runs/{run['name']}"), where)).absolute()
        kind = gen.pop("kind")
        dtype = _check(one_of("complex128", "complex64"), "generator", "dtype", gen.pop("dtype"), where)
        if recorded:   # a record from before laws were stated: a built-in's own
            params, code = gen, data.get("code", "")
            law = _check(one_of(*generators.LAWS), "generator", "law",
                         data.get("law") or generators.builtin_law(kind), where)
        else:
            try:
                generator = generators.get(kind)
                params, code, law = generator.validate(gen), generator.code, generator.law
            except InputError as e:
                raise InputError(f"{where}: {e}") from e
        storage = _section(Storage, "storage", data["storage"], where)
        cluster = _section(Cluster, "cluster", data["cluster"], where)
        if not recorded:
            expand_vars(storage.local_dir, where)  # fails now on a bad expression, not on a node
        if cluster.mode == "scheduler_file" and not cluster.scheduler_file:
            raise InputError(f"{where}: cluster.scheduler_file is required in scheduler_file mode")
        return cls(**values, run_dir=run_dir, kind=kind, dtype=dtype, params=MappingProxyType(params),
                   storage=storage, cluster=cluster, code=code, law=law, source=where)

    @property
    def n_tasks(self) -> int:
        if not isinstance(self.task_size, int):
            raise RunError(f"{self.source or 'config'}: run.task_size = {self.task_size!r} is not sized yet "
                           "(unidask.sizing.resolve)")
        return plan.n_tasks(self.count, self.task_size)

    def task_count(self, task: int) -> int:
        """Unitaries in task ``task`` (the last one may be short)."""
        return plan.task_count(self.count, self.task_size, task)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data: what run.json and the databases' meta record."""
        return {
            "run": {"name": self.name, "count": self.count, "task_size": self.task_size,
                    "seed": self.seed, "run_dir": str(self.run_dir)},
            "generator": {"kind": self.kind, "dtype": self.dtype, **self.params},
            "storage": asdict(self.storage),
            "cluster": asdict(self.cluster),
            **({"code": self.code} if self.code else {}),
            "law": self.law,
        }

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the data; shards of one run share it."""
        data = {"count": self.count, "task_size": self.task_size, "seed": self.seed,
                "generator": self.to_dict()["generator"], **({"code": self.code} if self.code else {})}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def local_dir(self) -> Path:
        """The node-local dir, expanded with this process's environment (call it on the node)."""
        return Path(expand_vars(self.storage.local_dir))


def _check(check: Callable[[Any], Any], section: str, key: str, value: Any, where: str) -> Any:
    try:
        return check(value)
    except ValueError as e:
        raise InputError(f"{where}: {section}.{key} {e}, got {value!r}") from e


def _rebuild_spec(values: dict[str, Any]) -> Spec:
    return Spec(**{**values, "params": MappingProxyType(values["params"])})


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] = MappingProxyType({}),
                data: Mapping[str, Any] | None = None) -> Spec:
    """Read a run config (TOML file, a job's resolved spec in JSON, or ``data``), apply
    ``{"section.key": value}`` overrides, validate. A ``task_size = "auto"`` stays so until the
    run sizes it (:func:`unidask.sizing.resolve`)."""
    if data is None:
        if path is None:
            raise InputError("no config given")
        path = Path(path)
        # a job's spec (RUN_DIR/jobs/spec-*.json), resolved and checked by `unidask submit`
        recorded = path.suffix == ".json"
        try:
            data = json.loads(path.read_text()) if recorded else tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise InputError(f"{path}: config file not found") from e
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read config: {e}") from e
        except (tomllib.TOMLDecodeError, ValueError) as e:
            raise InputError(f"{path}: not valid {'JSON' if recorded else 'TOML'}: {e}") from e
    else:
        recorded = False
    where = str(path) if path is not None else "config"
    defaults = dask.config.get("unidask")
    merged = {s: copy.deepcopy(defaults[s]) for s in SECTIONS}
    if recorded and not isinstance(data, dict):
        raise InputError(f"{where}: not a unidask job spec (a JSON object of sections)")
    data = dict(data)   # the caller's, left as it is
    code = data.pop("code", "") if recorded else ""
    law = data.pop("law", "") if recorded else ""
    _update(merged, data, where)
    for key, value in overrides.items():
        section, dot, item = key.partition(".")
        if not dot or not section or not item:
            raise InputError(f"override {key!r}: expected section.key, e.g. run.count")
        _update(merged, {section: {item: value}}, "override")
    if merged["run"]["name"] is None:
        merged["run"]["name"] = Path(path).stem if path is not None else "unidask"
    return Spec.from_dict({**merged, "code": code, "law": law}, where, recorded=recorded)


def parse_override(item: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``; the value is read as TOML, else kept
    as a string. Raises ValueError on anything else."""
    key, sep, value = item.partition("=")
    section, dot, name_ = key.strip().partition(".")
    if not sep or not dot or not section or not name_:
        raise ValueError(f"{item!r}: expected section.key=value, e.g. run.count=1000")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _update(merged: dict, data: Mapping[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in merged:
            raise InputError(f"{where}: unknown section [{section}] (known: {', '.join(merged)})")
        if not isinstance(values, Mapping):
            raise InputError(f"{where}: [{section}] must be a table of keys")
        for key, value in values.items():
            # generator parameters depend on the kind and are checked once it is known
            if key not in merged[section] and section != "generator":
                if ours := SPELLED_OTHERWISE.get(section, {}).get(key):
                    raise InputError(f"{where}: unknown key {section}.{key}: did you mean {section}.{ours}?")
                raise InputError(f"{where}: unknown key {section}.{key} "
                                 f"(known: {', '.join(merged[section])})")
            merged[section][key] = value


_USER_VARS = {"USER": lambda: pwd.getpwuid(os.getuid()).pw_name, "UID": lambda: str(os.getuid())}
_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def expand_vars(text_: str, where: str = "config") -> str:
    """Expand ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` as a shell would; unset without default
    fails. ``USER`` and ``UID`` are known even where the environment lacks them (cron, containers):
    the per-user local dir must never fall back to a name another user shares."""

    def sub(m: re.Match) -> str:
        var = m["braced"] or m["plain"]
        value = os.environ.get(var) or _USER_VARS.get(var, lambda: None)()
        if value:
            return value
        if m["default"] is not None:
            return m["default"]
        raise InputError(f"{where}: environment variable ${var} in {text_!r} is not set")

    expanded = os.path.expanduser(_VAR.sub(sub, text_))
    if expanded.startswith("~"):   # ~name of no user: expanduser leaves it as a literal dir name
        raise InputError(f"{where}: {text_!r}: no user {expanded[1:].partition('/')[0]!r} on this machine")
    return expanded


# -- Dask's settings for the clusters unidask starts -----------------------------------------------

def dask_settings() -> dict[str, Any]:
    """``unidask.dask`` as dotted ``distributed.*`` keys, for the clusters unidask starts (never
    the process: a notebook that reads a Dataset keeps its own Dask). A key the user or site set
    in Dask's own config (a value other than Dask's default) keeps their value."""
    def flatten(node: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            if isinstance(v, Mapping):
                out.update(flatten(v, (*keys, k)))
            else:
                out[".".join((*keys, k))] = v
        return out

    import distributed  # noqa: F401  (its defaults registered before any is compared with them)

    ours = flatten(dask.config.get("unidask.dask"), ())
    return {key: value if dask.config.get(key, None) == _dask_default(key) else dask.config.get(key)
            for key, value in ours.items()}


def _dask_default(key: str) -> Any:
    for layer in reversed(dask.config.defaults):
        try:
            return dask.config.get(key, config=layer)
        except KeyError:
            continue
    return None


def dask_exports() -> list[str]:
    """:func:`dask_settings` as the shell exports of ``DASK_*`` variables that carry them to a
    `dask scheduler` or `dask worker` a job script starts: those read only Dask's own config."""
    return [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={shlex.quote(str(value))}"
            for key, value in dask_settings().items()]
