"""Merge: check every staged shard, then combine them into one database built beside the target
and renamed into place when complete.

Staged shards never change, so they are read read-only and immutable (no locks on the network
filesystem), with ``trusted_schema`` off and a check that nothing in them is a view or trigger.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import db, files, malloc, plan
from .db import (COLUMNS, MMAP_SIZE, BadFile, Expected, blame, check_database, check_pages, check_schema,
                 check_tasks)
from .errors import InputError, RunError, writing
from .progress import Progress
from .rundir import RunDir

ATTACH_BATCH = 8  # SQLite attaches at most 10 databases by default


@dataclass
class MergeReport:
    out: Path
    expected_tasks: int
    shards: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    tasks: int = 0
    duplicates: int = 0          # tasks found in more than one shard, with identical data
    missing: list[int] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        rate = self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0
        text = (f"merged {len(self.shards)} shard(s) into {self.out}: {self.rows:,} unitaries, "
                f"{self.tasks}/{self.expected_tasks} tasks, {rate:,.0f} MB/s")
        if self.duplicates:
            text += f", {self.duplicates} duplicate task(s) kept once"
        for path, reason in self.rejected:
            text += f"\nrejected {path}: {reason}"
        if self.missing:
            text += f"\nincomplete: {len(self.missing)} task(s) missing: {plan.ranges(self.missing)}"
        return text


def merge(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, append: bool = False,
          skip_bad: bool = False) -> MergeReport:
    """Merge the staged shards of ``run_dir`` into ``out`` (default ``RUN_DIR/NAME.db``).

    ``append`` adds to an existing ``out`` instead of rebuilding it; ``skip_bad`` merges the good
    shards and lists the rejected ones instead of refusing the merge.
    """
    rd = RunDir(run_dir)
    record = rd.record()
    spec = rd.spec()
    task_size = spec.task_size
    out = Path(out) if out is not None else rd.database(spec.name)
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: no directory {out.parent}")
    with writing(out):   # a place that takes no file (/proc, read-only) is the user's to change: exit 2
        tempfile.TemporaryFile(dir=out.parent).close()
    paths, odd = rd.entries()
    if not paths:
        raise InputError(f"{rd.shards}: no staged shards to merge")
    sizes = {p: p.stat().st_size for p in paths}   # once: each stat is a round trip on shared storage
    report = MergeReport(out, spec.n_tasks)
    for p, why in odd.items():   # named, never opened
        if not skip_bad:
            raise BadFile(p, f"{why}; refused")
        report.rejected.append((str(p), why))
    fingerprint = spec.fingerprint   # a hash of the spec: once, not once a shard
    expected = Expected.of(spec)
    if expected.dim is None:   # a plugin's matrix size: its first sound shard's
        expected = Expected.of(spec, first=_first_sound(paths, fingerprint))

    start = time.monotonic()
    malloc.tune()   # the heap reused from shard to shard, not pages faulted in afresh for each
    tmp = files.temp_name(out)
    files.remove_stale_temps(out)
    files.create_private(tmp)   # owner-only while it is built (SQLite would make it 0644)
    # every shard is checked (meta and schema, every page, every task: counts, ids, dims, lengths,
    # recomputed checksums: the integrity invariant, db.task_faults) on other cores while the rows
    # are copied; a batch commits only once its shards passed. A shard's schema is checked again
    # where it is attached, before anything of it is read.
    checker = ThreadPoolExecutor(2, thread_name_prefix="unidask-check")
    checks = {p: checker.submit(db.check, p, fingerprint, expected) for p in paths}
    # the shards' page size (a delta's may be smaller): the rows fill the pages as well, and the
    # copy runs ~2x faster than at 4 KiB at n = 4
    page_size = db.run_page_size(spec.storage.page_size, expected.dim and expected.dim ** 2 * expected.itemsize)
    try:
        existing = out if append and out.exists() else None
        with contextlib.closing(_open_target(tmp, existing, record, page_size, expected)) as con, files.write_behind(tmp):
            progress = Progress(sum(sizes.values()), unit="MB", desc="merge", scale=1e-6)
            merged = dict(con.execute("SELECT task, checksum FROM main.tasks"))
            for i in range(0, len(paths), ATTACH_BATCH):
                batch = paths[i:i + ATTACH_BATCH]
                while batch:
                    try:
                        report.duplicates += _merge_batch(con, batch, merged, task_size, checks, fingerprint)
                        report.shards += map(str, batch)
                        break
                    except BadFile as e:
                        if not skip_bad:
                            raise
                        report.rejected.append((str(e.path), e.reason))
                        batch = [p for p in batch if p != e.path]  # and merge the others again
                progress.update(sum(sizes[p] for p in paths[i:i + ATTACH_BATCH]))
            progress.close()
            if not report.shards:
                raise InputError(f"{run_dir}: no shard could be merged")
            # every task's row count was checked as it was copied: no need to count the table
            report.rows = con.execute("SELECT coalesce(sum(count), 0) FROM tasks").fetchone()[0]
            done = set(merged)
            report.tasks = len(done)
            report.missing = [t for t in range(spec.n_tasks) if t not in done]
            con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            [("rows", str(report.rows)), ("tasks", str(report.tasks)),
                             ("merged", repr(time.time()))])
            con.execute("PRAGMA journal_mode = DELETE")
        files.publish(tmp, out, mode=files.shared_mode())   # meant to be shared: the umask decides
    except sqlite3.Error as e:
        full = "full" in str(e) or (getattr(e, "sqlite_errorcode", 0) & 0xFF) == 13
        raise RunError(f"merge into {out} failed: {e}" + (f" (the disk of {out.parent} is full: free space, "
                                                         "then merge again)" if full else "")) from e
    except OSError as e:
        raise RunError(f"merge into {out} failed: {e.strerror or e} ({e.filename or out})") from e
    finally:
        checker.shutdown(cancel_futures=True)
        tmp.unlink(missing_ok=True)
    report.bytes_read = sum(sizes[Path(p)] for p in report.shards)
    report.seconds = time.monotonic() - start
    return report


def _first_sound(paths: list[Path], fingerprint: str) -> Path | None:
    for p in paths:
        with contextlib.suppress(BadFile):
            check_database(p, fingerprint)
            return p
    return None


def _open_target(tmp: Path, existing: Path | None, record: dict, page_size: int, expected: Expected
                 ) -> sqlite3.Connection:
    if existing is not None:
        try:   # the same checks hold for a merged result
            check_pages(existing)
            check_database(existing, record["fingerprint"], what="database")
            check_tasks(existing, expected)
        except BadFile as e:
            raise InputError(f"cannot append to {existing}: {e.reason}") from e
        shutil.copyfile(existing, tmp)
    con = sqlite3.connect(tmp, isolation_level=None, uri=True)
    con.execute("PRAGMA trusted_schema = OFF")
    con.execute(f"PRAGMA page_size = {page_size}")
    # the temp file is thrown away on any failure and never seen under its final name, so its
    # journal need not survive a crash: keep it in memory (ROLLBACK still works)
    con.execute("PRAGMA journal_mode = MEMORY")
    con.execute("PRAGMA synchronous = OFF")
    # rows append in id order, touching only the b-tree's right edge: SQLite's default 2 MiB cache
    # holds that, and a larger one only delays writes to the commit, where the disk cannot
    # overlap the copy (64 MiB, with the write-behind: 1.2x slower at n = 4, 1.27x at n = 16)
    con.execute("PRAGMA cache_size = -2048")
    if existing is None:
        con.executescript(db.SCHEMA)
        meta = db.database_meta(record["spec"], record["fingerprint"])
        con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
    return con


def _merge_batch(con: sqlite3.Connection, batch: list[Path], merged: dict[int, str], task_size: int,
                 checks: dict[Path, Future], fingerprint: str) -> int:
    """Copy the tasks of a few attached shards in one transaction, in task order: the rows then
    append to the end of the table (2.5x faster than copying shard after shard, which splits pages
    in the middle of it). Tasks already merged are skipped if identical. Returns how many were.
    Commits only when ``checks`` (pages and tasks of each shard) found them sound."""
    attached = 0
    try:
        for j, p in enumerate(batch):
            with blame(p):
                con.execute(f"ATTACH DATABASE ? AS s{j}", (f"file:{p.absolute()}?mode=ro&immutable=1",))
                attached += 1
                # nothing of a shard is read before its schema passed (no view or trigger runs)
                check_schema(con, p, fingerprint, schema=f"s{j}")
                # read the rows in place, not through pread into SQLite's cache: 1.08x the copy at
                # n = 4 and 1.1x at n = 16; safe, as a staged shard is never written again
                con.execute(f"PRAGMA s{j}.mmap_size = {MMAP_SIZE}")
        owners: dict[int, tuple[int, tuple]] = {}   # task -> (shard index, its tasks row)
        duplicates = 0
        for j, p in enumerate(batch):
            with blame(p):
                rows = con.execute(f"SELECT {', '.join(COLUMNS['tasks'])} FROM s{j}.tasks").fetchall()
            differ = []
            for row in rows:
                task, digest = row[0], row[-1]
                held = merged.get(task, owners[task][1][-1] if task in owners else None)
                if held is None:
                    owners[task] = (j, row)
                elif held == digest:
                    duplicates += 1
                else:
                    differ.append(task)
            if differ:
                # a copy that fails its checks is the one to blame; two sound copies that differ
                # mean generation is not reproducible, and neither can be chosen
                for q in {batch[owners[t][0]] for t in differ if t in owners} | {p}:
                    checks[q].result()
                raise BadFile(p, f"task(s) {plan.ranges(differ)} differ from the copy already merged "
                                 "from another shard; refusing to choose")
        con.execute("BEGIN")
        try:
            for task in sorted(owners):
                j, row = owners[task]
                with blame(batch[j]):
                    copied = con.execute(f"INSERT INTO main.unitaries SELECT * FROM s{j}.unitaries "
                                         "WHERE id >= ? AND id < ?", (task * task_size, (task + 1) * task_size)).rowcount
                if copied != row[2]:
                    raise BadFile(batch[j], f"task {task} has {copied} of its {row[2]} unitaries")
            for p in batch:
                checks[p].result()   # raises its BadFile: the batch rolls back
            con.executemany(f"INSERT INTO main.tasks VALUES ({', '.join('?' * len(COLUMNS['tasks']))})",
                            [row for _, row in owners.values()])
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:   # SQLite rolled back by itself on a full disk
                con.execute("ROLLBACK")
            raise
        merged.update((task, row[-1]) for task, (_, row) in owners.items())
        return duplicates
    finally:
        for j in range(attached):
            con.execute(f"DETACH DATABASE s{j}")
