"""Shared fixtures: configs written to real files, runs on a real local Dask cluster, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import unidask

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, *, run: dict | None = None, generator: dict | None = None,
                 storage: dict | None = None, cluster: dict | None = None) -> Path:
    """A run config in TOML, small by default, with everything under ``path.parent``."""
    base = path.parent
    sections = {
        "run": {"name": "t", "count": 2000, "task_size": 100, "seed": 7, "run_dir": str(base / "run")},
        "generator": {"kind": "haar", "dim": 4},
        "storage": {"local_dir": str(base / "local")},
        "cluster": {"nodes": 2, "workers": 1, "dashboard_address": "127.0.0.1:0"},
    }
    if generator and "kind" in generator:  # another kind: its own parameters, not haar's dim
        sections["generator"] = {}
    for name, extra in (("run", run), ("generator", generator), ("storage", storage), ("cluster", cluster)):
        sections[name].update(extra or {})
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {toml_value(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``unidask`` command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "unidask.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def run_main(*args, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process (its real entry point); return exit status, stdout, stderr."""
    from unidask.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def unitarity_error(u: np.ndarray) -> float:
    n = u.shape[-1]
    return float(np.abs(np.einsum("kji,kjl->kil", u.conj(), u) - np.eye(n)).max())


def merged_data(db: Path) -> list[tuple[int, bytes]]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, data FROM unitaries ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.fixture
def config(tmp_path: Path):
    """``config(**sections)`` -> a validated spec from a TOML file in a fresh directory."""

    def make(name: str = "run.toml", **sections) -> unidask.Spec:
        return unidask.load_config(write_config(tmp_path / name, **sections))

    return make


@pytest.fixture(scope="session")
def netfs(tmp_path_factory) -> Path:
    """A directory on a real network filesystem, as a cluster's shared storage: sshfs from this
    host's own sshd (``cluster/netfs.sh``). Skipped where that cannot run (not root)."""
    mnt = tmp_path_factory.mktemp("netfs")
    script = str(REPO / "cluster" / "netfs.sh")
    started = subprocess.run(["bash", script, "start", str(mnt)], capture_output=True, text=True, timeout=300)
    if started.returncode == 2:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stderr
    yield mnt
    subprocess.run(["bash", script, "stop", str(mnt)], check=True, timeout=60)


@pytest.fixture(scope="session")
def haar_run(tmp_path_factory) -> tuple[unidask.Spec, Path]:
    """One finished run shared by read-only tests: 20,000 Haar U(4) on 2 simulated nodes."""
    base = tmp_path_factory.mktemp("haar")
    spec = unidask.load_config(write_config(base / "haar.toml", run={"count": 20000, "task_size": 1000}))
    result = unidask.run(spec, echo=lambda s: None)
    assert result.merged is not None and result.merged.complete
    return spec, result.merged.out
