"""What runs on a Dask worker: generate one task into this node's shard, stage the shard out.

Only small summaries go back to the driver; the matrices never leave the node except inside a
staged shard.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import glob
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import generators, plan, shard
from .config import Spec
from .errors import RunError


def local_shard_path(spec: Spec, attempt: str, node: str | None = None) -> Path:
    """This process's live shard: the node's, or its own with ``storage.shard_per = "process"``."""
    own = f"-p{os.getpid()}" if spec.storage["shard_per"] == "process" else ""
    return spec.local_dir / spec.name / f"{node or shard.node_name()}-{attempt}{own}.db"


def shard_args(spec: Spec, row_bytes: int | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The meta rows and the open options of this run's shards; ``row_bytes`` (one matrix) sizes
    the pages of a new shard under ``page_size = "auto"`` (an existing file keeps its own)."""
    s = spec.storage
    page_size = s["page_size"]
    if page_size == "auto":
        page_size = shard.page_size_for(row_bytes) if row_bytes else max(shard.AUTO_PAGE_SIZES)
    return (shard.database_meta(spec.to_dict(), spec.fingerprint),
            {"synchronous": s["synchronous"], "busy_timeout": s["busy_timeout"],
             "allow_network_fs": s["allow_network_fs"], "page_size": page_size,
             "single_writer": s["shard_per"] == "process"})


def node_shard(spec: Spec, attempt: str, row_bytes: int | None = None) -> shard.Shard:
    path = local_shard_path(spec, attempt)
    if (open_ := shard.cached(path)) is not None:
        return open_
    meta, options = shard_args(spec, row_bytes)
    return shard.open_shard(path, meta, **options)


def generate(spec: Spec, task: int) -> tuple[np.ndarray, list[str | None] | None]:
    """Task ``task``'s unitaries and their meta strings, checked for shape, dtype and finiteness."""
    count = spec.task_count(task)
    array, metas = generators.get(spec.kind)(plan.rng(spec, task), count, spec.dtype, spec.params)
    if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[0] != count \
            or array.shape[1] != array.shape[2]:
        raise RunError(f"generator {spec.kind!r} returned {getattr(array, 'shape', type(array))}, "
                       f"expected ({count}, n, n)")
    if array.dtype != np.dtype(spec.dtype):
        raise RunError(f"generator {spec.kind!r} returned dtype {array.dtype}, expected {spec.dtype}")
    if not np.isfinite(array).all():
        raise RunError(f"generator {spec.kind!r} returned non-finite values in task {task}")
    if metas is not None:
        if len(metas) != count:
            raise RunError(f"generator {spec.kind!r} returned {len(metas)} metas for {count} unitaries")
        try:
            metas = [None if m is None else json.dumps(m, sort_keys=True) for m in metas]
        except TypeError as e:
            raise RunError(f"generator {spec.kind!r} returned meta that is not JSON: {e}") from None
    return array, metas


@functools.cache
def tune_malloc() -> None:
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ at 64 KiB, which also freezes glibc's
    mmap threshold at 128 KiB: every task's arrays then come from freshly mapped pages, and each
    free hands the top of the heap back to the kernel, so the next task faults it in again (~30%
    of a task at n = 16). Serve allocations up to 64 MiB from the heap and keep up to 256 MiB of
    it: a task's arrays and temporaries, reused task after task."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def generate_task(spec: Spec, task: int, attempt: str) -> dict[str, Any]:
    """Generate task ``task`` and commit it to this node's shard; return a small summary."""
    tune_malloc()
    started = time.time()
    array, metas = generate(spec, task)
    node = shard.node_name()
    info = {"seed": plan.seed_label(spec, task), "node": node,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "started": started,
            "finished": time.time()}
    s = node_shard(spec, attempt, array[0].nbytes if len(array) else None)
    written = s.write_task(task, task * spec.task_size, array, metas, info)
    return {"task": task, "count": len(array), "node": node, "written": written,
            "nbytes": array.nbytes, "shard_bytes": s.nbytes, "seconds": time.time() - started}


def disk(spec: Spec) -> str:
    """Which shard this worker writes: its node, and the device and inode of the local dir (workers
    of one SLURM job share it; two jobs on one node with private scratch do not), and with
    ``shard_per = "process"`` its process id."""
    path = spec.local_dir
    path.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    own = f":{os.getpid()}" if spec.storage["shard_per"] == "process" else ""  # each stages its own
    return f"{shard.node_name()}:{st.st_dev}:{st.st_ino}{own}"


def stage_out(spec: Spec, attempt: str, *, final: bool = False) -> dict[str, Any] | None:
    """Copy this node's shard to ``RUN_DIR/shards/`` as a whole snapshot.

    ``final``: close this process's connection first and delete the local shard after staging
    (for a node shard, the driver closes the other processes' connections before calling it).
    """
    node = shard.node_name()
    if spec.storage["shard_per"] == "process":
        stage_orphans(spec, attempt, node)
    path = local_shard_path(spec, attempt, node)
    if not path.exists() and shard.cached(path) is None:
        return None
    start = time.time()
    live, staging = node_shard(spec, attempt), plan.shard_dir(spec.run_dir)
    if not final or (moved := live.close_and_move(staging)) is None:
        moved = live.snapshot(staging)
    dest, tasks, rows = moved
    if final:
        shard.close_shards()
        shard.remove_files(path)
    return {"node": node, "path": str(dest), "tasks": tasks, "rows": rows,
            "bytes": dest.stat().st_size, "time": time.time(), "seconds": time.time() - start}


def stage_orphans(spec: Spec, attempt: str, node: str) -> list[Path]:
    """Stage and remove the shards of this node's worker processes that died (``shard_per =
    "process"``): their restarted successors write new shards, and without this every task the
    dead ones wrote since their last stage-out would be generated again. A lock on a claim file
    keeps two workers of the node from taking the same orphan."""
    staged = []
    for path in sorted((spec.local_dir / spec.name).glob(f"{glob.escape(node)}-{glob.escape(attempt)}-p*.db")):
        pid = path.stem.rsplit("-p", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        # a lock, not a mere file, so a worker killed while staging an orphan leaves it to the next
        claim = path.with_name(f".{path.name}.claim")
        fd = os.open(claim, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if path.exists():  # not yet staged and removed by the previous holder
                staged.append(stage_and_remove(spec, path))
        finally:
            if not path.exists():
                claim.unlink(missing_ok=True)
            os.close(fd)
    return staged


def salvage(spec: Spec) -> list[Path]:
    """Stage the shards an earlier, killed driver left in this machine's local dir, then remove them.

    Used on ``--resume`` in local mode, where the local dir of every simulated node is on this
    machine; opening a shard replays its WAL or rolls back its hot journal, so every committed task is
    kept.
    """
    return [stage_and_remove(spec, path) for path in sorted((spec.local_dir / spec.name).glob("[!.]*.db"))]


def stage_and_remove(spec: Spec, path: Path) -> Path:
    """Stage a shard whose writer is gone, then remove it from local disk."""
    meta, options = shard_args(spec)
    live = shard.Shard(path, meta, **{**options, "single_writer": True})
    try:
        staged = live.snapshot(plan.shard_dir(spec.run_dir))[0]
    finally:
        live.close()
    shard.remove_files(path)
    return staged
