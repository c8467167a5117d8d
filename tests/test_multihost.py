"""The SLURM job on separate hosts (cluster/hosts.sh under cluster/start.sh): nodes with their own
addresses, names and scratch, no default route, reached over bridged networks from a login host.
The scheduler must advertise an address every node can reach, found with no setting at all."""

from __future__ import annotations

import os
import subprocess

import pytest

import unidask
from unidask import RunDir

from conftest import REPO, cli, config_in, merged_data

pytestmark = [pytest.mark.slurm, pytest.mark.hosts]
DIR = "/var/tmp/unidask-slurm-hosts-tests"


@pytest.fixture(scope="module")
def slurm_hosts():
    """A 3-node SLURM whose nodes are separate hosts; skipped where that cannot run (not root)."""
    env = {**os.environ, "UNIDASK_SLURM_DIR": DIR, "UNIDASK_SLURM_HOSTS": "1"}
    r = subprocess.run([str(REPO / "cluster" / "start.sh"), "3", "2"], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-2000:]
    yield {"SLURM_CONF": f"{DIR}/slurm.conf"}
    subprocess.run([str(REPO / "cluster" / "stop.sh")], env=env, timeout=120)


def test_submit_on_three_separate_hosts(slurm_hosts, shared):
    cfg = config_in(shared, "gen", run={"count": 6000, "task_size": 200, "run_dir": str(shared / "run")},
                    cluster={"nodes": 3})
    r = cli("submit", cfg, "--nodes", "3", "--time", "00:05:00", "--wait", cwd=shared, env=slurm_hosts)
    assert r.returncode == 0, r.stdout + r.stderr
    shards = RunDir(shared / "run").staged_shards()
    assert sorted({p.name.split("-")[0] for p in shards}) == ["node1", "node2", "node3"]   # all three wrote
    log = next((shared / "run" / "logs").glob("unidask-t-*.out")).read_text()
    assert "on 3 node(s)" in log
    # the scheduler at node1's own address (no default route there: Dask alone would pick 127.0.0.1):
    # the dashboard link is the scheduler's, and the ssh tunnel goes through the login host
    assert "unidask page: http://10.77.0.11:8787/unidask" in log and "-L 8787:10.77.0.11:8787" in log
    local = unidask.load_config(cfg, {"cluster.mode": "local", "run.run_dir": str(shared / "local"),
                                      "cluster.dashboard_address": "127.0.0.1:0", "cluster.nodes": 2})
    assert merged_data(shared / "run" / "t.db") == merged_data(unidask.run(local).merged.out)
