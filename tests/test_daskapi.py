"""The distributed that is installed, whichever supported version: each call unidask makes outside
distributed's public API still works (``unidask/daskapi.py``), no other module makes one, and a
run of many workers stages every task (distributed 2025.5-2026.3 answered ``scheduler_info`` for
five workers only). CI runs this file on the oldest and the newest supported releases."""

from __future__ import annotations

import ast
from pathlib import Path

import distributed
import pytest
from distributed import Client, LocalCluster

import unidask
from unidask.core import daskapi

PACKAGE = Path(unidask.__file__).parent


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=7, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \
            Client(c) as client:
        client.wait_for_workers(7, timeout=60)
        yield client


def test_every_worker_is_seen(client):
    """More than the five workers distributed 2025.5-2026.3 answer for by default."""
    seen = daskapi.workers(client)
    assert len(seen) == 7, sorted(seen)
    assert all({"name", "last_seen", "nthreads"} <= set(w) for w in seen.values())


def _held(path: str) -> str:
    import os
    import time

    while os.path.exists(path):   # this test's event: the file removed
        time.sleep(0.01)
    return "done"


def test_a_completion_wakes_the_waiter(client, tmp_path):
    """next_completed returns [] when nothing finished within its timeout, and a finished task,
    with its result, once one has: the condition as_completed notifies still exists."""
    hold = tmp_path / "hold"
    hold.touch()
    completed = distributed.as_completed(with_results=True)
    future = client.submit(_held, str(hold), pure=False)
    completed.add(future)
    assert daskapi.next_completed(completed, timeout=0.2) == []
    hold.unlink()
    got = daskapi.next_completed(completed, timeout=300)   # the bound only a hang reaches
    assert got == [(future, "done")] and completed.is_empty()


def test_the_dashboard_calls_still_exist(client):
    """The page's hooks into Dask's dashboard: a route table, its template, the scheduler's view
    of running tasks, the handler class of Dask's HTTP routes."""
    from distributed.dashboard.scheduler import applications

    daskapi.dashboard_page("/unidask-probe", lambda scheduler, extra, doc: None)
    try:
        assert "/unidask-probe" in applications
    finally:
        del applications["/unidask-probe"]
    assert "simple.html" in daskapi.page_template().name
    running = client.run_on_scheduler(lambda dask_scheduler: daskapi.running_tasks(dask_scheduler))
    assert running == 0
    assert issubclass(daskapi.RequestHandler, __import__("tornado.web").web.RequestHandler)
    assert daskapi.address_host("tls://10.0.0.2:8786") == "10.0.0.2"
    assert daskapi.address_host("tcp://[::1]:8786") == "::1"


def test_workers_of_a_spec_cluster_start_and_a_failed_start_raises(tmp_path):
    """The local cluster's workers are started (and started again) through daskapi.start_workers,
    which must wait for them and raise where one cannot start."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with SpecCluster(workers={}, scheduler=scheduler) as cluster:
        cluster.worker_spec["w"] = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}}
        daskapi.start_workers(cluster)
        assert list(cluster.workers) == ["w"] and cluster.workers["w"].status.name == "running"
        # a worker that cannot start: its local directory is a file
        (tmp_path / "file").write_text("")
        cluster.worker_spec["bad"] = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1",
                                                                "local_directory": str(tmp_path / "file" / "x")}}
        with pytest.raises((RuntimeError, OSError)):
            daskapi.start_workers(cluster)


def imports_from_distributed(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distributed":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "distributed":
                    yield node.lineno, a.name, []


def test_no_private_distributed_name_outside_daskapi():
    """Only distributed's top-level public names, and no private attribute of anything that is not
    unidask's own, anywhere but daskapi.py."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "daskapi.py":
            continue
        tree = ast.parse(path.read_text())
        for line, module, names in imports_from_distributed(tree):
            if module != "distributed" or not set(names) <= set(distributed.__all__):
                bad.append(f"{path.name}:{line}: from {module} import {', '.join(names)}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


def test_the_private_name_check_can_fail(tmp_path):
    tree = ast.parse("from distributed.deploy.spec import SpecCluster\ncluster._correct_state()\n")
    assert list(imports_from_distributed(tree)) == [(1, "distributed.deploy.spec", ["SpecCluster"])]
    assert any(isinstance(n, ast.Attribute) and n.attr == "_correct_state" for n in ast.walk(tree))


@pytest.mark.cluster
def test_eight_workers_stage_every_task(config):
    """The run the version bug broke: 8 simulated nodes of one worker each, 400,000 U(4) in tasks
    of 10,000. Every final stage-out must reach every node: no task generated twice."""
    spec = config(run={"count": 400_000, "task_size": 10_000}, cluster={"nodes": 8, "workers": 1},
                  storage={"stage_every": 3600})
    result = unidask.run(spec)
    assert result.redone == [], f"lost before their stage-out: {result.redone}"
    assert result.written == 400_000
    assert len(result.per_node) == 8, result.per_node
    assert result.merged.complete and result.merged.rows == 400_000


def test_a_tls_handshake_never_finished_is_closed(tmp_path, caplog):
    """distributed waits for a TLS handshake without end; daskapi.bound_tls_handshakes closes the
    connection of a peer that never starts one once its time is up."""
    import socket

    from unidask.execute import tls

    sec = tls.security(tmp_path / "run")
    daskapi.bound_tls_handshakes(1.0)
    try:
        with LocalCluster(n_workers=0, processes=False, protocol="tls", security=sec, host="127.0.0.1",
                          dashboard_address=":0") as cluster:
            port = int(cluster.scheduler_address.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                assert s.recv(1) == b""   # closed by the scheduler: EOF, not a timeout of this test
            said = [r.getMessage() for r in caplog.records if "sent no TLS handshake" in r.getMessage()]
            assert said == [f"{cluster.scheduler_address}: closed 1 connection(s) that sent no TLS handshake "
                            "within 1 s (a port scan, or another local user's flood of half-open connections); "
                            "the run goes on"], said
    finally:
        daskapi.bound_tls_handshakes(30.0)


def test_the_sitemap_answers():
    """Dask's /sitemap.json answered 500 on every dashboard (bokeh's static route has no ``path``
    argument); mended, it lists the dashboard's pages."""
    import json
    import urllib.request

    daskapi.mend_sitemap()
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        port = cluster.scheduler.http_server.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sitemap.json", timeout=60) as r:
            paths = json.load(r)["paths"]
    assert {"/status/?", "/json/identity.json"} <= set(paths), paths
