"""The live shard: a SQLite database on node-local disk (one per worker process by default, or one
per node), written one task per transaction, sealed or snapshotted whole for a stage-out
(:mod:`staging` ships them); its path and this process's open shards.

A node's shared shard (``storage.shard_per = "node"``) is in WAL mode: its worker processes read
while one writes, ``BEGIN IMMEDIATE`` takes the write lock up front (no deadlocking upgrade),
``busy_timeout`` makes a writer wait instead of failing, and generation happens before the
transaction so the lock is held only for the inserts.

A shard with a single writer (``shard_per = "process"``) needs none of WAL's concurrency, so it
keeps a rollback journal instead: WAL writes every page twice (to the WAL, then at the checkpoint
into the database, each synced), a rollback journal holds only the few pages an append changes.
That writes faster, and the file is always a whole database: a stage-out copies it and a close
needs no checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from itertools import repeat
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core import files
from ..core.errors import InputError, RunError
from ..spec.config import Spec
from . import db, identity

# A task's rows go in packed (table blocks), in BLOBs of this size: each a few inserts' worth of
# SQLite's work, and small enough that its copies stay in memory already in use (one BLOB of a
# whole task made SQLite copy it twice into freshly mapped memory: slower than a row per matrix at
# n = 16 and 32). Tasks over PACK_MAX, and rows with meta, go in a row per matrix.
BLOCK_BYTES = 1 << 20
PACK_MAX = 1 << 40
WRITE_BEHIND_EVERY = files.WRITE_BEHIND_EVERY

log = logging.getLogger(__name__)


class Shard:
    """A live shard (a process's or a node's). Cache one per process with :func:`open_shard`."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, str], *, synchronous: str = "NORMAL",
                 busy_timeout: float = 60.0, allow_network_fs: bool = False, page_size: int = 65536,
                 single_writer: bool = False):
        """``single_writer``: only this process writes the shard (``shard_per = "process"``): a
        rollback journal instead of WAL, and a stage-out copies the file instead of rebuilding it."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.single_writer = single_writer
        files.private_dir(self.path.parent)
        if not allow_network_fs:
            files.require_local_disk(self.path.parent)
        try:
            files.create_private(self.path)
            self.con = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                       check_same_thread=False)
            self.con.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # large pages: fewer page headers and WAL frames per matrix, and up to n = 32
            # (complex128) a matrix fits in a page instead of an overflow chain; only takes
            # effect while the file is empty, so it comes before the journal mode
            self.con.execute(f"PRAGMA page_size = {int(page_size)}")
            journal = "TRUNCATE" if single_writer else "WAL"
            mode = self._retry(lambda: self.con.execute(f"PRAGMA journal_mode = {journal}").fetchone()[0])
            if mode.lower() != journal.lower():
                raise RunError(f"{self.path}: the filesystem does not support journal_mode={journal} "
                               f"(got {mode})")
            if single_writer and synchronous.upper() == "NORMAL":
                # with a rollback journal only FULL promises what NORMAL does with WAL: a power
                # loss may lose the last commits but never corrupts the file; an append's journal
                # is a few pages, so its extra sync costs nothing measurable
                synchronous = "FULL"
            self.con.execute(f"PRAGMA synchronous = {synchronous}")
            # the first real write doubles as the probe that the journal works on this filesystem
            self._retry(self.con.executescript, db.SHARD_SCHEMA)
            # shard_uid tells this file from a later one at the same path (after a node lost its
            # disk), so their staged snapshots get different names and neither overwrites the other
            rows = {**meta, "shard_uid": secrets.token_hex(3)}
            self._transaction(self.con.executemany,
                              "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", rows.items())
            found = db.read_meta(self.con)
        except sqlite3.Error as e:
            raise RunError(f"{self.path}: cannot open shard: {e}") from e
        self.uid = found["shard_uid"]
        if found.get("fingerprint") != meta["fingerprint"]:
            raise RunError(f"{self.path}: shard belongs to another run "
                           f"(fingerprint {found.get('fingerprint')}, expected {meta['fingerprint']})")

    def _retry(self, fn, *args):
        """Run ``fn`` retrying 'database is locked' with jittered backoff beyond busy_timeout."""
        deadline = time.monotonic() + 4 * self.busy_timeout
        delay = 0.01
        while True:
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    def _transaction(self, fn, *args):
        def attempt():
            self.con.execute("BEGIN IMMEDIATE")
            try:
                result = fn(*args)
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
            return result

        return self._retry(attempt)

    def write_task(self, task: int, base_id: int, array: np.ndarray, metas: Sequence[str | None] | None,
                   info: dict[str, Any]) -> bool:
        """Write one task's unitaries and its ``tasks`` row in one transaction.

        Returns False when the task was already there with the same checksum (a retried task);
        raises when it was there with different data, which would mean generation is not
        reproducible.
        """
        n = array.shape[-1]
        # the array's own bytes, not a bytes copy of them: SQLite and the hash read any buffer, and
        # at n = 32 a task's 64 MB copy (freshly faulted pages) was a quarter of the write path
        buf = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = memoryview(buf).cast("B") if buf.size else b""
        step = len(data) // len(array) if len(array) else 1
        digest = db.checksum(data, len(array) if metas is None else metas)

        def insert() -> bool:
            found = self.con.execute("SELECT checksum FROM tasks WHERE task = ?", (task,)).fetchone()
            if found is not None:
                if found[0] != digest:
                    raise RunError(f"{self.path}: task {task} written twice with different data "
                                   f"(checksums {found[0]} and {digest})")
                return False
            if metas is None and 0 < len(data) <= PACK_MAX:   # packed, meta left to NULL
                per = max(1, BLOCK_BYTES // step)   # whole matrices a block
                self.con.executemany("INSERT INTO blocks(id, dim, data) VALUES (?, ?, ?)",
                                     ((base_id + i, n, data[i * step:(i + per) * step])
                                      for i in range(0, len(array), per)))
            else:
                # rows made afresh on each attempt (a retry must not get a spent iterator)
                ids = range(base_id, base_id + len(array))
                blobs = (data[i:i + step] for i in range(0, len(data), step))
                if metas is None:
                    self.con.executemany("INSERT INTO unitaries(id, dim, data) VALUES (?, ?, ?)",
                                         zip(ids, repeat(n), blobs))
                else:
                    self.con.executemany("INSERT INTO unitaries(id, dim, data, meta) VALUES (?, ?, ?, ?)",
                                         zip(ids, repeat(n), blobs, metas))
            self.con.execute("INSERT INTO tasks(task, seed, count, node, worker, started, finished, checksum) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (task, info["seed"], len(array), info["node"], info["worker"],
                              info["started"], info["finished"], digest))
            return True

        # a big task's pages go to disk while SQLite still inserts, so the commit's sync finds
        # little left: 1.08x the write path at n = 32 (64 MiB tasks), 1.05-1.1x at n = 4 (26 MiB);
        # a WAL shard syncs nothing at commit (NORMAL), so only a single writer's file gains
        behind = self.single_writer and len(data) >= 2 * WRITE_BEHIND_EVERY
        try:
            with files.write_behind(self.path) if behind else contextlib.nullcontext():
                return self._transaction(insert)
        except sqlite3.Error as e:
            raise RunError(f"{self.path}: cannot write task {task}: {e}") from e

    @property
    def staged_name(self) -> str:
        """The name of its staged copy: the live file's name and its uid (a sealed segment, named
        so already, keeps its name)."""
        return self.path.name if self.path.stem.endswith(f"-{self.uid}") else f"{self.path.stem}-{self.uid}.db"

    def has_tasks(self) -> bool:
        return self.con.execute("SELECT EXISTS (SELECT 1 FROM tasks)").fetchone()[0] == 1

    def seal(self) -> Path:
        """Close this single-writer shard and rename it, beside itself, to its staged name: a
        segment, a whole database (every commit synced; an empty rollback journal stays behind),
        ready to ship. The next task of this process starts a new shard at the live path."""
        self.close()
        if any(Path(f"{self.path}{suffix}").exists() for suffix in ("-wal", "-shm")):
            raise RunError(f"{self.path}: another process still has this single-writer shard open; "
                           "left in place (`unidask run --resume` stages it)")
        sealed = self.path.with_name(self.staged_name)
        try:
            os.rename(self.path, sealed)
            # the journal left empty by the last commit: the next shard makes its own, and a
            # process killed before its next task leaves nothing behind
            Path(f"{self.path}-journal").unlink(missing_ok=True)
        except OSError as e:
            raise self._stage_error(sealed, e) from e
        return sealed

    def snapshot(self, staging_dir: str | os.PathLike, check: Callable[[Path], Any] | None = None
                 ) -> tuple[Path, list[int], int]:
        """Stage out: write a consistent copy of the shard into ``staging_dir`` under a temporary
        name, fsync it and rename it into place, so the staged name only ever holds a whole
        database. ``check`` sees the copy before the rename (and may refuse it by raising).
        Returns the staged path, the tasks and the rows in the copy."""
        dest = Path(staging_dir) / self.staged_name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with files.publishing(dest) as tmp:
                if not (self.single_writer and self._copy_file(tmp)):
                    # VACUUM INTO copies one read snapshot of the WAL database (writers go on
                    # meanwhile) into a compact file with a rollback journal: readers of it need
                    # no -wal or -shm
                    self._retry(self.con.execute, "VACUUM INTO ?", (str(tmp),))
                counts = self.as_staged(tmp)
                if check is not None:
                    check(tmp)
        except (sqlite3.Error, OSError) as e:
            raise self._stage_error(dest, e) from e
        return dest, *counts

    def delta(self, dest: Path, since: set[int]) -> tuple[Path, list[int], int] | None:
        """Stage out only the tasks not in ``since`` (those an earlier stage-out of this process
        staged): a shard of its own at ``dest``, merged like any other, so the bytes written to
        shared storage grow with the data, not with the data times the stage-outs. None when no
        task is new. Returns the path, the tasks and the rows staged."""
        task_size = int(db.read_meta(self.con)["task_size"])
        try:
            self.con.execute("BEGIN")   # one read snapshot of a WAL shard's other writers' commits
            try:
                counts = dict(self.con.execute("SELECT task, count FROM tasks"))
                new = sorted(t for t in counts if t not in since)
                if not new:
                    return None
                dest.parent.mkdir(parents=True, exist_ok=True)
                row_bytes = self.con.execute(
                    "SELECT coalesce((SELECT dim * dim FROM blocks WHERE id >= ? LIMIT 1) * ?, "
                    "(SELECT length(data) FROM unitaries WHERE id >= ? LIMIT 1))",
                    (new[0] * task_size, np.dtype(db.read_meta(self.con).get("dtype", "complex128")).itemsize,
                     new[0] * task_size)).fetchone()[0] or 1
                page = min(self.con.execute("PRAGMA page_size").fetchone()[0],
                           db.page_size_for(row_bytes, row_bytes * sum(counts[t] for t in new)))
                with files.publishing(dest) as tmp:
                    out = sqlite3.connect(tmp, isolation_level=None)
                    try:
                        out.execute(f"PRAGMA page_size = {page}")
                        out.execute("PRAGMA journal_mode = OFF")   # built whole, then published
                        out.executescript(db.SHARD_SCHEMA)
                    finally:
                        out.close()
                    self.con.execute("ATTACH DATABASE ? AS delta", (str(tmp),))
                    try:
                        self.con.execute("INSERT INTO delta.meta SELECT * FROM main.meta")
                        self.con.executemany("INSERT INTO delta.tasks SELECT * FROM main.tasks WHERE task = ?",
                                             ((t,) for t in new))
                        self.con.executemany("INSERT INTO delta.blocks SELECT * FROM main.blocks "
                                             "WHERE id >= ? AND id < ?",
                                             ((t * task_size, (t + 1) * task_size) for t in new))
                        self.con.executemany("INSERT INTO delta.unitaries SELECT * FROM main.unitaries "
                                             "WHERE id >= ? AND id < ?",
                                             ((t * task_size, (t + 1) * task_size) for t in new))
                        self.con.execute("COMMIT")
                    finally:
                        if self.con.in_transaction:
                            self.con.execute("ROLLBACK")
                        self.con.execute("DETACH DATABASE delta")
                    _, rows = self.as_staged(tmp)
            finally:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as e:
            raise self._stage_error(dest, e) from e
        return dest, new, rows

    def _stage_error(self, dest: Path, e: Exception) -> RunError:
        return stage_error(self.path, dest, e)

    @staticmethod
    def as_staged(tmp: Path) -> tuple[list[int], int]:
        """Make the staged copy at ``tmp`` a rollback-journal database (header bytes 18-19, the file
        format versions: 1 instead of WAL's 2, what `PRAGMA journal_mode = DELETE` writes; readers
        need no -wal or -shm) and read it back: its tasks and rows."""
        with open(tmp, "r+b") as f:
            f.seek(18)
            f.write(b"\x01\x01")
        check = db.connect_readonly(tmp)
        try:
            rows = check.execute("SELECT task, count FROM tasks").fetchall()
        finally:
            check.close()
        return [t for t, _ in rows], sum(c for _, c in rows)

    def _copy_file(self, tmp: Path) -> bool:
        """Snapshot by copying the file, ~3x faster than VACUUM INTO: while this connection holds
        the write lock, with no WAL (a single-writer shard, or a WAL one just checkpointed), the
        database file holds every commit and nothing can change it. False if a WAL shard's other
        writer committed in between."""
        self._retry(self.con.execute, "PRAGMA wal_checkpoint(TRUNCATE)")  # no-op without WAL
        self._retry(self.con.execute, "BEGIN IMMEDIATE")
        try:
            wal = Path(f"{self.path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                return False
            shutil.copyfile(self.path, tmp)
        finally:
            self.con.execute("ROLLBACK")
        return True

    @property
    def nbytes(self) -> int:
        """Bytes on local disk, WAL included."""
        return sum(os.stat(f"{self.path}{suffix}").st_size for suffix in ("", "-wal")
                   if os.path.exists(f"{self.path}{suffix}"))

    def close(self) -> None:
        self.con.close()


# -- where a run's live shards are, and how they are opened -----------------------------------------

def new_attempt() -> str:
    """An id unique to this allocation, so a resumed run never overwrites an earlier staged shard."""
    return identity.job_id() or secrets.token_hex(4)


def run_local_dir(spec: Spec) -> Path:
    """This node's directory of the run's live shards: named for the run and scoped to its run dir
    and fingerprint, so two runs of one config never see each other's shards."""
    scope = hashlib.sha256(f"{spec.run_dir}\0{spec.fingerprint}".encode()).hexdigest()[:12]
    return spec.local_dir / f"{spec.name}-{scope}"


def local_path(spec: Spec, attempt: str, node: str | None = None) -> Path:
    """This process's live shard: the node's, or its own with ``storage.shard_per = "process"``."""
    own = f"-p{os.getpid()}" if spec.storage.shard_per == "process" else ""
    return run_local_dir(spec) / f"{node or identity.node_name()}-{attempt}{own}.db"


def writer_pid(path: Path) -> int | None:
    """The pid in a process shard's name (``NODE-ATTEMPT-pPID.db``, or a sealed segment's
    ``NODE-ATTEMPT-pPID-UID.db``)."""
    found = re.search(r"-p(\d+)(?:-[0-9a-f]{6})?$", path.stem)
    return int(found[1]) if found else None


def options(spec: Spec, row_bytes: int | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The meta rows and the open options of this run's shards; ``row_bytes`` (one matrix) sizes
    the pages of a new shard under ``page_size = "auto"`` (an existing file keeps its own)."""
    s = spec.storage
    return (db.database_meta(spec.to_dict(), spec.fingerprint),
            {"synchronous": s.synchronous, "busy_timeout": s.busy_timeout,
             "allow_network_fs": s.allow_network_fs, "page_size": db.run_page_size(s.page_size, row_bytes),
             "single_writer": s.shard_per == "process"})


def check_local_dir(spec: Spec) -> None:
    """Fail early on an unusable local dir (in local mode the driver's machine is the node)."""
    path = files.private_dir(spec.local_dir, "local_dir")
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise InputError(f"local_dir {path} is not writable: {e.strerror or e}") from e
    if not spec.storage.allow_network_fs:
        files.require_local_disk(path)
    files.private_dir(run_local_dir(spec), "local_dir")


def disk(spec: Spec) -> str:
    """Which shard this process writes: its node, and the device and inode of the local dir
    (workers of one SLURM job share it; two jobs on one node with private scratch do not), and with
    ``shard_per = "process"`` its process id."""
    st = files.private_dir(spec.local_dir).stat()
    own = f":{os.getpid()}" if spec.storage.shard_per == "process" else ""  # each stages its own
    return f"{identity.node_name()}:{st.st_dev}:{st.st_ino}{own}"


# -- this process's open shards (worker processes live long: open once) ----------------------------

_open: dict[Path, Shard] = {}


def cached(path: Path) -> Shard | None:
    """This process's open shard at ``path``, if any."""
    return _open.get(path)


def for_task(spec: Spec, attempt: str, row_bytes: int | None = None) -> Shard:
    """This process's live shard of the run, opened on first use and kept."""
    path = local_path(spec, attempt)
    if (shard := _open.get(path)) is None:
        meta, opts = options(spec, row_bytes)
        shard = _open[path] = Shard(path, meta, **opts)
    return shard


def close_shards() -> list[str]:
    """Close every shard this process holds (before a final stage-out or removal)."""
    paths = [str(p) for p in _open]
    while _open:
        _open.popitem()[1].close()
    return paths


def detach(path: Path) -> Shard | None:
    """Forget this process's open shard at ``path`` (sealed for a stage-out: the next task opens
    a new one)."""
    return _open.pop(path, None)


def stage_error(path: Path, dest: Path, e: Exception) -> RunError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return RunError(f"cannot stage {path} to {dest}: {reason}")
