"""scheduler_file mode against a scheduler and workers started as separate `dask` processes, as a
job script starts them: the data is the same as in local mode and the unidask page is served."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import unidask

from conftest import merged_data, messages

pytestmark = pytest.mark.cluster   # every test here runs on a local cluster of worker processes

BIN = Path(sys.executable).parent


@pytest.fixture
def external_cluster(tmp_path):
    """`dask scheduler --preload unidask.preload` and two workers on two simulated nodes."""
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file),
                               "--preload", "unidask.preload"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    for node in ("cn1", "cn2"):
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
             "--nworkers", "1", "--host", "127.0.0.1", "--local-directory", str(tmp_path / node)],
            env={**env, "UNIDASK_NODE": node}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout="60s") as c:
        c.wait_for_workers(2, timeout=60)
    yield sched_file
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        p.wait(30)


def test_scheduler_file_mode(config, tmp_path, external_cluster):
    spec = config(run={"count": 3000, "task_size": 100},
                  cluster={"mode": "scheduler_file", "scheduler_file": str(external_cluster),
                           "security": "none"})   # this scheduler speaks plain TCP
    with messages() as lines:
        result = unidask.run(spec)
    assert any(line.startswith("warning: cluster.security = 'none'") for line in lines)
    assert result.merged.complete and set(result.per_node) == {"cn1", "cn2"}
    page = next(line.split(": ", 1)[1] for line in lines if line.startswith("unidask page: "))
    assert any(line.startswith("from your machine: ssh -N -L ") for line in lines)
    with urllib.request.urlopen(page + "/json", timeout=10) as r:
        figures = json.loads(r.read())
    assert figures["written"] == 3000 and set(figures["nodes"]) == {"cn1", "cn2"}
    with urllib.request.urlopen(page, timeout=10) as r:
        assert r.status == 200

    local = config("local.toml", run={"count": 3000, "task_size": 100, "run_dir": str(tmp_path / "local-run")})
    assert merged_data(result.merged.out) == merged_data(unidask.run(local).merged.out)


def test_a_scheduler_file_that_never_appears_ends_the_run(config, tmp_path, capsys):
    from conftest import run_main, write_config

    missing = tmp_path / "never" / "scheduler.json"
    cfg = write_config(tmp_path / "c.toml", cluster={"mode": "scheduler_file", "scheduler_file": str(missing),
                                                     "security": "none", "worker_timeout": 3})
    code, out, err = run_main("run", cfg, capsys=capsys)
    assert code == 1 and f"unidask: error: no scheduler file {missing} after 3 s" in err, err
    assert err.count("unidask: error:") == 1


def test_a_scheduler_without_workers_ends_the_run(config, tmp_path, capsys):
    """A scheduler whose workers never come (their jobs died, a wrong interface): the run says what
    it waits for, and ends after cluster.worker_timeout with one line, resumable."""
    from conftest import run_main, write_config

    sched_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cfg = write_config(tmp_path / "c.toml", cluster={"mode": "scheduler_file", "scheduler_file": str(sched_file),
                                                         "security": "none", "worker_timeout": 15})
        code, out, err = run_main("run", cfg, capsys=capsys)
        assert code == 1 and "unidask: error: no worker for " in err and "(cluster.worker_timeout)" in err, err
        assert "waiting: no task finished for " in err and "0 worker(s)" in err
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("content,why", [
    ("garbage", "not JSON: Expecting value"), ("[]", "not a JSON object"),
    ('{"address": 5}', "its address is 5, not PROTOCOL://HOST:PORT"),
    ('{"address": "tcp://127.0.0.1:1"}', "the scheduler at tcp://127.0.0.1:1 does not speak TLS"),
    ("fifo", "a FIFO, not a regular file"),
    ('{"address": "tls://127.0.0.1:1"}', "cannot reach the scheduler at tls://127.0.0.1:1 (named by ")])
def test_a_scheduler_file_of_no_scheduler_is_one_line(config, tmp_path, capsys, monkeypatch, content, why):
    """A scheduler file that is damaged, not a file, of a plain-TCP scheduler where the run wants
    TLS, or left by a scheduler that is gone: one line naming it and what is wrong, never a
    traceback nor a wait without end (a FIFO would block a read)."""
    from unidask.execute import cluster

    from conftest import run_main, write_config

    monkeypatch.setattr(cluster, "SCHEDULER_FILE_GRACE", 0.5)
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)
    path = tmp_path / "scheduler.json"
    if content == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(content)
    cfg = write_config(tmp_path / "c.toml", cluster={"mode": "scheduler_file", "scheduler_file": str(path),
                                                     "worker_timeout": 30})
    code, out, err = run_main("run", cfg, capsys=capsys)
    last = err.splitlines()[-1]
    assert code == (1 if "cannot reach" in why else 2) and "Traceback" not in err, err
    assert last.startswith("unidask: error: ") and str(path) in last and why in last, err
