"""Haar-random unitaries, U(n), by batched QR (Mezzadri 2007, "How to generate random matrices
from the classical compact groups")."""

from __future__ import annotations

import numpy as np

# Best throughput keeps a batch near 2e4 complex elements: larger batches leave the CPU caches.
_BATCH_ELEMENTS = 20_000


def batch_size(dim: int) -> int:
    return max(1, _BATCH_ELEMENTS // (dim * dim))


def haar(rng: np.random.Generator, count: int, *, dim: int, dtype: str = "complex128") -> np.ndarray:
    """``count`` Haar-random ``dim x dim`` unitaries as a ``(count, dim, dim)`` array.

    QR of a complex Ginibre matrix gives Q with an arbitrary phase per column; multiplying column
    j by r_jj/|r_jj| makes the distribution exactly Haar. The normals are drawn in batches from
    one stream, so the result depends only on ``rng`` and ``count``, not on the batch size.
    """
    dtype = np.dtype(dtype)
    real = np.float32 if dtype == np.complex64 else np.float64
    out = np.empty((count, dim, dim), dtype)
    step = batch_size(dim)
    for start in range(0, count, step):
        k = min(step, count - start)
        # one draw of (k, n, n, 2) reals viewed as complex avoids temporaries; the 1/sqrt(2)
        # scale of a standard complex normal does not change Q after the phase fix
        z = rng.standard_normal((k, dim, dim, 2), dtype=real).view(dtype)[..., 0]
        q, r = np.linalg.qr(z)
        d = np.diagonal(r, axis1=-2, axis2=-1)
        q *= (d / np.abs(d))[:, None, :]
        out[start:start + k] = q
    return out
