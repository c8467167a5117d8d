"""Locking the cluster: per-run TLS on the real SLURM, owner-only run files, loopback-only local mode."""

from __future__ import annotations

import datetime
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
from unidask.execute import tls

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


@pytest.mark.cluster
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


def planted(run, other, case: str) -> str:
    """Do ``case`` to RUN_DIR ``run``'s TLS files (``other``: another run's); return the file that
    must be named."""
    d = run / "tls"
    if case == "garbage cert":
        (d / "cert.pem").write_text("garbage")
        return "cert.pem"
    if case == "empty key":
        (d / "key.pem").write_bytes(b"")
        return "key.pem"
    if case == "key others read":
        os.chmod(d / "key.pem", 0o644)
        return "key.pem"
    if case == "dir others use":
        os.chmod(d, 0o755)
        return "tls"
    if case == "another user's CA":
        os.chown(d / "ca.pem", 65534, 65534)   # nobody
        return "ca.pem"
    if case == "another run's CA":           # a CA planted to let its issuer's certificates in
        os.replace(other / "tls" / "ca.pem", d / "ca.pem")
        return "cert.pem"
    if case == "another run's key":
        os.replace(other / "tls" / "key.pem", d / "key.pem")
        return "key.pem"
    if case == "a FIFO":
        (d / "ca.pem").unlink()
        os.mkfifo(d / "ca.pem")
        return "ca.pem"
    if case == "expired":
        for name in tls.FILES:
            (d / name).unlink()
        tls.ensure(run, days=1, issued=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2))
        return "ca.pem"
    raise ValueError(case)


@pytest.mark.cluster
@pytest.mark.parametrize("case,why", [
    ("garbage cert", "not a PEM certificate (Unable to load PEM file)"), ("empty key", "not a PEM private key"),
    ("key others read", "others may read it (mode 0644)"), ("dir others use", "others may use it (mode 0755)"),
    ("another user's CA", "it belongs to another user (uid 65534)"), ("another run's CA", "not issued by ca.pem"),
    ("another run's key", "not the key of cert.pem"), ("a FIFO", "a FIFO, not a regular file"),
    ("expired", "it expired on ")])
def test_tls_files_not_the_owners_alone_or_not_whole_are_refused(config, tmp_path, capsys, case, why):
    """The run's TLS files are what keeps others out: a CA or key another user planted or can
    read, or files that are damaged, mixed between runs or expired, are refused in one line
    naming the file (Dask said "[SSL] PEM lib", with a traceback, or took them), by `unidask
    tls`, which the job scripts call, and by a run."""
    spec = config(run={"count": 200, "task_size": 100})
    tls.ensure(spec.run_dir)
    tls.ensure(tmp_path / "other")
    name = planted(spec.run_dir, tmp_path / "other", case)
    code, out, err = run_main("tls", spec.run_dir, capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"unidask: error: {spec.run_dir / 'tls'}") and f"{name}: {why}" in err, err
    code, _, err = run_main("run", spec.run_dir.parent / "run.toml", capsys=capsys)
    assert code == 2 and err.splitlines()[-1].startswith("unidask: error: ") and why in err, err
    assert not (spec.run_dir / "shards").exists() or not any((spec.run_dir / "shards").iterdir())


@pytest.mark.cluster
def test_a_shard_another_user_planted_is_never_taken(config, other_user, shared_tmp, capsys):
    """The user made the run dir and shards/ group- and world-writable (a shared project dir);
    another user planted a shard of the run's missing tasks there, a faithful copy of a real one
    (matching checksums, identity matrices would pass them too). The merge refuses it by name;
    a --resume sets it aside, makes shards/ owner-only again and generates those tasks itself."""
    import shutil

    from unidask import RunDir

    name, run = other_user
    spec = config(run={"count": 2000, "task_size": 100, "run_dir": str(shared_tmp / "run")})
    unidask.run(spec, merge=False)
    rd = RunDir(spec.run_dir)
    (spec.run_dir / "t.db").unlink(missing_ok=True)
    os.chmod(spec.run_dir, 0o777)
    os.chmod(rd.shards, 0o777)
    theirs = rd.shards / "zz-planted.db"
    first = rd.staged_shards()[0]
    data = first.read_bytes()
    first.unlink()   # its tasks are now missing: the planted copy offers them
    r = subprocess.run(["runuser", "-u", name, "--", "/bin/sh", "-c", 'cat > "$0"', str(theirs)], input=data,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert theirs.stat().st_uid != os.getuid()
    code, out, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and str(theirs) in err and "belongs to another user" in err and err.count("\n") == 1, err
    result = unidask.run(spec, resume=True)
    assert result.merged.complete
    assert not theirs.exists() and (rd.rejected / theirs.name).exists()
    assert stat.S_IMODE(rd.shards.stat().st_mode) == 0o700 and stat.S_IMODE(spec.run_dir.stat().st_mode) == 0o700
    shutil.rmtree(rd.rejected)


FLOOD = """\
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ports, n = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2])
held = []
for i in range(n):   # connect, and never say a word: no TLS handshake, no HTTP request
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", ports[i % len(ports)]))
    except OSError:
        continue
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()   # held until the test closes our stdin
"""


@pytest.mark.cluster
def test_a_flood_of_half_open_connections_does_not_stop_a_run(tmp_path, other_user, shared_tmp):
    """Another local user opens 1,100 TCP connections to every port the driver listens on (the
    scheduler's, the nannies', the dashboard's) and never completes a handshake, against a driver
    started with the common soft limit of 1,024 open files (it crashed in seconds with EMFILE).
    The run goes on and finishes, every task merged, without a traceback."""
    import resource

    from conftest import write_config

    name, _ = other_user
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves no room above a flood of 1,100")
    hold = tmp_path / "hold"
    hold.touch()
    cfg = write_config(tmp_path / "c.toml", run={"count": 4000, "task_size": 10},
                       generator={"kind": "plugin_generators:held_haar", "dim": 2, "hold": str(hold)},
                       storage={"stage_every": 1})
    # Dask's connect timeout bounds a handshake; shortened so the run sees its first ones closed
    driver = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO / "tests"),
                                   "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    err_lines: list[str] = []
    flood_said = threading.Event()

    def read_err():
        for line in driver.stdout:
            err_lines.append(line)
            if "sent no TLS handshake" in line:
                flood_said.set()

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    attacker = None
    try:
        deadline = time.monotonic() + 120
        while not any((tmp_path / "run" / "shards").glob("*.db")):   # running, and staging
            assert driver.poll() is None and time.monotonic() < deadline, "".join(err_lines)[-3000:]
            time.sleep(0.1)
        ports = sorted({c.laddr.port for c in psutil.Process(driver.pid).net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN})
        (shared_tmp / "flood.py").write_text(FLOOD)
        attacker = subprocess.Popen(["runuser", "-u", name, "--", "/usr/bin/python3", str(shared_tmp / "flood.py"),
                                     ",".join(map(str, ports)), "1100"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        opened = int(attacker.stdout.readline())
        assert opened >= 1000, opened
        # held until the driver says what is happening, then on to its end under the flood
        assert flood_said.wait(timeout=120), "".join(err_lines)[-3000:]
        hold.unlink()
        driver.wait(timeout=600)
        reader.join(timeout=60)
        out = err = "".join(err_lines)
    finally:
        hold.unlink(missing_ok=True)
        if attacker is not None:
            attacker.stdin.close()
            attacker.wait(timeout=60)
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Too many open files" not in err, err[-3000:]
    assert "merged" in out + err and unidask.verify(tmp_path / "run" / "t.db").ok
    flood_lines = [line for line in err.splitlines() if "sent no TLS handshake" in line]
    assert 1 <= len(flood_lines) <= 20, err[-3000:]   # said, in a line a minute, not a line a connection
