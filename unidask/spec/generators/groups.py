"""The other classical compact groups, batched like haar: SU(n), O(n), and random diagonal phases."""

from __future__ import annotations

import numpy as np

from .haar import batch_size, haar


def special(rng: np.random.Generator, count: int, *, dim: int, dtype: str = "complex128") -> np.ndarray:
    """Haar-random SU(n): a Haar U(n) sample divided by an n-th root of its determinant (the
    image of Haar measure under U -> U / det(U)^(1/n) is Haar on SU(n))."""
    u = haar(rng, count, dim=dim, dtype="complex128")
    phase = np.angle(np.linalg.det(u))
    u *= np.exp(-1j * phase / dim)[:, None, None]
    return u.astype(dtype, copy=False)


def orthogonal(rng: np.random.Generator, count: int, *, dim: int, dtype: str = "complex128") -> np.ndarray:
    """Haar-random O(n): QR of real Gaussian matrices, column j times sign(r_jj) (Mezzadri 2007).
    Stored in the run's complex dtype with zero imaginary part."""
    out = np.empty((count, dim, dim), dtype)
    step = batch_size(dim)
    for start in range(0, count, step):
        k = min(step, count - start)
        q, r = np.linalg.qr(rng.standard_normal((k, dim, dim)))
        d = np.diagonal(r, axis1=-2, axis2=-1)
        out[start:start + k] = q * np.where(d < 0, -1.0, 1.0)[:, None, :]
    return out


def diagonal(rng: np.random.Generator, count: int, *, dim: int, dtype: str = "complex128") -> np.ndarray:
    """Diagonal unitaries with independent phases uniform on [0, 2 pi)."""
    out = np.zeros((count, dim, dim), dtype)
    idx = np.arange(dim)
    out[:, idx, idx] = np.exp(2j * np.pi * rng.random((count, dim)))
    return out
