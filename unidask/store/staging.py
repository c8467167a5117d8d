"""Stage-outs: a live shard (:mod:`shard`) to the run dir on shared storage, whole. A process's own
shard is sealed as a segment and shipped (a rename on one filesystem, else a file copy on the
process's background thread, reported by its next stage-out); a node's shared shard is copied
whole first, then as deltas. Also the shards dead processes and killed drivers left behind
(``stage_orphans``, ``salvage``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import secrets
import shutil
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core import files
from ..core.errors import RunError
from ..spec.config import Spec
from . import db, identity, shard
from .rundir import RunDir

log = logging.getLogger(__name__)


def same_filesystem(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def ship(sealed: Path, staging_dir: Path) -> tuple[Path, list[int], int]:
    """Stage a sealed segment (:meth:`shard.Shard.seal`) whole under its own name, then remove it from
    local disk: a rename where the staging dir is on the same filesystem, else a file copy (no
    row is read or written: no per-row cost). Either way the staged name only ever holds a whole
    file; on failure the segment stays where it was. Returns the staged path, its tasks and rows."""
    dest = staging_dir / sealed.name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (moved := same_filesystem(sealed.parent, dest.parent)):
            tmp = files.temp_name(dest)
            files.remove_stale_temps(dest)
            try:
                os.rename(sealed, tmp)
            except OSError as e:
                if e.errno != errno.EXDEV:   # a bind mount: one device, and yet no rename across
                    raise
                moved = False
        if moved:
            try:
                counts = shard.Shard.as_staged(tmp)
                files.publish(tmp, dest)
            except BaseException:
                os.rename(tmp, sealed)   # back where the next stage-out (or --resume) finds it
                raise
        else:
            with files.publishing(dest) as tmp:
                # flushed as it grows: gigabytes left dirty in the page cache stall every writer
                # of the node (its shards' commits too) when the kernel writes them back at once
                with files.write_behind(tmp):
                    shutil.copyfile(sealed, tmp)
                counts = shard.Shard.as_staged(tmp)
            db.remove_files(sealed)
    except (sqlite3.Error, OSError) as e:
        raise shard.stage_error(sealed, dest, e) from e
    return dest, *counts


class Staged:
    """What this process staged of one live shard: the tasks, their rows; for a single-writer
    shard its segments still shipping, on a background thread, and for a node shard the name of
    its next delta (a token of this process, so no two processes' deltas share a name)."""

    def __init__(self) -> None:
        self.tasks: set[int] = set()
        self.rows = 0
        self.token, self.seq = secrets.token_hex(2), 0
        self.shipping: dict[Future, Path] = {}   # segment copies under way -> the sealed file
        self.failed: list[Path] = []             # sealed segments whose shipping failed: next time
        self.shipped: list[tuple[Path, list[int], int]] = []   # shipped, not yet reported

    def next_name(self, live: shard.Shard) -> str:
        self.seq += 1
        return f"{live.path.stem}-{live.uid}-d{self.token}{self.seq:05d}.db"

    def ship(self, sealed: Path, staging: Path, *, wait: bool) -> None:
        """Ship ``sealed``: at once where it is a rename (same filesystem) or ``wait``, else on
        the background thread, the worker generating meanwhile."""
        if wait or same_filesystem(sealed.parent, staging):
            try:
                self.shipped.append(ship(sealed, staging))
            except RunError:
                self.failed.append(sealed)
                raise
        else:
            self.shipping[_shipper().submit(ship, sealed, staging)] = sealed

    def settle(self, staging: Path, *, wait: bool) -> None:
        """Gather the copies finished (all of them, with ``wait``); ship again, first, what failed
        before. Raises the first failure (its segment kept for the next try)."""
        retry, self.failed = self.failed, []
        errors = []
        for sealed in retry:
            try:
                self.ship(sealed, staging, wait=wait)
            except RunError as e:
                errors.append(e)
        for future in list(self.shipping):
            if wait or future.done():
                sealed = self.shipping.pop(future)
                try:
                    self.shipped.append(future.result())
                except RunError as e:
                    self.failed.append(sealed)
                    errors.append(e)
        if errors:
            raise errors[0]

    def report(self) -> list[tuple[Path, list[int], int]]:
        shipped, self.shipped = self.shipped, []
        for _, new, rows in shipped:
            self.tasks.update(new)
            self.rows += rows
        return shipped


_staged: dict[Path, Staged] = {}   # outlives the Shard objects (a node shard is closed before its final stage)
_pool: ThreadPoolExecutor | None = None


def _shipper() -> ThreadPoolExecutor:
    """This process's one thread that copies its segments to shared storage (a copy leaves the
    GIL to the kernel: the worker's generation goes on beside it)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="unidask-ship")
    return _pool


def stage(spec: Spec, attempt: str, *, final: bool = False) -> dict[str, Any] | None:
    """Stage this process's (or node's) shard out to the run dir; None if it has none.

    A process's own shard (``shard_per = "process"``) is staged as segments: its live file is
    sealed and shipped whole (:meth:`shard.Shard.seal`, :func:`ship`), and the next task starts a new
    one, so a stage-out costs the worker a rename, whatever the interval. A node's shared shard:
    the first stage-out copies it whole, each later one only the tasks written since
    (:meth:`shard.Shard.delta`). ``final``: wait for every copy, then close the shard and delete it
    locally (for a node shard, the driver closes the other processes' connections first)."""
    node = identity.node_name()
    if spec.storage.shard_per == "process":
        stage_orphans(spec, attempt, node)
    path = shard.local_path(spec, attempt, node)
    start = time.time()
    staging = RunDir(spec.run_dir).shards
    done = _staged.setdefault(path, Staged())
    if spec.storage.shard_per == "process":
        live = shard.cached(path) or (shard.for_task(spec, attempt) if path.exists() else None)
        if live is not None and live.has_tasks():
            shard.detach(path)
            try:
                staging.mkdir(parents=True, exist_ok=True)
                sealed = live.seal()
            except OSError as e:
                raise shard.stage_error(path, staging, e) from e
            done.ship(sealed, staging, wait=final)
        done.settle(staging, wait=final)
    elif path.exists() or shard.cached(path) is not None:
        live = shard.for_task(spec, attempt)
        if not done.tasks:   # the whole shard
            done.shipped.append(live.snapshot(staging))
        elif (delta := live.delta(staging / done.next_name(live), done.tasks)) is not None:
            done.shipped.append(delta)
    shipped = done.report()
    if final:
        shard.close_shards()
        db.remove_files(path)
        _staged.pop(path, None)
    if not (shipped or done.tasks or done.shipping or done.failed):   # no shard here
        return None
    return {"node": node, "path": str(shipped[-1][0]) if shipped else None,
            "paths": [str(dest) for dest, _, _ in shipped], "tasks": len(done.tasks), "rows": done.rows,
            "new_tasks": sum(len(new) for _, new, _ in shipped),
            "bytes": sum(dest.stat().st_size for dest, _, _ in shipped),
            "time": time.time(), "seconds": time.time() - start}


def stage_orphans(spec: Spec, attempt: str, node: str) -> list[Path]:
    """Stage and remove the shards of this node's worker processes that died (``shard_per =
    "process"``): their restarted successors write new shards, and without this every task the
    dead ones wrote since their last stage-out would be generated again. A lock on a claim file
    keeps two workers of the node from taking the same orphan."""
    staged = []
    mine = f"{glob.escape(node)}-{glob.escape(attempt)}-p*.db"
    for journal in shard.run_local_dir(spec).glob(f"{mine}-journal"):   # a dead process's, its shard sealed
        shard_file = journal.with_name(journal.name.removesuffix("-journal"))
        pid = shard.writer_pid(shard_file)
        if pid is not None and pid != os.getpid() and not files.pid_alive(pid) and not shard_file.exists():
            journal.unlink(missing_ok=True)
    for path in sorted(shard.run_local_dir(spec).glob(mine)):
        pid = shard.writer_pid(path)
        if pid is None or pid == os.getpid() or files.pid_alive(pid):
            continue
        with _claimed(path) as mine_now:
            if mine_now and path.exists() and (done := stage_and_remove(spec, path)) is not None:
                staged.append(done)
    # a claimer killed between removing its orphan and its claim leaves the claim alone behind
    for claim in shard.run_local_dir(spec).glob(f".{mine}.claim"):
        orphan = claim.with_name(claim.name[1:].removesuffix(".claim"))
        if not orphan.exists():
            with _claimed(orphan):   # which removes the claim, unless a live claimer holds it
                pass
    return staged


@contextlib.contextmanager
def _claimed(path: Path):
    """Yield whether this process holds the claim on an orphan shard: a lock, not a mere file, so
    a worker killed while staging an orphan leaves it to the next. The claim file goes once the
    shard is gone."""
    claim = path.with_name(f".{path.name}.claim")
    fd = os.open(claim, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            if not path.exists():
                claim.unlink(missing_ok=True)
    finally:
        os.close(fd)


def salvage(spec: Spec) -> list[Path]:
    """Stage the shards an earlier, killed driver left in this machine's local dir, then remove them.

    Used on ``--resume`` in local mode, where the local dir of every simulated node is on this
    machine; opening a shard replays its WAL or rolls back its hot journal, so every committed task is
    kept.
    """
    staged = []
    for path in sorted(shard.run_local_dir(spec).glob("[!.]*.db")):
        # a live process's shard is not left over: a driver stopped for a while may go on with it
        if (pid := files.opened_by(path)) is not None:
            log.warning("%s: left in place, process %d still has it open", path, pid)
        elif (staged_path := stage_and_remove(spec, path)) is not None:
            staged.append(staged_path)
    return staged


def stage_and_remove(spec: Spec, path: Path) -> Path | None:
    """Stage a shard whose writer is gone, then remove it from local disk. Only a file of this
    user's, of this run, whose every task passes the merge's checks is staged; one its writer died
    in before a task committed is removed (it holds nothing); anything else is left in place with a
    warning naming it (None)."""
    if (why := files.owned_file(path)) is None:
        db.recover(path)
        if db.never_written(path):
            log.info("%s: removed, its writer died before its first task", path)
            db.remove_files(path)
            return None
        try:
            db.check_database(path, spec.fingerprint)   # read-only, before it is opened to write
        except db.BadFile as e:
            why = e.reason
    if why is not None:
        log.warning("%s: left in place, not staged: %s", path, why)
        return None
    meta, opts = shard.options(spec)
    expected = db.Expected.of(spec)
    live = shard.Shard(path, meta, **{**opts, "single_writer": True})
    try:
        staged = live.snapshot(RunDir(spec.run_dir).shards,
                               check=lambda tmp: db.check(tmp, spec.fingerprint, expected))[0]
    except db.BadFile as e:
        log.warning("%s: left in place, not staged: %s", path, e.reason)
        return None
    finally:
        live.close()
    db.remove_files(path)
    return staged
