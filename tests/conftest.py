"""Shared fixtures: configs written to real files, runs on a real local Dask cluster, the real CLI,
the real SLURM of cluster/ and a real network filesystem. Tests that need SLURM, the network
filesystem or a browser are marked (slurm, netfs, browser) by the fixtures they use, and skipped
with the reason where those are not installed (cluster/install.sh installs them, as root)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

import unidask

REPO = Path(__file__).resolve().parent.parent
# every database a merge writes in the tests, in this process, the CLI's and the workers' (they
# inherit it), passes SQLite's PRAGMA integrity_check before it is published (merge.CHECK_ENV)
os.environ["UNIDASK_INTEGRITY_CHECK"] = "1"
# the calibrations runs remember (sizing.remembered) kept to this session: every session measures afresh
os.environ["XDG_CACHE_HOME"] = __import__("tempfile").mkdtemp(prefix="unidask-test-cache-")


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
    """Run the real ``unidask`` command in a fresh interpreter (which, and the jobs it submits,
    can import the test plugin generators)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "unidask.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def slow_haar_reference(spec: unidask.Spec) -> list[tuple[int, bytes]]:
    """What a run of ``plugin_generators:slow_haar`` (dim 2) must merge to: every task once, in
    id order, generated here from the plan's seeds."""
    import plugin_generators

    from unidask.spec import plan

    expected = []
    for t in range(spec.n_tasks):
        u = plugin_generators.slow_haar(plan.rng(spec, t), spec.task_count(t), dim=2)
        expected += [(t * spec.task_size + i, m.astype(np.complex128).tobytes()) for i, m in enumerate(u)]
    return expected


def on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """``unidask ARGS`` with its stderr on a pseudo-terminal (where progress bars are drawn):
    its exit status, stdout, and what the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    main, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # a terminal's size
    p = subprocess.Popen([sys.executable, "-m", "unidask.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=tty, text=True)
    os.close(tty)
    shown = b""
    while True:   # until the child closes the terminal (EIO at its exit)
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    out, _ = p.communicate(timeout=timeout)
    os.close(main)
    return p.returncode, out, shown.decode(errors="replace")


def run_main(*args, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process (its real entry point); return exit status, stdout, stderr."""
    from unidask.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def unitarity_error(u: np.ndarray) -> float:
    from unidask.spec.generators import unitarity_errors

    return float(unitarity_errors(u.reshape(-1, *u.shape[-2:])).max())


@contextlib.contextmanager
def messages(on_line: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """The ``unidask`` logger's lines while the body runs, formatted as the CLI shows them."""
    from unidask.core.progress import LineFormatter

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(line := self.format(record))
            if on_line is not None:
                on_line(line)

    handler, log = Collect(), logging.getLogger("unidask")
    handler.setFormatter(LineFormatter())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def merged_data(db: Path) -> list[tuple[int, bytes]]:
    """A merged database's rows, read by SQLite, once its integrity_check (every page, every
    b-tree, whatever wrote them: SQLite or the page merge) passed."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], db
        return con.execute("SELECT id, data FROM unitaries ORDER BY id").fetchall()
    finally:
        con.close()


def shard_data(con, full: bool = False) -> list[tuple]:
    """A shard's rows (``con``: a connection or a path), whatever their layout: a row per matrix
    (table unitaries) or packed in blocks of rows, as (id, bytes) in id order; ``full``: as
    the merged table's rows, (id, dim, data, meta)."""
    import sqlite3

    if not isinstance(con, sqlite3.Connection):
        with contextlib.closing(sqlite3.connect(f"file:{con}?mode=ro", uri=True)) as c:
            return shard_data(c, full)
    rows = con.execute("SELECT id, dim, data, meta FROM unitaries").fetchall()
    itemsize = np.dtype(con.execute("SELECT value FROM meta WHERE key = 'dtype'").fetchone()[0]).itemsize
    for first, dim, data in con.execute("SELECT id, dim, data FROM blocks"):
        step = dim * dim * itemsize
        rows += [(first + i, dim, data[i * step:(i + 1) * step], None) for i in range(len(data) // step)]
    return sorted(rows) if full else sorted((r[0], r[2]) for r in rows)


@pytest.fixture
def per_row_shards(monkeypatch):
    """Shards that keep a row per matrix (the layout of rows with meta, and of tasks over
    shard.PACK_MAX bytes) for every task: what row-level damage is crafted on."""
    from unidask.store import shard

    monkeypatch.setattr(shard, "PACK_MAX", 0)


@pytest.fixture
def config(tmp_path: Path):
    """``config(**sections)`` -> a validated spec from a TOML file in a fresh directory."""

    def make(name: str = "run.toml", **sections) -> unidask.Spec:
        return unidask.load_config(write_config(tmp_path / name, **sections))

    return make


SLURM_DIR = "/var/tmp/unidask-slurm-tests"


MARKED_BY_FIXTURE = ("slurm", "netfs", "browser", "hosts")
OUTSIDE_THE_QUICK_LAYER = ("cluster", "faults", "bench", *MARKED_BY_FIXTURE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test not marked ``cluster`` may not start worker processes of its own (a session
    fixture's one shared run, such as ``haar_run``, is made before, at setup): the quick layer,
    ``-m "not cluster ..."``, stays quick because a test that would slow it fails, saying so.
    Tests of the other layers (faults, SLURM, the browser, ...) are outside it anyway."""
    if any(item.get_closest_marker(m) for m in OUTSIDE_THE_QUICK_LAYER):
        return (yield)
    from unidask.execute import cluster

    def refused(spec):
        raise AssertionError(f"{item.nodeid} starts a local cluster of worker processes: mark it "
                             "@pytest.mark.cluster (or use an in-process one, as tests/test_driver.py)")

    started, cluster.local_cluster = cluster.local_cluster, refused
    try:
        return (yield)
    finally:
        cluster.local_cluster = started


def pytest_collection_modifyitems(items) -> None:
    """A test that uses the slurm, netfs or browser fixture carries that marker, so ``-m`` selects
    by what a test needs, and no marker can be forgotten."""
    for item in items:
        for name in MARKED_BY_FIXTURE:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(name)


def config_in(shared: Path, name: str, **sections) -> Path:
    """A config for a SLURM job: the run dir on shared storage, the live shards on the job's
    node-local scratch ($TMPDIR)."""
    sections.setdefault("storage", {})
    sections["storage"].setdefault("local_dir", "${TMPDIR:-/tmp}/unidask")
    return write_config(shared / f"{name}.toml", **sections)


@pytest.fixture(scope="session")
def slurm():
    """A running 2-node SLURM (cluster/start.sh); its SLURM_CONF is set for this process and the
    jobs it submits. Skipped where SLURM is not installed (cluster/install.sh, as root)."""
    env = {**os.environ, "UNIDASK_SLURM_DIR": SLURM_DIR}
    r = subprocess.run([str(REPO / "cluster" / "start.sh"), "2", "2"], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip())
    if r.returncode != 0:
        pytest.fail(f"cluster/start.sh failed: {r.stderr[-2000:]}")
    conf = f"{SLURM_DIR}/slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run([str(REPO / "cluster" / "stop.sh")], env=env, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture
def shared():
    """A directory on "shared storage" for a SLURM run (the jobs' own scratch is $TMPDIR)."""
    path = Path("/var/tmp/unidask-tests") / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def netfs(tmp_path_factory) -> Path:
    """A directory on a real network filesystem, as a cluster's shared storage: sshfs from this
    host's own sshd (``cluster/netfs.sh``). Skipped where that cannot run (not root, not installed)."""
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
    result = unidask.run(spec)
    assert result.merged is not None and result.merged.complete
    return spec, result.merged.out


SYSTEM_PYTHON = "/usr/bin/python3"   # what another user can run: the stdlib, not our venv


@pytest.fixture(scope="session")
def other_user():
    """A real second user account on this machine (created here, removed after), and a way to run
    stdlib Python as it: ``run(code, *args)``. Skipped where accounts cannot be made (not root)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("a second user account needs root, useradd and the system's python3")
    name = f"unidask-{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)

    def run(code: str, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", name, "--", SYSTEM_PYTHON, "-c", code, *map(str, args)],
                              capture_output=True, text=True, timeout=60, cwd="/")

    try:
        yield name, run
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def shared_tmp():
    """A directory like /tmp: every user may create in it (mode 1777), as on a login node."""
    path = Path("/var/tmp") / f"unidask-shared-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Tmpfs:
    """A tmpfs of a test's own, mounted at ``path``, changed with ``remount`` (its size, ro, rw).
    Needs root (CI runs as root): skipped without."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.decode().strip()}")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def grow(self) -> None:
        self.remount("size=256m")

    def read_only(self, ro: bool) -> None:
        if not ro:
            return self.remount("rw")
        # the kernel refuses ro while a file is open for writing (a stage-out's copy in flight): the
        # fault lands at the first moment none is, as a disk's errors=remount-ro would land anyway
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run(["mount", "-o", "remount,ro", str(self.path)], capture_output=True, text=True)
            if r.returncode == 0:
                return
            if "busy" not in r.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"cannot remount {self.path} read-only: {r.stderr.strip()}")
            time.sleep(0.01)

    def unmount(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)])
        subprocess.run(["umount", "-l", str(self.path)])


def wait_for(predicate, what: str, timeout: float = 120.0, step: float = 0.05):
    """``predicate()``'s first true value, waited for; ``timeout`` bounds a hang, not the test's
    expected time, and the failure says what never came."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(step)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")
