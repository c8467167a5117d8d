import numpy as np
import pytest
from scipy import stats

from unidask.spec.generators import haar as haar_module
from unidask.spec.generators.haar import haar

from conftest import unitarity_error


@pytest.mark.parametrize("dim", [1, 2, 4, 8, 33])
def test_haar_is_unitary(dim):
    u = haar(np.random.default_rng(0), 300, dim=dim)
    assert u.shape == (300, dim, dim) and u.dtype == np.complex128
    assert unitarity_error(u) < 1e-10


def test_haar_complex64_is_unitary_to_single_precision():
    u = haar(np.random.default_rng(0), 300, dim=6, dtype="complex64")
    assert u.dtype == np.complex64
    assert unitarity_error(u.astype(np.complex128)) < 1e-5


def test_haar_does_not_depend_on_batch_size(monkeypatch):
    a = haar(np.random.default_rng(3), 1000, dim=4)
    monkeypatch.setattr(haar_module, "_BATCH_ELEMENTS", 16 * 7)  # batches of 7
    b = haar(np.random.default_rng(3), 1000, dim=4)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_haar_first_entry_follows_beta(dim):
    # for Haar U(n), |U_00|^2 ~ Beta(1, n - 1)
    u = haar(np.random.default_rng(2024), 20000, dim=dim)
    assert stats.kstest(np.abs(u[:, 0, 0]) ** 2, stats.beta(1, dim - 1).cdf).pvalue > 0.01


def test_haar_phases_are_uniform():
    u = haar(np.random.default_rng(5), 20000, dim=4)
    assert stats.kstest(np.angle(u[:, 0, 0]), stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 0.01
