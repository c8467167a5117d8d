"""The driver's logic on an in-process Dask cluster (one worker thread in this process: real
scheduler, real futures, real shards on disk, no worker processes to start): the quick layer of
what `tests/test_run.py` checks end to end."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from unidask import RunDir
from unidask.core.errors import InputError, RunError
from unidask.execute.driver import Driver, RunResult
from unidask.execute.window import Window
from unidask.spec import plan
from unidask.store import shard
from unidask.store.runlock import run_lock


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \
            Client(c) as client:
        yield client


@pytest.fixture
def driver(client, config):
    """A driver of ``spec`` on the in-process cluster, its run dir made and locked."""
    drivers = []

    def make(**sections) -> Driver:
        spec = config(**sections)
        rd = RunDir(spec.run_dir)
        rd.create()
        rd.prepare(spec, False)
        lock = run_lock(rd.lock_path)
        drivers.append(lock)
        d = Driver(client, spec, rd, shard.new_attempt(), RunResult(spec.run_dir), set(), lock.__enter__())
        return d

    yield make
    for lock in drivers:
        lock.__exit__(None, None, None)
    shard.close_shards()


def test_every_task_runs_once_within_the_window(client, config):
    """At most the window's tasks in flight, refilled as they finish; each task's summary once."""
    spec = config(run={"count": 2000, "task_size": 100})
    window = Window(client, spec, shard.new_attempt(), range(spec.n_tasks), size=4)
    assert len(window) == 4
    done, most = [], len(window)
    while window:
        for future, summary in window.wait(timeout=60):
            if (task := window.finished(future)) is not None:
                done.append(task)
                assert summary["count"] == spec.task_count(task)
            most = max(most, len(window))
    assert sorted(done) == list(range(spec.n_tasks)) and most <= 4
    shard.close_shards()


def test_a_failing_task_names_itself(client, config):
    """A user's generator that raises: the task's error, one line naming the task."""
    spec = config(run={"count": 200, "task_size": 100}, generator={"kind": "plugin_generators:raises"})
    window = Window(client, spec, shard.new_attempt(), [0, 1], size=2)
    with pytest.raises((RunError, InputError), match=r"task [01]|ZeroDivisionError|division"):
        while window:
            for future, _ in window.wait(timeout=60):
                window.finished(future)
    window.cancel()


def test_the_driver_generates_stages_and_accounts(driver):
    """generate() then the final stage-out: every task staged once, the counts the run reports,
    periodic stage-outs on the way (every task's completion wakes the loop)."""
    d = driver(run={"count": 3000, "task_size": 100}, storage={"stage_every": 0.001})
    tasks = plan.todo(d.spec, set())
    d.generate(tasks)
    finals = d.final_stage_out()
    rd = RunDir(d.spec.run_dir)
    assert rd.staged_tasks() == set(range(d.spec.n_tasks))
    assert d.result.written == 3000 and sum(d.result.per_node.values()) == 3000
    assert finals and len(rd.read_stages()) > len(finals)   # periodic ones before the final


def test_a_quick_test_may_not_start_worker_processes(config):
    """The quick layer's guard (conftest.py): a test not marked ``cluster`` that starts a local
    cluster of worker processes fails, saying how to mark it."""
    import unidask

    with pytest.raises(AssertionError, match="mark it @pytest.mark.cluster"):
        unidask.run(config(run={"count": 200, "task_size": 100}))
