"""The tests of each law a generator may state (``generators.LAWS``), on a sample of its unitaries.

Each statistical test compares the sample with theory (or, for the eigenphase spacings, with
scipy's own Haar sampler, an independent implementation): a p-value below :data:`ALPHA` fails it.
A law has at most eight such tests, so a correct generator fails one by chance in about one
``--stats`` run in a thousand or fewer; the classic bugs fail by many orders of magnitude more
(``tests/test_stats.py`` shows both, at fixed seeds). The phase of det U and of U_00 are tested
because every other Haar test is blind to a global phase: SU(n) data claimed as U(n) passes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special, stats

ALPHA = 1e-4        # a p-value below this fails a test
SPACINGS = 2000     # matrices whose eigenphase spacings are compared (n of them each)


@dataclass
class Check:
    """One test's verdict: ``ok`` True (passed), False (failed) or None (not tested)."""

    name: str
    ok: bool | None
    detail: str
    pvalue: float | None = None

    def line(self) -> str:
        p = "" if self.pvalue is None else f"p = {self.pvalue:.2g}, "
        mark = {True: "ok  ", False: "FAIL", None: "NOT TESTED"}[self.ok]
        return f"{mark} {self.name}: {p}{self.detail}"


def tested(name: str, pvalue: float, detail: str) -> Check:
    return Check(name, bool(pvalue >= ALPHA), detail, float(pvalue))


def exact(name: str, error: float, u: np.ndarray, what: str) -> Check:
    """An identity that holds to rounding: ``error`` within the dtype's (a few hundred ulps)."""
    return Check(name, bool(error < (1e-6 if u.dtype == np.complex64 else 1e-9)), f"max {what} = {error:.1e}")


def mean_test(name: str, x: np.ndarray, expected: float, what: str) -> Check:
    """Two-sided z-test of the sample mean of ``x`` against ``expected``."""
    se = x.std(ddof=1) / np.sqrt(len(x))
    z = (x.mean() - expected) / se if se > 0 else (0.0 if x.mean() == expected else np.inf)
    return tested(name, 2 * stats.norm.sf(abs(z)), f"{what} = {x.mean():.4f} (theory {expected:g})")


def beta_test(name: str, x: np.ndarray, a: float, b: float) -> Check:
    return tested(name, stats.kstest(x, stats.beta(a, b).cdf).pvalue, f"Kolmogorov-Smirnov, {len(x):,} rows")


def uniform_phase(name: str, z: np.ndarray) -> Check:
    """The phase of ``z`` uniform on [0, 2 pi) (Kolmogorov-Smirnov)."""
    return tested(name, stats.kstest(np.angle(z) % (2 * np.pi), stats.uniform(0, 2 * np.pi).cdf).pvalue,
                  f"Kolmogorov-Smirnov, {len(z):,} rows")


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


def _trace2(u: np.ndarray) -> np.ndarray:
    return np.abs(np.trace(u, axis1=1, axis2=2)) ** 2


def unitary(u: np.ndarray, seed: int) -> list[Check]:
    """Haar on U(n)."""
    n = u.shape[-1]
    det = uniform_phase("phase of det U uniform", np.linalg.det(u))
    if n < 2:
        return [det]
    tr = _trace2(u)
    k = min(len(u), SPACINGS)
    reference = stats.unitary_group.rvs(n, size=k, random_state=np.random.default_rng(seed + 1))
    return [
        beta_test("|U_00|^2 ~ Beta(1, n-1)", np.abs(u[:, 0, 0]) ** 2, 1, n - 1),
        uniform_phase("phase of U_00 uniform", u[:, 0, 0]),
        det,
        tested("eigenphase spacings (CUE)",
               stats.ks_2samp(spacings(u[:k]), spacings(reference.reshape(k, n, n))).pvalue,
               f"against scipy's unitary_group, {k:,} matrices each"),
        mean_test("E|tr U|^2 = 1", tr, 1.0, "mean"),
        mean_test("E|tr U|^4 = 2", tr ** 2, 2.0, "mean"),
        # Weingarten: two entries of one matrix together, which the one-entry tests do not see
        mean_test("E|U_00 U_11|^2 = 1/(n^2-1)", np.abs(u[:, 0, 0] * u[:, 1, 1]) ** 2, 1 / (n * n - 1), "mean"),
    ]


def special_unitary(u: np.ndarray, seed: int) -> list[Check]:
    """Haar on SU(n)."""
    n = u.shape[-1]
    out = [exact("det U = 1", float(np.abs(np.linalg.det(u) - 1).max()), u, "|det U - 1|")]
    if n >= 2:
        out += [beta_test("|U_00|^2 ~ Beta(1, n-1)", np.abs(u[:, 0, 0]) ** 2, 1, n - 1),
                uniform_phase("phase of U_00 uniform", u[:, 0, 0]),
                mean_test("E|tr U|^2 = 1", _trace2(u), 1.0, "mean")]
    return out


def _real(u: np.ndarray) -> Check:
    imag = float(np.abs(u.imag).max())
    return Check("real", imag == 0, f"max |Im U| = {imag:.1e}")


def orthogonal(u: np.ndarray, seed: int) -> list[Check]:
    """Haar on O(n): both determinant signs, equally likely."""
    n = u.shape[-1]
    det = np.linalg.det(u.real)
    plus = int((det > 0).sum())
    out = [_real(u), tested("det = +1 and -1 equally likely", stats.binomtest(plus, len(det)).pvalue,
                            f"{plus:,} of {len(det):,} have det +1")]
    if n >= 2:
        out.append(beta_test("U_00^2 ~ Beta(1/2, (n-1)/2)", u[:, 0, 0].real ** 2, 0.5, (n - 1) / 2))
    return out


def special_orthogonal(u: np.ndarray, seed: int) -> list[Check]:
    """Haar on SO(n)."""
    n = u.shape[-1]
    out = [_real(u), exact("det U = 1", float(np.abs(np.linalg.det(u.real) - 1).max()), u, "|det U - 1|")]
    if n >= 2:
        out.append(beta_test("U_00^2 ~ Beta(1/2, (n-1)/2)", u[:, 0, 0].real ** 2, 0.5, (n - 1) / 2))
    return out


def symplectic_form(n: int) -> np.ndarray:
    """J = [[0, I], [-I, 0]], the form USp(n) keeps: U^T J U = J."""
    m = n // 2
    return np.block([[np.zeros((m, m)), np.eye(m)], [-np.eye(m), np.zeros((m, m))]])


def symplectic(u: np.ndarray, seed: int) -> list[Check]:
    """Haar on the compact symplectic group USp(n), n even, in the form of :func:`symplectic_form`."""
    n = u.shape[-1]
    if n % 2:
        return [Check("n even", False, f"Sp(n) needs an even n, the matrices are {n} x {n}")]
    j = symplectic_form(n)
    form = float(np.abs(np.einsum("kji,jl,klm->kim", u, j, u) - j).max())
    trace = np.trace(u, axis1=1, axis2=2)
    return [exact("U^T J U = J", form, u, "|U^T J U - J|"),
            exact("tr U real", float(np.abs(trace.imag).max()), u, "|Im tr U|"),
            # the first column is uniform on the unit sphere of C^n, as for U(n)
            beta_test("|U_00|^2 ~ Beta(1, n-1)", np.abs(u[:, 0, 0]) ** 2, 1, n - 1),
            mean_test("E|tr U|^2 = 1", np.abs(trace) ** 2, 1.0, "mean")]


def diagonal(u: np.ndarray, seed: int) -> list[Check]:
    """Diagonal, with independent phases uniform on the circle."""
    off = float(np.abs(u - np.einsum("kii->ki", u)[:, :, None] * np.eye(u.shape[-1])).max())
    return [Check("diagonal", off == 0, f"max |off-diagonal| = {off:.1e}"),
            uniform_phase("phases uniform on [0, 2 pi)", u[:, -1, -1])]


# the laws tested on the unitaries alone; "circuit" needs the stored circuits (stats.py)
TESTS: dict[str, Callable[[np.ndarray, int], list[Check]]] = {
    "U(n)": unitary, "SU(n)": special_unitary, "O(n)": orthogonal, "SO(n)": special_orthogonal,
    "Sp(n)": symplectic, "diagonal": diagonal,
}


def own(checks: Callable, u: np.ndarray, kind: str) -> list[Check]:
    """A plugin's own tests (:func:`unidask.law`'s ``checks``): ``{name: p-value or bool}``."""
    try:
        results = dict(checks(u))
    except Exception as e:   # the user's code: its failure is a failed check, said in one line
        return [Check(f"{kind}'s own checks", False, f"raised {type(e).__name__}: {e}")]
    out = []
    for name, value in results.items():
        if isinstance(value, (bool, np.bool_)):
            out.append(Check(str(name), bool(value), f"{kind}'s own check"))
        else:
            out.append(tested(str(name), float(value), f"{kind}'s own test"))
    return out
