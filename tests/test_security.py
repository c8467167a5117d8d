"""Locking the cluster: per-run TLS on the real SLURM, owner-only run files, loopback-only local mode."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest
from distributed import Client

import unidask
from unidask import tls

from conftest import REPO, config_in, run_main


def refused_without_certificate(host: str, port: int, ca) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    with socket.create_connection((host, port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\0" * 8)
                return s.recv(1) == b""          # closed on us
        except (ssl.SSLError, ConnectionError):
            return True


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tls_job_refuses_clients_without_the_certificate(slurm, shared):
    cfg = config_in(shared, "tls", run={"count": 2000, "task_size": 10, "run_dir": str(shared / "run")},
                    generator={"kind": "plugin_generators:slow_haar", "delay": 0.2})
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}   # the jobs import the test plugin
    job = subprocess.Popen([sys.executable, "-m", "unidask.cli", "submit", str(cfg), "--wait",
                            "--time", "00:05:00"], cwd=shared, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    run_dir = shared / "run"
    deadline = time.monotonic() + 120
    sched = None
    while time.monotonic() < deadline and sched is None:
        found = [p for p in run_dir.glob("scheduler-*.json") if p.stat().st_size > 0]
        sched = found[0] if found else None
        time.sleep(0.2)
    assert sched is not None, "the job never wrote its scheduler file"
    address = json.loads(sched.read_text())["address"]
    assert address.startswith("tls://")
    assert mode(sched) == 0o600 and mode(run_dir) == 0o700
    assert mode(run_dir / "tls") == 0o700
    assert all(mode(run_dir / "tls" / f) == 0o600 for f in tls.FILES)

    strangers = {
        "plain TCP": (address.replace("tls://", "tcp://"), None),
        "another run's certificate": (address, tls.security(shared / "other-run")),
    }
    for who, (addr, sec) in strangers.items():
        with pytest.raises((OSError, TimeoutError)):   # the scheduler turns them away
            Client(addr, timeout=5, security=sec)
            pytest.fail(f"{who} could connect")
    # TLS that trusts the run's CA but shows no client certificate (Dask cannot even say that)
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    assert refused_without_certificate(host, int(port), run_dir / "tls" / "ca.pem")
    with Client(address, timeout=30, security=tls.security(run_dir)) as c:
        assert c.scheduler_info()["address"] == address

    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, out + err
    with unidask.Dataset(run_dir / "t.db") as ds:
        assert len(ds) == 2000


def test_local_mode_listens_on_loopback_only(config):
    spec = config(run={"count": 6000, "task_size": 100}, generator={"dim": 48})
    seen: set[str] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
                try:
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            seen.add(c.laddr.ip)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        unidask.run(spec)
    finally:
        done.set()
        t.join()
    assert seen and seen <= {"127.0.0.1"}, seen


def test_tls_command_makes_owner_only_files_but_no_stray_parents(tmp_path, capsys):
    code, out, _ = run_main("tls", tmp_path / "run", capsys=capsys)
    files = {name: tmp_path / "run" / "tls" / name for name in tls.FILES}
    assert code == 0 and out.split() == ["--tls-ca-file", str(files["ca.pem"]), "--tls-cert",
                                         str(files["cert.pem"]), "--tls-key", str(files["key.pem"])]
    assert mode(tmp_path / "run" / "tls") == 0o700 and {mode(f) for f in files.values()} == {0o600}
    code, _, err = run_main("tls", tmp_path / "typo" / "run", capsys=capsys)
    assert code == 2 and err == f"unidask: error: {tmp_path / 'typo' / 'run'}: no directory " \
                                f"{tmp_path / 'typo'} to make the run dir in\n", err
    assert not (tmp_path / "typo").exists()
