"""A run on 32 simulated nodes, as a cluster run is: a shard per node, periodic stage-outs, a
Ctrl-C, a resume, a merge; its data byte for byte a one-node run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import unidask
from unidask import RunDir

from conftest import REPO, merged_data, wait_for, write_config
from test_faults import staged_tasks

pytestmark = pytest.mark.cluster   # every test here runs on a local cluster of worker processes

NODES = 32


def test_thirty_two_nodes_stage_resume_and_merge_to_the_bytes_of_one(tmp_path):
    (tmp_path / "many").mkdir(), (tmp_path / "one").mkdir()
    # 480 tasks of a quarter second (asleep, so 32 workers share 2 cores without waiting for them)
    run = {"count": 48_000, "task_size": 100}
    generator = {"kind": "plugin_generators:slow_haar", "dim": 4, "delay": 0.25}
    cfg = write_config(tmp_path / "many" / "c.toml", run=run, generator=generator,
                       storage={"stage_every": 0.5}, cluster={"nodes": NODES, "workers": 1})
    spec = unidask.load_config(cfg)
    cmd = [sys.executable, "-m", "unidask.cli", "run", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}   # the workers import the generator
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=env)
    try:
        wait_for(lambda: len(staged_tasks(spec.run_dir)) >= 10, "10 staged tasks", timeout=300)   # a periodic stage-out
        os.killpg(driver.pid, signal.SIGINT)
        _, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 3 and "--resume" in err, err
    assert len(staged_tasks(spec.run_dir)) < spec.n_tasks

    again = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    shards = RunDir(spec.run_dir).staged_shards()
    assert {p.name.split("-")[0] for p in shards} == {f"node{k}" for k in range(1, NODES + 1)}
    assert len(shards) > NODES   # segments: stage-outs as it ran, not only the final ones

    one = write_config(tmp_path / "one" / "c.toml", run=run, generator=generator,
                       cluster={"nodes": 1, "workers": 8})
    reference = unidask.run(unidask.load_config(one))
    assert merged_data(spec.run_dir / "t.db") == merged_data(reference.merged.out)
