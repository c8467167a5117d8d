"""The merge page by page: the merged database's ``unitaries`` table built from the staged shards'
pages (``pages.py``), in ranges of tasks that any process may build and write at their places.

Every row's place in the file is known before a byte is read: the tasks (sorted) and their counts
give each row's index, and the layout (``pages.layout_for``) each index's leaf. A *unit* is a run
of consecutive tasks: it reads each task once from the shard it is taken from, checks it (count,
ids, checksum: of the same bytes) and writes the whole leaves that lie inside its rows at their
offsets; the rows of a leaf it shares with its neighbours go back to the merging process, which
writes those leaves, the interior pages and the header. Units run in this process, or as Dask
tasks on a cluster's workers (each then syncs what it wrote: another host's cache is its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..spec import plan
from . import db, pages, pagewrite, shardread
from .db import COLUMNS, MMAP_SIZE, BadFile, Expected, blame, check_schema, connect_readonly, reading

log = logging.getLogger(__name__)

UNIT_BYTES = 64 << 20   # a unit's rows: enough to amortize its start, few enough to spread
PART_BYTES = 4 << 20    # a unit's rows read, checked and laid out at a time: the buffers stay in cache


class NotPages(Exception):
    """What the page writer does not take, found as it reads: the merge goes to SQLite."""


@dataclass(frozen=True)
class Task:
    """One planned task to take: from ``path``, ids ``base ... base + count - 1``, its recorded checksum."""
    task: int
    path: str
    base: int
    count: int
    checksum: str


@dataclass(frozen=True)
class Unit:
    """Tasks whose rows are ``first_row ...`` of the table, in order."""
    first_row: int
    tasks: tuple[Task, ...]

    @property
    def rows(self) -> int:
        return sum(t.count for t in self.tasks)


@dataclass
class Fragment:
    """Rows ``first_row ...`` of a leaf that a unit shares with its neighbours."""
    first_row: int
    ids: np.ndarray
    data: np.ndarray


def owners(paths: list[Path], fingerprint: str, expected: Expected, found: dict[int, tuple[Path, tuple]] | None = None
           ) -> tuple[dict[int, tuple[Path, tuple]], int]:
    """Which shard each task is taken from (task -> (shard, its tasks row)), and how many copies
    of tasks were left out as duplicates (identical checksums). A task outside the plan, or of
    another count than the plan's, is :class:`NotPages`: the SQL merge refuses it by name.
    ``found``: the tasks taken from shards before (added to)."""
    found = {} if found is None else found
    duplicates = 0
    for p in paths:
        with reading(p) as con:
            check_schema(con, p, fingerprint)   # nothing of a shard is read before its schema passed
            rows = con.execute(f"SELECT {', '.join(COLUMNS['tasks'])} FROM tasks").fetchall()
        differ = []
        for row in rows:
            task, count = row[0], row[2]
            if not (type(task) is int and 0 <= task < expected.n_tasks and count == expected.task_count(task)
                    and type(count) is int):
                raise NotPages(f"{p}: task {task!r} of {count!r} rows is not a task of the plan")
            if task not in found:
                found[task] = (p, row)
            elif found[task][1][-1] == row[-1]:
                duplicates += 1
            else:
                differ.append(task)
        if differ:   # the SQL merge names the damaged copy, or refuses to choose
            raise NotPages(f"task(s) {plan.ranges(differ)} of {p} differ from another shard's")
    return found, duplicates


class Table:
    """The rows to lay out, in task order: each task's first row, the layout, each leaf's largest id."""

    def __init__(self, tasks: list[Task], page_size: int, first_leaf: int, row_bytes: int, dim: int):
        """``tasks``: in task order (:meth:`taken`, or every task of the plan: :meth:`planned`)."""
        self.tasks = tasks
        counts = np.array([t.count for t in self.tasks], np.int64)
        self.bases = np.array([t.base for t in self.tasks], np.int64)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        rows = int(self.starts[-1])
        largest = max((t.base + t.count - 1 for t in self.tasks), default=0)
        self.layout = pages.layout_for(page_size, first_leaf, row_bytes, dim, largest, rows)

    @staticmethod
    def taken(owners: dict[int, tuple[Path, tuple]], task_size: int) -> list[Task]:
        """The tasks of :func:`owners`, each from the shard it is taken from."""
        return [Task(t, str(p), t * task_size, row[2], row[-1]) for t, (p, row) in sorted(owners.items())]

    @staticmethod
    def planned(expected: Expected) -> list[Task]:
        """Every task of the plan, before any is staged (the merge behind the generation): its
        ids and count; its shard and checksum are those of the copy taken, later."""
        return [Task(t, "", t * expected.task_size, expected.task_count(t), "") for t in range(expected.n_tasks)]

    def id_of(self, rows: np.ndarray) -> np.ndarray:
        task = np.searchsorted(self.starts, rows, "right") - 1
        return self.bases[task] + (rows - self.starts[task])

    @property
    def keys(self) -> np.ndarray:
        """Each leaf's largest id."""
        c, rows = self.layout.per_leaf, self.layout.rows
        return self.id_of(np.minimum(np.arange(1, self.layout.leaves + 1) * c, rows) - 1)

    def units(self, unit_bytes: int | None = None) -> list[Unit]:
        per_unit = max(1, (unit_bytes or UNIT_BYTES) // self.layout.row_bytes)
        out, first = [], 0
        for i in range(1, len(self.tasks) + 1):
            if i == len(self.tasks) or self.starts[i] - self.starts[first] >= per_unit:
                out.append(Unit(int(self.starts[first]), tuple(self.tasks[first:i])))
                first = i
        return out


class Readers:
    """Open shards, the most recently read kept (tasks alternate between a few shards): each one's
    pages mapped (:class:`shardread.TableReader`) and a connection for what they do not take. One
    thread's: the rows it returns are in a buffer of its own, reused by the next call."""

    KEEP = 16

    def __init__(self, row_bytes: int, dim: int) -> None:
        self.row_bytes, self.dim = row_bytes, dim
        self.open: dict[str, tuple[sqlite3.Connection, shardread.TableReader | None]] = {}
        self.buffer = np.zeros((0, row_bytes), np.uint8)
        self.pinned: set[str] = set()   # the shards of the unit being read: never closed meanwhile
        self.blocks: dict[str, bool] = {}   # each open shard: whether it has packed rows (table blocks)

    def _shard(self, path: str) -> tuple[sqlite3.Connection, shardread.TableReader | None]:
        shard = self.open.pop(path, None)
        if shard is None:
            if len(self.open) >= self.KEEP and (old := next((p for p in self.open if p not in self.pinned), None)):
                self._close(self.open.pop(old))
            con = connect_readonly(path, check_same_thread=False)
            try:
                with blame(Path(path)):   # a shard's damage is the shard's: named, never a crash
                    con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
                    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
                    self.blocks[path] = db.has_blocks(con)
                    only_packed = self.blocks[path] and not con.execute(
                        "SELECT EXISTS (SELECT 1 FROM unitaries)").fetchone()[0]
            except BaseException:
                con.close()
                raise
            # every task packed: no rows in pages to read
            shard = (con, None) if only_packed else self._table(path, con, root)
        self.open[path] = shard
        return shard

    def _table(self, path: str, con: sqlite3.Connection, root: int) -> tuple[sqlite3.Connection,
                                                                            shardread.TableReader | None]:
        """The shard's rows of a row per matrix, read from its pages; SQL's where they are not as expected."""
        try:
            return con, shardread.TableReader(path, root, self.row_bytes, self.dim)
        except pages.Unreadable as e:
            log.debug("%s read through SQL: %s", path, e)
            return con, None

    def unit_rows(self, unit: Unit, part_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The unit's rows in row order, in parts (runs of tasks of ``part_rows`` rows or more,
        small enough to stay in cache): the ids and an ``(rows, row_bytes)`` array of each part,
        valid until the next one, every task checked (:meth:`task_rows`). Each shard's cells for
        all its tasks of the unit are parsed at once, and a part's rows gathered from each shard
        in one go: a unit of many small tasks costs little more than one of a few large ones."""
        counts = np.array([t.count for t in unit.tasks], np.int64)
        bases = np.array([t.base for t in unit.tasks], np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        at = np.zeros(unit.rows, np.int64)   # each row's data in its shard's file
        source = np.full(unit.rows, -1, np.int64)   # the shard it is read from; -1: SQL's
        tables = []
        by_path: dict[str, list[int]] = {}
        for i, t in enumerate(unit.tasks):
            by_path.setdefault(t.path, []).append(i)
        self.pinned = set(by_path)
        for path, idx in by_path.items():
            _, table = self._shard(path)
            if table is None:
                continue
            with contextlib.suppress(pages.Unreadable):
                ids, cells, lo, hi = table.cells_in(bases[idx], bases[idx] + counts[idx])
                n, b = counts[idx], bases[idx]
                whole = (hi - lo == n) & (n > 0)   # every id, nothing else; a task of no rows is SQL's
                whole[whole] &= (ids[lo[whole]] == b[whole]) & (ids[hi[whole] - 1] == b[whole] + n[whole] - 1)
                for i, k in zip(np.asarray(idx)[whole].tolist(), lo[whole].tolist()):
                    at[offsets[i]:offsets[i + 1]] = cells[k:k + counts[i]]
                    source[offsets[i]:offsets[i + 1]] = len(tables)
                tables.append(table)
        ids = np.repeat(bases - offsets[:-1], counts) + np.arange(unit.rows)
        cuts = np.searchsorted(offsets, np.arange(part_rows, unit.rows, part_rows))
        bounds = np.unique(np.concatenate(([0], cuts, [len(unit.tasks)])))
        for i, j in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            r0, r1 = int(offsets[i]), int(offsets[j])
            if len(self.buffer) < r1 - r0:
                self.buffer = np.empty((r1 - r0, self.row_bytes), np.uint8)
            out = self.buffer[:r1 - r0]
            for s, table in enumerate(tables):
                if len(rows := np.flatnonzero(source[r0:r1] == s)):
                    table.gather(at[r0 + rows], out=out, into=rows)
            for k in range(i, j):
                t, rows = unit.tasks[k], out[offsets[k] - r0:offsets[k + 1] - r0]
                if not (source[offsets[k]] >= 0 and db.checksum(rows, t.count) == t.checksum):
                    rows[:] = self.task_rows(t)   # not as the pages say: SQLite reads it, or says what is wrong
            yield ids[r0:r1], out
        self.pinned = set()

    def task_rows(self, t: Task) -> np.ndarray:
        """Task ``t``'s rows read by SQLite, an ``(count, row_bytes)`` array in id order, once they
        passed the task's checks (:class:`BadFile` naming what is wrong; :class:`NotPages` where a
        row has meta)."""
        con, _ = self._shard(t.path)
        with blame(Path(t.path)):
            if self.blocks[t.path] and con.execute("SELECT EXISTS (SELECT 1 FROM blocks WHERE id >= ? AND id < ?)",
                                                   (t.base, t.base + t.count)).fetchone()[0]:
                # packed: its blocks read and hashed once
                reason, _, rows = db.read_block(con, "main", t.task, t.base, t.count, self.dim, self.row_bytes,
                                                t.checksum, keep=True)
                if reason or rows is None:
                    raise BadFile(Path(t.path), reason or f"task {t.task} has no packed rows")
                return rows
            rows = db.TaskRows.read(con, "main", t.base, t.count, self.dim, self.row_bytes, keep=True)
            if rows.metas:
                raise NotPages(f"{t.path}: rows with meta")
            if (reason := rows.fault(con, "main", t.task, t.base, t.count, self.dim, self.row_bytes, t.checksum)):
                raise BadFile(Path(t.path), reason)
        data = rows.data[0] if len(rows.data) == 1 else b"".join(rows.data)
        return np.frombuffer(data, np.uint8).reshape(t.count, self.row_bytes)

    @staticmethod
    def _close(shard: tuple[sqlite3.Connection, shardread.TableReader | None]) -> None:
        shard[0].close()
        if shard[1] is not None:
            shard[1].close()

    def close(self) -> None:
        while self.open:
            self._close(self.open.popitem()[1])


def write_unit(target: str, layout: pages.Layout, unit: Unit, sync: bool = False,
               readers: Readers | None = None) -> list[Fragment]:
    """Build and write ``unit``'s whole leaves into ``target`` at their places; return the rows
    of the leaves it shares (at its start, and at its end unless the table ends there).
    ``sync``: fsync what it wrote (a process on another host than the one that finishes the file).
    ``readers``: the shards already open (one process writing unit after unit); else its own.
    Raises :class:`BadFile` or :class:`NotPages` as :meth:`Readers.task_rows`."""
    c = layout.per_leaf
    head = min((-unit.first_row) % c, unit.rows)   # rows before the unit's first whole leaf
    own = readers is None
    readers = Readers(layout.row_bytes, layout.dim) if own else readers
    fd = os.open(target, os.O_RDWR)
    out = []
    try:
        writer = pagewrite.TableWriter(fd, layout, first_row=unit.first_row + head)
        front: list[tuple[np.ndarray, np.ndarray]] = []
        before = head
        for ids, data in readers.unit_rows(unit, max(1, PART_BYTES // layout.row_bytes)):
            if before:
                k = min(before, len(ids))
                front.append((ids[:k], data[:k].copy()))
                ids, data, before = ids[k:], data[k:], before - k
            writer.add(ids, data)
        if head:
            out.append(Fragment(unit.first_row, *map(np.concatenate, zip(*front))))
        if writer.rows + writer.pending == layout.rows:   # the table's last leaf, short: the unit's own
            writer.flush()
        elif writer.pending:
            out.append(Fragment(writer.rows, *writer.take_pending()))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
        if own:
            readers.close()
    return out


def write_fragments(fd: int, layout: pages.Layout, fragments: list[Fragment]) -> None:
    """The shared leaves, from the fragments of the units on either side (each run of them
    begins a leaf)."""
    leaves = pagewrite.LeafWriter(fd, layout)
    run: list[Fragment] = []
    for f in sorted(fragments, key=lambda f: f.first_row) + [None]:
        if run and (f is None or f.first_row != run[-1].first_row + len(run[-1].ids)):
            leaves.write(run[0].first_row, np.concatenate([r.ids for r in run]), np.concatenate([r.data for r in run]))
            run = []
        if f is not None:
            run.append(f)


def write_complete(fd: int, layout: pages.Layout, fragments: dict[int, Fragment]) -> None:
    """Write the shared leaves whose rows have all arrived (``fragments`` by first row: the runs
    that begin a leaf and end one, or the table), and forget them; the others wait for their
    neighbours. Keeps what a merge built task by task holds to the leaves of tasks not yet laid."""
    c, complete, run = layout.per_leaf, [], []
    for first in sorted(fragments):
        if run and first != run[-1].first_row + len(run[-1].ids):
            run = []
        run.append(fragments[first])
        end = first + len(fragments[first].ids)
        if run[0].first_row % c == 0 and (end % c == 0 or end == layout.rows):
            complete += run
            run = []
    if complete:
        write_fragments(fd, layout, complete)
        for f in complete:
            del fragments[f.first_row]
