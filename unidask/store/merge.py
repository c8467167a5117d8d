"""Merge: check every staged shard, then combine them into one database built beside the target
and renamed into place when complete.

Staged shards never change, so they are read read-only and immutable (no locks on the network
filesystem), with ``trusted_schema`` off and a check that nothing in them is a view or trigger.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import files, malloc
from ..core.errors import InputError, RunError, writing
from ..core.progress import Progress, messages_shown
from ..spec import plan
from . import db, pagemerge, pageread, pages, pagewrite, runlock
from .db import COLUMNS, MMAP_SIZE, BadFile, Expected, blame, check_database, check_pages, check_schema, check_tasks
from .rundir import RunDir

ATTACH_BATCH = 8  # SQLite attaches at most 10 databases by default
# a merge unit not back from its worker this long after the one before (and this many times the
# usual gap) is written by the merging process: a stopped worker must not hold the merge
STALL_MIN, STALL_X = 30.0, 10.0
# set (tests/conftest.py): every merge's output also through SQLite's PRAGMA integrity_check
CHECK_ENV = "UNIDASK_INTEGRITY_CHECK"
MERGE_THREADS = 8   # the merging process's own units at most this many at once (memory: ~3 units each)

log = logging.getLogger(__name__)


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
    behind: bool = False         # built while the run generated (behind.py): seconds are those after its last task

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        rate = self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0
        text = (f"merged {len(self.shards)} shard(s) into {self.out}: {self.rows:,} unitaries, "
                f"{self.tasks}/{self.expected_tasks} tasks, "
                + (f"built behind the generation, {self.seconds:.1f} s after its last task" if self.behind
                   else f"{rate:,.0f} MB/s"))
        if self.duplicates:
            text += f", {self.duplicates} duplicate task(s) kept once"
        for path, reason in self.rejected:
            text += f"\nrejected {path}: {reason}"
        if self.missing:
            text += f"\nincomplete: {len(self.missing)} task(s) missing: {plan.ranges(self.missing)}"
        return text


def merge(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, append: bool = False,
          skip_bad: bool = False, client=None, lock: bool = True) -> MergeReport:
    """Merge the staged shards of ``run_dir`` into ``out`` (default ``RUN_DIR/NAME.db``).

    ``append`` adds to an existing ``out`` instead of rebuilding it; ``skip_bad`` merges the good
    shards and lists the rejected ones instead of refusing the merge. ``client``: a Dask client
    whose workers see ``run_dir`` and ``out`` at the same paths (shared storage) build the pages.
    ``lock``: hold the run lock while merging, so no run changes the shards under the merge (a run
    dir this user cannot write: only refuse while a run holds it); False for the run that holds it.
    """
    rd = RunDir(run_dir)
    rd.record()   # a run dir at all, before a lock file is made in it
    with messages_shown(), runlock.merging(rd.lock_path) if lock else contextlib.nullcontext():
        return _merge(rd, out, append, skip_bad, client)


def _merge(rd: RunDir, out: str | os.PathLike | None, append: bool, skip_bad: bool, client) -> MergeReport:
    run_dir = rd.path
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
    checker = ThreadPoolExecutor(2, thread_name_prefix="unidask-check", initializer=files.background_thread)
    # the shards' page size (a delta's may be smaller): the rows fill the pages as well, and the
    # copy runs ~2x faster than at 4 KiB at n = 4
    page_size = db.run_page_size(spec.storage.page_size, expected.row_bytes)
    try:
        existing = out if append and out.exists() else None
        laid = False
        row_bytes = expected.row_bytes   # None where the rows' size is unknown (a plugin's, no rows yet)
        if existing is None and row_bytes is not None and pages.fits(row_bytes, page_size):
            try:
                _merge_pages(tmp, paths, record, page_size, expected, checker, task_size, fingerprint, report, sizes,
                             client)
                laid = True
            except (pagemerge.NotPages, BadFile) as e:
                # rows with meta, or a shard that fails a check: SQLite merges them, and says which
                # shard fails and why as it always has (or leaves it out, with --skip-bad)
                log.debug("merging by SQLite instead of page by page: %s", e)
                report = MergeReport(out, spec.n_tasks, rejected=report.rejected)
                tmp.unlink(missing_ok=True)
                files.create_private(tmp)
        if not laid:
            checks = {p: checker.submit(db.check, p, fingerprint, expected) for p in paths}
            _merge_sql(tmp, existing, paths, record, page_size, expected, checks, task_size, fingerprint,
                       report, sizes, skip_bad, run_dir)
        publish(tmp, out)
    except sqlite3.Error as e:
        full = "full" in str(e) or (getattr(e, "sqlite_errorcode", 0) & 0xFF) == 13
        raise RunError(f"merge into {out} failed: {e}" + (f" (the disk of {out.parent} is full: free space, "
                                                         "then merge again)" if full else "")) from e
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)   # the page writer's own writes
        raise RunError(f"merge into {out} failed: {e.strerror or e} ({e.filename or out})"
                       + (f" (the disk of {out.parent} is full: free space, then merge again)" if full else "")) from e
    finally:
        checker.shutdown(cancel_futures=True)
        tmp.unlink(missing_ok=True)
    report.bytes_read = sum(sizes[Path(p)] for p in report.shards)
    report.seconds = time.monotonic() - start
    return report


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, synced (:func:`files.publish`); under the test
    suite (:data:`CHECK_ENV`) once SQLite's integrity_check passed too."""
    if os.environ.get(CHECK_ENV):   # the test suite's: SQLite's own judgement of every merge too
        with contextlib.closing(sqlite3.connect(f"file:{tmp}?mode=ro", uri=True)) as con:
            if (result := con.execute("PRAGMA integrity_check").fetchall()) != [("ok",)]:
                raise RunError(f"merge into {out} failed: integrity_check says {result[:3]}")
    files.publish(tmp, out, mode=files.shared_mode())   # meant to be shared: the umask decides


def _merge_sql(tmp: Path, existing: Path | None, paths: list[Path], record: dict, page_size: int,
               expected: Expected, checks: dict[Path, Future], task_size: int, fingerprint: str,
               report: MergeReport, sizes: dict[Path, int], skip_bad: bool, run_dir) -> None:
    """The merge by SQLite: a few attached shards at a time, their tasks' rows copied by
    ``INSERT ... SELECT`` (rows with meta, rows larger than a page, ``--append``)."""
    with contextlib.closing(open_target(tmp, existing, record, page_size, expected)) as con, files.write_behind(tmp):
        progress = Progress(sum(sizes.values()), unit="B", desc="merge")
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
        _finish(con, report, set(merged), expected.n_tasks)
        con.execute("PRAGMA journal_mode = DELETE")


def _unpack(con: sqlite3.Connection, schema: str, base: int, count: int, itemsize: int) -> int:
    """Insert the packed rows of ids ``base ... base + count - 1`` of the attached shard ``schema``
    into the merged table, a block at a time (:data:`db.UNPACK`); how many went in. A block that is
    not whole matrices goes in as it cuts: its shard's check refuses it before anything commits."""
    before = con.total_changes   # rowcount says -1 for a statement that begins WITH
    factory, con.text_factory = con.text_factory, bytes   # a forged TEXT block: bytes, for its check to name
    try:
        blocks = con.execute(f"SELECT id, dim, data FROM {schema}.blocks WHERE id >= ? AND id < ? ORDER BY id",
                             (base, base + count)).fetchall()
    finally:
        con.text_factory = factory
    for first, dim, data in blocks:
        step = max(1, dim * dim * itemsize) if type(dim) is int else max(1, len(data))
        con.execute(db.UNPACK, {"count": max(1, len(data) // step), "base": first, "dim": dim, "data": data,
                                "step": step})
    return con.total_changes - before


def _finish(con: sqlite3.Connection, report: MergeReport, done: set[int], n_tasks: int,
            extra: dict[str, str] | None = None) -> None:
    """The report's counts, and the meta rows that say what the database holds (by the tasks rows
    already in it)."""
    # every task's row count was checked as it was copied: no need to count the table
    report.rows = con.execute("SELECT coalesce(sum(count), 0) FROM tasks").fetchone()[0]
    report.tasks = len(done)
    report.missing = [t for t in range(n_tasks) if t not in done]
    con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [("rows", str(report.rows)), ("tasks", str(report.tasks)), ("merged", repr(time.time())),
                     *(extra or {}).items()])


def _merge_pages(tmp: Path, paths: list[Path], record: dict, page_size: int, expected: Expected,
                 checker: ThreadPoolExecutor, task_size: int, fingerprint: str, report: MergeReport,
                 sizes: dict[Path, int], client=None) -> None:
    """The merge page by page (``pagemerge.py``): SQLite makes the file, its schema and meta; the
    planned tasks' rows, each read once from the shard it is taken from, checked (count, ids,
    checksum) and laid from those same bytes into the ``unitaries`` table's leaf pages at their
    places, by units of tasks (on ``client``'s workers where given); the tasks rows and the meta
    follow through SQLite. Every shard's other checks (schema, pages, the tasks not taken from it,
    rows of no task) run on ``checker`` meanwhile, and pass before the file is finished. Raises
    :class:`NotPages` where a row has meta, :class:`BadFile` where a shard fails a check (then the
    SQL merge runs, and says so or leaves the shard out)."""
    owners, duplicates = pagemerge.owners(paths, fingerprint, expected)
    taken: dict[Path, set[int]] = {p: set() for p in paths}
    for task, (p, _) in owners.items():
        taken[p].add(task)
    with contextlib.closing(open_target(tmp, None, record, page_size, expected)) as con:
        root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    assert expected.row_bytes is not None and expected.dim is not None   # the page merge's condition
    table = pagemerge.Table(pagemerge.Table.taken(owners, task_size), page_size, tmp.stat().st_size // page_size + 1,
                            expected.row_bytes, expected.dim)
    units = table.units()
    progress = Progress(sum(sizes.values()), unit="B", desc="merge")
    per_row = sum(sizes.values()) / max(1, table.layout.rows)
    # on background threads (files.background_thread): the units, which keep the disk busy, first
    checks = {p: checker.submit(db.check, p, fingerprint, expected, frozenset(taken[p])) for p in paths}
    try:
        with files.write_behind(tmp):
            if client is None or len(units) < 2:
                fragments = _on_threads(str(tmp), table.layout, units, progress, per_row, checks)
            else:
                fragments = _on_workers(client, str(tmp), table.layout, units, progress, per_row, checks)
    finally:
        progress.close()
    report.shards += map(str, paths)
    report.duplicates = duplicates
    finish_pages(tmp, table, root, fragments, owners, [checks[p] for p in paths], expected.n_tasks, report)


def finish_pages(tmp: Path, table: pagemerge.Table, root: int, fragments: list[pagemerge.Fragment],
                 owners: dict[int, tuple[Path, tuple]], checks: list[Future], n_tasks: int,
                 report: MergeReport) -> None:
    """What the page merge does once every unit is written: the leaves the units share
    (``fragments``), the interior pages, every shard's checks passed (``checks``: a BadFile
    raised), the tasks rows and the meta through SQLite, then the proof of the table."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        pagemerge.write_fragments(fd, table.layout, fragments)
        layout = pagewrite.finish_table(fd, table.layout, root, table.keys)
    finally:
        os.close(fd)
    for check in checks:
        check.result()   # its BadFile: the SQL merge, which says so
    # the file as this transaction leaves it: its header's change counter one up (a reader of the
    # layout trusts it only while nothing has written the file since), and its ids from 0 on
    counter = pages.change_counter(tmp) + 1
    dense = sorted(owners) == list(range(n_tasks))
    extra = {**layout.to_meta(), "layout.change_counter": str(counter), "layout.dense": str(int(dense))}
    with contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as con:
        con.execute("PRAGMA synchronous = OFF")   # publishing fsyncs the whole file
        con.execute("BEGIN")
        con.executemany(f"INSERT INTO tasks VALUES ({', '.join('?' * len(COLUMNS['tasks']))})",
                        [row for _, row in sorted(owners.values(), key=lambda o: o[1][0])])
        _finish(con, report, set(owners), n_tasks, extra)
        con.execute("COMMIT")
        if pages.change_counter(tmp) != counter:   # SQLite counted otherwise: read it through SQL
            con.execute("DELETE FROM meta WHERE key = 'layout.change_counter'")
    try:   # the file proves its table before it is published: a fault of the writer is ours, exit 1
        pageread.prove(tmp, layout, root, table.id_of)
    except pages.Unreadable as e:
        raise RunError(f"merge into {report.out} failed: the table written is not sound, "
                       f"nothing published ({e})") from e


def raise_failed(checks: dict[Path, Future]) -> None:
    """A shard's check that failed stops the units at once: its BadFile (the SQL merge then says
    which shard and why), not after every unit was written."""
    for future in checks.values():
        if future.done() and not future.cancelled() and future.exception() is not None:
            future.result()


def _on_threads(target: str, layout: pages.Layout, units: list[pagemerge.Unit], progress: Progress,
                per_row: float, checks: dict[Path, Future]) -> list[pagemerge.Fragment]:
    """The units on a thread per core (numpy's copies, the hashing and the writes let go of the
    GIL), each thread with its shards open."""
    local, opened = threading.local(), []

    def write(unit: pagemerge.Unit) -> list[pagemerge.Fragment]:
        if (readers := getattr(local, "readers", None)) is None:
            readers = local.readers = pagemerge.Readers(layout.row_bytes, layout.dim)
            opened.append(readers)
        return pagemerge.write_unit(target, layout, unit, readers=readers)

    out: list[pagemerge.Fragment] = []
    pool = ThreadPoolExecutor(min(len(units), os.cpu_count() or 1, MERGE_THREADS), thread_name_prefix="unidask-merge")
    try:
        for unit, fragments in zip(units, pool.map(write, units)):
            out += fragments
            progress.update(unit.rows * per_row)
            raise_failed(checks)
    finally:
        pool.shutdown(cancel_futures=True)
        for readers in opened:
            readers.close()
    return out


def _on_workers(client, target: str, layout: pages.Layout, units: list[pagemerge.Unit], progress: Progress,
                per_row: float, checks: dict[Path, Future]) -> list[pagemerge.Fragment]:
    """The units as Dask tasks on ``client``'s workers, each syncing what it wrote. A shard that
    fails a check cancels the rest. A unit that fails otherwise (its worker lost, the target not
    reachable from its host), or that has not come back long after the others (a stopped
    worker), is written by this process: the same bytes at the same places."""
    from distributed import wait

    futures = client.map(pagemerge.write_unit, [target] * len(units), [layout] * len(units), units,
                         sync=True, pure=False, key=[f"unidask-merge-{u.first_row}-{id(units)}" for u in units])
    unit_of = {f.key: u for f, u in zip(futures, units)}
    out: list[pagemerge.Fragment] = []
    said: list[str] = []

    def here(unit: pagemerge.Unit, why: str) -> None:
        (log.debug if said else log.warning)("merge: rows from %d %s; writing them here", unit.first_row, why)
        said.append(why)
        out.extend(pagemerge.write_unit(target, layout, unit))

    gaps: list[float] = []
    pending, last = set(futures), time.monotonic()
    try:
        while pending:
            bound = max(STALL_MIN, STALL_X * statistics.median(gaps)) if gaps else None
            try:
                done, pending = wait(pending, timeout=bound, return_when="FIRST_COMPLETED")
            except TimeoutError:
                for future in pending:
                    here(unit_of[future.key], f"not back from a worker {bound:.0f} s after the one before")
                    progress.update(unit_of[future.key].rows * per_row)
                break
            now = time.monotonic()
            gaps.append((now - last) / len(done))
            last = now
            for future in done:
                unit = unit_of[future.key]
                try:
                    out += future.result()
                except (BadFile, pagemerge.NotPages):
                    raise
                except Exception as e:   # anything else of a worker's: the unit is this process's to write
                    here(unit, f"failed on a worker ({type(e).__name__}: {e})")
                progress.update(unit.rows * per_row)
            raise_failed(checks)
    finally:
        client.cancel(futures)
    return out


def _first_sound(paths: list[Path], fingerprint: str) -> Path | None:
    for p in paths:
        with contextlib.suppress(BadFile):
            check_database(p, fingerprint)
            return p
    return None


def open_target(tmp: Path, existing: Path | None, record: dict, page_size: int, expected: Expected
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
    con.execute("PRAGMA auto_vacuum = NONE")   # no pointer-map pages: the page writer's format (pages.Header.plain)
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
    itemsize: list[int] = []   # each shard's, from its dtype
    try:
        for j, p in enumerate(batch):
            with blame(p):
                con.execute(f"ATTACH DATABASE ? AS s{j}", (f"file:{p.absolute()}?mode=ro&immutable=1",))
                attached += 1
                # nothing of a shard is read before its schema passed (no view or trigger runs)
                meta = check_schema(con, p, fingerprint, schema=f"s{j}")
                itemsize.append(np.dtype(meta.get("dtype", "complex128")).itemsize)
                # read the rows in place, not through pread into SQLite's cache: 1.08x the copy at
                # n = 4 and 1.1x at n = 16; safe, as a staged shard is never written again
                con.execute(f"PRAGMA s{j}.mmap_size = {MMAP_SIZE}")
        packed: list[dict[int, int]] = []   # each shard's packed tasks
        owners: dict[int, tuple[int, tuple]] = {}   # task -> (shard index, its tasks row)
        duplicates = 0
        for j, p in enumerate(batch):
            with blame(p):
                rows = con.execute(f"SELECT {', '.join(COLUMNS['tasks'])} FROM s{j}.tasks").fetchall()
                packed.append(db.packed(con, task_size, f"s{j}"))
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
                try:
                    with blame(batch[j]):
                        copied = con.execute(f"INSERT INTO main.unitaries SELECT * FROM s{j}.unitaries "
                                             "WHERE id >= ? AND id < ?",
                                             (task * task_size, (task + 1) * task_size)).rowcount
                        if not copied and task in packed[j] and row[2]:   # its rows packed: unpacked here
                            copied = _unpack(con, f"s{j}", task * task_size, row[2], itemsize[j])
                    if copied != row[2]:
                        raise BadFile(batch[j], f"task {task} has {copied} of its {row[2]} unitaries")
                except BadFile:
                    checks[batch[j]].result()   # what its check found, where it found it: said first
                    raise
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
