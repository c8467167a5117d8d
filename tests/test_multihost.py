"""The SLURM job on separate hosts (cluster/hosts.sh under cluster/start.sh): nodes with their own
addresses, names and scratch, no default route, reached over bridged management and data networks
from a login host (this machine's own namespace), which the user submits from. The addresses Dask
uses must be ones every host reaches, found with no setting at all or on the network that
``cluster.interface`` names; TLS must hold across hosts; and a host that is cut off, crashes or is
partitioned from another must cost at most its unstaged tasks, never a wrong or missing row."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import unidask
from unidask import RunDir

from conftest import REPO, cli, config_in, merged_data, slow_haar_reference, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.hosts]
DIR = "/var/tmp/unidask-slurm-hosts-tests"
HOSTS = f"{DIR}/hosts"
SHARED = "/var/tmp/unidask-hosts-shared"   # the cluster's network filesystem, on every host
ENV = {"UNIDASK_SLURM_DIR": DIR, "UNIDASK_SLURM_HOSTS": "1", "UNIDASK_HOSTS_DIR": HOSTS,
       "UNIDASK_SLURM_SHARED": SHARED}


class Hosts:
    """The running 3-node cluster of separate hosts, and the faults that can befall a host."""

    env = {"SLURM_CONF": f"{DIR}/slurm.conf", "UNIDASK_HOSTS_DIR": HOSTS}

    def start(self) -> None:
        r = subprocess.run([str(REPO / "cluster" / "start.sh"), "3", "2"], env={**os.environ, **ENV},
                           capture_output=True, text=True, timeout=600)
        if r.returncode == 2:
            pytest.skip(r.stderr.strip())
        assert r.returncode == 0, r.stderr[-2000:]

    def hosts(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "cluster" / "hosts.sh"), *args], capture_output=True, text=True,
                              env={**os.environ, **ENV, "PYTHONPATH": str(REPO / "tests")}, timeout=120,
                              check=check)

    def on_node(self, k: int, code: str, *args: str) -> subprocess.CompletedProcess:
        """Python run on node ``k`` (its network, host name and scratch)."""
        return self.hosts("exec", str(k), sys.executable, "-c", code, *args, check=False)

    def slurm(self, *args: str) -> str:
        return subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60).stdout


@pytest.fixture(scope="module")
def cluster():
    """A 3-node SLURM whose nodes are separate hosts; skipped where that cannot run (not root)."""
    c = Hosts()
    c.start()
    yield c
    subprocess.run([str(REPO / "cluster" / "stop.sh")], env={**os.environ, **ENV}, timeout=120)


@pytest.fixture
def shared(cluster):
    """A directory on the cluster's shared storage, which the login host and every node mount
    from the network filesystem over the management network."""
    path = Path(SHARED) / uuid.uuid4().hex[:8]
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def haar_reference(tmp_path_factory):
    """The bytes a local run of the hosts' Haar config writes, to hold the cluster's runs to."""
    base = tmp_path_factory.mktemp("reference")
    cfg = config_in(base, "gen", run={"count": 6000, "task_size": 200, "run_dir": str(base / "run")})
    local = unidask.load_config(cfg, {"storage.local_dir": str(base / "local"), "cluster.nodes": 2})
    return merged_data(unidask.run(local).merged.out)


def haar_config(shared: Path, **cluster) -> Path:
    return config_in(shared, "gen", run={"count": 6000, "task_size": 200, "run_dir": str(shared / "run")},
                     cluster={"nodes": 3, "dashboard_address": ":8790", **cluster})


def worker_addresses(logs: Path) -> set[str]:
    """The addresses the run's Dask workers listened at, from their own logs."""
    text = "".join(p.read_text() for p in logs.glob("*") if p.suffix in (".log", ".err"))
    return set(re.findall(r"Start worker at:\s+tls://([\d.]+):", text))


def test_submit_on_three_separate_hosts(cluster, shared, haar_reference):
    # the run dir on the network filesystem, which each node mounts itself over the network
    for k in (1, 2, 3):
        seen = cluster.on_node(k, "import sys; from unidask.core import files; print(files.filesystem_type(sys.argv[1]))",
                               str(shared))
        assert seen.stdout.strip() == "fuse.sshfs", seen.stderr
    cfg = haar_config(shared, workers=2, walltime="00:05:00")
    r = cli("submit", cfg, "--wait", cwd=shared, env=cluster.env)   # every job parameter from the config
    assert r.returncode == 0, r.stdout + r.stderr
    shards = RunDir(shared / "run").staged_shards()
    assert sorted({p.name.split("-")[0] for p in shards}) == ["node1", "node2", "node3"]   # all three wrote
    log = next((shared / "run" / "logs").glob("unidask-t-*.out")).read_text()
    assert "on 3 node(s)" in log
    # the scheduler at node1's own address (no default route there: Dask alone would pick 127.0.0.1):
    # the dashboard link is the scheduler's, and the ssh tunnel goes through the login host
    assert "unidask page: http://10.77.0.11:8790/unidask" in log and "-L 8790:10.77.0.11:8790" in log
    # and cluster.workers processes of every node at its own management address, none at a loopback one
    assert "on 3 node(s) (node[1-3]), 2 worker process(es) per node" in log
    assert re.search(r"workers joined: node1 \d at 10\.77\.0\.11, node2 \d at 10\.77\.0\.12, "
                     r"node3 \d at 10\.77\.0\.13\n", log), log
    assert merged_data(shared / "run" / "t.db") == haar_reference


@pytest.mark.parametrize("interface, network", [(None, "10.77.0"), ("data0", "10.78.0")])
def test_slurm_mode_from_the_login_host(cluster, shared, haar_reference, interface, network):
    """dask-jobqueue from the login host: the scheduler here, at the address the nodes reach it by
    (the login host's default route leads elsewhere), or on the network ``cluster.interface``
    names, where the workers are too."""
    extra = {"interface": interface} if interface else {}
    cfg = haar_config(shared, mode="slurm", workers=2, walltime="00:05:00", memory="2GB", worker_timeout=120,
                      **extra)
    r = cli("run", cfg, cwd=shared, env=cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"dashboard: http://{network}.1:" in r.stderr
    # every worker on that network; a job SLURM starts after the last task has none to do, so not
    # every node need have joined
    seen = worker_addresses(shared / "run" / "logs")
    assert seen and seen <= {f"{network}.{k}" for k in (11, 12, 13)}, seen
    assert merged_data(shared / "run" / "t.db") == haar_reference


TRY_CLIENTS = """
import json, sys
from distributed import Client
from distributed.security import Security
import unidask
from unidask.execute.cluster import security

address, cfg = sys.argv[1:]
_, _, hostport = address.partition("://")
attempts = {"the run's certificate": (address, security(unidask.load_config(cfg))),
            "no certificate": (address, None),
            "plain tcp": ("tcp://" + hostport, None),
            "another CA's certificate": (address, Security.temporary())}
joined = {}
for name, (addr, sec) in attempts.items():
    try:
        with Client(addr, security=sec, timeout=8):
            joined[name] = True
    except Exception:
        joined[name] = False
print(json.dumps(joined))
"""


def test_tls_refuses_a_client_on_another_host(cluster, shared):
    """While a job runs, a client on another node that lacks the run's certificate is refused;
    the same client with it connects (so the refusals are TLS's, not the network's)."""
    cfg = config_in(shared, "long", run={"count": 100_000, "task_size": 10, "run_dir": str(shared / "run")},
                    generator={"kind": "plugin_generators:slow_haar", "delay": 1.0})
    r = cli("submit", cfg, "--nodes", "1", "--time", "00:05:00", cwd=shared, env=cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = re.search(r"generation job (\d+) and merge job (\d+)", r.stdout).groups()
    try:
        scheduler_file = RunDir(shared / "run").scheduler_file(jobs[0])
        deadline = time.monotonic() + 120
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://10.77.0.11:")   # the job's scheduler, on node1
        tried = cluster.on_node(2, TRY_CLIENTS, address, str(cfg))
        assert tried.returncode == 0, tried.stderr[-3000:]
        assert json.loads(tried.stdout.splitlines()[-1]) == {
            "the run's certificate": True, "no certificate": False, "plain tcp": False,
            "another CA's certificate": False}
        # the dashboard link the job's log gives opens from the login host (the end of the ssh
        # tunnel line it prints), here without the tunnel
        log = RunDir(shared / "run").logs / f"unidask-t-{jobs[0]}.out"
        while not (link := re.search(r"unidask page: (http://10\.77\.0\.11:\d+/unidask)", log.read_text())):
            assert time.monotonic() < deadline, "the job's log never gave the dashboard link"
            time.sleep(0.5)
        with urllib.request.urlopen(link.group(1), timeout=10) as page:
            assert page.status == 200 and b"unidask" in page.read()
    finally:
        cluster.slurm("scancel", *jobs)


# -- faults of a host -------------------------------------------------------------------------------

def slow_config(shared: Path, tasks: int = 600) -> Path:
    """A run of a minute or more on 3 nodes with little data: tasks of 0.3 s, staged every 5 s."""
    return config_in(shared, "slow", run={"count": 10 * tasks, "task_size": 10, "run_dir": str(shared / "run")},
                     generator={"kind": "plugin_generators:slow_haar", "delay": 0.3},
                     storage={"stage_every": 5})


def submit_in_background(cluster: Hosts, cfg: Path, *args: str) -> tuple[threading.Thread, dict]:
    done: dict = {}

    def submit():
        done["result"] = cli("submit", cfg, "--time", "00:10:00", "--wait", *args, cwd=cfg.parent,
                             env=cluster.env)

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    return thread, done


def wait_for_staged(run_dir: Path, tasks: int) -> None:
    wait_for(lambda: len(RunDir(run_dir).staged_tasks()) >= tasks, f"{tasks} tasks staged", timeout=180, step=0.5)


def finished(thread: threading.Thread, done: dict, timeout: float = 420.0) -> subprocess.CompletedProcess:
    thread.join(timeout)
    assert not thread.is_alive(), "the job did not end"
    return done["result"]


def assert_complete(shared: Path, cfg: Path, r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    spec = unidask.load_config(cfg)
    assert merged_data(shared / "run" / "t.db") == slow_haar_reference(spec)
    return "".join(p.read_text() for p in (shared / "run" / "logs").glob("unidask-t-*.out"))


@pytest.fixture
def fresh(cluster):
    """The cluster started afresh for a fault test (its nodes all up, nothing left of the last)."""
    cluster.start()
    return cluster


def test_a_node_cut_off(fresh, shared):
    """node3's links go down mid-run, until SLURM has declared it down (30 s of silence, as Dask's
    worker-ttl): the job goes on without it (--no-kill, a worker step per node), the tasks it
    finished but had not staged are generated again, and the result is whole."""
    cfg = slow_config(shared, 1200)   # long enough to outlast the cut
    thread, done = submit_in_background(fresh, cfg, "--nodes", "3")
    wait_for_staged(shared / "run", 60)
    fresh.hosts("cut", "3")
    try:
        wait_for(lambda: "down" in fresh.slurm("sinfo", "-h", "-n", "node3", "-o", "%T") or not thread.is_alive(),
                 "SLURM to declare node3 down", timeout=300, step=1)
    finally:
        fresh.hosts("mend", "3")
    log = assert_complete(shared, cfg, finished(thread, done))
    assert "on 3 node(s)" in log


def test_a_node_crashes(fresh, shared):
    """Every process of node3 killed and its scratch gone: the run finishes on the other two."""
    cfg = slow_config(shared)
    thread, done = submit_in_background(fresh, cfg, "--nodes", "3")
    wait_for_staged(shared / "run", 60)
    fresh.hosts("crash", "3")
    assert not fresh.on_node(3, "pass").returncode == 0   # gone
    assert_complete(shared, cfg, finished(thread, done))


def test_the_first_node_crashes_then_a_resubmit_resumes(fresh, shared):
    """node1 (scheduler and driver) crashes: the job fails and the merge never runs; submitting
    again, on the nodes left, resumes from what was staged and completes the run."""
    cfg = slow_config(shared)
    thread, done = submit_in_background(fresh, cfg, "--nodes", "3")
    wait_for_staged(shared / "run", 60)
    fresh.hosts("crash", "1")
    r = finished(thread, done)
    assert r.returncode == 1 and "did not complete" in r.stderr, r.stdout + r.stderr
    staged = RunDir(shared / "run").staged_tasks()
    assert 60 <= len(staged) < unidask.load_config(cfg).n_tasks
    r = cli("submit", cfg, "--nodes", "2", "--time", "00:10:00", "--wait", cwd=shared, env=fresh.env)
    log = assert_complete(shared, cfg, r)
    assert re.search(rf"resume: {len(staged)} of 600 tasks already staged", log), log[-3000:]


def test_a_partition_between_two_nodes(fresh, shared):
    """node2 and node3 cannot reach each other for the whole run, while both reach node1 (the
    scheduler) and the login host: unidask's workers never need each other, so nothing is lost."""
    cfg = slow_config(shared)
    fresh.hosts("partition", "2", "3")
    try:
        unreachable = fresh.on_node(2, "import socket; socket.create_connection(('10.77.0.13', 17001), 3)")
        assert unreachable.returncode != 0 and "TimeoutError" in unreachable.stderr
        log = assert_complete(shared, cfg, cli("submit", cfg, "--nodes", "3", "--time", "00:10:00", "--wait",
                                               cwd=shared, env=fresh.env))
    finally:
        fresh.hosts("partition")
    assert "on 3 node(s)" in log and "lost before their stage-out" not in log
