"""Random quantum circuits and their exact unitaries, with the circuit as OpenQASM 2.

Qubit order is qiskit's: qubit 0 is the least significant bit of a basis-state index, so
``Operator(QuantumCircuit.from_qasm_str(qasm)).data`` is the stored unitary. A gate is applied
to the unitary as a tensor with one axis per qubit (a tensordot over the gate's qubits), never
by building 2^q x 2^q Kronecker products.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ...core.errors import InputError

_s2 = 1 / np.sqrt(2)
FIXED = {
    "h": np.array([[_s2, _s2], [_s2, -_s2]], complex),
    "x": np.array([[0, 1], [1, 0]], complex),
    "s": np.diag([1, 1j]),
    "sdg": np.diag([1, -1j]),
    "t": np.diag([1, np.exp(1j * np.pi / 4)]),
    "tdg": np.diag([1, np.exp(-1j * np.pi / 4)]),
    "sx": 0.5 * np.array([[1 + 1j, 1 - 1j], [1 - 1j, 1 + 1j]]),
}
# two-qubit gates as (out_a, out_b, in_a, in_b) tensors, a = the first qubit named in QASM
TWO = {
    "cx": np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], complex).reshape(2, 2, 2, 2),
    "cz": np.diag([1, 1, 1, -1]).astype(complex).reshape(2, 2, 2, 2),
    "swap": np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], complex).reshape(2, 2, 2, 2),
}
ANGLES = {"rx": 1, "ry": 1, "rz": 1, "u3": 3}
GATES = (*FIXED, *ANGLES, *TWO)


def rotation(name: str, a: list[float]) -> np.ndarray:
    if name == "rx":
        c, s = np.cos(a[0] / 2), np.sin(a[0] / 2)
        return np.array([[c, -1j * s], [-1j * s, c]])
    if name == "ry":
        c, s = np.cos(a[0] / 2), np.sin(a[0] / 2)
        return np.array([[c, -s], [s, c]], complex)
    if name == "rz":
        return np.diag([np.exp(-0.5j * a[0]), np.exp(0.5j * a[0])])
    theta, phi, lam = a  # u3, as OpenQASM 2 defines it
    c, s = np.cos(theta / 2), np.sin(theta / 2)
    return np.array([[c, -np.exp(1j * lam) * s], [np.exp(1j * phi) * s, np.exp(1j * (phi + lam)) * c]])


def check(params: dict[str, Any]) -> None:
    q = params["qubits"]
    unknown = [g for g in params["gate_set"] if g not in GATES]
    if unknown or not params["gate_set"]:
        raise InputError(f"generator.gate_set: unknown gate(s) {unknown} (known: {', '.join(GATES)})")
    if not 0.0 <= params["two_qubit_density"] <= 1.0:
        raise InputError("generator.two_qubit_density must be between 0 and 1")
    gates = params["gates"]
    if isinstance(gates, list) and not (len(gates) == 2 and all(isinstance(g, int) and not isinstance(g, bool)
                                                               for g in gates) and 1 <= gates[0] <= gates[1]):
        raise InputError(f"generator.gates must be a number of gates or [min, max] with 1 <= min <= max, "
                         f"got {gates!r}")
    if isinstance(gates, int) and gates < 0:
        raise InputError(f"generator.gates must be >= 0, got {gates!r}")
    if params["depth"] == 0 and params["gates"] == 0:
        raise InputError("generator: give depth or gates (a number of gates) > 0")
    for pair in params["coupling_map"]:
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, int) for x in pair)
                or not all(0 <= x < q for x in pair) or pair[0] == pair[1]):
            raise InputError(f"generator.coupling_map: {pair!r} is not a pair of distinct qubits < {q}")
    if q < 2 and all(g in TWO for g in params["gate_set"]):
        raise InputError("generator: a gate_set of two-qubit gates only needs qubits >= 2")


def random_circuit(rng: np.random.Generator, qubits: int, depth: int, gates: int | list[int], gate_set: list[str],
                   density: float, pairs: list[tuple[int, int]]) -> list[tuple[str, tuple[int, ...], list[float]]]:
    """A list of (gate, qubits, angles). With ``gates`` > 0, that many gates on random qubits (a
    ``[min, max]`` range: a count drawn uniformly from it, as circuit-synthesis datasets are made);
    else ``depth`` layers, each touching every qubit at most once."""
    one = [g for g in gate_set if g not in TWO]
    two = [g for g in gate_set if g in TWO] if pairs else []
    ops = []

    def add_one(k: int) -> None:
        name = one[rng.integers(len(one))]
        ops.append((name, (k,), list(rng.uniform(0, 2 * np.pi, ANGLES.get(name, 0)))))

    def add_two(a: int, b: int) -> None:
        ops.append((two[rng.integers(len(two))], (a, b), []))

    if gates:
        count = int(rng.integers(gates[0], gates[1] + 1)) if isinstance(gates, list) else gates
        for _ in range(count):
            if two and (not one or rng.random() < density):
                a, b = pairs[rng.integers(len(pairs))]
                add_two(a, b)
            else:
                add_one(int(rng.integers(qubits)))
        return ops
    for _ in range(depth):
        free = set(range(qubits))
        for k in rng.permutation(qubits):
            k = int(k)
            if k not in free:
                continue
            free.discard(k)
            partners = [b for a, b in pairs if a == k and b in free] + \
                       [a for a, b in pairs if b == k and a in free]
            if two and partners and (not one or rng.random() < density):
                other = partners[rng.integers(len(partners))]
                free.discard(other)
                add_two(*((k, other) if (k, other) in pairs else (other, k)))
            elif one:
                add_one(k)
    return ops


def unitary(qubits: int, ops) -> np.ndarray:
    """The circuit's unitary, gates applied to the identity as tensors (row axes = qubits)."""
    dim = 2 ** qubits
    u = np.eye(dim, dtype=complex).reshape((2,) * qubits + (dim,))

    def axis(k: int) -> int:  # qubit 0 is the least significant bit: the last row axis
        return qubits - 1 - k

    for name, qs, angles in ops:
        if len(qs) == 1:
            g = FIXED[name] if name in FIXED else rotation(name, angles)
            u = np.moveaxis(np.tensordot(g, u, axes=([1], [axis(qs[0])])), 0, axis(qs[0]))
        else:
            a, b = axis(qs[0]), axis(qs[1])
            u = np.moveaxis(np.tensordot(TWO[name], u, axes=([2, 3], [a, b])), [0, 1], [a, b])
    return u.reshape(dim, dim)


def qasm(qubits: int, ops) -> str:
    lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{qubits}];"]
    for name, qs, angles in ops:
        args = f"({','.join(repr(float(a)) for a in angles)})" if angles else ""
        lines.append(f"{name}{args} {','.join(f'q[{k}]' for k in qs)};")
    return "\n".join(lines) + "\n"


def parse_qasm(text: str) -> tuple[int, list[tuple[str, tuple[int, ...], list[float]]]]:
    """``(qubits, ops)`` of a circuit :func:`qasm` wrote (its own dialect: one ``qreg``, the gates
    above), so a stored circuit can be simulated again without qiskit."""
    qubits, ops = 0, []
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(("OPENQASM", "include")):
            continue
        if m := re.fullmatch(r"qreg q\[(\d+)\]", line):
            qubits = int(m.group(1))
            continue
        m = re.fullmatch(r"(\w+)(?:\(([^)]*)\))? (q\[\d+\](?:,q\[\d+\])*)", line)
        if m is None or (m.group(1) not in FIXED and m.group(1) not in ANGLES and m.group(1) not in TWO):
            raise InputError(f"not a circuit unidask wrote: {line!r}")
        angles = [float(a) for a in m.group(2).split(",")] if m.group(2) else []
        ops.append((m.group(1), tuple(int(k) for k in re.findall(r"\d+", m.group(3))), angles))
    return qubits, ops


def circuit(rng: np.random.Generator, count: int, *, qubits: int, depth: int = 10, gates: int | list[int] = 0,
            gate_set: list[str] | tuple[str, ...] = GATES, two_qubit_density: float = 0.3,
            coupling_map: list[list[int]] | tuple = (), dtype: str = "complex128"
            ) -> tuple[np.ndarray, list[dict]]:
    """``count`` random circuits on ``qubits`` qubits and their unitaries; meta holds the QASM."""
    pairs = [tuple(p) for p in coupling_map] or [(a, b) for a in range(qubits) for b in range(qubits) if a != b]
    out = np.empty((count, 2 ** qubits, 2 ** qubits), dtype)
    metas = []
    for i in range(count):
        ops = random_circuit(rng, qubits, depth, gates, list(gate_set), two_qubit_density, pairs)
        out[i] = unitary(qubits, ops)
        metas.append({"qasm": qasm(qubits, ops), "gates": len(ops)})
    return out, metas
