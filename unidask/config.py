"""Run configs: a TOML file in, a validated and frozen :class:`Spec` out.

Defaults live in ``unidask.yaml`` under dask.config's ``unidask`` namespace, so a site can set
them once (e.g. the node-local scratch dir); the run's TOML and ``--set`` overrides win over them.
This module is the one place where input errors about a run are made.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import dask.config
import distributed.config  # noqa: F401  (registers Dask's distributed.* defaults, see below)
import yaml

from . import generators
from .errors import InputError

_defaults_file = Path(__file__).with_name("unidask.yaml")
_defaults = yaml.safe_load(_defaults_file.read_text())
# after distributed's defaults: a later update_defaults replaces values still at an earlier default,
# so ours (allowed-failures, the worker profiler) must come last to take effect
dask.config.update_defaults(_defaults)

DTYPES = ("complex128", "complex64")
SYNCHRONOUS = ("NORMAL", "FULL", "OFF")
MODES = ("local", "scheduler_file", "slurm")
PAGE_SIZES = tuple(2 ** k for k in range(9, 17))  # what SQLite accepts


def dask_exports() -> list[str]:
    """unidask.yaml's ``distributed.*`` settings, at their current values (a site's or the user's
    win), as the shell exports of ``DASK_*`` variables that carry them to a `dask scheduler` or
    `dask worker` a job script starts: those read only Dask's own config files."""

    def flatten(node: dict, keys: tuple[str, ...]) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += flatten(v, (*keys, k))
            else:
                name = "DASK_" + "__".join((*keys, k)).upper().replace("-", "_")
                value = str(dask.config.get(".".join((*keys, k))))
                out.append(f"export {name}={shlex.quote(value)}")
        return out

    return flatten(_defaults["distributed"], ("distributed",))


@dataclass(frozen=True)
class Spec:
    """A validated run: what to generate, where to store it, where to run it."""

    name: str
    count: int
    task_size: int
    seed: int
    run_dir: Path
    kind: str
    dtype: str
    params: Mapping[str, Any]
    storage: Mapping[str, Any]
    cluster: Mapping[str, Any]
    source: str = field(default="", compare=False)

    def __reduce__(self):
        # mappingproxy does not pickle; rebuild from plain dicts (for multiprocessing, Dask)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _rebuild_spec, ({k: dict(v) if isinstance(v, MappingProxyType) else v
                                for k, v in values.items()},)

    @property
    def n_tasks(self) -> int:
        return -(-self.count // self.task_size)

    def task_count(self, task: int) -> int:
        """Unitaries in task ``task`` (the last one may be short)."""
        return min(self.task_size, self.count - task * self.task_size)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data: what run.json and the databases' meta record."""
        return {
            "run": {"name": self.name, "count": self.count, "task_size": self.task_size,
                    "seed": self.seed, "run_dir": str(self.run_dir)},
            "generator": {"kind": self.kind, "dtype": self.dtype, **self.params},
            "storage": dict(self.storage),
            "cluster": dict(self.cluster),
        }

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the data; shards of one run share it."""
        data = {"count": self.count, "task_size": self.task_size, "seed": self.seed,
                "generator": self.to_dict()["generator"]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def local_dir(self) -> Path:
        """The node-local dir, expanded with this process's environment (call it on the node)."""
        return Path(expand_vars(self.storage["local_dir"]))


def _rebuild_spec(values: dict[str, Any]) -> Spec:
    return Spec(**{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in values.items()})


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | list[str] = (),
                data: Mapping[str, Any] | None = None) -> Spec:
    """Read a run config (TOML file or mapping), apply ``section.key=value`` overrides, validate."""
    if data is None:
        if path is None:
            raise InputError("no config given")
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read config: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{path}: not valid TOML: {e}") from None
    where = str(path) if path is not None else "config"
    merged = copy.deepcopy(dask.config.get("unidask"))
    _update(merged, data, where)
    if isinstance(overrides, Mapping):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    for item in overrides:
        _update(merged, parse_override(item), "--set")
    if merged["run"]["name"] is None:
        merged["run"]["name"] = Path(path).stem if path is not None else "unidask"
    return _validate(merged, where)


def parse_override(item: str) -> dict[str, Any]:
    """``section.key=value`` -> ``{section: {key: value}}``; the value is read as TOML, else a string."""
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise InputError(f"--set {item!r}: expected section.key=value, e.g. run.count=1000")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return {section: {name: parsed}}


def _update(merged: dict, data: Mapping[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in merged:
            raise InputError(f"{where}: unknown section [{section}] (known: {', '.join(merged)})")
        if not isinstance(values, Mapping):
            raise InputError(f"{where}: [{section}] must be a table of keys")
        for key, value in values.items():
            # generator parameters depend on the kind and are checked once it is known
            if key not in merged[section] and section != "generator":
                raise InputError(f"{where}: unknown key {section}.{key} "
                                 f"(known: {', '.join(merged[section])})")
            merged[section][key] = value


def _validate(c: dict, where: str) -> Spec:
    run, gen, storage, cluster = c["run"], dict(c["generator"]), c["storage"], c["cluster"]

    def positive_int(section: str, key: str, value: Any, minimum: int = 1) -> int:
        if value is None:
            raise InputError(f"{where}: {section}.{key} is required")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{where}: {section}.{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def choice(section: str, key: str, value: Any, options: tuple[str, ...]) -> str:
        if value not in options:
            raise InputError(f"{where}: {section}.{key} must be one of {', '.join(options)}, got {value!r}")
        return value

    name = run["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"{where}: run.name must be letters, digits, '_', '-' or '.', got {name!r}")
    count = positive_int("run", "count", run["count"])
    task_size = positive_int("run", "task_size", run["task_size"])
    seed = positive_int("run", "seed", run["seed"], minimum=0)
    run_dir = Path(expand_vars(str(run["run_dir"] or f"runs/{name}"), where)).absolute()

    kind = gen.pop("kind")
    dtype = choice("generator", "dtype", gen.pop("dtype"), DTYPES)
    try:
        params = generators.get(kind).validate(gen)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None

    storage = dict(storage)
    storage["synchronous"] = choice("storage", "synchronous", str(storage["synchronous"]).upper(),
                                    SYNCHRONOUS)
    choice("storage", "shard_per", storage["shard_per"], ("node", "process"))
    if storage["page_size"] != "auto" and (storage["page_size"] not in PAGE_SIZES
                                           or isinstance(storage["page_size"], (bool, float))):
        raise InputError(f"{where}: storage.page_size must be \"auto\" or a power of 2 from 512 to 65536 "
                         f"bytes, got {storage['page_size']!r}")
    for key in ("stage_every", "busy_timeout"):
        value = storage[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InputError(f"{where}: storage.{key} must be a number of seconds > 0, got {value!r}")
    if not isinstance(storage["local_dir"], str) or not storage["local_dir"]:
        raise InputError(f"{where}: storage.local_dir must be a path")
    expand_vars(storage["local_dir"], where)  # fails now on a bad expression, not on a node
    if not isinstance(storage["allow_network_fs"], bool):
        raise InputError(f"{where}: storage.allow_network_fs must be true or false")

    cluster = dict(cluster)
    choice("cluster", "mode", cluster["mode"], MODES)
    positive_int("cluster", "workers", cluster["workers"])
    positive_int("cluster", "nodes", cluster["nodes"])
    if cluster["max_in_flight"] is not None:
        positive_int("cluster", "max_in_flight", cluster["max_in_flight"])
    choice("cluster", "security", cluster["security"], ("tls", "none"))
    positive_int("cluster", "stop_before", cluster["stop_before"])
    for key in ("memory", "walltime"):
        if not isinstance(cluster[key], str) or not cluster[key]:
            raise InputError(f"{where}: cluster.{key} must be a string, e.g. \"4GB\" or \"01:00:00\"")
    if cluster["mode"] == "scheduler_file" and not cluster["scheduler_file"]:
        raise InputError(f"{where}: cluster.scheduler_file is required in scheduler_file mode")

    return Spec(name=name, count=count, task_size=task_size, seed=seed, run_dir=run_dir,
                kind=kind, dtype=dtype, params=MappingProxyType(params),
                storage=MappingProxyType(storage), cluster=MappingProxyType(cluster), source=where)


_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def expand_vars(text: str, where: str = "config") -> str:
    """Expand ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` as a shell would; unset without default fails."""

    def sub(m: re.Match) -> str:
        name = m["braced"] or m["plain"]
        value = os.environ.get(name)
        if value:
            return value
        if m["default"] is not None:
            return m["default"]
        raise InputError(f"{where}: environment variable ${name} in {text!r} is not set")

    return os.path.expanduser(_VAR.sub(sub, text))
