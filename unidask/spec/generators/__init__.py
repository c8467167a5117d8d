"""Generator families and their registry: ``kind`` -> a :class:`Generator`.

A built-in generator is ``f(rng, count, *, dtype, **params)``. A user's generator, named in the
config as ``kind = "module:function"``, is ``function(rng, count, **params)``; both return a
``(count, n, n)`` array, or a pair ``(array, metas)`` with one JSON-able dict (or None) per unitary.

Every generator states the law its samples follow (:data:`LAWS`), which ``verify --stats`` tests: a
built-in here, a plugin with :func:`law`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ...core.errors import InputError, RunError
from .. import plan
from . import circuits, groups
from . import haar as _haar

if TYPE_CHECKING:
    from ..config import Spec

REQUIRED = object()

# the laws a generator may state (unidask/laws.py holds each one's tests); "none": not testable
LAWS = ("U(n)", "SU(n)", "O(n)", "SO(n)", "Sp(n)", "diagonal", "circuit", "none")


def law(name: str, checks: Callable[[np.ndarray], Mapping[str, float | bool]] | None = None
        ) -> Callable[[Callable], Callable]:
    """State the law a plugin generator's samples follow, for ``verify --stats``::

        @unidask.law("U(n)")
        def my_haar(rng, count, *, dim=4): ...

    ``name`` is one of :data:`LAWS`. ``checks``, the plugin's own tests, is called with a sample of
    the stored unitaries ``(k, n, n)`` and returns ``{test name: p-value or pass (bool)}``; a
    p-value fails below the threshold of unidask's own tests."""
    if name not in LAWS:
        raise InputError(f"law {name!r} is not one unidask tests (known: {', '.join(LAWS)})")
    if checks is not None and not callable(checks):
        raise InputError(f"law {name!r}: checks must be a function of the sampled unitaries")

    def stated(function: Callable) -> Callable:
        setattr(function, "law", name)   # read back by get(): the function itself carries its law
        setattr(function, "checks", checks)
        return function
    return stated


@dataclass(frozen=True)
class Param:
    """One generator parameter: its type, default (or REQUIRED), smallest value and meaning."""

    type: type | tuple[type, ...]
    default: Any = REQUIRED
    minimum: float | None = None
    doc: str = ""

    def describe(self) -> str:
        name = self.type.__name__ if isinstance(self.type, type) else "/".join(t.__name__ for t in self.type)
        default = "required" if self.default is REQUIRED else f"default {self.default!r}"
        low = f", >= {self.minimum}" if self.minimum is not None else ""
        return f"{name}{low}, {default}" + (f": {self.doc}" if self.doc else "")


@dataclass(frozen=True)
class Generator:
    kind: str
    function: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    doc: str = ""
    check: Callable[[dict[str, Any]], None] | None = None   # cross-parameter checks
    plugin: bool = False
    code: str = ""   # a plugin's identity: module:function and its source's hash (or version)
    law: str = "none"   # one of LAWS: what its samples follow

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``given`` against the parameters; return them with defaults filled in."""
        unknown = set(given) - set(self.params)
        if unknown and not (self.plugin and _takes_kwargs(self.function)):
            known = ", ".join(["kind", "dtype", *self.params])
            keys = ", ".join(f"generator.{k}" for k in sorted(unknown))
            raise InputError(f"kind {self.kind!r} takes no {keys}: remove {'it' if len(unknown) == 1 else 'them'} "
                             f"from [generator] (the keys of {self.kind!r}: {known}; configs/ has a config "
                             "for each kind)")
        out = {k: given[k] for k in unknown}
        for name, p in self.params.items():
            value = given.get(name, p.default)
            if value is REQUIRED:
                raise InputError(f"generator.{name} is required for kind {self.kind!r}")
            types = p.type if isinstance(p.type, tuple) else (p.type,)
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
            if p.type is not object and (not ok or (p.minimum is not None and value < p.minimum)):
                raise InputError(f"generator.{name} must be {p.describe().split(',')[0]}"
                                 + (f" >= {p.minimum}" if p.minimum is not None else "") + f", got {value!r}")
            out[name] = value
        if self.check is not None:
            self.check(out)
        return out

    def label(self, params: Mapping[str, Any]) -> str:
        """A readable task-name prefix for Dask's pages, e.g. ``generate-haar-4``."""
        size = params.get("dim") or (f"{params['qubits']}q" if "qubits" in params else "")
        return f"generate-{self.kind.replace(':', '.')}" + (f"-{size}" if size else "")

    def __call__(self, rng: np.random.Generator, count: int, dtype: str,
                 params: Mapping[str, Any]) -> tuple[np.ndarray, list | None]:
        if not self.plugin:
            out = self.function(rng, count, dtype=dtype, **params)
            return out if isinstance(out, tuple) else (out, None)
        return _call_plugin(self, rng, count, dtype, params)


dim = Param(int, minimum=1, doc="matrix size n")
REGISTRY: dict[str, Generator] = {g.kind: g for g in [
    Generator("haar", _haar.haar, {"dim": dim},
              "Haar-random U(n): batched QR with Mezzadri's phase correction", law="U(n)"),
    Generator("special", groups.special, {"dim": dim}, "Haar-random SU(n)", law="SU(n)"),
    Generator("orthogonal", groups.orthogonal, {"dim": dim},
              "Haar-random O(n) (real, stored as complex), both determinant signs", law="O(n)"),
    Generator("diagonal", groups.diagonal, {"dim": dim}, "diagonal unitaries with uniform random phases",
              law="diagonal"),
    Generator("circuit", circuits.circuit, {
        "qubits": Param(int, minimum=1, doc="qubits q; unitaries are 2^q x 2^q"),
        "depth": Param(int, 10, minimum=0, doc="layers, each touching a qubit at most once"),
        "gates": Param((int, list), 0, doc="if > 0: this many gates instead of depth layers; "
                                            "[min, max]: a count drawn for each circuit"),
        "gate_set": Param(list, list(circuits.GATES), doc="gates to draw from"),
        "two_qubit_density": Param(float, 0.3, doc="chance a slot gets a two-qubit gate"),
        "coupling_map": Param(list, [], doc="allowed [a, b] qubit pairs (default: all)"),
    }, "random circuits; meta holds the circuit as OpenQASM 2 (qubit 0 = least significant bit)",
        check=circuits.check, law="circuit"),
]}

PLUGIN_PARAMS = {
    "check_unitary": Param(bool, True, doc="check every returned matrix is unitary"),
    "tolerance": Param(float, 1e-8, doc="max |U^H U - I| allowed"),
}


def builtin_law(kind: Any) -> str:
    """The law of the built-in ``kind`` ("none" for anything else): what a record from before
    laws were recorded stated."""
    return REGISTRY[kind].law if isinstance(kind, str) and kind in REGISTRY else "none"


def get(kind: str) -> Generator:
    """The generator registered under ``kind``, or the user's ``module:function``."""
    if isinstance(kind, str) and ":" in kind:
        return plugin(kind)
    try:
        return REGISTRY[kind]
    except (KeyError, TypeError) as e:
        raise InputError(f"unknown generator kind {kind!r} (known: {', '.join(REGISTRY)}, "
                         "or module:function)") from e


def plugin(kind: str) -> Generator:
    """Load a user generator ``module:function``; its keyword parameters become config keys."""
    module, _, name = kind.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise InputError(f"generator {kind!r}: cannot import {module!r} ({e})") from e
    except AttributeError as e:
        raise InputError(f"generator {kind!r}: module {module!r} has no {name!r}") from e
    if not callable(function):
        raise InputError(f"generator {kind!r} is not a function")
    params = dict(PLUGIN_PARAMS)
    for p in list(inspect.signature(function).parameters.values())[2:]:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            params[p.name] = Param(object, REQUIRED if p.default is p.empty else p.default)
    stated = getattr(function, "law", "none")
    if stated not in LAWS:
        raise InputError(f"generator {kind!r} states law {stated!r}, not one unidask tests (known: "
                         f"{', '.join(LAWS)}; state it with @unidask.law)")
    return Generator(kind, function, params, (inspect.getdoc(function) or "").split("\n")[0], plugin=True,
                     code=code_identity(kind, function), law=stated)


def code_identity(kind: str, function: Callable) -> str:
    """What a plugin's data depends on beside its parameters: its module's source (a hash of it),
    else the version of the package it comes from. Part of the run's fingerprint, so a changed
    generator cannot mix its rows with the old one's."""
    module = inspect.getmodule(function)
    try:
        if module is None:
            raise TypeError(f"{function!r} has no module")
        return f"{kind} sha256:{hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:16]}"
    except (OSError, TypeError):
        top = kind.partition(":")[0].split(".")[0]
        try:
            return f"{kind} {top}=={importlib.metadata.version(top)}"
        except importlib.metadata.PackageNotFoundError:
            return kind


def _takes_kwargs(function: Callable) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def _call_plugin(gen: Generator, rng, count: int, dtype: str, params: Mapping[str, Any]):
    own = {k: v for k, v in params.items() if k not in PLUGIN_PARAMS}
    out = gen.function(rng, count, **own)
    array, metas = out if isinstance(out, tuple) else (out, None)
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.number):
        raise RunError(f"generator {gen.kind!r} returned dtype {array.dtype}, expected numbers")
    if array.ndim != 3 or array.shape[0] != count or array.shape[1] != array.shape[2]:
        raise RunError(f"generator {gen.kind!r} returned shape {array.shape}, expected ({count}, n, n)")
    if not np.isfinite(array).all():
        raise RunError(f"generator {gen.kind!r} returned non-finite values (NaN or inf)")
    array = array.astype(dtype)
    if params["check_unitary"] and count:
        err = unitarity_errors(array)
        bad = int(np.argmax(err))
        if err[bad] > params["tolerance"]:
            raise RunError(f"generator {gen.kind!r} returned a matrix that is not unitary (#{bad}: "
                           f"max |U^H U - I| = {err[bad]:.1e} > tolerance {params['tolerance']:g})")
    return array, metas


def matrix_dim(kind: str, params: Mapping[str, Any]) -> int | None:
    """The n of the run's n x n matrices, from its config; None for a plugin (its rows tell)."""
    if ":" in kind:
        return None
    return 2 ** params["qubits"] if "qubits" in params else params["dim"]


# max |U^H U - I| of a built-in's matrices, per dtype: a few hundred ulps at the sizes unidask makes
TOLERANCE = {"complex128": 1e-10, "complex64": 1e-4}


def tolerance(spec: Spec) -> tuple[float, str]:
    """The max |U^H U - I| a run's matrices keep, and whose bound it is: a plugin's
    ``generator.tolerance`` where its run checked with it, else unidask's for the dtype."""
    params = spec.params
    if ":" in spec.kind and params.get("check_unitary", True) and isinstance(params.get("tolerance"), float):
        return params["tolerance"], "the run's generator.tolerance"
    return TOLERANCE.get(spec.dtype, TOLERANCE["complex128"]), f"unidask's for {spec.dtype}"


def unitarity_errors(u: np.ndarray) -> np.ndarray:
    """max |U^H U - I| of each matrix of a ``(k, n, n)`` array, in double precision."""
    u = np.asarray(u).astype(np.complex128)
    n = u.shape[-1]
    return np.abs(np.einsum("kji,kjl->kil", u.conj(), u) - np.eye(n)).max(axis=(1, 2))


def generate(spec: Spec, task: int) -> tuple[np.ndarray, list[str | None] | None]:
    """Task ``task``'s unitaries and their meta strings (JSON), checked for shape, dtype and
    finiteness: what a worker writes and what ``verify --against`` compares with."""
    count = spec.task_count(task)
    array, metas = get(spec.kind)(plan.rng(spec, task), count, spec.dtype, spec.params)
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[0] != count \
            or array.shape[1] != array.shape[2]:
        raise RunError(f"generator {spec.kind!r} returned {getattr(array, 'shape', type(array))}, "
                       f"expected ({count}, n, n)")
    if array.dtype != np.dtype(spec.dtype):
        raise RunError(f"generator {spec.kind!r} returned dtype {array.dtype}, expected {spec.dtype}")
    if not np.isfinite(array).all():
        raise RunError(f"generator {spec.kind!r} returned non-finite values in task {task}")
    if metas is not None:
        if len(metas) != count:
            raise RunError(f"generator {spec.kind!r} returned {len(metas)} metas for {count} unitaries")
        try:
            metas = [None if m is None else json.dumps(m, sort_keys=True) for m in metas]
        except TypeError as e:
            raise RunError(f"generator {spec.kind!r} returned meta that is not JSON: {e}") from e
    return array, metas
