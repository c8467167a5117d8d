"""User generators for the plugin tests: good ones, broken ones, and ones that state a law
(right or wrong) for verify --stats."""

import numpy as np


def rotations(rng, count, *, scale=1.0):
    """Random SO(2) rotations, with their angle as meta."""
    theta = scale * rng.uniform(0, 2 * np.pi, count)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2), [{"theta": t} for t in theta]


def wrong_shape(rng, count):
    return np.zeros((count, 2, 3))


def with_nan(rng, count):
    out = np.stack([np.eye(2)] * count)
    out[-1, 0, 0] = np.nan
    return out


def not_unitary(rng, count):
    return 2 * np.stack([np.eye(3)] * count)


def raises(rng, count):
    """A bug in the user's code."""
    return count // 0


def slow_haar(rng, count, *, dim=2, delay=0.0):
    """Haar U(dim), taking ``delay`` seconds a task: long runs with little data, for walltime tests."""
    import time

    from unidask.spec.generators.haar import haar

    time.sleep(delay)
    return haar(rng, count, dim=dim)


def held_haar(rng, count, *, dim=2, hold="", delay=0.25):
    """Haar U(dim), each task taking ``delay`` seconds while the file ``hold`` exists: a run that
    goes on, task by task, until its watcher is done with it (at most tasks x delay / workers)."""
    import os
    import time

    from unidask.spec.generators.haar import haar

    if hold and os.path.exists(hold):
        time.sleep(delay)
    return haar(rng, count, dim=dim)


# --- the laws of verify --stats (tests/test_stats.py): generators that state one, right or wrong

import unidask  # noqa: E402


def _haar(rng, count, dim):
    from unidask.spec.generators.haar import haar

    return haar(rng, count, dim=dim)


@unidask.law("U(n)")
def stated_haar(rng, count, *, dim=4):
    """Haar U(n), stated so."""
    return _haar(rng, count, dim)


def unstated_haar(rng, count, *, dim=4):
    """Haar U(n), with no law stated: verify --stats cannot test it."""
    return _haar(rng, count, dim)


@unidask.law("U(n)")
def haar_times_fixed(rng, count, *, dim=4):
    """Haar times one fixed unitary: Haar again (the measure is invariant)."""
    return _haar(rng, count, dim) @ _haar(np.random.default_rng(12345), 1, dim)[0]


@unidask.law("U(n)")
def haar_dagger(rng, count, *, dim=4):
    """The conjugate transpose of Haar: Haar again."""
    return _haar(rng, count, dim).conj().transpose(0, 2, 1)


@unidask.law("U(n)")
def gue_expm(rng, count, *, dim=4):
    """exp(iH), H from the GUE: unitary, not Haar."""
    a = rng.standard_normal((count, dim, dim)) + 1j * rng.standard_normal((count, dim, dim))
    w, v = np.linalg.eigh((a + a.conj().transpose(0, 2, 1)) / 2)
    return np.einsum("kij,kj,klj->kil", v, np.exp(1j * w), v.conj())


@unidask.law("U(n)")
def special_as_unitary(rng, count, *, dim=4):
    """Haar SU(n) claimed as U(n): every determinant 1."""
    from unidask.spec.generators.groups import special

    return special(rng, count, dim=dim)


@unidask.law("U(n)")
def orthogonal_as_unitary(rng, count, *, dim=4):
    """Haar O(n) claimed as U(n): real."""
    from unidask.spec.generators.groups import orthogonal

    return orthogonal(rng, count, dim=dim)


@unidask.law("U(n)")
def qr_without_phase_fix(rng, count, *, dim=4):
    """QR of complex Gaussians without Mezzadri's phase fix: not Haar."""
    z = rng.standard_normal((count, dim, dim)) + 1j * rng.standard_normal((count, dim, dim))
    return np.linalg.qr(z)[0]


@unidask.law("U(n)")
def same_seed_every_task(rng, count, *, dim=4):
    """Haar, but every task from one seed: the tasks repeat each other."""
    return _haar(np.random.default_rng(7), count, dim)


@unidask.law("U(n)")
def haar_in_complex64(rng, count, *, dim=4):
    """Haar computed in single precision, stored in the run's complex128."""
    return _haar(rng, count, dim).astype(np.complex64)


@unidask.law("Sp(n)")
def symplectic_haar(rng, count, *, dim=4):
    """Haar on USp(n), n even: columns k < n/2 uniform in what the earlier ones leave free, each
    with its partner -J conj(u_k) as column k + n/2 (Gram-Schmidt, equivariant like QR's)."""
    m = dim // 2
    j = np.block([[np.zeros((m, m)), np.eye(m)], [-np.eye(m), np.zeros((m, m))]])
    out = np.empty((count, dim, dim), complex)
    done = []
    for k in range(m):
        v = rng.standard_normal((count, dim)) + 1j * rng.standard_normal((count, dim))
        for _ in range(2):   # twice: orthogonal to rounding
            for c in done:
                v -= np.einsum("ki,ki->k", c.conj(), v)[:, None] * c
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        w = -(v.conj() @ j.T)
        done += [v, w]
        out[:, :, k], out[:, :, k + m] = v, w
    return out


def _uniform_angle(u):
    from scipy import stats

    return {"rotation angle uniform": stats.kstest(np.angle(u[:, 0, 0] + 1j * u[:, 1, 0]) % (2 * np.pi),
                                                   stats.uniform(0, 2 * np.pi).cdf).pvalue}


@unidask.law("none", checks=_uniform_angle)
def rotations_checked(rng, count, *, scale=1.0):
    """Random SO(2) rotations with a test of their own: the angle uniform (scale 1)."""
    return rotations(rng, count, scale=scale)[0]


def wrong_law(rng, count):
    """A law set by hand, not by @unidask.law: one unidask does not know."""
    return np.stack([np.eye(2)] * count)


wrong_law.law = "Haar"
