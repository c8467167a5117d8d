"""``unidask verify DB --stats``: independent checks that a database holds the distribution its
generator claims, on a seeded sample of its rows.

Each check is a hypothesis test against theory (or, for the eigenphase spacings, against scipy's
own Haar sampler, an independent implementation): a p-value below :data:`ALPHA` fails it. With
about ten tests on a dataset, a correct generator fails one by chance about once in a thousand
runs of ``--stats``; the classic bugs fail them with p-values far below 1e-10
(``tests/test_stats.py`` shows both). Alongside, two checks that are not statistical: rows that
repeat (a seed reused across tasks), and complex128 data with only complex64's precision.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from .dataset import Dataset

ALPHA = 1e-4        # a p-value below this fails a test
SAMPLE = 5000       # rows a test reads, spread over the dataset by a fixed seed
SPACINGS = 2000     # matrices whose eigenphase spacings are compared (n of them each)
CIRCUITS = 200      # stored circuits simulated again
TASK_HEAD = 4       # rows at the start of each task compared with the other tasks
F32_BITS = 29       # mantissa bits a float64 has beyond a float32's


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    pvalue: float | None = None

    def line(self) -> str:
        p = "" if self.pvalue is None else f"p = {self.pvalue:.2g}, "
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {p}{self.detail}"


def tested(name: str, pvalue: float, detail: str) -> Check:
    return Check(name, bool(pvalue >= ALPHA), detail, float(pvalue))


def sample(ds: Dataset, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``size`` distinct ids of ``ds`` drawn with ``seed``, and their unitaries."""
    lo, hi = ds.id_range
    rng = np.random.default_rng(seed)
    if len(ds) == hi - lo:   # complete: every id in the range is there
        ids = lo + np.sort(rng.choice(hi - lo, min(size, hi - lo), replace=False))
    else:
        ids = np.sort(rng.choice(ds.ids(), min(size, len(ds)), replace=False))
    return ids, ds[ids]


def wigner_cdf(s: np.ndarray) -> np.ndarray:
    """CDF of the Wigner surmise for CUE (beta = 2) spacings, p(s) = 32/pi^2 s^2 exp(-4 s^2/pi):
    the large-n shape, drawn in the report as a guide."""
    return special.erf(2 * s / np.sqrt(np.pi)) - 4 * s / np.pi * np.exp(-4 * s * s / np.pi)


def spacings(u: np.ndarray) -> np.ndarray:
    """Nearest-neighbour eigenphase spacings, unfolded to mean 1."""
    n = u.shape[-1]
    theta = np.sort(np.angle(np.linalg.eigvals(u)), axis=1)
    gaps = np.diff(np.concatenate([theta, theta[:, :1] + 2 * np.pi], axis=1), axis=1)
    return (gaps * n / (2 * np.pi)).ravel()


def mean_test(name: str, x: np.ndarray, expected: float, what: str) -> Check:
    """Two-sided z-test of the sample mean of ``x`` against ``expected``."""
    se = x.std(ddof=1) / np.sqrt(len(x))
    z = (x.mean() - expected) / se if se > 0 else (0.0 if x.mean() == expected else np.inf)
    return tested(name, 2 * stats.norm.sf(abs(z)), f"{what} = {x.mean():.4f} (theory {expected:g})")


def haar_checks(u: np.ndarray, seed: int) -> list[Check]:
    n = u.shape[-1]
    if n < 2:
        return [tested("|U_00| = 1, phase uniform", stats.kstest(np.angle(u[:, 0, 0]) % (2 * np.pi),
                                                                 stats.uniform(0, 2 * np.pi).cdf).pvalue,
                       "U(1)")]
    tr = np.abs(np.trace(u, axis1=1, axis2=2)) ** 2
    k = min(len(u), SPACINGS)
    reference = stats.unitary_group.rvs(n, size=k, random_state=np.random.default_rng(seed + 1))
    return [
        tested("|U_00|^2 ~ Beta(1, n-1)", stats.kstest(np.abs(u[:, 0, 0]) ** 2, stats.beta(1, n - 1).cdf).pvalue,
               f"Kolmogorov-Smirnov, {len(u):,} rows"),
        tested("eigenphase spacings (CUE)", stats.ks_2samp(spacings(u[:k]), spacings(reference.reshape(k, n, n))).pvalue,
               f"against scipy's unitary_group, {k:,} matrices each"),
        mean_test("E|tr U|^2 = 1", tr, 1.0, "mean"),
        mean_test("E|tr U|^4 = 2", tr ** 2, 2.0, "mean"),
    ]


def special_checks(u: np.ndarray, seed: int) -> list[Check]:
    n = u.shape[-1]
    err = float(np.abs(np.linalg.det(u) - 1).max())
    out = [Check("det U = 1", err < 1e-6 if u.dtype == np.complex64 else err < 1e-9,
                 f"max |det U - 1| = {err:.1e}")]
    if n >= 2:
        out.append(tested("|U_00|^2 ~ Beta(1, n-1)", stats.kstest(np.abs(u[:, 0, 0]) ** 2,
                                                                  stats.beta(1, n - 1).cdf).pvalue,
                          f"Kolmogorov-Smirnov, {len(u):,} rows"))
    return out


def orthogonal_checks(u: np.ndarray, seed: int) -> list[Check]:
    n = u.shape[-1]
    imag = float(np.abs(u.imag).max())
    det = np.linalg.det(u.real)
    plus = int((det > 0).sum())
    out = [Check("real", imag == 0, f"max |Im U| = {imag:.1e}"),
           tested("det = +1 and -1 equally likely", stats.binomtest(plus, len(det)).pvalue,
                  f"{plus:,} of {len(det):,} have det +1")]
    if n >= 2:
        out.append(tested("U_00^2 ~ Beta(1/2, (n-1)/2)", stats.kstest(u[:, 0, 0].real ** 2,
                                                                      stats.beta(0.5, (n - 1) / 2).cdf).pvalue,
                          f"Kolmogorov-Smirnov, {len(u):,} rows"))
    return out


def diagonal_checks(u: np.ndarray, seed: int) -> list[Check]:
    off = float(np.abs(u - np.einsum("kii->ki", u)[:, :, None] * np.eye(u.shape[-1])).max())
    phases = np.angle(u[:, -1, -1]) % (2 * np.pi)
    return [Check("diagonal", off == 0, f"max |off-diagonal| = {off:.1e}"),
            tested("phases uniform on [0, 2 pi)", stats.kstest(phases, stats.uniform(0, 2 * np.pi).cdf).pvalue,
                   f"Kolmogorov-Smirnov, {len(u):,} rows")]


def circuit_checks(ds: Dataset, ids: np.ndarray, u: np.ndarray) -> list[Check]:
    """The stored unitary against the stored circuit simulated again: by qiskit where installed
    (independent of unidask), else by unidask's own simulator."""
    from .generators import circuits

    try:
        from qiskit import QuantumCircuit
        from qiskit.quantum_info import Operator

        def simulate(qasm: str) -> np.ndarray:
            return Operator(QuantumCircuit.from_qasm_str(qasm)).data
        by = "qiskit"
    except ImportError:
        def simulate(qasm: str) -> np.ndarray:
            return circuits.unitary(*circuits.parse_qasm(qasm))
        by = "unidask's simulator (qiskit is not installed)"
    picked = np.linspace(0, len(ids) - 1, min(CIRCUITS, len(ids))).astype(int)
    err = max((float(np.abs(u[j] - simulate(ds.meta_of(int(ids[j]))["qasm"])).max()) for j in picked),
              default=0.0)
    tol = 1e-5 if u.dtype == np.complex64 else 1e-10
    return [Check("stored unitary = its circuit simulated again", err < tol,
                  f"{len(picked)} circuits by {by}, max |difference| = {err:.1e}")]


KINDS = {"haar": haar_checks, "special": special_checks, "orthogonal": orthogonal_checks,
         "diagonal": diagonal_checks}


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


def check(db: str | os.PathLike, size: int = SAMPLE, seed: int = 0) -> list[Check]:
    """The statistical checks for ``db``'s generator, on ``size`` rows drawn with ``seed``."""
    with Dataset(db) as ds:
        kind = ds.spec["generator"]["kind"]
        ids, u = sample(ds, size, seed)
        if kind == "circuit":
            return [*circuit_checks(ds, ids, u), repeats(ds, None)]   # small circuits can repeat
        out = [precision(u), repeats(ds, u)]
        if kind in KINDS:
            return out + KINDS[kind](u, seed)
        return out + [Check(f"distribution of {kind}", True, "unknown to unidask: not tested")]


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


def shown(db: str | os.PathLike, size: int = SAMPLE, seed: int = 0) -> list[Shown]:
    """What the report's data section draws for ``db``'s generator (the groups; nothing for
    circuits and unknown kinds)."""
    with Dataset(db) as ds:
        kind = ds.spec["generator"]["kind"]
        if kind not in KINDS:
            return []
        _, u = sample(ds, size, seed)
    n = u.shape[-1]
    if kind == "diagonal" or n < 2:
        return [Shown("phases of U_nn", "phase", np.angle(u[:, -1, -1]) % (2 * np.pi),
                      lambda x: np.full_like(x, 1 / (2 * np.pi)), "uniform", 0, 2 * np.pi)]
    if kind == "orthogonal":
        return [Shown("U_00^2", "U_00^2", u[:, 0, 0].real ** 2, stats.beta(0.5, (n - 1) / 2).pdf,
                      f"Beta(1/2, {(n - 1) / 2:g})", 0, 1)]
    out = [Shown("|U_00|^2", "|U_00|^2", np.abs(u[:, 0, 0]) ** 2, stats.beta(1, n - 1).pdf,
                 f"Beta(1, {n - 1})", 0, 1)]
    if kind == "haar":
        out += [Shown("eigenphase spacings", "spacing (unfolded: mean 1)", spacings(u[:SPACINGS]),
                      lambda s: 32 / np.pi ** 2 * s ** 2 * np.exp(-4 * s * s / np.pi),
                      "Wigner surmise (CUE, large n)", 0, 4),
                Shown("|tr U|^2", "|tr U|^2", np.abs(np.trace(u, axis1=1, axis2=2)) ** 2,
                      lambda x: np.exp(-x), "exp(-x) (large n; mean 1 at every n >= 1)", 0, 6)]
    return out
