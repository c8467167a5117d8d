"""Stored circuits simulated again, independently of the generator (``generators/circuits.py``
applies each gate to the unitary as a tensor, with its own gate tables and QASM reader): by qiskit
where installed; else here, by another algorithm from other sources: each gate built from its
definition (rotations as exponentials of Pauli matrices, controlled gates as sums of projectors),
applied to the rows of the unitary by basis-index arithmetic, the QASM read by its own parser.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
from scipy.linalg import expm

I2 = np.eye(2, dtype=complex)
X = np.array([[0, 1], [1, 0]], complex)
Y = np.array([[0, -1j], [1j, 0]])
Z = np.diag([1.0 + 0j, -1.0])
P0, P1 = np.diag([1.0 + 0j, 0]), np.diag([0j, 1.0])
PAULI = {"x": X, "y": Y, "z": Z}


def rotation(axis: str, angle: float) -> np.ndarray:
    """exp(-i angle sigma / 2)."""
    return expm(-0.5j * angle * PAULI[axis])


def phase(angle: float) -> np.ndarray:
    """diag(1, e^(i angle)): s, t and their inverses are this at pi/2, pi/4 and their negatives."""
    return np.diag([1, np.exp(1j * angle)])


def one_qubit(name: str, angles: list[float]) -> np.ndarray:
    if name in ("rx", "ry", "rz"):
        return rotation(name[1], angles[0])
    if name == "u3":   # OpenQASM 2's U(theta, phi, lambda) = e^(i(phi+lambda)/2) Rz(phi) Ry(theta) Rz(lambda)
        theta, phi, lam = angles
        return np.exp(0.5j * (phi + lam)) * rotation("z", phi) @ rotation("y", theta) @ rotation("z", lam)
    fixed = {"h": (X + Z) / np.sqrt(2), "x": X, "s": phase(np.pi / 2), "sdg": phase(-np.pi / 2),
             "t": phase(np.pi / 4), "tdg": phase(-np.pi / 4),
             "sx": np.exp(0.25j * np.pi) * rotation("x", np.pi / 2)}   # sqrt(X), as qiskit's SX
    return fixed[name]


# on the basis |a b> (index 2 a + b), a the first qubit named in QASM: the control of cx and cz
TWO_QUBIT = {
    "cx": np.kron(P0, I2) + np.kron(P1, X),
    "cz": np.kron(P0, I2) + np.kron(P1, Z),
    "swap": (np.kron(I2, I2) + np.kron(X, X) + np.kron(Y, Y) + np.kron(Z, Z)) / 2,
}
LINE = re.compile(r"(?P<gate>[a-z0-9]+)(?:\((?P<angles>[^)]*)\))?\s+(?P<args>q\[\d+\](?:\s*,\s*q\[\d+\])*)")


def unitary(qasm: str) -> np.ndarray:
    """The unitary of a circuit in unidask's OpenQASM 2 dialect (qubit 0 the least significant bit
    of a basis-state index, as qiskit orders them)."""
    statements = [s.strip() for s in qasm.split(";") if s.strip()]
    qubits = next((int(m.group(1)) for s in statements if (m := re.fullmatch(r"qreg\s+q\[(\d+)\]", s))), None)
    if qubits is None:
        raise ValueError("no 'qreg q[N]' in the circuit")
    u = np.eye(2 ** qubits, dtype=complex)
    index = np.arange(2 ** qubits)
    for s in statements:
        if s.startswith(("OPENQASM", "include", "qreg")):
            continue
        m = LINE.fullmatch(s)
        if m is None:
            raise ValueError(f"not a gate of unidask's circuits: {s!r}")
        angles = [float(a) for a in m["angles"].split(",")] if m["angles"] else []
        targets = [int(k) for k in re.findall(r"\d+", m["args"])]
        gate = TWO_QUBIT[m["gate"]] if len(targets) == 2 else one_qubit(m["gate"], angles)
        # the rows whose target bits are all zero, then each combination of those bits set
        bits = [1 << k for k in targets]
        base = index[np.all([(index & b) == 0 for b in bits], axis=0)]
        rows = [base + sum(b for b, on in zip(bits, f"{c:0{len(bits)}b}") if on == "1")
                for c in range(2 ** len(bits))]
        stacked = np.stack([u[r] for r in rows])
        for c, r in enumerate(rows):
            u[r] = np.tensordot(gate[c], stacked, axes=1)
    return u


def simulator() -> tuple[Callable[[str], np.ndarray], str]:
    """A circuit's unitary from its QASM, and by what: qiskit where installed, else :func:`unitary`."""
    try:
        from qiskit import QuantumCircuit
        from qiskit.quantum_info import Operator
    except ImportError:
        return unitary, "unidask's independent simulator (qiskit is not installed)"
    return (lambda qasm: Operator(QuantumCircuit.from_qasm_str(qasm)).data), "qiskit"
