"""The SLURM path against a real SLURM (cluster/start.sh: munge, slurmctld, 2 slurmd, a scratch dir
per job and node as $TMPDIR, wiped when the job ends): `unidask submit`, a job ended by its walltime
and resubmitted, `mode = "slurm"`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unidask
from unidask import RunDir

from conftest import (REPO, SLURM_DIR, cli, config_in, merged_data, slow_haar_reference, unitarity_error,
                      write_config)


def test_dry_run_prints_both_scripts(tmp_path):
    cfg = write_config(tmp_path / "c.toml", cluster={"nodes": 3, "walltime": "00:20:00", "workers": 2,
                                                     "job_extra_directives": ["--qos=high"]})
    r = subprocess.run([sys.executable, "-m", "unidask.cli", "submit", str(cfg), "--dry-run", "--time", "00:10:00",
                        "--partition", "short", "--sbatch", "--comment=two words; rm -rf ~", "--set", "run.seed=9"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    gen, rest = r.stdout.split("# ---- merge.sbatch ----")
    merge, spec = rest.split(f"# ---- {tmp_path / 'run' / 'jobs'}/spec-")
    # every job parameter from the config's [cluster], the command line's over it, values quoted
    for line in ("#SBATCH --nodes=3", "#SBATCH --time=00:10:00", "#SBATCH --partition=short", "#SBATCH --qos=high",
                 "#SBATCH --comment='two words; rm -rf ~'", "#SBATCH --no-kill", "#SBATCH --signal=B:USR1@300",
                 "srun --overlap", "distributed.cli.dask_worker", "--preload unidask.preload",
                 f"export UNIDASK_PYTHON={sys.executable}"):
        assert line in gen, line
    assert "#SBATCH --nodes=1" in merge and "unidask.cli merge" in merge and "#SBATCH --qos=high" in merge
    # the jobs read the resolved spec, overrides and all, not the config
    recorded = json.loads(spec.split("----\n", 1)[1])
    assert recorded["run"]["seed"] == 9 and recorded["cluster"]["workers"] == 2
    assert recorded["cluster"]["walltime"] == "00:10:00" and recorded["storage"]["local_dir"] == str(tmp_path / "local")
    assert not (tmp_path / "run").exists()                  # nothing submitted, nothing created
    for bad, said in ((["--time", "soon"], "'soon'"), (["--sbatch", "qos=high"], "'qos=high'"),
                      (["--sbatch", "--qos=a\n#SBATCH --b"], "one sbatch option on one line")):
        r = subprocess.run([sys.executable, "-m", "unidask.cli", "submit", str(cfg), *bad], capture_output=True,
                           text=True)
        assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_job_parameters_default_from_the_config(tmp_path):
    cfg = write_config(tmp_path / "c.toml", cluster={"nodes": 1})
    r = subprocess.run([sys.executable, "-m", "unidask.cli", "submit", str(cfg), "--dry-run"], capture_output=True,
                       text=True)
    assert "#SBATCH --nodes=1\n" in r.stdout and "#SBATCH --time=01:00:00" in r.stdout   # unidask.yaml's


def test_extra_directives_reach_sbatch(slurm, shared):
    """sbatch reads a quoted value as one value: the job's comment keeps its spaces (the job is
    held an hour by --begin, so it can be looked at, then cancelled)."""
    cfg = config_in(shared, "gen", run={"run_dir": str(shared / "run")})
    r = cli("submit", cfg, "--sbatch", "--comment=two words", "--sbatch", "--begin=now+3600", cwd=shared)
    assert r.returncode == 0, r.stderr
    jobs = re.search(r"generation job (\d+) and merge job (\d+)", r.stdout).groups()
    try:
        shown = subprocess.run(["squeue", "-h", "-o", "%k", "-j", jobs[0]], capture_output=True, text=True).stdout
        assert shown.strip() == "two words"
    finally:
        subprocess.run(["scancel", *jobs])


def test_start_twice_and_after_a_stale_stop(slurm):
    env = {**os.environ, "UNIDASK_SLURM_DIR": SLURM_DIR}
    start = [str(REPO / "cluster" / "start.sh"), "2", "2"]
    assert subprocess.run(start, env=env, capture_output=True, timeout=300).returncode == 0   # again
    # a stale stop: the controller killed behind the scripts' back, its pid file left behind
    ctld = int(Path(SLURM_DIR, "run", "slurmctld.pid").read_text())
    os.kill(ctld, 9)
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    nodes = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True)
    assert sorted(set(nodes.stdout.split())) == ["node1", "node2"]


def test_submit_and_wait(slurm, shared):
    cfg = config_in(shared, "gen", run={"count": 4000, "task_size": 200, "run_dir": str(shared / "run")})
    r = cli("submit", cfg, "--nodes", "2", "--time", "00:05:00", "--wait", cwd=shared)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted generation job" in r.stdout
    shards = RunDir(shared / "run").staged_shards()
    assert sorted({p.name.split("-")[0] for p in shards}) == ["node1", "node2"]   # both nodes wrote
    db = shared / "run" / "t.db"          # run.name = "t" in the test configs
    with unidask.Dataset(db) as ds:
        assert len(ds) == 4000 and unitarity_error(ds[0:4000]) < 1e-10
    local = unidask.load_config(cfg, {"run.run_dir": str(shared / "local"),
                                      "cluster.dashboard_address": "127.0.0.1:0"})
    assert merged_data(db) == merged_data(unidask.run(local).merged.out)
    logs = list((shared / "run" / "logs").glob("unidask-t-*.out"))
    assert logs and "unidask page: http://" in logs[0].read_text() and "ssh -N -L " in logs[0].read_text()


def test_submit_refused_by_sbatch_is_one_line(slurm, shared):
    cfg = config_in(shared, "gen", run={"run_dir": str(shared / "run")})
    r = cli("submit", cfg, "--partition", "nope", cwd=shared)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("unidask: error: sbatch refused generate-")
    assert "invalid partition specified: nope" in r.stderr.lower() and "Traceback" not in r.stderr


def test_a_run_longer_than_two_walltimes_requeues_itself_to_the_end(slurm, shared):
    """About 100 s of work (660 tasks of 0.3 s on 2 workers) under a walltime of one minute, less
    a start and stop_before = 10: no job can do more than ~42 s of it, so it takes three jobs or
    more. One submit: the job requeues itself (the same job id) walltime after walltime, and the
    merge job, which waits on that id, merges the whole run, byte-identical."""
    cfg = config_in(shared, "slow", run={"count": 6600, "task_size": 10, "run_dir": str(shared / "run")},
                    generator={"kind": "plugin_generators:slow_haar", "delay": 0.3},
                    cluster={"stop_before": 10, "nodes": 2, "workers": 1, "max_resubmits": 30})
    spec = unidask.load_config(cfg)
    # each job of at most a minute, and SLURM holds a requeued job 10 s (cluster/start.sh)
    r = subprocess.run([sys.executable, "-m", "unidask.cli", "submit", str(cfg), "--time", "00:01:00", "--wait"],
                       capture_output=True, text=True, cwd=shared, timeout=1800,
                       env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"submitted generation job (\d+)", r.stdout)[1]
    log = (shared / "run" / "logs" / f"unidask-t-{job}.out").read_text()
    requeued = log.count("requeueing job")
    assert requeued >= 2, log                    # three walltimes or more, from one submit
    assert "stopped by SIGUSR1" in log and f"requeued {requeued} time(s) of at most 30" in log, log
    assert merged_data(shared / "run" / "t.db") == slow_haar_reference(spec)


def test_slurm_mode(slurm, shared):
    cfg = config_in(shared, "jq", run={"count": 3000, "task_size": 100, "run_dir": str(shared / "run")},
                    cluster={"mode": "slurm", "nodes": 2, "workers": 1})
    spec = unidask.load_config(cfg)
    result = unidask.run(spec)
    assert result.merged.complete and len(result.shards) >= 1
    local = unidask.load_config(cfg, {"cluster.mode": "local", "run.run_dir": str(shared / "local")})
    assert merged_data(result.merged.out) == merged_data(unidask.run(local).merged.out)
    assert list((shared / "run" / "logs").glob("*.err"))   # dask-jobqueue's worker job logs
    jobs = "".join(p.read_text() for p in (shared / "run" / "logs").glob("*.err"))
    assert "tls://" in jobs and (shared / "run" / "tls" / "key.pem").exists()   # TLS by default


def test_slurm_mode_fails_when_worker_jobs_die(slurm, shared):
    import dask.config

    cfg = config_in(shared, "dies", run={"count": 300, "task_size": 100, "run_dir": str(shared / "run")},
                    cluster={"mode": "slurm", "nodes": 1, "workers": 1})
    spec = unidask.load_config(cfg)
    with dask.config.set({"jobqueue.slurm.job-script-prologue": ["exit 1"]}):   # every job dies at start
        with pytest.raises(unidask.RunError, match="ended before any worker joined"):
            unidask.run(spec)


def test_node_address_reaches_beyond_loopback():
    from unidask.core.errors import InputError
    from unidask.execute.network import node_address

    assert node_address("lo") == "127.0.0.1"                     # cluster.interface: that one's
    assert node_address() != "127.0.0.1"                         # this machine has a way out
    with pytest.raises(InputError, match="cluster.interface 'nope0': no IPv4 address"):
        node_address("nope0")


JOBQUEUE_YAML = """\
jobqueue:
  slurm:
    memory: 64GB
    walltime: '12:00:00'
    processes: 4
    cores: 16
    queue: long
    account: proj
    job-extra-directives: ['--qos=big']
"""

RENDER = """\
import json, sys
import unidask
from dask_jobqueue import SLURMCluster
from unidask.execute import cluster
spec = unidask.load_config(sys.argv[1], json.loads(sys.argv[2]))
with SLURMCluster(**cluster.worker_jobs(spec)) as jobs:
    print(jobs.job_script())
"""


def worker_job_script(tmp_path: Path, cfg: Path, overrides: dict, dask_config: Path) -> str:
    """slurm mode's worker job script as dask-jobqueue renders it, in a process whose Dask reads
    its config from ``dask_config`` (as ~/.config/dask would be read)."""
    r = subprocess.run([sys.executable, "-c", RENDER, str(cfg), json.dumps(overrides)], capture_output=True,
                       text=True, env={**os.environ, "DASK_CONFIG": str(dask_config)}, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_users_jobqueue_settings_reach_the_worker_jobs(tmp_path):
    """A user's ~/.config/dask/jobqueue.yaml counts in slurm mode, except where the run's
    [cluster] states a value: then the run's wins. Workers keep one thread each."""
    (tmp_path / "dask").mkdir()
    (tmp_path / "dask" / "jobqueue.yaml").write_text(JOBQUEUE_YAML)
    cfg = write_config(tmp_path / "c.toml", cluster={"mode": "slurm", "security": "none"})
    theirs = worker_job_script(tmp_path, cfg, {"cluster.workers": "auto"}, tmp_path / "dask")
    for line in ("#SBATCH --mem=60G", "#SBATCH -t 12:00:00", "#SBATCH -p long", "#SBATCH -A proj",
                 "#SBATCH --qos=big", "#SBATCH --cpus-per-task=16", "--nworkers 4", "--nthreads 1",
                 "--preload unidask.execute.worker"):
        assert line in theirs, (line, theirs)
    ours = worker_job_script(tmp_path, cfg, {"cluster.workers": 2, "cluster.memory": "8GB",
                                             "cluster.walltime": "02:00:00", "cluster.partition": "short"},
                             tmp_path / "dask")
    for line in ("#SBATCH --mem=8G", "#SBATCH -t 02:00:00", "#SBATCH -p short", "#SBATCH -A proj",
                 "#SBATCH --qos=big", "--nworkers 2", "--nthreads 1"):
        assert line in ours, (line, ours)
    assert "--mem=60G" not in ours and "12:00:00" not in ours
    # without any jobqueue.yaml: unidask's fallbacks, one worker
    (tmp_path / "none").mkdir()
    bare = worker_job_script(tmp_path, cfg, {"cluster.workers": "auto"}, tmp_path / "none")
    assert "#SBATCH --mem=4G" in bare and "--nthreads 1" in bare and "-p " not in bare
    assert "--nworkers" not in bare or "--nworkers 1 " in bare


def test_dask_jobqueue_words_point_to_unidask_s(tmp_path):
    for key, ours in (("queue", "partition"), ("processes", "workers"), ("job_extra", "job_extra_directives")):
        cfg = write_config(tmp_path / "c.toml", cluster={key: "x"})
        r = cli("config", cfg)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"unknown key cluster.{key}: did you mean cluster.{ours}?" in r.stderr, r.stderr


def test_submit_warns_of_idle_cores(slurm, tmp_path):
    """Nodes of more cores than cluster.workers: submit says so, as plan does (dry run too)."""
    cfg = write_config(tmp_path / "c.toml", cluster={"workers": 1})
    r = cli("submit", cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "cluster.workers = 1 runs 1 worker process(es) on each node's" in r.stderr, r.stderr
    cfg = write_config(tmp_path / "c.toml", cluster={"workers": "auto"})
    r = cli("submit", cfg, "--dry-run")
    assert r.returncode == 0 and "worker process(es) on each node" not in r.stderr, r.stderr
