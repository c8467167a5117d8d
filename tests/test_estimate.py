"""unidask plan: its estimates against a real run on this machine, and its warnings."""

from __future__ import annotations

import json

import pytest

import unidask
from unidask import RunDir

from conftest import run_main, write_config

pytestmark = pytest.mark.cluster   # every test here runs on a local cluster of worker processes

CIRCUITS = {"kind": "circuit", "qubits": 3, "depth": 10, "gate_set": ["h", "s", "t", "cx"]}


def test_plan_matches_a_real_run(tmp_path, capsys):
    """The plan's tasks, workers, staged files and merged bytes are what a run of the config does
    (the bytes within 30%: the model counts rows, not the b-tree's slack). Its duration is a
    measurement of this machine, so the benchmark compares it (`python -m benchmarks --only
    plan`: wall plan/run), not a test."""
    cfg = write_config(tmp_path / "c.toml", run={"count": 4000, "task_size": 100}, generator=CIRCUITS)
    code, out, _ = run_main("plan", cfg, "--json", capsys=capsys)
    assert code == 0
    plan = json.loads(out)
    result = unidask.run(unidask.load_config(cfg))
    size = result.merged.out.stat().st_size
    assert (plan["tasks"], plan["workers"], plan["warnings"]) == (40, 2, [])
    assert abs(plan["data_bytes"] / size - 1) < 0.3, (plan["data_bytes"], size)
    assert plan["shards"] == len(RunDir(result.merged.out.parent).staged_shards())
    assert plan["wall_seconds"] > 0


def test_plan_warns_before_the_queue_time_is_spent(tmp_path, capsys):
    cfg = write_config(tmp_path / "h.toml", run={"count": 10**9, "task_size": 1000},
                       cluster={"workers": "auto"}, storage={"stage_every": 60})
    code, out, _ = run_main("plan", cfg, "--nodes", "1000", "--cores", "64", capsys=capsys)
    assert code == 0 and "workers     64,000 (1,000 node(s) x 64)" in out
    assert "warning: scheduler-bound" in out and "set run.task_size >=" in out
    assert "staged files of" in out and "a longer storage.stage_every" in out
    code, out, _ = run_main("plan", cfg, "--nodes", "1000", "--cores", "64", "--set", "run.count=1000000",
                            capsys=capsys)
    assert "fewer than 4 each" in out
    code, out, err = run_main("plan", tmp_path / "missing.toml", capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "missing.toml" in err


def test_plan_says_where_its_figures_come_from(tmp_path, capsys):
    """A given generator cost is not called measured, and a fixed cluster.workers that does not
    match the --cores asked about is named (a user planning 64-core nodes with workers = 1 would
    otherwise pay for 64 cores and use one)."""
    cfg = write_config(tmp_path / "c.toml", run={"count": 20000, "task_size": 100})
    code, out, _ = run_main("plan", cfg, "--nodes", "10", "--cores", "64", "--seconds-per-unitary", "1e-5",
                            capsys=capsys)
    assert code == 0 and "(10.0 µs a unitary, as given)" in out and "workers     10 (10 node(s) x 1)" in out
    assert 'warning: cluster.workers = 1 runs 1 worker process(es) on each node\'s 64 cores: ' \
           'cluster.workers = "auto" runs one per core' in out, out
    code, out, _ = run_main("plan", cfg, "--seconds-per-unitary", "0.5", capsys=capsys)
    assert "50 s each (0.5 s a unitary, as given)" in out, out      # not 500,000.0 µs
    code, out, _ = run_main("plan", cfg, "--cores", "2", "--set", "cluster.workers=4", capsys=capsys)
    assert "µs a unitary, measured here)" in out
    assert "cluster.workers = 4 on nodes of 2 core(s): the processes share the cores, and each task " \
           "takes 2.0x the time it takes alone" in out, out
    plans = {}
    for workers in ("4", "2", '"auto"'):
        code, out, _ = run_main("plan", cfg, "--cores", "2", "--seconds-per-unitary", "1e-3", "--json",
                                "--set", f"cluster.workers={workers}", capsys=capsys)
        plans[workers] = json.loads(out)
        assert code == 0 and ("cluster.workers =" in out) == (workers == "4"), out
    # twice the workers on the same cores: each task twice as long, about the same duration
    assert plans["4"]["task_seconds"] == 2 * plans["2"]["task_seconds"] == pytest.approx(2 * 100 * 1e-3)
    assert plans["4"]["wall_seconds"] == pytest.approx(plans["2"]["wall_seconds"], rel=0.05)
    timing = ("workers", "task_seconds", "wall_seconds", "core_hours")
    assert [plans['"auto"'][k] for k in timing] == [plans["2"][k] for k in timing]
