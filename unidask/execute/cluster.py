"""Connect the driver to Dask workers: an embedded local cluster (default), or a scheduler that
a job script started (``scheduler_file``)."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import dask.config
from distributed import Client, Nanny, Scheduler, SpecCluster, Status

from ..core import daskapi, files
from ..core.errors import InputError, RunError
from ..spec.config import SUBMIT_WALLTIME, Spec, dask_exports, dask_settings
from ..store import identity
from ..store.rundir import RunDir
from ..views import dashboard
from . import network, slurm, tls, worker

log = logging.getLogger(__name__)


# every worker imports the task code as it starts rather than in its first task (~40 ms, and a
# broken install fails the worker's start instead of the run's first tasks)
WORKER_PRELOAD = "unidask.execute.worker"


def local_node_names(nodes: int) -> list[str]:
    return [f"node{k}" for k in range(1, nodes + 1)]


def local_cluster(spec: Spec) -> SpecCluster:
    """``nodes`` simulated nodes of ``workers`` single-threaded worker processes, all on loopback.

    Each simulated node is told its name through ``UNIDASK_NODE``, so it gets its own shard, as a
    real node would with its own local disk. Loopback keeps other machines out, not other users of
    this one: the scheduler and workers speak TLS with the run's certificate, as in the cluster
    modes, so a client without it is refused during the handshake.
    """
    routes = dashboard.install()
    daskapi.withstand_floods()   # the scheduler and the nannies run in this process, the workers are its children
    c = spec.cluster
    sec = security(spec)
    tls_options = {"security": sec, "protocol": "tls"} if sec is not None else {}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": c.dashboard_address,
                                               **tls_options}}
    # each worker process gets this config (a nanny copies the config it is given into its worker)
    config = dask_config()
    per_node = c.local_per_node()
    workers = {
        f"{node}-{j}": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1",
                                                  # each worker's own HTTP server (its /health, its
                                                  # metrics): on loopback too (distributed before
                                                  # 2025 bound it to every interface)
                                                  "dashboard_address": "127.0.0.1:0",
                                                  "env": {"UNIDASK_NODE": node}, "preload": [WORKER_PRELOAD],
                                                  "config": config, "security": sec,
                                                  # Dask's scratch space in the user's own local dir,
                                                  # not in a /tmp/dask-scratch-space anyone can make
                                                  "local_directory": str(files.private_dir(spec.local_dir / "dask")),
                                                  # the driver reports task failures in one line
                                                  "silence_logs": logging.CRITICAL}}
        for node in local_node_names(c.nodes) for j in range(per_node)
    }
    with dask.config.set({**dask_settings(), **routes}), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")   # Dask's multi-line "Port 8787 is already in use" as one line
        cluster = SpecCluster(workers={}, scheduler=scheduler, security=sec, name=f"unidask-{spec.name}")
    for w in said:
        if "already in use" in str(w.message):
            log.warning("cluster.dashboard_address %s: that port is in use; the dashboard is on another "
                        "(its link follows)", c.dashboard_address)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # the workers after the cluster exists: one that fails to start (killed as it starts, out of
    # memory) must not take the cluster down with it; keep_size starts it again
    cluster.worker_spec.update(workers)
    keep_size(cluster)
    return cluster


def check_dashboard_address(spec: Spec) -> None:
    """Fail in one line on a local dashboard address this machine cannot listen at (a host that is
    not one of its own), before anything starts."""
    host = spec.cluster.dashboard_address.rpartition(":")[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        raise InputError(f"cluster.dashboard_address {spec.cluster.dashboard_address!r}: cannot listen "
                         f"there ({e.strerror or e})") from e


def keep_size(cluster: SpecCluster) -> list[str]:
    """Start again the local workers whose nanny gave up ("Failed to start process"), so the
    cluster stays at the size asked for; the names of those started (in the background: a start
    that fails again is tried again at the next look)."""
    gone = [name for name, nanny in cluster.workers.items() if nanny.status in (Status.closed, Status.failed)]
    if not gone and set(cluster.worker_spec) <= set(cluster.workers):
        return []
    for name in gone:
        del cluster.workers[name]
    try:
        daskapi.start_workers(cluster)
    except (RuntimeError, OSError) as e:   # tried again at the next look
        log.warning("worker(s) could not start (%s); starting them again", e)
    return gone + [name for name in cluster.worker_spec if name not in cluster.workers and name not in gone]


def dask_config() -> dict[str, Any]:
    """The whole Dask config with unidask's settings for its clusters applied (a copy)."""
    with dask.config.set(dask_settings()):
        return dask.config.merge(dask.config.config)


def security(spec: Spec):
    """The run's TLS settings, in every mode (None: plain TCP, ``security = "none"``)."""
    if spec.cluster.security == "none":
        return None
    return tls.security(spec.run_dir)


SCHEDULER_FILE_GRACE = 10.0   # a scheduler writes its file in place, in milliseconds
CONNECT_TIMEOUT = 120.0       # for a scheduler that a scheduler file names


def scheduler_address(path: Path, timeout: float, every: float = 10.0) -> str:
    """The address in the scheduler file a job's scheduler writes, waited for and saying so every
    ``every`` seconds; one line after ``timeout`` (Dask's own wait for it has no end), or where
    the file stays something other than a scheduler's for :data:`SCHEDULER_FILE_GRACE` seconds."""
    start = said = time.monotonic()
    bad_since = None
    while True:
        now = time.monotonic()
        address, why = _read_scheduler_file(path)
        if address is not None:
            return address
        if why != "missing":
            bad_since = bad_since or now
            if now - bad_since > SCHEDULER_FILE_GRACE:
                raise InputError(f"{path}: not a Dask scheduler file ({why}): remove it, or set "
                                 "cluster.scheduler_file to the file the scheduler writes")
        elif now - start > timeout:
            raise RunError(f"no scheduler file {path} after {timeout:.0f} s (cluster.worker_timeout): "
                           "did the scheduler start? (its log is in the run dir's logs/)")
        if now - said >= every:
            said = now
            log.info("waiting for the scheduler file %s (%.0f s of %.0f)", path, now - start, timeout)
        time.sleep(0.2)


def _read_scheduler_file(path: Path) -> tuple[str | None, str | None]:
    """The scheduler's address in ``path``, or why there is none yet ("missing": not there, or empty)."""
    if not path.exists():
        return None, "missing"
    if (why := files.regular(path)) is not None:   # a FIFO would block the read
        return None, why
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"cannot read it ({e})"
    if not text:
        return None, "missing"
    try:
        address = json.loads(text).get("address")
    except ValueError as e:
        return None, f"not JSON: {e}"
    except AttributeError:
        return None, "not a JSON object"
    if not isinstance(address, str) or "://" not in address:
        return None, f"its address is {address!r}, not PROTOCOL://HOST:PORT"
    return address, None


def connect_scheduler(spec: Spec) -> Client:
    """A client of the scheduler that ``cluster.scheduler_file`` names, with the run's security."""
    path = Path(spec.cluster.scheduler_file)
    address = scheduler_address(path, spec.cluster.worker_timeout)
    sec = security(spec)
    if sec is not None and not address.startswith("tls://"):
        raise InputError(f"{path}: the scheduler at {address} does not speak TLS, and cluster.security = "
                         "\"tls\": start it with the run's certificate (unidask tls RUN_DIR), or set "
                         "cluster.security = \"none\" on a network only you use")
    log.info("connecting to the scheduler at %s (named by %s), for up to %.0f s", address, path, CONNECT_TIMEOUT)
    try:
        return Client(address, timeout=CONNECT_TIMEOUT, security=sec)
    except OSError as e:
        raise RunError(f"cannot reach the scheduler at {address} (named by {path}): {e}; a scheduler "
                       "file outlives its scheduler, so it may be an old job's") from e


def wait_for_nodes(client: Client, nodes: int, timeout: float = 120.0) -> None:
    """Wait until workers of ``nodes`` nodes have joined (inside a SLURM job: all of its nodes),
    so the first tasks do not all land on the node whose workers started first."""
    start = said = time.monotonic()
    while (now := time.monotonic()) < start + timeout:
        where = client.run(worker.node_name, on_error="ignore")   # {worker address: node}
        if (joined := len(set(where.values()))) >= nodes:
            # the addresses Dask really uses, which a network setting is about
            hosts: dict[str, list[str]] = {}
            for address, node in where.items():
                hosts.setdefault(node, []).append(daskapi.address_host(address))
            log.info("workers joined: %s", ", ".join(f"{node} {len(h)} at {' '.join(sorted(set(h)))}"
                                                     for node, h in sorted(hosts.items())))
            return
        if now - said >= 10:
            said = now
            log.info("waiting for workers of %d node(s): %d joined (%.0f s of %.0f)", nodes, joined, now - start,
                     timeout)
        time.sleep(0.5)


def dashboard_lines(client: Client, spec: Spec) -> list[str]:
    """Where to watch the run; on a cluster, also the ssh tunnel to reach a compute node."""
    link = client.dashboard_link
    base = link.rsplit("/", 1)[0]
    lines = [f"dashboard: {link}", f"unidask page: {base}/unidask"]
    if spec.cluster.mode != "local":
        host_port = urlsplit(link).netloc
        host, _, port = host_port.rpartition(":")
        login = identity.submit_host()
        lines.append(f"from your machine: ssh -N -L {port}:{host}:{port} {login}, then open "
                     f"http://localhost:{port}/unidask")
    return lines


@contextlib.contextmanager
def connect(spec: Spec) -> Iterator[Client]:
    """A client for the run's workers, closed (and the local cluster shut down) on exit."""
    mode = spec.cluster.mode
    if mode == "local":
        with local_cluster(spec) as cluster, Client(cluster, security=cluster.security) as client:
            yield client
    elif mode == "scheduler_file":
        with connect_scheduler(spec) as client:
            wait_for_nodes(client, identity.job_nodes(), timeout=min(120.0, spec.cluster.worker_timeout))
            yield client
    else:
        with slurm_cluster(spec) as cluster, Client(cluster) as client:
            yield client


def jobqueue(key: str):
    """The user's own dask-jobqueue setting ``jobqueue.slurm.KEY`` (~/.config/dask/jobqueue.yaml,
    DASK_JOBQUEUE__SLURM__KEY), None where unset."""
    return dask.config.get(f"jobqueue.slurm.{key}", None)


def worker_jobs(spec: Spec) -> dict[str, Any]:
    """dask-jobqueue's ``SLURMCluster`` options of slurm mode. What the run's ``[cluster]`` states
    wins; what it leaves unset comes from the user's ``jobqueue.slurm`` config, then unidask's
    fallbacks (one worker per core of the job, 4GB, an hour). Every worker has one thread: a
    process writes one shard."""
    c = spec.cluster
    interface = c.interface or jobqueue("interface")
    cores = jobqueue("job-cpu") or jobqueue("cores")
    processes = c.workers if c.workers != "auto" else (jobqueue("processes") or cores or 1)
    host = network.login_address(interface)
    # each worker at its node's address on the way here, found in the job (Dask's own guess is
    # 127.0.0.1 on a node without a default route); with an interface, Dask's --interface does it
    find_host = [] if interface else [
        f"UNIDASK_WORKER_HOST=$({shlex.quote(sys.executable)} -m unidask.cli address --towards {host})"]
    partition, account = c.partition or jobqueue("queue"), c.account or jobqueue("account")
    sec = security(spec)
    return dict(
        cores=processes, processes=processes,
        # the CPUs the user books per job, where more than its single-threaded workers
        **({"job_cpu": cores} if cores and cores > processes else {}),
        memory=c.memory or jobqueue("memory") or "4GB",
        walltime=c.walltime or jobqueue("walltime") or SUBMIT_WALLTIME,
        **({"interface": interface} if interface else {}),   # the workers'
        **({"queue": partition} if partition else {}), **({"account": account} if account else {}),
        job_name=f"unidask-{spec.name}",
        job_extra_directives=[*(jobqueue("job-extra-directives") or []), *map(slurm.directive, c.job_extra_directives)],
        log_directory=str(RunDir(spec.run_dir).logs), python=sys.executable,
        scheduler_options={"dashboard_address": c.dashboard_address, "host": host},
        worker_extra_args=[*(jobqueue("worker-extra-args") or []), "--preload", WORKER_PRELOAD,
                           *(["--host", '"$UNIDASK_WORKER_HOST"'] if find_host else [])],
        job_script_prologue=[*(jobqueue("job-script-prologue") or []), *dask_exports(), *find_host],
        **({"security": sec, "protocol": "tls://"} if sec else {}))


def slurm_cluster(spec: Spec):
    """Workers as SLURM jobs through dask-jobqueue, one job per node of ``workers`` processes; the
    scheduler runs here (a login node). Options as :func:`worker_jobs` says."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:
        raise InputError("cluster.mode = 'slurm' needs dask-jobqueue: pip install 'unidask[slurm]'") from e
    routes = dashboard.install()
    daskapi.withstand_floods()   # the scheduler runs here
    options = worker_jobs(spec)
    # the scheduler runs here, the workers get the exports
    with dask.config.set({**dask_settings(), **routes}):
        cluster = SLURMCluster(**options)
    if said := spec.cluster.cores_warning(options.get("job_cpu") or options["processes"]):
        log.warning(said)
    # ask SLURM first whether it would take the job, so a refusal fails the run with SLURM's
    # reason instead of leaving it waiting for workers that never come
    try:
        slurm.check_accepts(cluster.job_script())
    except RunError:
        cluster.close()
        raise
    cluster.scale(jobs=spec.cluster.nodes)
    try:
        wait_for_worker_jobs(cluster, spec)
    except BaseException:
        cluster.close()
        raise
    return cluster


def wait_for_worker_jobs(cluster, spec: Spec) -> None:
    """Block until a worker has joined; fail if every worker job left the queue before that (a job
    that dies at start would otherwise leave the run waiting forever). Jobs still in the queue are
    waited for, as long as SLURM keeps them there, saying so every minute; without any job for
    ``cluster.worker_timeout`` (none could be submitted) the run ends."""
    start = said = time.monotonic()
    while not cluster.scheduler_info.get("workers"):
        time.sleep(1.0)
        now = time.monotonic()
        jobs = job_ids(cluster)
        if not jobs:
            if now - start > spec.cluster.worker_timeout:
                raise RunError(f"no worker job was submitted in {now - start:.0f} s (cluster.worker_timeout)")
            continue   # still being submitted
        if not identity.queued(jobs) and not cluster.scheduler_info.get("workers"):
            raise RunError(f"the worker jobs {', '.join(jobs)} ended before any worker joined; "
                           f"see {RunDir(spec.run_dir).logs}")
        if now - said >= 60:
            said = now
            log.info("waiting for the worker jobs %s in the SLURM queue (%.0f s)", ", ".join(jobs), now - start)


def job_ids(cluster) -> list[str]:
    """The SLURM job ids of a dask-jobqueue cluster's worker jobs (none for other clusters)."""
    workers = getattr(cluster, "workers", {}) or {}
    return [j for j in (getattr(job, "job_id", None) for job in workers.values()) if j]
