"""The shard on real SQLite files: one task per transaction, shared by processes, staged whole."""

import multiprocessing
import os
import shutil
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import unidask
from unidask.store import db, identity, pages, shard, staging
from unidask.store.rundir import RunDir
from unidask.core import files
from unidask.spec import generators
from unidask.execute import worker
from unidask.spec.generators.haar import haar
from unidask.core.errors import InputError, RunError

from conftest import REPO, Tmpfs, merged_data, messages, shard_data


def write_tasks(spec, tasks, attempt):
    os.environ["UNIDASK_NODE"] = "shared"
    return [worker.generate_task(spec, t, attempt)["written"] for t in tasks]


def test_four_processes_write_one_shard(config):
    spec = config(run={"count": 4000, "task_size": 10}, storage={"busy_timeout": 30, "shard_per": "node"})
    tasks = list(range(spec.n_tasks))
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        written = list(pool.map(write_tasks, [spec] * 4, [tasks[i::4] for i in range(4)], ["a1"] * 4))
    assert all(all(w) for w in written)
    path = shard.local_path(spec, "a1", "shared")
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [i for i, _ in shard_data(con)] == list(range(4000))
    assert sorted(t for (t,) in con.execute("SELECT task FROM tasks")) == tasks
    assert len({w for (w,) in con.execute("SELECT DISTINCT worker FROM tasks")}) == 4
    # every task's rows are complete, packed in one block (10 U(4)): count matches the tasks row
    bad = con.execute("SELECT t.task FROM tasks t JOIN blocks b ON b.id = t.task * 10 WHERE length(b.data) != t.count * 256"
                      ).fetchall()
    assert bad == [] and con.execute("SELECT count(*) FROM blocks").fetchone()[0] == len(tasks)


def test_task_written_twice_is_kept_once(config, monkeypatch):
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config()
    first = worker.generate_task(spec, 3, "x")
    again = worker.generate_task(spec, 3, "x")
    assert first["written"] and not again["written"]
    con = sqlite3.connect(shard.local_path(spec, "x"))
    assert con.execute("SELECT count(*), sum(length(data)) FROM blocks WHERE id / ? = 3",
                       (spec.task_size,)).fetchone() == (1, 100 * 256)
    assert con.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1
    shard.close_shards()


def test_task_written_twice_with_other_data_fails(config, monkeypatch):
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config()
    s = shard.for_task(spec, "y")
    array, metas = generators.generate(spec, 1)
    info = {"seed": "7/1", "node": "n", "worker": "w", "started": 0.0, "finished": 1.0}
    assert s.write_task(1, 100, array, metas, info)
    array[0, 0, 0] += 1e-9
    with pytest.raises(RunError, match="task 1 written twice with different data"):
        s.write_task(1, 100, array, metas, info)
    shard.close_shards()


def test_snapshot_is_a_whole_database_with_no_wal(config, monkeypatch, tmp_path):
    """A node's shared shard (WAL, several writers): its first stage-out a consistent copy, each
    later one a delta of the tasks written since."""
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config(storage={"shard_per": "node"})
    for t in range(5):
        worker.generate_task(spec, t, "z")
    staged = worker.stage_out(spec, "z")
    dest = spec.run_dir / "shards" / shard.for_task(spec, "z").staged_name
    assert dest.name.startswith("n-z-") and staged["path"] == str(dest) and staged["tasks"] == 5
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]   # no temp left behind
    con = db.connect_readonly(dest)
    assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert len(shard_data(con)) == 500
    with open(dest, "rb") as f:
        header = f.read(20)
    assert header[18:20] == b"\x01\x01"   # rollback-journal file format: readable without -wal/-shm
    assert con.execute("PRAGMA page_size").fetchone()[0] == 65536
    # a later stage-out stages only the new task, in a shard of its own (a delta); the final one
    # removes the live local shard
    worker.generate_task(spec, 5, "z")
    final = worker.stage_out(spec, "z", final=True)
    delta = Path(final["path"])
    assert not shard.local_path(spec, "z").exists() and delta != dest and delta.name.startswith(dest.stem)
    assert (final["tasks"], final["new_tasks"], final["rows"]) == (6, 1, 600)
    assert not list(spec.local_dir.rglob("*.db*"))
    con = db.connect_readonly(delta)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT task, count FROM tasks").fetchall() == [(5, 100)]
    assert [i for i, _ in shard_data(con)] == list(range(500, 600))
    row = 256
    # a small delta gets small pages: its table roots would otherwise outweigh its rows
    assert con.execute("PRAGMA page_size").fetchone()[0] == db.page_size_for(row, 100 * row) < 65536
    assert db.read_meta(con) == db.read_meta(db.connect_readonly(dest))
    db.check(delta, spec.fingerprint, db.Expected.of(spec))   # what the merge checks of a shard
    staged = [t for p in (dest, delta) for (t,) in db.connect_readonly(p).execute("SELECT task FROM tasks")]
    assert sorted(staged) == list(range(6))   # each task staged once
    assert dest.read_bytes()[18:20] == b"\x01\x01"


@pytest.mark.parametrize("where", ["same filesystem", "other filesystem"])   # a rename | a file copy
def test_a_process_shard_is_staged_as_segments(config, monkeypatch, tmp_path, where):
    """A process's own shard is staged as segments: at each stage-out its live file is sealed
    under its staged name and shipped whole (no row copied), and the next task starts a new one.
    On another filesystem the copy runs on a background thread and is reported by the next
    stage-out (the final one waits for it). Every task is staged once, in a whole database."""
    monkeypatch.setenv("UNIDASK_NODE", "n")
    mount = Tmpfs(tmp_path / "shared", "64m") if where == "other filesystem" else None
    run_dir = (mount.path if mount else tmp_path) / "run"
    try:
        spec = config(run={"run_dir": str(run_dir)}, storage={"shard_per": "process"})
        assert (os.stat(tmp_path).st_dev == run_dir.parent.stat().st_dev) == (mount is None)
        written = []
        for t in range(5):
            worker.generate_task(spec, t, "z")
        first = worker.stage_out(spec, "z")
        live = shard.local_path(spec, "z")
        assert not live.exists() and shard.cached(live) is None   # sealed; the next task starts anew
        for t in (5, 6):
            worker.generate_task(spec, t, "z")
        second = worker.stage_out(spec, "z")
        worker.generate_task(spec, 7, "z")
        final = worker.stage_out(spec, "z", final=True)
        for r in (first, second, final):
            written += r["paths"]
        if where == "same filesystem":   # a rename: staged at once
            assert [len(r["paths"]) for r in (first, second, final)] == [1, 1, 1]
        assert (final["tasks"], final["rows"]) == (8, 800) and len(written) == len(set(written)) == 3
        assert not list(spec.local_dir.rglob("*.db*")) and not list(spec.local_dir.rglob(".*"))
        shards = sorted(Path(p) for p in written)
        assert sorted(run_dir.joinpath("shards").iterdir()) == shards   # no temp left behind
        staged, metas = [], []
        for path in shards:
            assert path.name.startswith("n-z-p") and path.read_bytes()[18:20] == b"\x01\x01"
            con = db.connect_readonly(path)
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            staged += [t for (t,) in con.execute("SELECT task FROM tasks")]
            metas.append({k: v for k, v in db.read_meta(con).items() if k != "shard_uid"})
            con.close()
            db.check(path, spec.fingerprint, db.Expected.of(spec))   # what the merge checks of a shard
        assert sorted(staged) == list(range(8)) and all(m == metas[0] for m in metas)   # each task once
    finally:
        if mount:
            mount.unmount()


KILLED_MID_TASK = """
import os, pickle, signal, sys
from unidask.store import shard
from unidask.execute import worker
spec = pickle.loads(bytes.fromhex(sys.argv[1]))
for t in range(3):
    worker.generate_task(spec, t, "k")
s = shard.for_task(spec, "k")
s.con.execute("PRAGMA cache_size = 1")   # spill uncommitted pages into the file before the commit
s.con.execute("BEGIN IMMEDIATE")
s.con.executemany("INSERT INTO unitaries(id, dim, data) VALUES (?, 4, zeroblob(256))",
                  [(3000 + i,) for i in range(1000)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_shard_killed_mid_task_keeps_its_whole_tasks(config, monkeypatch):
    """A shard per process keeps a rollback journal: a writer killed in the middle of a task
    leaves a hot journal, and staging its orphaned shard rolls the half-written task back."""
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config(run={"count": 10_000, "task_size": 1000}, storage={"shard_per": "process", "page_size": 1024})
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_TASK, pickle.dumps(spec).hex()],
                          env={**os.environ, "UNIDASK_NODE": "n"}, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    [path] = shard.run_local_dir(spec).glob("n-k-p*.db")
    assert os.path.getsize(f"{path}-journal") > 0                       # a hot journal
    assert path.read_bytes()[18:20] == b"\x01\x01" and not os.path.exists(f"{path}-wal")  # not WAL
    [staged] = staging.stage_orphans(spec, "k", "n")
    assert not path.exists() and not os.path.exists(f"{path}-journal")
    con = db.connect_readonly(staged)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM unitaries").fetchone()[0] == 0   # the half-written task's rows
    assert [i for i, _ in shard_data(con)] == list(range(3000))
    for task, digest in con.execute("SELECT task, checksum FROM tasks"):
        blobs = [b for i, b in shard_data(con) if i // 1000 == task]
        assert db.checksum(b"".join(blobs), [None] * 1000) == digest
    con.close()


def killed_in_first_transaction(path: Path, spill: bool) -> None:
    """A writer that creates a shard at ``path`` and dies inside its first transaction, after
    SQLite spilled pages to the file (``spill``) or before."""
    rows = "con.execute('PRAGMA cache_size = 1'); con.executemany('INSERT INTO unitaries(id, dim, data) " \
           "VALUES (?, 4, ?)', [(i, bytes(256)) for i in range(2000)])" if spill else ""
    subprocess.run([sys.executable, "-c", f"""
import os, sqlite3, sys
sys.path.insert(0, {str(REPO)!r})
from unidask.store import db
con = sqlite3.connect({str(path)!r}, isolation_level=None)
con.execute("PRAGMA journal_mode = TRUNCATE")
con.executescript(db.SCHEMA)
con.execute("BEGIN")
con.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '2')")
{rows}
os._exit(0)
"""], check=True)


def test_shard_of_a_writer_killed_while_creating_it_is_removed(config, monkeypatch):
    """A worker killed between creating its shard and its first task leaves a file with nothing
    committed in it (empty, the schema without meta, a hot journal of its first transaction, or a
    journal of it not yet synced):
    its successor removes it instead of leaving it on local disk with a warning. A rollback
    journal holds the pages as they were before, never a committed task."""
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config(run={"count": 1000, "task_size": 100}, storage={"shard_per": "process"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    local = shard.run_local_dir(spec)
    local.mkdir(parents=True)
    empty, schema_only, journal, unsynced = (local / f"n-k-p{dead}{i}.db" for i in ("", "0", "1", "2"))
    pids = {empty: dead, schema_only: dead + "0", journal: dead + "1", unsynced: dead + "2"}
    empty.touch()
    con = sqlite3.connect(schema_only)
    con.executescript(db.SCHEMA)
    con.close()
    # killed inside its first transaction, after SQLite spilled pages to the file: a hot journal
    killed_in_first_transaction(journal, spill=True)
    assert os.path.getsize(f"{journal}-journal") > 0 and os.path.getsize(journal) > 100_000
    # killed inside its first transaction before anything spilled: the journal's header is still
    # the one SQLite writes first, its magic zeroed until a sync (not hot: the file is untouched)
    killed_in_first_transaction(unsynced, spill=False)
    with open(f"{unsynced}-journal", "rb") as f:
        assert f.read(8) == bytes(8) and os.path.getsize(f"{unsynced}-journal") > 512
    assert all(not files.pid_alive(int(pid)) for pid in pids.values())
    with messages() as lines:
        assert staging.stage_orphans(spec, "k", "n") == []
    assert not any(p.exists() or os.path.exists(f"{p}-journal") for p in pids), lines
    assert not any("left in place" in line for line in lines), lines


def test_a_claim_left_by_a_killed_claimer_is_removed(config, monkeypatch):
    """A worker killed after it staged and removed an orphan, before it removed its claim, leaves
    the claim alone in the local dir: the next stage-out of the node removes it, but not a claim a
    live worker holds."""
    monkeypatch.setenv("UNIDASK_NODE", "n")
    spec = config(run={"count": 1000, "task_size": 100}, storage={"shard_per": "process"})
    local = shard.run_local_dir(spec)
    local.mkdir(parents=True)
    left, held = local / ".n-k-p1.db.claim", local / ".n-k-p2.db.claim"
    left.touch()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys
fd = os.open({str(held)!r}, os.O_CREAT | os.O_WRONLY, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert staging.stage_orphans(spec, "k", "n") == []
        assert not left.exists() and held.exists()
    finally:
        holder.communicate("")
    staging.stage_orphans(spec, "k", "n")
    assert not held.exists()


def test_snapshots_stay_whole_while_other_processes_write(config, tmp_path):
    """A shard opened as single-writer that other processes write anyway (a misconfiguration):
    every snapshot still holds whole tasks only, whose rows match their checksums."""
    # small pages, so the writers' automatic checkpoints (every 1000 pages) run during the copies
    spec = config(run={"count": 20_000, "task_size": 20}, generator={"dim": 8},
                  storage={"busy_timeout": 30, "page_size": 1024, "shard_per": "node"})
    tasks = list(range(spec.n_tasks))
    meta, options = shard.options(spec)
    live = shard.Shard(shard.local_path(spec, "c1", "shared"), meta, **{**options, "single_writer": True})
    snapshots = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = [pool.submit(write_tasks, spec, tasks[i::2], "c1") for i in range(2)]
        while not all(f.done() for f in running):
            snapshots.append(live.snapshot(tmp_path / f"snap{len(snapshots)}")[0])
            time.sleep(0.05)
        assert all(all(f.result()) for f in running)
    snapshots.append(live.snapshot(tmp_path / "last")[0])
    live.close()
    sizes = []
    for path in snapshots:
        con = db.connect_readonly(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for task, digest, count in con.execute("SELECT task, checksum, count FROM tasks"):
            blobs = [b for i, b in shard_data(con) if i // spec.task_size == task]
            assert len(blobs) == count and db.checksum(b"".join(blobs), [None] * count) == digest
        assert len(shard_data(con)) == con.execute("SELECT coalesce(sum(count), 0) FROM tasks").fetchone()[0]
        sizes.append(con.execute("SELECT count(*) FROM tasks").fetchone()[0])
        con.close()
    assert sizes == sorted(sizes) and sizes[-1] == len(tasks) and len(set(sizes)) > 2


def test_network_filesystem_is_refused(netfs):
    with pytest.raises(InputError, match="network filesystem \\(fuse.sshfs\\)"):
        shard.Shard(netfs / "live" / "x.db", {"fingerprint": "f"})
    assert not (netfs / "live" / "x.db").exists()


def test_filesystem_type_reads_proc_mounts(tmp_path):
    assert files.filesystem_type(tmp_path) == files.filesystem_type(tmp_path / "not-yet-there")
    assert files.filesystem_type("/proc") == "proc"


def test_node_name_precedence(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "cn042")
    monkeypatch.setenv("UNIDASK_NODE", "sim3")
    assert identity.node_name() == "sim3"
    monkeypatch.delenv("UNIDASK_NODE")
    assert identity.node_name() == "cn042"


@pytest.mark.parametrize("dim, expected", [(4, 65536), (16, 65536), (32, 16384), (48, 32768)])
def test_auto_page_size_keeps_shards_small(tmp_path, dim, expected, per_row_shards):
    """"auto" picks, for real shards, the largest page size whose file grows within 10% of the
    least per matrix: 64 KiB pages hold three n = 32 rows (a quarter wasted) and one n = 48 row."""
    u = haar(np.random.default_rng(0), 160, dim=dim)
    info = {"seed": "0/0", "node": "n", "worker": "w", "started": 0.0, "finished": 0.0}
    per_row = {}
    for page in db.AUTO_PAGE_SIZES:
        s = shard.Shard(tmp_path / f"{page}.db", {"fingerprint": "f"}, single_writer=True, page_size=page)
        s.write_task(0, 0, u[:40], None, info)   # the fixed pages (schema, meta, tasks) first
        before = s.path.stat().st_size
        s.write_task(1, 40, u[40:], None, info)
        per_row[page] = (s.path.stat().st_size - before) / 120
        s.close()
    best = min(per_row.values())
    pick = db.page_size_for(u[0].nbytes)
    assert pick == expected
    assert per_row[pick] <= 1.1 * best, per_row
    assert all(per_row[page] > 1.1 * best for page in db.AUTO_PAGE_SIZES if page > pick), per_row


@pytest.mark.parametrize("count", [1, 300])
def test_a_packed_task_merges_to_the_rows_a_row_per_matrix_writes(tmp_path, config, monkeypatch, count):
    """A task packed (blocks) and the same task a row per matrix (rows with meta, tasks
    over PACK_MAX bytes) hold the same rows, with one checksum; both merges (page by page, and
    SQLite's with its unpacking in SQL) make the same database of them."""
    spec = config(run={"count": count, "task_size": count})
    u = haar(np.random.default_rng(1), count, dim=4)
    info = {"seed": "0/0", "node": "n", "worker": "w", "started": 0.0, "finished": 0.0}
    rows, tables = {}, {}
    for name, limit in (("packed", shard.PACK_MAX), ("row by row", 0)):
        monkeypatch.setattr(shard, "PACK_MAX", limit)
        meta, opts = shard.options(spec)
        s = shard.Shard(tmp_path / f"{limit}.db", meta, **{**opts, "single_writer": True})
        s.write_task(0, 0, u, None, info)
        rows[name] = (shard_data(s.con), s.con.execute("SELECT checksum FROM tasks").fetchall(),
                      s.con.execute("SELECT count(*) FROM blocks").fetchone()[0])
        s.close()
        RunDir(spec.run_dir).prepare(spec, resume=False)
        staged = RunDir(spec.run_dir).shards / "s.db"
        staged.parent.mkdir(exist_ok=True)
        shutil.copy(s.path, staged)
        for how in ("pages", "sql"):
            with monkeypatch.context() as m:
                if how == "sql":   # what the merge does where rows do not fit its pages
                    m.setattr(pages, "fits", lambda *a: False)
                report = unidask.merge(spec.run_dir)
            tables[name, how] = merged_data(report.out)
            report.out.unlink()
        staged.unlink()
    assert rows["packed"][:2] == rows["row by row"][:2] and (rows["packed"][2], rows["row by row"][2]) == (1, 0)
    assert [i for i, _ in rows["packed"][0]] == list(range(count))
    assert all(d == m.tobytes() for (_, d), m in zip(rows["packed"][0], u))
    assert len({tuple(t) for t in tables.values()}) == 1 and len(tables) == 4


def test_big_task_written_with_write_behind_is_whole_and_durable(tmp_path, monkeypatch):
    """A task big enough for the write-behind thread (made small here) commits the same rows, and
    nothing of it is left unsynced when write_task returns."""
    monkeypatch.setattr(shard, "WRITE_BEHIND_EVERY", 1 << 16)
    u = haar(np.random.default_rng(2), 2000, dim=8)   # 2 MiB
    s = shard.Shard(tmp_path / "big.db", {"fingerprint": "f"}, single_writer=True)
    info = {"seed": "0/0", "node": "n", "worker": "w", "started": 0.0, "finished": 0.0}
    assert s.write_task(0, 0, u, None, info)
    assert not any(t.name == "unidask-write-behind" for t in threading.enumerate())
    assert _dirty_pages(tmp_path / "big.db") == 0
    data = b"".join(d for (d,) in s.con.execute("SELECT data FROM blocks ORDER BY id"))
    assert s.con.execute("SELECT max(length(data)) FROM blocks").fetchone()[0] <= shard.BLOCK_BYTES
    assert data == u.tobytes()
    s.close()


def _dirty_pages(path) -> int:
    """Dirty page-cache pages of ``path``, from Linux's cachestat (6.5+)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fields = (ctypes.c_uint64 * 2)(0, 0)   # the whole file
    stat = (ctypes.c_uint64 * 5)()         # cache, dirty, writeback, evicted, recently evicted
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, fields, stat, 0) != 0:   # 451: cachestat on every architecture
            pytest.skip(f"no cachestat: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return stat[1]


def _write(path, chunks: int) -> None:
    block = np.random.default_rng(0).bytes(1 << 20)
    with open(path, "ab") as f:   # not "wb": ext4 writes back a file truncated by its open at close
        for _ in range(chunks):
            f.write(block)
            f.flush()


def test_write_behind_only_on_local_disk(tmp_path, netfs):
    for where, flushes in ((tmp_path, True), (netfs, False)):
        (where / "f").touch()
        with files.write_behind(where / "f"):
            assert ("unidask-write-behind" in {t.name for t in threading.enumerate()}) is flushes, where


def test_write_behind_flushes_while_the_file_is_written(tmp_path):
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    (tmp_path / "behind").touch()   # write_behind follows a file that exists
    _write(tmp_path / "plain", 48)
    if _dirty_pages(tmp_path / "plain") < pages // 2:
        pytest.skip("this kernel wrote the file back by itself; nothing to compare")
    with files.write_behind(tmp_path / "behind", every=8 << 20, poll=0.01):
        _write(tmp_path / "behind", 48)
        deadline = time.monotonic() + 10
        while _dirty_pages(tmp_path / "behind") > pages // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _dirty_pages(tmp_path / "behind") <= pages // 4   # before the body's own fsync
    assert _dirty_pages(tmp_path / "plain") >= pages // 2       # no flush without it


def test_a_small_file_gets_pages_that_its_fixed_pages_do_not_outweigh():
    """A delta of one small task: 4 KiB pages (64 KiB made it 1.7x its data); a large one keeps
    the run's pages; rows too big for small pages (n = 32) never get pages that waste space."""
    u4, u32 = 4 * 4 * 16, 32 * 32 * 16
    assert db.page_size_for(u4, 2000 * u4) == 4096
    assert db.page_size_for(u4, 10**8) == db.page_size_for(u4) == 65536
    for rows in (1, 10, 1000, 10**5):
        page = db.page_size_for(u32, rows * u32)
        assert page in db.AUTO_PAGE_SIZES and (rows < 1000 or db.FIXED_PAGES * page <= rows * u32 / 20)
