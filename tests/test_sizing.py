"""run.task_size = "auto": the size chosen keeps the scheduler under its load and every worker
busy, is recorded, and is reused on resume whatever the workers, so the bytes stay the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hypothesis import given, settings, strategies as st

import unidask
from unidask import RunDir
from unidask.spec import plan
from unidask.cost import sizing

from conftest import merged_data, messages, run_main, write_config

ROUND = {m * 10 ** e for e in range(12) for m in (1, 2, 5)}


@settings(max_examples=500, deadline=None)
@given(count=st.integers(1, 10**12), seconds=st.floats(1e-8, 10.0), unitary_bytes=st.integers(8, 1 << 31),
       workers=st.integers(1, 100_000))
def test_auto_size_keeps_the_scheduler_under_its_load_and_every_worker_busy(count, seconds, unitary_bytes,
                                                                             workers):
    size = sizing.choose(count, seconds, unitary_bytes, workers)
    assert 1 <= size <= count and (size in ROUND or size == count)
    if size == 1:
        return
    # never fewer tasks than a few per worker, nor a task's array beyond the bound
    assert plan.n_tasks(count, size) >= sizing.TASKS_PER_WORKER * workers
    assert size * unitary_bytes <= sizing.TASK_BYTES
    bounded = min(count / (sizing.TASKS_PER_WORKER * workers), sizing.TASK_BYTES / unitary_bytes)
    if size * 10 > bounded:   # bounded by the workers or memory: the largest round size under it
        return
    # otherwise long enough: the scheduler at most at SCHEDULER_LOAD, each task TASK_SECONDS or more
    task = size * seconds
    assert task >= sizing.TASK_SECONDS * (1 - 1e-9)
    assert workers * sizing.SCHEDULER_CPU / task <= sizing.SCHEDULER_LOAD * (1 + 1e-9)


def test_round_numbers():
    assert [sizing.round_number(x, up=True) for x in (0.3, 1, 1.5, 3, 20, 21, 999, 1001)] == \
        [1, 1, 2, 5, 20, 50, 1000, 2000]
    assert [sizing.round_number(x, up=False) for x in (0.3, 1.9, 3, 20, 49, 999, 1001)] == \
        [1, 1, 2, 20, 20, 500, 1000]


def test_a_bad_task_size_is_named_in_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", run={"task_size": "big"})
    code, out, err = run_main("run", cfg, capsys=capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith('run.task_size must be an integer from 1 to 9,007,199,254,740,992 or "auto", '
                                                               "got 'big'")


@pytest.mark.cluster
def test_auto_size_is_recorded_and_a_resume_on_other_workers_reuses_it(tmp_path):
    """Two simulated nodes choose the size and stage; a shard is lost; the resume on one node of
    one worker reuses the recorded size (no calibration) and merges to the bytes of a run with
    that size fixed."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cfg = write_config(tmp_path / "a" / "c.toml", run={"count": 20_000, "task_size": "auto"})
    with messages() as lines:
        first = sizing.resolve(unidask.load_config(cfg))
    size = first.task_size
    assert isinstance(size, int) and any("run.task_size = auto" in line for line in lines)
    assert 1 < size <= 20_000 // (sizing.TASKS_PER_WORKER * 2)   # 2 nodes of 1 worker
    result = unidask.run(first, merge=False)
    rd = RunDir(first.run_dir)
    assert json.loads(rd.record_path.read_text())["spec"]["run"]["task_size"] == size
    lost = max(map(Path, result.shards), key=lambda p: p.stat().st_size)
    lost.unlink()
    assert rd.staged_tasks() and len(rd.staged_tasks()) < first.n_tasks

    with messages() as lines:
        again = sizing.resolve(unidask.load_config(cfg, {"cluster.nodes": 1, "cluster.workers": 1}))
    assert again.task_size == size and not any("run.task_size = auto" in line for line in lines)
    resumed = unidask.run(again, resume=True)
    assert resumed.merged.complete and resumed.skipped_tasks > 0

    fixed = write_config(tmp_path / "b" / "c.toml", run={"count": 20_000, "task_size": size})
    reference = unidask.run(unidask.load_config(fixed))
    assert merged_data(resumed.merged.out) == merged_data(reference.merged.out)


def test_submit_and_plan_size_auto_tasks_for_the_clusters_nodes(tmp_path, capsys):
    """A local-mode config submitted to 64 nodes of 8 workers: the job's spec leaves the size to
    the job, which sizes it for those 512 workers (a few tasks each), not for this machine's
    cores; the plan for --nodes 64 --cores 8 does the same."""
    cfg = write_config(tmp_path / "c.toml", run={"count": 10**7, "task_size": "auto"},
                       cluster={"nodes": 64, "workers": 8})
    code, out, _ = run_main("submit", cfg, "--dry-run", capsys=capsys)
    assert code == 0
    (tmp_path / "spec.json").write_text(out.split(".json ----\n", 1)[1])
    assert json.loads((tmp_path / "spec.json").read_text())["run"]["task_size"] == "auto"
    # as the generation job's first node reads it (generate.sbatch)
    job = unidask.load_config(tmp_path / "spec.json", {"cluster.mode": "scheduler_file",
                                                       "cluster.scheduler_file": str(tmp_path / "s.json")})
    assert sizing.parallel(job) == 512
    assert sizing.resolve(job).n_tasks >= sizing.TASKS_PER_WORKER * 512
    code, out, _ = run_main("plan", cfg, "--nodes", "64", "--cores", "8", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["tasks"] >= sizing.TASKS_PER_WORKER * 512
    here = sizing.resolve(unidask.load_config(cfg))   # a local run of it: this machine's cores
    assert here.n_tasks < sizing.TASKS_PER_WORKER * 512


def test_the_calibration_is_remembered_per_machine_and_generator(config, monkeypatch, tmp_path):
    """A run's "auto" task size measures the generator once on a machine, then reuses the figures
    (its start waits for no calibration); another generator, an old or unreadable cache are
    measured again, without a word of the cache's trouble."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = config(run={"count": 100_000, "task_size": "auto"})
    first = sizing.remembered(spec)
    again = sizing.remembered(spec)
    assert first[2] == "here" and again[:2] == first[:2] and again[2].startswith("on ")
    assert sizing.remembered(config(run={"count": 100_000, "task_size": "auto"}, generator={"dim": 8}))[2] == "here"
    path = tmp_path / "cache" / "unidask" / "calibration.json"
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    known = json.loads(path.read_text())
    assert len(known) == 2
    known = {k: [v[0], v[1], v[2] - sizing.REMEMBER_S - 1] for k, v in known.items()}   # a week old
    path.write_text(json.dumps(known))
    assert sizing.remembered(spec)[2] == "here" and sizing.remembered(spec)[2].startswith("on ")
    for damaged in ("{not json", "[1, 2]", json.dumps({k: "x" for k in known})):
        path.write_text(damaged)
        assert sizing.remembered(spec)[2] == "here"
    path.unlink()
    os.mkfifo(path)   # never opened: it would block
    assert sizing.remembered(spec)[2] == "here"
