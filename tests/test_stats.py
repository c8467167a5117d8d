"""verify --stats: a correct generator passes every test, the classic bugs fail them (p-values
shown), with the thresholds of unidask/stats.py."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest

import unidask
from unidask import stats
from unidask.generators.haar import haar

from conftest import run_main


@pytest.mark.parametrize("generator", [{"kind": "special", "dim": 3}, {"kind": "orthogonal", "dim": 5},
                                       {"kind": "diagonal", "dim": 3}, {"dim": 6, "dtype": "complex64"},
                                       {"kind": "circuit", "qubits": 2, "depth": 5}])
def test_correct_generators_pass(config, generator, capsys):
    spec = config(run={"count": 6000, "task_size": 500}, generator=generator)
    db = unidask.run(spec).merged.out
    code, out, _ = run_main("verify", db, "--stats", capsys=capsys)
    assert code == 0 and out.splitlines()[-1].startswith("stats: OK"), out
    assert all(line.startswith(("OK", "ok", "stats")) for line in out.splitlines()), out


def test_haar_passes_every_test(haar_run, capsys):
    _, db = haar_run
    code, out, _ = run_main("verify", db, "--stats", capsys=capsys)
    assert code == 0, out
    passed = [line for line in out.splitlines() if line.startswith("ok")]
    for name in ("Beta(1, n-1)", "spacings (CUE)", "E|tr U|^2 = 1", "E|tr U|^4 = 2", "precision", "repeats"):
        assert any(name in line for line in passed), (name, out)


def test_calibration_no_false_alarm_over_seeds():
    """The haar tests at ALPHA over 25 independent correct samples (fixed seeds): none fails."""
    for seed in range(25):
        u = haar(np.random.default_rng(1000 + seed), 3000, dim=4)
        failed = [c.line() for c in stats.haar_checks(u, seed) if not c.ok]
        assert failed == [], (seed, failed)


def doctored(db, tmp_path, rows) -> str:
    """A copy of the haar run's database whose 20,000 rows are replaced by ``rows(count)``; the
    statistical checks read data, not checksums."""
    bad = tmp_path / "bad.db"
    shutil.copy(db, bad)
    con = sqlite3.connect(bad)
    data = rows(20000).astype(np.complex128)
    con.executemany("UPDATE unitaries SET data = ? WHERE id = ?",
                    [(u.tobytes(), i) for i, u in enumerate(data)])
    con.commit()
    con.close()
    return str(bad)


def qr_without_phase_fix(count):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((count, 4, 4)) + 1j * rng.standard_normal((count, 4, 4))
    return np.linalg.qr(z)[0]


def seed_reused_in_every_task(count):
    return np.concatenate([haar(np.random.default_rng(7), 1000, dim=4)] * (count // 1000))


def complex64_as_complex128(count):
    return haar(np.random.default_rng(5), count, dim=4).astype(np.complex64)


@pytest.mark.parametrize("rows,fails", [
    (qr_without_phase_fix, {"eigenphase spacings (CUE)", "E|tr U|^2 = 1"}),
    (seed_reused_in_every_task, {"no repeats"}),
    (complex64_as_complex128, {"precision of the dtype"}),
])
def test_classic_bugs_fail(haar_run, tmp_path, rows, fails):
    _, db = haar_run
    checks = {c.name: c for c in stats.check(doctored(db, tmp_path, rows))}
    failed = {name for name, c in checks.items() if not c.ok}
    assert fails <= failed, [c.line() for c in checks.values()]
    for name in fails:   # far past the threshold, not near it
        assert checks[name].pvalue is None or checks[name].pvalue < 1e-10, checks[name].line()


def test_orthogonal_with_one_determinant_sign_fails(config, tmp_path):
    """SO(n) data claimed as O(n): the determinant test fails."""
    spec = config(run={"count": 4000, "task_size": 500}, generator={"kind": "orthogonal", "dim": 3})
    db = unidask.run(spec).merged.out
    con = sqlite3.connect(db)
    for i, blob in con.execute("SELECT id, data FROM unitaries").fetchall():
        u = np.frombuffer(blob, np.complex128).reshape(3, 3).copy()
        if np.linalg.det(u.real) < 0:
            u[:, 0] *= -1
            con.execute("UPDATE unitaries SET data = ? WHERE id = ?", (u.tobytes(), i))
    con.commit()
    con.close()
    checks = {c.name: c for c in stats.check(db)}
    assert not checks["det = +1 and -1 equally likely"].ok
    assert checks["det = +1 and -1 equally likely"].pvalue < 1e-10
