"""``run.task_size = "auto"``: the task size a run gets from its generator's measured cost and
the workers it will have.

A task should be long enough that the one scheduler stays under ``SCHEDULER_LOAD`` of its core
(Dask spends ``SCHEDULER_CPU`` of driver and scheduler CPU on each task, whatever its size) and
that Dask's per-task cost stays small beside the work (``TASK_SECONDS``), and short enough that
every worker gets ``TASKS_PER_WORKER`` of them (for balance at the end, and spare tasks for
backups; where a machine has fewer cores than worker threads, every core) and that a task's
array stays small in memory (``TASK_BYTES``).

The task size decides the data (task i draws from its own seed), so the size chosen is recorded
in run.json and reused whenever that run is resumed, on any number of workers. The same config
run afresh on other machines may get another size: a fixed ``run.task_size`` gives the same bytes
everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core import files
from ..core.errors import InputError
from ..core.fmt import duration
from ..spec import generators
from ..spec.config import Spec
from ..store import shard
from ..store.rundir import RunDir

log = logging.getLogger(__name__)

AUTO = "auto"
SCHEDULER_CPU = 0.0056   # s of driver + scheduler CPU per task (benchmark: task_size, scheduler)
SCHEDULER_LOAD = 0.5     # the share of the scheduler's core a run may use
TASK_SECONDS = 0.5       # the shortest task: Dask's and the shard's per-task cost a few % of it
TASKS_PER_WORKER = 4     # fewer and the run ends unevenly, with no spare tasks for backups
TASK_BYTES = 64 << 20    # a task's array (as generated) at most
CALIBRATE_S = 1.0        # seconds of generation and writing a calibration counts (at least)
RESOLVE_S = 0.25         # ... for a task size only: rounded to 1-2-5 steps, it needs less
REMEMBER_S = 7 * 86400   # a machine's measured speed is reused this long (sizing.remembered)


def parallel(spec: Spec, local: bool | None = None) -> int:
    """Worker threads of ``spec``'s run that run at once: on a cluster each has its own core
    (``workers = "auto"``: as many as this machine has cores, the best guess for the nodes'
    where nothing else says); a ``local`` run (default: local mode) shares this machine's cores."""
    cores = os.cpu_count() or 1
    if spec.cluster.mode == "local" if local is None else local:
        return min(spec.cluster.nodes * spec.cluster.local_per_node(), cores)
    return spec.cluster.nodes * spec.cluster.workers_per_node(cores)


def round_number(x: float, up: bool) -> int:
    """The next 1-2-5 number (1, 2, 5, 10, 20, ...) above (``up``) or below ``x``, at least 1:
    a size a person reads and types, that small changes of the measured speed rarely move."""
    if x <= 1:
        return 1
    steps = [m * 10 ** e for e in range(int(math.log10(x)) - 1, int(math.log10(x)) + 2) for m in (1, 2, 5)]
    return min(s for s in steps if s >= x) if up else max(s for s in steps if s <= x)


def choose(count: int, seconds_per_unitary: float, unitary_bytes: float, workers: int) -> int:
    """The task size for ``count`` unitaries of ``seconds_per_unitary`` each, on ``workers``
    worker threads that run at once (see the module's docstring)."""
    shortest = max(TASK_SECONDS, workers * SCHEDULER_CPU / SCHEDULER_LOAD)
    size = round_number(shortest / max(seconds_per_unitary, 1e-9), up=True)
    most = min(count / (TASKS_PER_WORKER * workers), TASK_BYTES / unitary_bytes)
    return max(1, min(size, round_number(most, up=False), count))


def resolve(spec: Spec, local: bool | None = None, *, workers: int | None = None,
            measured: tuple[float, float] | None = None) -> Spec:
    """``spec`` with a task size: its own; for "auto" the one its run dir's run.json records
    for this run (a resume: :meth:`RunDir.sized`), else :func:`choose`'s for ``workers``
    (default: :func:`parallel`'s, with ``local``), from ``measured`` (seconds per unitary and
    bytes per row, :func:`calibrate`'s; default: a calibration here)."""
    spec = RunDir(spec.run_dir).sized(spec)
    if spec.task_size != AUTO:
        return spec
    per_unitary, row_bytes, when = (*measured, "here") if measured else remembered(spec)
    workers = workers or parallel(spec, local)
    size = choose(spec.count, per_unitary, row_bytes, workers)
    log.info("run.task_size = auto: %s unitaries a task (%s of work each, at %.1f µs a unitary measured "
             "%s, for %s worker thread(s) at once)", f"{size:,}", duration(size * per_unitary),
             per_unitary * 1e6, when, f"{workers:,}")
    return dataclasses.replace(spec, task_size=size)


def remembered(spec: Spec) -> tuple[float, float, str]:
    """:func:`calibrate`'s figures for ``spec``'s generator on this machine, and when they were
    measured: remembered for :data:`REMEMBER_S` in the user's cache (``$XDG_CACHE_HOME/unidask``),
    so a run starts its cluster without measuring first; measured (for :data:`RESOLVE_S`) where
    not remembered. The key is all that sets the speed: host, cores, generator, its parameters
    and dtype, and the versions of unidask and numpy."""
    from .._version import __version__

    path = cache_dir() / "calibration.json"
    key = json.dumps([socket.gethostname(), os.cpu_count(), spec.kind, spec.params, spec.dtype, __version__,
                      np.__version__], sort_keys=True, default=str)
    try:   # none yet, or unreadable: measured again, and written whole
        known = json.loads(path.read_text()) if files.regular(path) is None else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        per_unitary, row_bytes, at = known[key]
        if 0 < time.time() - at < REMEMBER_S and per_unitary > 0 and row_bytes > 0:
            return float(per_unitary), float(row_bytes), f"on {time.strftime('%Y-%m-%d %H:%M', time.localtime(at))}"
    per_unitary, row_bytes = calibrate(spec, RESOLVE_S)
    known[key] = [per_unitary, row_bytes, time.time()]
    with contextlib.suppress(OSError, InputError):   # a cache that cannot be written: measured next time
        files.private_dir(path.parent)
        files.write_atomic(path, json.dumps(known))
    return per_unitary, row_bytes, "here"


def cache_dir() -> Path:
    """The user's cache of unidask (``$XDG_CACHE_HOME/unidask``, default ``~/.cache/unidask``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unidask"


def calibrate(spec: Spec, seconds: float = CALIBRATE_S) -> tuple[float, float]:
    """(seconds per unitary, stored bytes per row) of ``spec``'s tasks, measured here as a worker
    does them: generated, then written to a shard (in a temporary directory), for ``seconds``
    or a little more. Tasks are made
    smaller than the run's (for "auto", than the whole run) where those would take long; the
    first, a warm-up, is not counted."""
    largest = spec.count if spec.task_size == AUTO else spec.task_size
    size, spent, t = 1, 0.0, 0
    per_unitary: list[float] = []
    with tempfile.TemporaryDirectory(prefix="unidask-plan-") as tmp:
        meta, opts = shard.options(spec)
        live = shard.Shard(Path(tmp) / "c.db", meta, **{**opts, "allow_network_fs": True})
        try:
            while spent < seconds:
                small = dataclasses.replace(spec, task_size=size, count=size * (t + 1))
                start = time.perf_counter()
                array, metas = generators.generate(small, t)
                live.write_task(t, t * size, array, metas, {"seed": "0/0", "node": "plan", "worker": "plan",
                                                            "started": 0.0, "finished": 0.0})
                took = time.perf_counter() - start
                if t > 0:
                    spent += took
                    per_unitary.append(took / size)
                if took < seconds / 10 and size < largest:
                    size = min(size * 4, largest)
                t += 1
            stored, rows = live.nbytes, live.con.execute("SELECT sum(count) FROM tasks").fetchone()[0]
        finally:
            live.close()
    # the median task: this machine's speed drifts, and a hiccup should not set the run
    return float(np.median(per_unitary)), stored / rows
