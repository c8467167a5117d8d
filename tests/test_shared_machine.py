"""A shared login node or workstation: another user of the same machine can neither run code in
nor put data into your run. Tested with a real second user account (root only; skipped otherwise)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys

import psutil
import pytest

import unidask
from unidask import RunDir
from unidask.store import shard
from unidask.execute import worker

from conftest import cli, merged_data, write_config

ATTACK = """
import socket, ssl, sys
host, port = "127.0.0.1", int(sys.argv[1])
out = []
# a plain Dask client: plain TCP, its first frame
with socket.create_connection((host, port), timeout=10) as s:
    try:
        s.sendall(b"\\x00" * 8 + b"\\x01" * 32)
        out.append("plain:" + ("closed" if s.recv(100) in (b"",) else "answered"))
    except OSError as e:
        out.append(f"plain:closed ({type(e).__name__})")
# TLS, trusting anything, without the run's client certificate
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection((host, port), timeout=10) as raw:
    try:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"\\x00" * 8)
            out.append("tls:" + ("closed" if s.recv(1) == b"" else "answered"))
    except (ssl.SSLError, OSError) as e:
        out.append(f"tls:refused ({type(e).__name__})")
# the run's key
try:
    open(sys.argv[2]).read()
    out.append("key:read")
except OSError as e:
    out.append(f"key:denied ({type(e).__name__})")
print(" ".join(out))
"""


def test_another_user_cannot_connect_to_a_local_run(other_user, tmp_path):
    """The attack of issue 16: during a default local-mode run, another account connects to the
    scheduler on loopback. Refused in the handshake, plain or TLS without the run's certificate;
    the run's owner, with it, gets in (so the test can tell the two apart)."""
    _, as_other = other_user
    cfg = write_config(tmp_path / "c.toml", run={"count": 12000, "task_size": 100}, generator={"dim": 64},
                       cluster={"nodes": 1, "workers": 1})
    proc = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dashboard = None
        for line in proc.stderr:
            if m := re.match(r"dashboard: http://127\.0\.0\.1:(\d+)/", line):
                dashboard = int(m[1])
                break
        assert dashboard, "the run never printed its dashboard"
        # the scheduler and the nannies listen in the driver's process: every one must refuse
        ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN} - {dashboard}
        assert len(ports) >= 2, ports
        run_dir = tmp_path / "run"
        for port in ports:
            r = as_other(ATTACK, port, run_dir / "tls" / "key.pem")
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith("plain:closed") and " tls:refused" in r.stdout \
                and " key:denied" in r.stdout, (port, r.stdout)
            # the owner, with the run's certificate, completes the handshake: the test can tell
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(run_dir / "tls" / "ca.pem")
            ctx.load_cert_chain(run_dir / "tls" / "cert.pem", run_dir / "tls" / "key.pem")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as s:
                assert s.version() is not None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.cluster
def test_a_local_dir_another_user_made_first_is_refused(other_user, shared_tmp, tmp_path):
    """Another user creates your default local dir first (mode 777) and plants a forged shard in
    it: the run refuses the dir with one line, and then, in a dir of its own, gives the clean result."""
    _, as_other = other_user
    env = {"TMPDIR": str(shared_tmp)}
    cfg = write_config(tmp_path / "c.toml", run={"count": 1000, "task_size": 100})
    with open(cfg) as f:
        text = "".join(line for line in f if not line.startswith("local_dir"))   # the default
    cfg.write_text(text)
    mine = shared_tmp / f"unidask-{os.environ.get('USER') or 'root'}"
    r = as_other("import os, sys; d = sys.argv[1]; os.makedirs(d + '/q'); os.chmod(d, 0o777); "
                 "open(d + '/q/node1-x.db', 'wb').write(b'forged')", mine)
    assert r.returncode == 0, r.stderr
    r = cli("run", cfg, "--resume", cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("unidask: error:") == 1, r.stderr
    assert f"local_dir {mine} belongs to another user" in r.stderr
    assert not (tmp_path / "run" / "shards").exists() or not any((tmp_path / "run" / "shards").iterdir())
    # writable by others, though ours: refused too
    shutil.rmtree(mine)
    mine.mkdir(mode=0o777)
    mine.chmod(0o777)
    r = cli("run", cfg, cwd=tmp_path, env=env)
    assert r.returncode == 2 and f"local_dir {mine} is writable by group and others" in r.stderr, r.stderr
    shutil.rmtree(mine)
    r = cli("run", cfg, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700 and mine.stat().st_uid == os.getuid()
    clean = unidask.run(unidask.load_config(write_config(tmp_path / "clean.toml",
                                                          run={"count": 1000, "task_size": 100,
                                                               "run_dir": str(tmp_path / "clean")})))
    assert merged_data(tmp_path / "run" / "t.db") == merged_data(clean.merged.out)


def test_a_local_dir_another_user_points_elsewhere_is_refused(other_user, shared_tmp, tmp_path):
    """Another user plants the default local dir as a symbolic link to a directory of yours
    (`ln -s /home/victim /tmp/unidask-victim`): shards and Dask's scratch would go wherever it
    points, and re-pointing it mid-run would silently stop every stage-out. Refused in one line,
    before anything is made; a directory on the way that anyone may rename in is refused too."""
    _, as_other = other_user
    env = {"TMPDIR": str(shared_tmp)}
    cfg = write_config(tmp_path / "c.toml", run={"count": 1000, "task_size": 100})
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(True) if not line.startswith("local_dir")))
    mine = shared_tmp / f"unidask-{os.environ.get('USER') or 'root'}"
    victim_home = tmp_path / "home"
    victim_home.mkdir(mode=0o700)
    r = as_other("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", victim_home, mine)
    assert r.returncode == 0, r.stderr
    r = cli("run", cfg, cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("unidask: error:") == 1, r.stderr
    assert f"{mine} is a symbolic link of another user's" in r.stderr, r.stderr
    assert list(victim_home.iterdir()) == []
    os.unlink(mine)
    # a world-writable directory without the sticky bit on the way: anyone may rename ours away
    open_dir = shared_tmp / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    os.chown(open_dir, 65534, 65534)
    r = cli("run", cfg, cwd=tmp_path, env={"TMPDIR": str(open_dir)})
    assert r.returncode == 2 and "may be written by anyone and has no sticky bit" in r.stderr, r.stderr


@pytest.mark.cluster
def test_a_planted_or_damaged_local_shard_is_not_staged(other_user, config, monkeypatch):
    """Leftover shards a resume would stage: one owned by another user, one of this user's with a
    damaged task. Both are left in place with a warning naming them; the result is the clean one."""
    name, _ = other_user
    spec = config(run={"count": 2000, "task_size": 100})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    monkeypatch.setenv("UNIDASK_NODE", "node1")
    for t in range(0, 5):
        worker.generate_task(spec, t, "old")
    shard.close_shards()
    [theirs] = shard.run_local_dir(spec).glob("node1-old-*.db")
    monkeypatch.setenv("UNIDASK_NODE", "node2")
    for t in range(5, 10):
        worker.generate_task(spec, t, "old")
    shard.close_shards()
    [damaged] = shard.run_local_dir(spec).glob("node2-old-*.db")
    import pwd
    import sqlite3
    os.chown(theirs, pwd.getpwnam(name).pw_uid, -1)
    con = sqlite3.connect(damaged)
    con.execute("UPDATE blocks SET data = zeroblob(length(data)) WHERE id >= 700 AND id < 800")
    con.commit()
    con.close()
    monkeypatch.delenv("UNIDASK_NODE")

    from conftest import messages
    with messages() as lines:
        result = unidask.run(spec, resume=True)
    assert any(line == f"warning: {theirs}: left in place, not staged: it belongs to another user "
                       f"(uid {pwd.getpwnam(name).pw_uid})" for line in lines), lines
    assert any(line.startswith(f"warning: {damaged}: left in place, not staged: ") and "task 7: checksum mismatch"
               in line for line in lines), lines
    assert theirs.exists() and damaged.exists()
    clean = unidask.run(unidask.load_config(write_config(spec.run_dir.parent / "clean.toml", run={
        "count": 2000, "task_size": 100, "run_dir": str(spec.run_dir.parent / "clean")})))
    assert merged_data(result.merged.out) == merged_data(clean.merged.out)


@pytest.mark.cluster
def test_two_runs_of_one_config_never_touch_each_others_shards(config, monkeypatch, tmp_path):
    """Same config file (same name), two run dirs: a resume of one never stages the other's
    leftovers, and each finishes with its own."""
    a = config("same.toml", run={"count": 2000, "task_size": 100, "run_dir": str(tmp_path / "a")})
    b = unidask.load_config(tmp_path / "same.toml", {"run.run_dir": str(tmp_path / "b")})
    assert a.name == b.name and shard.run_local_dir(a) != shard.run_local_dir(b)
    RunDir(a.run_dir).prepare(a, resume=False)
    monkeypatch.setenv("UNIDASK_NODE", "node1")
    for t in range(3):
        worker.generate_task(a, t, "killed")     # what a killed run of A left on local disk
    shard.close_shards()
    monkeypatch.delenv("UNIDASK_NODE")
    [left] = shard.run_local_dir(a).glob("*.db")

    from conftest import messages
    with messages() as lines:
        rb = unidask.run(b, resume=True)
    assert rb.merged.complete and not any("earlier run left" in line for line in lines)
    assert left.exists()                         # A's, untouched
    with messages() as lines:
        ra = unidask.run(a, resume=True)
    assert "resume: staged 1 shard(s) an earlier run left on local disk" in lines and not left.exists()
    assert ra.skipped_tasks == 3 and merged_data(ra.merged.out) == merged_data(rb.merged.out)


@pytest.mark.cluster
def test_everything_unidask_writes_is_owner_only(config):
    spec = config(run={"count": 1000, "task_size": 100}, storage={"stage_every": 0.01})
    result = unidask.run(spec)
    for base in (spec.run_dir, spec.local_dir):
        for path in [base, *base.rglob("*")]:
            if path == result.merged.out or spec.local_dir / "dask" in path.parents:
                continue   # the merged database is meant to be shared: the umask decides; Dask's
                           # scratch space is Dask's, inside a dir of unidask's that is 0700
            assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path
