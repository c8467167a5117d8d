"""Connect the driver to Dask workers: an embedded local cluster (default), or a scheduler that
a job script started (``scheduler_file``)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlsplit
from typing import Iterator

from distributed import Client, Nanny, Scheduler, SpecCluster

from . import dashboard
from .config import Spec
from .errors import InputError


def local_node_names(nodes: int) -> list[str]:
    return [f"node{k}" for k in range(1, nodes + 1)]


def local_cluster(spec: Spec) -> SpecCluster:
    """``nodes`` simulated nodes of ``workers`` single-threaded worker processes, all on loopback.

    Each simulated node is told its name through ``UNIDASK_NODE``, so it gets its own shard, as a
    real node would with its own local disk.
    """
    dashboard.install()
    c = spec.cluster
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1",
                                               "dashboard_address": c["dashboard_address"]}}
    workers = {
        f"{node}-{j}": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1",
                                                  "env": {"UNIDASK_NODE": node},
                                                  # the driver reports task failures in one line
                                                  "silence_logs": logging.CRITICAL}}
        for node in local_node_names(c["nodes"]) for j in range(c["workers"])
    }
    return SpecCluster(workers=workers, scheduler=scheduler, name=f"unidask-{spec.name}")


def dashboard_lines(client: Client, spec: Spec) -> list[str]:
    """Where to watch the run; on a cluster, also the ssh tunnel to reach a compute node."""
    link = client.dashboard_link
    base = link.rsplit("/", 1)[0]
    lines = [f"dashboard: {link}", f"unidask page: {base}/unidask"]
    if spec.cluster["mode"] != "local":
        host_port = urlsplit(link).netloc
        host, _, port = host_port.rpartition(":")
        login = os.environ.get("SLURM_SUBMIT_HOST") or socket.gethostname()
        lines.append(f"from your machine: ssh -N -L {port}:{host}:{port} {login}, then open "
                     f"http://localhost:{port}/unidask")
    return lines


@contextlib.contextmanager
def connect(spec: Spec) -> Iterator[Client]:
    """A client for the run's workers, closed (and the local cluster shut down) on exit."""
    mode = spec.cluster["mode"]
    if mode == "local":
        with local_cluster(spec) as cluster, Client(cluster) as client:
            yield client
    elif mode == "scheduler_file":
        with Client(scheduler_file=spec.cluster["scheduler_file"], timeout="120s") as client:
            yield client
    else:
        raise InputError(f"cluster.mode = {mode!r} is not available yet in this version")
