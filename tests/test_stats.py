"""verify --stats: a correct generator passes every test of the law it states, the classic bugs
fail them (p-values shown), with the thresholds of unidask/laws.py; a generator that states no law
is never OK."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import unidask
from unidask.spec import generators, laws
from unidask.views import stats
from unidask.spec.generators import groups
from unidask.spec.generators.haar import haar

import plugin_generators
from conftest import run_main, write_config


@pytest.mark.cluster
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
    for name in ("Beta(1, n-1)", "spacings (CUE)", "E|tr U|^2 = 1", "E|tr U|^4 = 2", "precision", "repeats",
                 "phase of det U uniform", "phase of U_00 uniform", "E|U_00 U_11|^2"):
        assert any(name in line for line in passed), (name, out)


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
    (qr_without_phase_fix, {"eigenphase spacings (CUE)", "E|tr U|^2 = 1", "phase of U_00 uniform"}),
    (seed_reused_in_every_task, {"no repeats"}),
    (complex64_as_complex128, {"precision of the dtype"}),
])
def test_classic_bugs_fail(haar_run, tmp_path, rows, fails):
    _, db = haar_run
    checks = {c.name: c for c in stats.check(doctored(db, tmp_path, rows)).checks}
    failed = {name for name, c in checks.items() if not c.ok}
    assert fails <= failed, [c.line() for c in checks.values()]
    for name in fails:   # far past the threshold, not near it
        assert checks[name].pvalue is None or checks[name].pvalue < 1e-10, checks[name].line()


@pytest.mark.cluster
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
    checks = {c.name: c for c in stats.check(db).checks}
    assert not checks["det = +1 and -1 equally likely"].ok
    assert checks["det = +1 and -1 equally likely"].pvalue < 1e-10


# --- the laws: every one calibrated both ways, at fixed seeds

def special_orthogonal(rng, count, dim):
    u = groups.orthogonal(rng, count, dim=dim)
    u[np.linalg.det(u.real) < 0, :, 0] *= -1   # Haar on O(n) restricted to det +1: Haar on SO(n)
    return u


CORRECT = {   # a correct sampler of each law
    "U(n)": lambda rng, count, n: haar(rng, count, dim=n),
    "SU(n)": lambda rng, count, n: groups.special(rng, count, dim=n),
    "O(n)": lambda rng, count, n: groups.orthogonal(rng, count, dim=n),
    "SO(n)": special_orthogonal,
    "Sp(n)": lambda rng, count, n: plugin_generators.symplectic_haar(rng, count, dim=n),
    "diagonal": lambda rng, count, n: groups.diagonal(rng, count, dim=n),
}
WRONG = {   # data of another law claimed as this one, and the test that must see it
    "U(n)": (CORRECT["SU(n)"], "phase of det U uniform"),
    "SU(n)": (CORRECT["U(n)"], "det U = 1"),
    "O(n)": (CORRECT["SO(n)"], "det = +1 and -1 equally likely"),
    "SO(n)": (CORRECT["O(n)"], "det U = 1"),
    "Sp(n)": (CORRECT["U(n)"], "U^T J U = J"),
    "diagonal": (lambda rng, count, n: np.exp(1j * rng.uniform(0, np.pi, (count, 1, 1))) * np.eye(n),
                 "phases uniform on [0, 2 pi)"),
}


def test_every_law_is_tested_and_every_stated_law_known():
    assert set(laws.TESTS) | {"circuit", "none"} == set(generators.LAWS)
    assert set(CORRECT) == set(WRONG) == set(laws.TESTS)
    for g in generators.REGISTRY.values():
        assert g.law in generators.LAWS and g.law != "none", g.kind


@pytest.mark.parametrize("law", list(laws.TESTS))
def test_false_alarms_over_fifty_seeds_stay_at_most_one(law):
    """Correct data of each law, 50 seeds of the default sample size: at most one seed fails any
    test (ALPHA over a law's few tests: about 0.05 expected)."""
    alarms = []
    for seed in range(50):
        u = CORRECT[law](np.random.default_rng(2000 + seed), stats.SAMPLE, 4)
        alarms += [(seed, c.line()) for c in laws.TESTS[law](u, seed) if not c.ok]
    assert len({seed for seed, _ in alarms}) <= 1, alarms


@pytest.mark.parametrize("law", list(laws.TESTS))
def test_data_of_another_law_fails(law):
    """The calibration's other side: what a wrong claim looks like fails its test by far."""
    make, name = WRONG[law]
    checks = {c.name: c for c in laws.TESTS[law](make(np.random.default_rng(11), stats.SAMPLE, 4), 0)}
    assert checks[name].ok is False, [c.line() for c in checks.values()]
    assert checks[name].pvalue is None or checks[name].pvalue < 1e-10, checks[name].line()


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_builtin_haar_twenty_seeds_of_twenty_thousand_rows_pass(dim):
    """The issue's first row: the built-in generator, 20 seeds of 20k rows, sampled as verify
    samples them, passes every test of U(n) (a false alarm here would be about 1 in 700)."""
    for seed in range(20):
        u = haar(np.random.default_rng(seed), 20000, dim=dim)
        picked = np.sort(np.random.default_rng(0).choice(len(u), stats.SAMPLE, replace=False))
        failed = [c.line() for c in [stats.precision(u[picked]), *laws.unitary(u[picked], 0)] if not c.ok]
        assert failed == [], (dim, seed, failed)


# The table, end to end: a real run of each plugin, 50,000 U(4), and `verify --stats`
TABLE = [   # generator, [generator] extras, exit status, the checks that must fail
    ("stated_haar", {}, 0, set()),
    ("haar_times_fixed", {}, 0, set()),
    ("haar_dagger", {}, 0, set()),
    ("gue_expm", {}, 1, {"E|tr U|^2 = 1"}),
    ("special_as_unitary", {}, 1, {"phase of det U uniform"}),
    ("orthogonal_as_unitary", {}, 1, {"|U_00|^2 ~ Beta(1, n-1)", "phase of U_00 uniform"}),
    ("qr_without_phase_fix", {}, 1, {"phase of U_00 uniform"}),
    ("same_seed_every_task", {}, 1, {"no repeats"}),
    ("haar_in_complex64", {"tolerance": 1e-6}, 1, {"precision of the dtype"}),
    ("unstated_haar", {}, 3, set()),
]


@pytest.mark.cluster
@pytest.mark.parametrize("name,extra,status,failing", TABLE, ids=[row[0] for row in TABLE])
def test_the_table_of_plugins(tmp_path, capsys, name, extra, status, failing):
    cfg = write_config(tmp_path / "c.toml", run={"count": 50000, "task_size": 5000},
                       generator={"kind": f"plugin_generators:{name}", "dim": 4, **extra})
    merged = unidask.run(unidask.load_config(cfg)).merged
    assert merged.complete
    db = merged.out
    code, out, err = run_main("verify", db, "--stats", capsys=capsys)
    lines = out.splitlines()
    assert code == status, out + err
    # the unitarity bound is the run's: the plugin's tolerance where its config set one
    assert lines[0].startswith("OK: ") and (("<= 1e-06 (the run's generator.tolerance)" in lines[0])
                                            == ("tolerance" in extra)), lines[0]
    failed = {line.split(": ")[0][5:] for line in lines if line.startswith("FAIL ")}
    assert failing <= failed, out
    if status == 0:
        assert lines[-1].startswith("stats: OK: ") and "of law U(n)" in lines[-1], out
    elif status == 3:
        assert lines[-1].startswith("stats: NOT TESTED: distribution"), out
        assert any(line.startswith("NOT TESTED distribution: generator") for line in lines), out
    assert "stats: OK" not in out or status == 0


@pytest.mark.cluster
def test_a_plugin_with_its_own_checks(tmp_path, capsys):
    """`@unidask.law("none", checks=...)`: its own tests run, and decide; a failing one fails."""
    for scale, status in ((1.0, 0), (0.5, 1)):   # scale 0.5: angles on half the circle
        (tmp_path / f"{scale}").mkdir()
        cfg = write_config(tmp_path / f"{scale}" / "c.toml", run={"count": 4000, "task_size": 1000},
                           generator={"kind": "plugin_generators:rotations_checked", "scale": scale})
        merged = unidask.run(unidask.load_config(cfg)).merged
        code, out, _ = run_main("verify", merged.out, "--stats", capsys=capsys)
        assert code == status, out
        line = next(line for line in out.splitlines() if "rotation angle uniform" in line)
        assert line.startswith("ok  " if status == 0 else "FAIL"), out


def test_a_law_that_is_not_one_is_refused():
    with pytest.raises(unidask.InputError, match="law 'Haar' is not one unidask tests"):
        unidask.law("Haar")


# --- circuits: simulated again by qiskit, or without it by an independent algorithm

def test_the_independent_simulator_agrees_with_qiskit_and_sees_a_wrong_gate(monkeypatch):
    """unidask.views.simulate (gates from their definitions, applied by index arithmetic, its own QASM
    reader) against qiskit on every gate; then a wrong gate table in the generator: it disagrees."""
    pytest.importorskip("qiskit")
    from qiskit import QuantumCircuit
    from qiskit.quantum_info import Operator

    from unidask.views import simulate
    from unidask.spec.generators import circuits

    gen = generators.get("circuit")
    for q in range(1, 6):
        u, metas = gen(np.random.default_rng(q), 20, "complex128", gen.validate({"qubits": q, "gates": 30}))
        for ui, meta in zip(u, metas):
            ours = simulate.unitary(meta["qasm"])
            assert np.abs(ours - Operator(QuantumCircuit.from_qasm_str(meta["qasm"])).data).max() < 1e-10
            assert np.abs(ours - ui).max() < 1e-10
    monkeypatch.setitem(circuits.FIXED, "t", np.diag([1, np.exp(-1j * np.pi / 4)]))   # t is tdg: a bug
    u, metas = gen(np.random.default_rng(1), 20, "complex128", gen.validate({"qubits": 2, "gate_set": ["t", "h"]}))
    assert max(np.abs(simulate.unitary(m["qasm"]) - ui).max() for ui, m in zip(u, metas)) > 0.1


@pytest.mark.cluster
def test_circuits_without_qiskit_are_checked_by_the_independent_simulator(config, tmp_path):
    """`verify --stats` where qiskit cannot be imported: the circuits are simulated again by unidask's
    independent simulator, the count says circuits, and a stored unitary that is not its circuit's
    fails."""
    spec = config(run={"count": 600, "task_size": 100}, generator={"kind": "circuit", "qubits": 3, "depth": 6})
    db = unidask.run(spec).merged.out
    no_qiskit = "import sys; sys.modules['qiskit'] = None; from unidask.cli import main; main(sys.argv[1:])"

    def verify(path):
        return subprocess.run([sys.executable, "-c", no_qiskit, "verify", str(path), "--stats"],
                              capture_output=True, text=True, timeout=300)

    done = verify(db)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 circuits by unidask's independent simulator (qiskit is not installed)" in done.stdout
    assert done.stdout.splitlines()[-1] == ("stats: OK: 2 checks of law circuit on 200 circuits simulated "
                                            "again and 600 sampled rows"), done.stdout
    bad = tmp_path / "bad.db"
    shutil.copy(db, bad)
    con = sqlite3.connect(bad)
    u = np.frombuffer(con.execute("SELECT data FROM unitaries WHERE id = 0").fetchone()[0], np.complex128)
    con.execute("UPDATE unitaries SET data = ? WHERE id = 0", ((u.reshape(8, 8) @ np.diag([1j] + [1] * 7)).tobytes(),))
    con.commit()
    con.close()
    failed = stats.check(bad)
    assert failed.verdict == "FAILED" and not failed.checks[0].ok, [c.line() for c in failed.checks]
