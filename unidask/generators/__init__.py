"""Generator families and their registry: ``kind`` -> a function ``f(rng, count, *, dtype, **params)``.

A generator returns a ``(count, n, n)`` array of the requested dtype, or a pair
``(array, metas)`` where ``metas`` is a list of JSON-able dicts (one per unitary) or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import InputError
from . import haar as _haar

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One generator parameter: its type, default (or REQUIRED), smallest value and meaning."""

    type: type
    default: Any = REQUIRED
    minimum: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class Generator:
    kind: str
    function: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    doc: str = ""

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``given`` against the parameters; return them with defaults filled in."""
        unknown = set(given) - set(self.params)
        if unknown:
            known = ", ".join(["kind", "dtype", *self.params])
            raise InputError(f"unknown key generator.{sorted(unknown)[0]} for kind {self.kind!r} "
                             f"(known: {known})")
        out = {}
        for name, p in self.params.items():
            value = given.get(name, p.default)
            if value is REQUIRED:
                raise InputError(f"generator.{name} is required for kind {self.kind!r}")
            ok = isinstance(value, p.type) and not (isinstance(value, bool) and p.type is not bool)
            if p.type is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok or (p.minimum is not None and value < p.minimum):
                want = f"{p.type.__name__}" + (f" >= {p.minimum}" if p.minimum is not None else "")
                raise InputError(f"generator.{name} must be {want}, got {value!r}")
            out[name] = value
        return out


REGISTRY: dict[str, Generator] = {
    "haar": Generator("haar", _haar.haar, {"dim": Param(int, minimum=1, doc="matrix size n")},
                      "Haar-random U(n): batched QR with Mezzadri's phase correction"),
}


def get(kind: str) -> Generator:
    """The generator registered under ``kind``."""
    try:
        return REGISTRY[kind]
    except (KeyError, TypeError):
        raise InputError(f"unknown generator kind {kind!r} (known: {', '.join(REGISTRY)})") from None
