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
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import plan, shard
from .errors import InputError, RunError
from .progress import Progress

ATTACH_BATCH = 8  # SQLite attaches at most 10 databases by default
MMAP_SIZE = 1 << 40  # map all of a shard (SQLite caps it at its build's limit, 2 GiB by default)
COLUMNS = {"meta": ["key", "value"],
           "unitaries": ["id", "dim", "data", "meta"],
           "tasks": ["task", "seed", "count", "node", "worker", "started", "finished", "checksum"]}


class BadShard(InputError):
    """A staged shard that must not be merged; the message names the file and the reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


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


def check_shard(path: Path, fingerprint: str, what: str = "shard") -> None:
    """Raise :class:`BadShard` unless ``path`` is a shard of this run, of this schema, with nothing
    in it that could run: what must hold before any of it is read. Its pages: :func:`check_pages`.
    ``what`` names the file in the reasons (a merged "database" is checked the same way)."""
    with _reading(path) as con:
        objects = con.execute("SELECT type, name FROM sqlite_master").fetchall()
        active = [f"{t} {n}" for t, n in objects if t in ("view", "trigger")]
        active += [f"virtual table {n}" for t, n in objects if t == "table" and n in COLUMNS and
                   con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (n,)).fetchone()[0]
                   .upper().startswith("CREATE VIRTUAL")]
        if active:
            raise BadShard(path, f"holds {', '.join(active)}; refused, nothing in a {what} may run")
        for table, columns in COLUMNS.items():  # meta first: its version explains other tables
            found = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            if found != columns:
                raise BadShard(path, f"not a unidask {what} (table {table!r} "
                               f"{'missing' if not found else 'has columns ' + ', '.join(found)})")
            if table == "meta":
                meta = shard.read_meta(con)
                version = meta.get("schema_version", "")
                if version != str(shard.SCHEMA_VERSION):
                    newer = version.isdigit() and int(version) > shard.SCHEMA_VERSION
                    raise BadShard(path, f"schema_version {version!r} is {'newer' if newer else 'older'} than "
                                   f"this unidask reads ({shard.SCHEMA_VERSION}); "
                                   + ("upgrade unidask" if newer else "merge it with the unidask that wrote it"))
        if meta.get("fingerprint") != fingerprint:
            raise BadShard(path, f"belongs to another run (fingerprint {meta.get('fingerprint')}, "
                           f"this run's is {fingerprint})")


def check_pages(path: Path) -> None:
    """Raise :class:`BadShard` unless SQLite's ``quick_check`` finds every page of ``path`` sound."""
    with _reading(path) as con:
        con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")   # 3x faster at n = 16, less of the copy's CPU
        if (ok := con.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
            raise BadShard(path, f"damaged ({ok})")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    """``path`` opened read-only for a check; errors name the file."""
    try:
        con = shard.connect_readonly(path)
    except sqlite3.Error as e:
        raise BadShard(path, f"cannot open ({e})") from None
    try:
        with _blame(path):
            yield con
    finally:
        con.close()


def merge(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, append: bool = False,
          skip_bad: bool = False, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
          ) -> MergeReport:
    """Merge the staged shards of ``run_dir`` into ``out`` (default ``RUN_DIR/NAME.db``).

    ``append`` adds to an existing ``out`` instead of rebuilding it; ``skip_bad`` merges the good
    shards and lists the rejected ones instead of refusing the merge.
    """
    run_dir = Path(run_dir)
    record = plan.load_run(run_dir)
    spec = record["spec"]
    task_size = spec["run"]["task_size"]
    expected = -(-spec["run"]["count"] // task_size)
    out = Path(out) if out is not None else run_dir / f"{spec['run']['name']}.db"
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: no directory {out.parent}")
    paths = plan.staged_shards(run_dir)
    if not paths:
        raise InputError(f"{plan.shard_dir(run_dir)}: no staged shards to merge")
    report = MergeReport(out, expected)
    good = []
    for p in paths:
        try:
            check_shard(p, record["fingerprint"])
            good.append(p)
        except BadShard as e:
            if not skip_bad:
                raise
            report.rejected.append((str(p), e.reason))
    if not good:
        raise InputError(f"{run_dir}: no shard could be merged")

    start = time.monotonic()
    tmp = shard.temp_name(out)
    shard.remove_stale_temps(out)
    # every page of every shard is checked on another core while the rows are copied (the check
    # was a fifth of the merge); a batch commits only once its shards passed
    checker = ThreadPoolExecutor(1, thread_name_prefix="unidask-check")
    pages = {p: checker.submit(check_pages, p) for p in good}
    try:
        existing = out if append and out.exists() else None
        with contextlib.closing(_open_target(tmp, existing, record, good[0])) as con, shard.write_behind(tmp):
            progress = Progress(sum(p.stat().st_size for p in good), unit="MB", desc="merge",
                                scale=1e-6)
            merged = dict(con.execute("SELECT task, checksum FROM main.tasks"))
            for i in range(0, len(good), ATTACH_BATCH):
                batch = good[i:i + ATTACH_BATCH]
                while batch:
                    try:
                        report.duplicates += _merge_batch(con, batch, merged, task_size, pages)
                        report.shards += map(str, batch)
                        break
                    except BadShard as e:
                        if not skip_bad:
                            raise
                        report.rejected.append((str(e.path), e.reason))
                        batch = [p for p in batch if p != e.path]  # and merge the others again
                progress.update(sum(p.stat().st_size for p in good[i:i + ATTACH_BATCH]))
            progress.close()
            # every task's row count was checked as it was copied: no need to count the table
            report.rows = con.execute("SELECT coalesce(sum(count), 0) FROM tasks").fetchone()[0]
            done = set(merged)
            report.tasks = len(done)
            report.missing = [t for t in range(expected) if t not in done]
            con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            [("rows", str(report.rows)), ("tasks", str(report.tasks))])
            con.execute("PRAGMA journal_mode = DELETE")
        shard.fsync_path(tmp)
        os.replace(tmp, out)
        shard.fsync_path(out.parent)
    except sqlite3.Error as e:
        raise RunError(f"merge into {out} failed: {e}") from None
    except OSError as e:
        raise RunError(f"merge into {out} failed: {e.strerror or e} ({e.filename or out})") from None
    finally:
        checker.shutdown(cancel_futures=True)
        tmp.unlink(missing_ok=True)
    report.bytes_read = sum(p.stat().st_size for p in good)
    report.seconds = time.monotonic() - start
    return report


def _open_target(tmp: Path, existing: Path | None, record: dict, a_shard: Path) -> sqlite3.Connection:
    if existing is not None:
        try:   # the same checks hold for a merged result
            check_pages(existing)
            check_shard(existing, record["fingerprint"], what="database")
        except BadShard as e:
            raise InputError(f"cannot append to {existing}: {e.reason}") from None
        shutil.copyfile(existing, tmp)
    con = sqlite3.connect(tmp, isolation_level=None, uri=True)
    con.execute("PRAGMA trusted_schema = OFF")
    # the shards' page size (storage.page_size, or "auto"'s choice for this matrix size): the rows
    # fill the pages as well, and the copy runs ~2x faster than at 4 KiB at n = 4
    con.execute(f"PRAGMA page_size = {shard.page_size(a_shard)}")
    # the temp file is thrown away on any failure and never seen under its final name, so its
    # journal need not survive a crash: keep it in memory (ROLLBACK still works)
    con.execute("PRAGMA journal_mode = MEMORY")
    con.execute("PRAGMA synchronous = OFF")
    # rows append in id order, touching only the b-tree's right edge: SQLite's default 2 MiB cache
    # holds that, and a larger one only delays writes to the commit, where the disk cannot
    # overlap the copy (64 MiB, with the write-behind: 1.2x slower at n = 4, 1.27x at n = 16)
    con.execute("PRAGMA cache_size = -2048")
    if existing is None:
        con.executescript(shard.SCHEMA)
        meta = shard.database_meta(record["spec"], record["fingerprint"])
        con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
    return con


def _merge_batch(con: sqlite3.Connection, batch: list[Path], merged: dict[int, str], task_size: int,
                 pages: dict[Path, Future]) -> int:
    """Copy the tasks of a few attached shards in one transaction, in task order: the rows then
    append to the end of the table (2.5x faster than copying shard after shard, which splits pages
    in the middle of it). Tasks already merged are skipped if identical. Returns how many were.
    Commits only when ``pages`` (:func:`check_pages` of each shard) found them sound."""
    for j, p in enumerate(batch):
        con.execute(f"ATTACH DATABASE ? AS s{j}", (f"file:{p.absolute()}?mode=ro&immutable=1",))
        # read the rows in place, not through pread into SQLite's cache: 1.08x the copy at n = 4
        # and 1.1x at n = 16; safe, as a staged shard is never written again
        con.execute(f"PRAGMA s{j}.mmap_size = {MMAP_SIZE}")
    try:
        owners: dict[int, tuple[int, tuple]] = {}   # task -> (shard index, its tasks row)
        duplicates = 0
        for j, p in enumerate(batch):
            with _blame(p):
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
                raise BadShard(p, f"task(s) {plan.ranges(differ)} differ from the copy already merged "
                                  "from another shard; refusing to choose")
        con.execute("BEGIN")
        try:
            for task in sorted(owners):
                j, row = owners[task]
                with _blame(batch[j]):
                    copied = con.execute(f"INSERT INTO main.unitaries SELECT * FROM s{j}.unitaries "
                                         "WHERE id >= ? AND id < ?", (task * task_size, (task + 1) * task_size)).rowcount
                if copied != row[2]:
                    raise BadShard(batch[j], f"task {task} has {copied} of its {row[2]} unitaries")
            for p in batch:
                pages[p].result()   # raises its BadShard: the batch rolls back
            con.executemany(f"INSERT INTO main.tasks VALUES ({', '.join('?' * len(COLUMNS['tasks']))})",
                            [row for _, row in owners.values()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        merged.update((task, row[-1]) for task, (_, row) in owners.items())
        return duplicates
    finally:
        for j in range(len(batch)):
            con.execute(f"DETACH DATABASE s{j}")


@contextlib.contextmanager
def _blame(path: Path):
    """Errors while reading a shard's rows are that shard's fault: name it."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        raise BadShard(path, f"rows clash with rows already merged ({e})") from None
    except sqlite3.DatabaseError as e:
        raise BadShard(path, f"not a readable SQLite database ({e})") from None
