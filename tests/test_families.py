"""The generator families: circuits against qiskit, the groups' statistics, user plugins."""

import re

import numpy as np
import pytest
from scipy import stats

import unidask
from unidask.spec import generators
from unidask.spec.generators import circuits, groups
from unidask.spec.generators.haar import haar
from unidask.spec.laws import spacings, wigner_cdf

from conftest import run_main, unitarity_error, write_config


def circuit_batch(seed, count, **params):
    gen = generators.get("circuit")
    return gen(np.random.default_rng(seed), count, "complex128", gen.validate(params))


def test_circuit_unitaries_match_qiskit():
    pytest.importorskip("qiskit")
    from qiskit import QuantumCircuit
    from qiskit.quantum_info import Operator

    checked = 0
    for q in range(1, 7):
        for mode in ({"depth": 6}, {"gates": 25, "two_qubit_density": 0.5}):
            u, metas = circuit_batch(100 + q, 20, qubits=q, **mode)
            for ui, meta in zip(u, metas):
                expected = Operator(QuantumCircuit.from_qasm_str(meta["qasm"])).data
                assert np.abs(ui - expected).max() < 1e-10, meta["qasm"]
                checked += 1
    assert checked == 240


def test_circuit_options():
    u, metas = circuit_batch(1, 30, qubits=4, gates=12, gate_set=["h", "cx"], two_qubit_density=1.0,
                             coupling_map=[[0, 1], [1, 2], [2, 3]])
    assert u.shape == (30, 16, 16) and unitarity_error(u) < 1e-10
    for m in metas:
        lines = m["qasm"].splitlines()[3:]
        assert len(lines) == m["gates"] == 12
        assert {line.split()[0] for line in lines} <= {"h", "cx"}
        for line in lines:
            if line.startswith("cx"):
                assert line.split()[1] in {"q[0],q[1];", "q[1],q[2];", "q[2],q[3];"}
    # depth layers touch each qubit at most once
    _, metas = circuit_batch(2, 10, qubits=5, depth=3, two_qubit_density=0.5)
    for m in metas:
        assert len(m["qasm"].splitlines()[3:]) <= 15


def test_circuit_gate_count_range():
    """gates = [min, max]: each circuit's gate count drawn from the range, every count reached."""
    u, metas = circuit_batch(4, 400, qubits=3, gates=[2, 6])
    counts = [m["gates"] for m in metas]
    assert set(counts) == {2, 3, 4, 5, 6}
    assert all(m["qasm"].count(";") - 3 == m["gates"] for m in metas)
    assert unitarity_error(u) < 1e-12


@pytest.mark.parametrize("params,message", [
    ({"qubits": 2, "gate_set": ["h", "toffoli"]}, "unknown gate"),
    ({"qubits": 2, "two_qubit_density": 1.5}, "between 0 and 1"),
    ({"qubits": 3, "coupling_map": [[0, 3]]}, "coupling_map"),
    ({"qubits": 2, "depth": 0}, "give depth or gates"),
    ({"qubits": 1, "gate_set": ["cx"]}, "needs qubits >= 2"),
    ({"depth": 3}, "generator.qubits is required"),
    ({"qubits": 2, "gates": [5, 2]}, "[min, max] with 1 <= min <= max"),
    ({"qubits": 2, "gates": [0, 2]}, "[min, max] with 1 <= min <= max"),
    ({"qubits": 2, "gates": [1, 2, 3]}, "[min, max] with 1 <= min <= max"),
    ({"qubits": 2, "gates": -1}, "generator.gates must be >= 0"),
    ({"qubits": 2, "gates": 2.5}, "generator.gates must be int/list"),
])
def test_circuit_bad_options(params, message):
    with pytest.raises(unidask.InputError, match=re.escape(message)):
        generators.get("circuit").validate(params)


@pytest.mark.cluster
def test_circuit_run_end_to_end(config):
    spec = config(run={"count": 60, "task_size": 25}, generator={"kind": "circuit", "qubits": 3, "depth": 4})
    db = unidask.run(spec).merged.out
    with unidask.Dataset(db) as ds:
        assert ds[0:60].shape == (60, 8, 8) and unitarity_error(ds[0:60]) < 1e-10
        meta = ds.meta_of(42)
        ops = meta["qasm"]
        assert ops.startswith("OPENQASM 2.0;") and "qreg q[3];" in ops
        # the stored circuit rebuilds the stored unitary
        lines = ops.splitlines()[3:]
        rebuilt = []
        for line in lines:
            head, args = line.rstrip(";").split(" ")
            name, _, angles = head.partition("(")
            qs = tuple(int(a[2:-1]) for a in args.split(","))
            rebuilt.append((name, qs, [float(x) for x in angles.rstrip(")").split(",")] if angles else []))
        assert np.abs(circuits.unitary(3, rebuilt) - ds[42]).max() < 1e-12


def test_special_unitary_determinant_is_one():
    u = groups.special(np.random.default_rng(4), 5000, dim=5)
    assert unitarity_error(u) < 1e-10
    assert np.abs(np.linalg.det(u) - 1).max() < 1e-10
    # the Haar test of the slice holds for SU(n) too: |U_00|^2 ~ Beta(1, n - 1)
    assert stats.kstest(np.abs(u[:, 0, 0]) ** 2, stats.beta(1, 4).cdf).pvalue > 0.01


def test_orthogonal_is_real_with_both_determinants():
    u = groups.orthogonal(np.random.default_rng(5), 20000, dim=4)
    assert np.all(u.imag == 0) and unitarity_error(u) < 1e-10
    det = np.linalg.det(u.real)
    assert np.allclose(np.abs(det), 1)
    assert stats.binomtest(int((det > 0).sum()), len(det)).pvalue > 0.01
    # Haar O(n): U_00^2 ~ Beta(1/2, (n - 1)/2)
    assert stats.kstest(u[:, 0, 0].real ** 2, stats.beta(0.5, 1.5).cdf).pvalue > 0.01


def test_diagonal_phases_are_uniform():
    u = groups.diagonal(np.random.default_rng(6), 20000, dim=3)
    assert unitarity_error(u) < 1e-12 and np.all(u[:, 0, 1] == 0)
    assert stats.kstest(np.angle(u[:, 1, 1]) % (2 * np.pi), stats.uniform(0, 2 * np.pi).cdf).pvalue > 0.01


def test_haar_eigenphase_spacings_follow_cue():
    u = haar(np.random.default_rng(8), 2000, dim=8)
    assert stats.kstest(spacings(u), wigner_cdf).pvalue > 0.01


def test_spacing_test_rejects_qr_without_phase_correction():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((2000, 8, 8)) + 1j * rng.standard_normal((2000, 8, 8))
    q, _ = np.linalg.qr(z)
    assert stats.kstest(spacings(q), wigner_cdf).pvalue < 1e-6


@pytest.mark.cluster
def test_plugin_generator_end_to_end(config):
    spec = config(run={"count": 300, "task_size": 100},
                  generator={"kind": "plugin_generators:rotations", "scale": 0.5})
    db = unidask.run(spec).merged.out
    with unidask.Dataset(db) as ds:
        u = ds[0:300]
        assert u.shape == (300, 2, 2) and u.dtype == np.complex128 and unitarity_error(u) < 1e-12
        assert 0 <= ds.meta_of(7)["theta"] <= np.pi


@pytest.mark.cluster
@pytest.mark.parametrize("name,message", [
    ("wrong_shape", "returned shape (100, 2, 3), expected (100, n, n)"),
    ("with_nan", "non-finite values"),
    ("not_unitary", "not unitary"),
    ("raises", "failed: ZeroDivisionError: integer division or modulo by zero"),
])
def test_broken_plugin_fails_with_a_clear_message(tmp_path, capsys, name, message):
    cfg = write_config(tmp_path / "p.toml", run={"count": 200, "task_size": 100},
                       generator={"kind": f"plugin_generators:{name}"})
    code, _, err = run_main("run", cfg, capsys=capsys)
    errors = [line for line in err.splitlines() if line.startswith("unidask: error:")]
    assert code == 1 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and "<class" not in err and "traceback object" not in err, err


@pytest.mark.cluster
def test_plugin_unitarity_check_can_be_turned_off(config):
    spec = config(run={"count": 20, "task_size": 10},
                  generator={"kind": "plugin_generators:not_unitary", "check_unitary": False})
    result = unidask.run(spec)
    assert result.merged.rows == 20


def test_bad_plugin_names(tmp_path, capsys):
    for kind, message in [("no_such_module_x:f", "cannot import"),
                          ("plugin_generators:nothing", "has no 'nothing'"),
                          ("plugin_generators:rotations", "takes no generator.size"),
                          ("plugin_generators:wrong_law", "states law 'Haar', not one unidask tests")]:
        cfg = write_config(tmp_path / "p.toml", generator={"kind": kind, "size": 3} if "rot" in kind
                           else {"kind": kind})
        code, _, err = run_main("run", cfg, capsys=capsys)
        assert code == 2 and message in err, err


def test_generators_command(capsys):
    code, out, _ = run_main("generators", capsys=capsys)
    assert code == 0
    for kind in ("haar", "special", "orthogonal", "diagonal", "circuit", "module:function"):
        assert f"{kind}:" in out
    assert "two_qubit_density" in out and "coupling_map" in out
    assert "(law U(n))" in out and "(law circuit)" in out and "@unidask.law(LAW)" in out
