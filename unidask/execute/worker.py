"""The Dask entry points, what runs on a worker: generate one task into this process's (or node's)
shard, say which shard it writes, stage it out. Workers preload this module as they start.

Only small summaries go back to the driver; the matrices never leave the node except inside a
staged shard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Any

from ..core import daskapi, files, malloc
from ..core.errors import RunError
from ..spec import generators, plan
from ..spec.config import Spec
from ..store import identity, shard, staging


def dask_setup(worker) -> None:
    """Dask's preload hook, as a worker starts: a Ctrl-C at the terminal reaches every process of
    its group, a local cluster's workers included; the driver alone acts on it (stages every shard
    out, then stops), so the workers ignore it instead of dying with a traceback each."""
    with contextlib.suppress(ValueError):   # only the main thread may set a handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    daskapi.withstand_floods()   # a worker listens too: a flood of half-open connections must not fill it


def generate_task(spec: Spec, task: int, attempt: str, stage: bool = False) -> dict[str, Any]:
    """Generate task ``task`` and commit it to this process's shard; return a small summary.
    ``stage``: then stage this process's shard out once it holds ``storage.stage_behind`` bytes (a
    segment sealed and shipped: a rename where the run dir shares the local disk's filesystem),
    its stage-out in the summary, so the driver can merge behind the generation
    (``store/behind.py``)."""
    malloc.tune()
    started = time.time()
    array, metas = generators.generate(spec, task)
    node = identity.node_name()
    info = {"seed": plan.seed_label(spec, task), "node": node,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "started": started,
            "finished": time.time()}
    s = shard.for_task(spec, attempt, array[0].nbytes if len(array) else None)
    written = s.write_task(task, task * spec.task_size, array, metas, info)
    summary = {"task": task, "count": len(array), "node": node, "written": written,
               "nbytes": array.nbytes, "shard_bytes": s.nbytes, "seconds": time.time() - started}
    if stage and spec.storage.shard_per == "process" and s.nbytes >= spec.storage.stage_behind:
        try:
            summary["stage"] = staging.stage(spec, attempt)
        except RunError as e:   # the task is committed: a later stage-out ships it
            summary["stage_error"] = str(e)
    return summary


def disk(spec: Spec) -> str:
    """Which shard this worker writes (:func:`shard.disk`)."""
    return shard.disk(spec)


def stage_out(spec: Spec, attempt: str, *, final: bool = False) -> dict[str, Any] | None:
    """Stage this worker's shard out to the run dir (:func:`staging.stage`)."""
    return staging.stage(spec, attempt, final=final)


def close_shards() -> list[str]:
    """Close this worker's shards (before a node shard's final stage-out)."""
    return shard.close_shards()


node_name = identity.node_name


def process() -> tuple[int, int]:
    """This worker process: its pid and its start time, which together name it even after the
    pid is reused (:func:`files.process_start`)."""
    return os.getpid(), files.process_start(os.getpid())
