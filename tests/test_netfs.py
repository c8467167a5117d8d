"""Shared storage on a real network filesystem (sshfs, ``cluster/netfs.sh``), as on a cluster: shards
live on local disk, are staged to the network filesystem and merged there; a live shard refuses it."""

import os
import re
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import unidask
from unidask import RunDir
from unidask.core import files

from conftest import REPO, cli, config_in, merged_data, wait_for, write_config


def test_stage_merge_and_read_on_a_network_filesystem(config, netfs, tmp_path):
    """Periodic and final stage-outs copy to the network filesystem (no rename across filesystems),
    the merge reads the shards there and builds its output there, and the data is the data of the
    same run on local disk."""
    # the run on the network filesystem goes on, a task every quarter second, until periodic
    # stage-outs have put more segments there than the final stage-outs alone would
    hold = tmp_path / "hold"
    hold.touch()

    def run(where: str, run_dir: Path):
        spec = config(f"{where}.toml", run={"count": 3000, "task_size": 20, "run_dir": str(run_dir)},
                      generator={"kind": "plugin_generators:held_haar", "dim": 4, "hold": str(hold)},
                      storage={"local_dir": str(tmp_path / f"local-{where}"), "stage_every": 0.2})
        return unidask.run(spec)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run, "netfs", netfs / "run")
        try:
            wait_for(lambda: len(RunDir(netfs / "run").staged_shards()) > 2 or running.done(), "3 segments staged")
        finally:
            hold.unlink()
        result = running.result(timeout=180)
    local = run("local", tmp_path / "run-local")   # the same data, unheld
    assert files.filesystem_type(result.merged.out) == "fuse.sshfs"
    assert result.merged.complete and result.merged.rows == 3000
    assert merged_data(result.merged.out) == merged_data(local.merged.out)
    shards = RunDir(netfs / "run").staged_shards()
    # segments of the processes' shards, copied whole (on each worker's background thread)
    assert len(shards) > 2 and all(re.search(r"-p\d+-[0-9a-f]{6}$", p.stem) for p in shards), shards
    assert not list(RunDir(netfs / "run").shards.glob(".*"))  # no temp left
    for db in [*shards, result.merged.out]:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", db
        con.close()
    # the CLI's merge and verify, there too
    again = netfs / "again.db"
    merged = cli("merge", netfs / "run", "-o", again)
    assert merged.returncode == 0, merged.stderr
    verified = cli("verify", again)
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
    with unidask.Dataset(again) as ds:
        assert len(ds) == 3000 and ds[2999].shape == (4, 4)


def test_shards_a_directory_cache_hides_are_found_by_name(config, netfs, tmp_path):
    """Another host's view of the shared storage with a directory cache (NFS keeps a listing up to
    a minute; here sshfs's, ten minutes): a listing there misses what was staged a moment ago.
    The run's record of its stage-outs (stages.jsonl) names them, and a file looked up by name is
    found: status counts them and the merge from that view is the whole run."""
    view = tmp_path / "view"
    mounted = subprocess.run(["bash", str(REPO / "cluster" / "netfs.sh"), "mount", str(view), "127.0.0.1"],
                             env={**os.environ, "UNIDASK_NETFS_OPTIONS": "dcache_timeout=600"},
                             capture_output=True, text=True, timeout=120)
    assert mounted.returncode == 0, mounted.stderr
    try:
        spec = config(run={"count": 2000, "task_size": 100, "run_dir": str(netfs / "cached")},
                      storage={"local_dir": str(tmp_path / "local"), "stage_every": 0.2})
        RunDir(spec.run_dir).prepare(spec, resume=False)
        seen = RunDir(view / "cached")
        assert seen.staged_shards() == []   # the view lists shards/ (empty), and caches that
        result = unidask.run(spec, merge=False)
        staged = sorted(p.name for p in RunDir(spec.run_dir).staged_shards())
        assert staged and len(staged) >= len(result.shards)
        assert not any(p.name.endswith(".db") for p in seen.shards.iterdir())   # the cache hides them
        assert sorted(p.name for p in seen.staged_shards()) == staged
        merged = unidask.merge(view / "cached")
        assert merged.complete and merged.rows == 2000
    finally:
        subprocess.run(["fusermount3", "-u", str(view)], timeout=60)


def test_local_dir_on_a_network_filesystem_is_refused_before_the_run(netfs, tmp_path):
    cfg = write_config(tmp_path / "c.toml", storage={"local_dir": str(netfs / "local")},
                       run={"run_dir": str(tmp_path / "run")})
    done = cli("run", cfg)
    assert done.returncode == 2, done.stderr
    *before, last = done.stderr.splitlines()
    assert last == (f"unidask: error: local dir {netfs / 'local'} is on a network filesystem "
                    "(fuse.sshfs); a live shard needs node-local disk (set storage.local_dir, or "
                    "storage.allow_network_fs = true to insist)")
    assert not any("dashboard" in line for line in before), before   # no cluster was started


def test_slurm_job_with_run_dir_on_a_network_filesystem(slurm, netfs):
    """The cluster layout: the scheduler file, the TLS files, the logs, the staged shards and the
    merged database on the network filesystem; each job's shard on its node's $TMPDIR."""
    shared = netfs / "slurm"
    shared.mkdir()
    cfg = config_in(shared, "gen", run={"count": 4000, "task_size": 200, "run_dir": str(shared / "run")})
    r = cli("submit", cfg, "--nodes", "2", "--time", "00:05:00", "--wait", cwd=shared)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (shared / "run" / "tls" / "key.pem").exists()   # the job ran with TLS, from there
    verified = cli("verify", shared / "run" / "t.db")
    assert verified.returncode == 0 and "4,000 unitaries in 20/20 tasks" in verified.stdout, verified.stdout


def test_one_driver_per_run_dir_on_a_network_filesystem(netfs, tmp_path):
    """A second `unidask run` on a run dir in use is refused in one line naming the first's host
    and pid (two would both generate everything); a lock from another host is taken over only once
    it has not been refreshed for a while; the lock of a driver that was killed, at once."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from unidask.store import runlock

    base = netfs / "lock"
    (base / "run").mkdir(parents=True)
    cfg = write_config(base / "slow.toml", run={"count": 2000, "task_size": 10, "run_dir": str(base / "run")},
                       generator={"kind": "plugin_generators:slow_haar", "delay": 0.2},
                       storage={"local_dir": str(tmp_path / "local")})
    lock = RunDir(base / "run").lock_path
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "since": time.time()}))
    refused = cli("run", cfg)
    error = refused.stderr.splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert error.startswith("unidask: error: ") and "another unidask run is using this run dir (host elsewhere, pid 1" in error
    old = time.time() - runlock.STALE - 60
    os.utime(lock, (old, old))

    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg)], stdout=out, stderr=out,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while runlock.holder_of(lock).get("pid") != first.pid:
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        assert files.filesystem_type(lock) == "fuse.sshfs"
        assert re.search(r"taking over the run lock of host elsewhere, pid 1, since [-\d]+ [:\d]+ \(it was last "
                         r"refreshed", log.read_text()), log.read_text()
        second = cli("run", cfg, "--resume")
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"(host {socket.gethostname()}, pid {first.pid}," in second.stderr.splitlines()[-1]
    finally:
        os.killpg(first.pid, signal.SIGKILL)   # the driver, its scheduler and workers: the lock stays
        first.wait()
    assert runlock.holder_of(lock)["pid"] == first.pid
    resumed = cli("run", cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"taking over the run lock of host {socket.gethostname()}, pid {first.pid}, since "
                     r"[-\d]+ [:\d]+ \(its process", resumed.stderr), resumed.stderr
    assert not lock.exists()                 # released at the end
