"""``unidask verify DB --stats``: independent checks that a database holds the law its generator
states (``generators.LAWS``; the tests of each in :mod:`unidask.laws`), on a seeded sample of its rows.

Alongside, checks that are not statistical: rows that repeat (a seed reused across tasks), complex128
data with only complex64's precision, and for circuits the stored unitary against its circuit
simulated again (:mod:`unidask.simulate`). A generator that states no law, and brings no checks of
its own, is NOT TESTED: never OK.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..core.errors import InputError
from ..spec import generators, laws
from ..spec.laws import Check
from ..store.dataset import Dataset

SAMPLE = 5000       # rows a test reads, spread over the dataset by a fixed seed
CIRCUITS = 200      # stored circuits simulated again
TASK_HEAD = 4       # rows at the start of each task compared with the other tasks
F32_BITS = 29       # mantissa bits a float64 has beyond a float32's


@dataclass
class Stats:
    """``verify --stats``'s checks of one database and what they read."""

    law: str
    checks: list[Check] = field(default_factory=list)
    read: list[str] = field(default_factory=list)   # e.g. "5,000 sampled rows"

    @property
    def verdict(self) -> str:
        """FAILED if a check failed, else NOT TESTED if one could not be run, else OK."""
        if any(c.ok is False for c in self.checks):
            return "FAILED"
        return "NOT TESTED" if any(c.ok is None for c in self.checks) else "OK"

    def summary(self) -> str:
        if self.verdict == "OK":
            of = f"of law {self.law}" if self.law != "none" else "(the generator's own, and unidask's)"
            return f"stats: OK: {len(self.checks)} checks {of} on {' and '.join(self.read)}"
        return f"stats: {self.verdict}: " + ", ".join(c.name for c in self.checks if c.ok is not True)


def sample(ds: Dataset, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``size`` distinct ids of ``ds`` drawn with ``seed``, and their unitaries."""
    lo, hi = ds.id_range
    rng = np.random.default_rng(seed)
    if len(ds) == hi - lo:   # complete: every id in the range is there
        ids = lo + np.sort(rng.choice(hi - lo, min(size, hi - lo), replace=False))
    else:
        ids = np.sort(rng.choice(ds.ids(), min(size, len(ds)), replace=False))
    return ids, ds[ids]


def circuit_checks(ds: Dataset, ids: np.ndarray, u: np.ndarray) -> tuple[list[Check], int]:
    """The stored unitary against the stored circuit simulated again (:mod:`unidask.simulate`), and
    how many circuits were."""
    from . import simulate

    simulate_one, by = simulate.simulator()
    name = "stored unitary = its circuit simulated again"
    picked = np.linspace(0, len(ids) - 1, min(CIRCUITS, len(ids))).astype(int)
    err = 0.0
    for j in picked:
        meta = ds.meta_of(int(ids[j]))
        if not isinstance(meta, dict) or not isinstance(meta.get("qasm"), str):
            return [Check(name, None, f"unitary {int(ids[j])} has no circuit (meta without \"qasm\")")], 0
        try:
            err = max(err, float(np.abs(u[j] - simulate_one(meta["qasm"])).max()))
        except Exception as e:   # a circuit no simulator reads (qiskit raises its own kinds)
            return [Check(name, False, f"unitary {int(ids[j])}'s circuit: {type(e).__name__}: {e}")], 0
    tol = 1e-5 if u.dtype == np.complex64 else 1e-10
    return [Check(name, err < tol, f"{len(picked):,} circuits by {by}, max |difference| = {err:.1e}")], len(picked)


def repeats(ds: Dataset, u: np.ndarray | None) -> Check:
    """Tasks that start alike (their first rows equal: a seed reused across tasks) and, for the
    continuous groups (``u`` given), rows of the sample that repeat."""
    task_size = int(ds.meta["task_size"])
    lo, hi = ds.id_range
    heads = np.arange(lo - lo % task_size, hi, task_size)
    want = np.unique(np.clip(heads[:, None] + np.arange(min(TASK_HEAD, task_size)), lo, hi - 1))
    signature: dict[int, Any] = {}
    for i, r in zip(*ds.present(want)):   # an incomplete dataset lacks some
        signature.setdefault(int(i) // task_size, hashlib.blake2b(digest_size=16)).update(r.tobytes())
    digests = [h.digest() for h in signature.values()]
    same_tasks = len(digests) - len(set(digests))
    rows = 0 if u is None else len(u) - len({r.tobytes() for r in u})
    detail = f"{same_tasks} of {len(digests):,} tasks start like another"
    if u is not None:
        detail += f"; {rows} repeat(s) among {len(u):,} sampled rows"
    return Check("no repeats", same_tasks == 0 and rows == 0, detail)


def precision(u: np.ndarray) -> Check:
    """complex128 whose values all fit a float32 (the low 29 mantissa bits zero): complex64 data
    stored as complex128. Random continuous values have those bits zero with odds of 2^-29."""
    if u.dtype != np.complex128:
        return Check("precision of the dtype", True, f"{u.dtype} stored as itself")
    bits = u.view(np.float64).ravel().view(np.uint64)
    nonzero = bits[(bits << np.uint64(1)) != 0]
    short = float(((nonzero & np.uint64((1 << F32_BITS) - 1)) == 0).mean()) if len(nonzero) else 0.0
    return Check("precision of the dtype", short < 0.01,
                 f"{100 * short:.1f}% of values fit a float32 (complex64 data stored as complex128 "
                 "would be 100%)")


def check(db: str | os.PathLike, size: int = SAMPLE, seed: int = 0) -> Stats:
    """The checks of the law ``db``'s generator states, on ``size`` rows drawn with ``seed``."""
    with Dataset(db) as ds:
        spec = ds.spec
        kind, law = spec["generator"]["kind"], stated_law(spec)
        ids, u = sample(ds, size, seed)
        result = Stats(law)
        if law == "circuit":
            result.checks, circuits = circuit_checks(ds, ids, u)
            result.checks.append(repeats(ds, None))   # small circuits can repeat
            result.read = [f"{circuits:,} circuits simulated again", f"{len(u):,} sampled rows"]
            return result
        result.checks = [precision(u), repeats(ds, u)]
        result.read = [f"{len(u):,} sampled rows"]
    if law in laws.TESTS:
        result.checks += laws.TESTS[law](u, seed)
    own = _own_checks(kind)
    if own is not None:
        result.checks += laws.own(own, u, kind)
    elif law == "none":
        result.checks.append(Check("distribution", None, f"generator {kind!r} states no law (state one "
                                   f"with @unidask.law, one of {', '.join(generators.LAWS[:-1])})"))
    return result


def _own_checks(kind: str):
    """A plugin's own checks (``@unidask.law(..., checks=)``), from its module where importable."""
    if ":" not in kind:
        return None
    try:
        return getattr(generators.get(kind).function, "checks", None)
    except InputError:
        return None   # not importable here: its law's tests still run


@dataclass
class Shown:
    """A distribution of the data and the theory it should follow, for the report to draw."""
    title: str
    x_label: str
    values: np.ndarray
    theory: Any = None         # a pdf, vectorised, over (lo, hi); None: no curve
    theory_label: str = ""
    lo: float = 0.0
    hi: float = 1.0


def stated_law(spec: dict[str, Any]) -> str:
    """The law a database's recorded spec states (a record from before laws: its built-in's;
    anything unidask does not know: none)."""
    law = spec.get("law") or generators.builtin_law(spec["generator"]["kind"])
    return law if law in generators.LAWS else "none"


def shown(db: str | os.PathLike, size: int = SAMPLE, seed: int = 0) -> list[Shown]:
    """What the report's data section draws for ``db``'s law (the groups; nothing for circuits
    and generators that state none)."""
    with Dataset(db) as ds:
        law = stated_law(ds.spec)
        if law not in laws.TESTS:
            return []
        _, u = sample(ds, size, seed)
    n = u.shape[-1]
    if law == "diagonal" or n < 2:
        return [Shown("phases of U_nn", "phase", np.angle(u[:, -1, -1]) % (2 * np.pi),
                      lambda x: np.full_like(x, 1 / (2 * np.pi)), "uniform", 0, 2 * np.pi)]
    if law in ("O(n)", "SO(n)"):
        return [Shown("U_00^2", "U_00^2", u[:, 0, 0].real ** 2, stats.beta(0.5, (n - 1) / 2).pdf,
                      f"Beta(1/2, {(n - 1) / 2:g})", 0, 1)]
    out = [Shown("|U_00|^2", "|U_00|^2", np.abs(u[:, 0, 0]) ** 2, stats.beta(1, n - 1).pdf,
                 f"Beta(1, {n - 1})", 0, 1)]
    if law == "U(n)":
        out += [Shown("eigenphase spacings", "spacing (unfolded: mean 1)", laws.spacings(u[:laws.SPACINGS]),
                      lambda s: 32 / np.pi ** 2 * s ** 2 * np.exp(-4 * s * s / np.pi),
                      "Wigner surmise (CUE, large n)", 0, 4),
                Shown("|tr U|^2", "|tr U|^2", np.abs(np.trace(u, axis1=1, axis2=2)) ** 2,
                      lambda x: np.exp(-x), "exp(-x) (large n; mean 1 at every n >= 1)", 0, 6)]
    return out
