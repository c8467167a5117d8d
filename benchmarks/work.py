"""What each contender does in its own process (importable by spawned processes). Every one gets
the same Haar U(n) data; ``start_at`` makes the processes of one case start writing together."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from unidask.store import db, shard
from unidask.core import malloc
from unidask.spec.generators.haar import haar

# unitaries per task (one transaction for every database contender): ~0.2 s of work each on this
# machine, the size a run's task-size hint aims for; Dask's few ms of CPU per task and a commit's
# syncs then cost a few percent (the task size section shows smaller and larger tasks)
TASK_SIZE = {4: 100_000, 16: 10_000, 32: 4_000}


def data(seed: int, count: int, dim: int) -> np.ndarray:
    return haar(np.random.default_rng(seed), count, dim=dim)


def wait_until(start_at: float) -> float:
    time.sleep(max(0.0, start_at - time.time()))
    return time.time()


def done(start: float, **extra) -> dict:
    end = time.time()
    return {"seconds": end - start, "end": end, **extra}


def info() -> dict:
    return {"seed": "-", "node": "n", "worker": str(os.getpid()), "started": 0.0, "finished": 0.0}


def write_shard(path: str, seed: int, count: int, dim: int, start_at: float, task: int,
                single_writer: bool) -> dict:
    """unidask's shard writer, synchronous=NORMAL, one task per transaction."""
    u = data(seed, count, dim)
    s = shard.Shard(Path(path), {"fingerprint": "bench", "dtype": "complex128"}, synchronous="NORMAL",
                    single_writer=single_writer, page_size=db.page_size_for(u[0].nbytes))   # as "auto"
    start = wait_until(start_at)
    for t in range(count // task):
        number = seed * 1_000_000 + t
        s.write_task(number, number * task, u[t * task:(t + 1) * task], None, info())
    s.close()
    return done(start)


def unidask_node_shard(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """unidask with ``storage.shard_per = "node"``: the processes of a node share its WAL shard."""
    return write_shard(path, seed, count, dim, start_at, task, single_writer=False)


def unidask_shard(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """unidask's default writer (``storage.shard_per = "process"``): each worker process its own
    shard, with a rollback journal."""
    return write_shard(f"{path}.{seed}.db", seed, count, dim, start_at, task, single_writer=True)


def unidask_rows_shard(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """unidask's writer before packed shards (schema 2): a row per matrix, as rows with meta still
    are (``shard.PACK_MAX`` 0 sends every task there)."""
    pack_max, shard.PACK_MAX = shard.PACK_MAX, 0
    try:
        return write_shard(f"{path}.{seed}.db", seed, count, dim, start_at, task, single_writer=True)
    finally:   # the pool's processes run the other contenders next
        shard.PACK_MAX = pack_max


def seed_shared_db(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """The seed's approach: every process inserts into ONE shared database (WAL, synchronous=OFF)."""
    u = data(seed, count, dim)
    con = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = OFF")
    locked, stall = 0, 0.0
    start = wait_until(start_at)
    for t in range(count // task):
        rows = [(seed * 1_000_000_000 + t * task + i, dim, u[t * task + i].tobytes()) for i in range(task)]
        while True:
            t0 = time.perf_counter()
            try:
                con.execute("BEGIN")
                con.executemany("INSERT INTO u(id, dim, data) VALUES (?, ?, ?)", rows)
                con.execute("COMMIT")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e):
                    raise
                locked += 1
                if con.in_transaction:
                    con.execute("ROLLBACK")
            finally:
                stall = max(stall, time.perf_counter() - t0)
    con.close()
    return done(start, locked=locked, stall=stall)


def savetxt_files(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """One np.savetxt file per unitary."""
    u = data(seed, count, dim)
    d = Path(path) / str(seed)
    d.mkdir(parents=True, exist_ok=True)
    start = wait_until(start_at)
    for i in range(count):
        np.savetxt(d / f"{i}.txt", u[i])
    return done(start)


def raw_bytes(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """The disk's limit: the same bytes written sequentially to one file per process, fsynced."""
    u = data(seed, count, dim)
    start = wait_until(start_at)
    with open(f"{path}.{seed}", "wb") as f:
        for t in range(0, count, task):
            f.write(u[t:t + task].tobytes())
        f.flush()
        os.fsync(f.fileno())
    return done(start)


def bare_loop(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """End to end without Dask: generate each task and insert it into a private shard file, as
    unidask's workers do, with their malloc settings: the limit, not a handicapped loop."""
    malloc.tune()
    start = wait_until(start_at)
    s = shard.Shard(Path(f"{path}.{seed}.db"), {"fingerprint": "bench", "dtype": "complex128"}, single_writer=True,
                    page_size=db.page_size_for(dim * dim * 16))
    for t in range(count // task):
        u = haar(np.random.default_rng([seed, t]), task, dim=dim)
        s.write_task(t, (seed * 100_000 + t) * task, u, None, info())
    s.close()
    return done(start)


def seed_script(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """The seed's own script, end to end: each process generates a batch and inserts it into ONE
    shared database (WAL, synchronous=OFF), generation on the clock."""
    con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    start = wait_until(start_at)
    for t in range(count // task):
        u = haar(np.random.default_rng([seed, t]), task, dim=dim)
        rows = [((seed * 100_000 + t) * task + i, dim, u[i].tobytes()) for i in range(task)]
        con.execute("BEGIN")
        con.executemany("INSERT INTO u(id, dim, data) VALUES (?, ?, ?)", rows)
        con.execute("COMMIT")
    con.close()
    return done(start)


def file_per_unitary(path: str, seed: int, count: int, dim: int, start_at: float, task: int) -> dict:
    """End to end the old way: one scipy call and one np.savetxt file per unitary."""
    from scipy.stats import unitary_group

    d = Path(path) / str(seed)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    start = wait_until(start_at)
    for i in range(count):
        np.savetxt(d / f"{i}.txt", unitary_group.rvs(dim, random_state=rng))
    return done(start)


def hosts_data(run_dir: str, count: str, local_dir: str) -> None:
    """A run's staged shards of ``count`` U(4), in 3 nodes' shards, for the merge over hosts."""
    import unidask

    spec = unidask.load_config(None, data={
        "run": {"name": "h", "count": int(count), "task_size": 20_000, "run_dir": run_dir},
        "generator": {"dim": 4}, "storage": {"local_dir": local_dir},
        "cluster": {"nodes": 3, "workers": 1, "dashboard_address": "127.0.0.1:0"}})
    unidask.run(spec, merge=False)


def hosts_merge(run_dir: str, out: str, scheduler: str, workers: str) -> None:
    """Merge ``run_dir`` into ``out`` (then removed) on this host's threads, or with the Dask
    workers of ``scheduler`` (``workers`` of them); print the seconds it took."""
    import unidask
    from distributed import Client

    client = Client(scheduler) if scheduler else None
    try:
        if client is not None:
            client.wait_for_workers(int(workers), timeout=120)
        t = time.perf_counter()
        unidask.merge(run_dir, out, client=client)
        seconds = time.perf_counter() - t
    finally:
        if client is not None:
            client.close()
    con = sqlite3.connect(out)
    assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    con.close()
    os.unlink(out)
    print(seconds)


if __name__ == "__main__":
    import sys

    {"hosts_data": hosts_data, "hosts_merge": hosts_merge}[sys.argv[1]](*sys.argv[2:])
