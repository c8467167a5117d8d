"""The merge behind the generation: while a run goes on, each newly staged shard's tasks are laid
into the merged database's pages (``pagemerge``) in a file beside its final name, by the run's
workers between their generation tasks (checked on a thread of the driver); when the last task is
staged only what is left remains: the last tasks' leaves, the
leaves tasks share, the interior pages, the small tables and the checks, then the atomic publish.

A row's place is known from the plan before the row exists (ids dense, a fixed row size and
number of rows a leaf), so the table's layout is the plan's from the start: the file is the one
``unidask merge`` makes of the same shards, and every check of that merge decides what is
published here too (each shard's schema, pages and tasks, each task's checksum of the bytes laid
out, the proof of the table). Where anything is not as the page merge takes it (a shard that fails
a check, rows with meta, a file that is no shard of this run, a task missing) it gives up quietly:
the run then merges after its end as before, which says what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..core import files
from ..core.errors import Stopped
from ..spec.config import Spec
from . import db, merge, pagemerge, pages
from .rundir import RunDir

log = logging.getLogger(__name__)


class Behind:
    """The database being built while the run goes on: :meth:`add` what is staged, :meth:`collect`
    what the workers laid out, then :meth:`finish` (or :meth:`abandon`)."""

    def __init__(self, rd: RunDir, spec: Spec, expected: db.Expected, page_size: int):
        self.rd, self.spec, self.expected = rd, spec, expected
        self.out = rd.database(spec.name)
        self.tmp = files.temp_name(self.out)
        files.remove_stale_temps(self.out)
        files.create_private(self.tmp)   # owner-only while it is built
        with contextlib.closing(merge.open_target(self.tmp, None, rd.record(), page_size, expected)) as con:
            self.root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
        assert expected.row_bytes is not None and expected.dim is not None   # Behind.start's condition
        self.table = pagemerge.Table(pagemerge.Table.planned(expected), page_size,
                                     self.tmp.stat().st_size // page_size + 1, expected.row_bytes, expected.dim)
        self.owners: dict[int, tuple[Path, tuple]] = {}   # task -> the shard it is taken from, its tasks row
        self.duplicates = 0
        self.added: list[Path] = []
        self.checks: dict[Path, Future] = {}
        self.laying: dict = {}   # Dask futures of units being laid out by the workers -> their unit
        self.fragments: dict[int, pagemerge.Fragment] = {}   # rows of leaves shared with tasks not laid yet
        self.failed: str | None = None
        self.fd = os.open(self.tmp, os.O_RDWR)
        self.client = None
        self.sync = False
        # the shards' checks on a thread of the driver (they read little); the units on the workers
        self.checker = ThreadPoolExecutor(1, thread_name_prefix="unidask-check", initializer=files.background_thread)
        self.flushing = contextlib.ExitStack()
        self.flushing.enter_context(files.write_behind(self.tmp))

    @classmethod
    def start(cls, rd: RunDir, spec: Spec) -> "Behind | None":
        """A database built behind the run's generation, where the page merge can build it (rows
        of a known size that fit a page); None where not: the run merges after its end."""
        expected = db.Expected.of(spec)
        page_size = db.run_page_size(spec.storage.page_size, expected.row_bytes)
        if expected.row_bytes is None or not pages.fits(expected.row_bytes, page_size) or spec.kind == "circuit":
            return None
        try:
            return cls(rd, spec, expected, page_size)
        except (OSError, sqlite3.Error) as e:
            log.debug("no merge behind the generation: %s", e)
            files.temp_name(rd.database(spec.name)).unlink(missing_ok=True)
            return None

    def connect(self, client, *, sync: bool) -> None:
        """Lay the units out on ``client``'s workers (``sync``: each fsyncs what it wrote: they
        are on other hosts); then the shards staged so far (a resumed run's)."""
        self.client, self.sync = client, sync
        self.add(self.rd.staged_shards())

    def add(self, paths) -> None:
        """Take the tasks of these newly staged shards: each checked, and laid out by a worker."""
        for path in map(Path, paths):
            if path in self.checks or self.failed is not None:
                continue
            self.added.append(path)
            try:
                before = set(self.owners)
                _, duplicates = pagemerge.owners([path], self.spec.fingerprint, self.expected, found=self.owners)
                self.duplicates += duplicates
                new = sorted(set(self.owners) - before)
                self.checks[path] = self.checker.submit(db.check, path, self.spec.fingerprint, self.expected,
                                                        frozenset(new))
                for task in new:
                    row = self.owners[task][1]
                    self._lay(pagemerge.Task(task, str(path), task * self.expected.task_size, row[2], row[-1]))
            except Exception as e:   # noqa: BLE001 - any fault: the merge after the run says what it is
                self._fail(e)

    def _lay(self, task: pagemerge.Task) -> None:
        unit = pagemerge.Unit(int(self.table.starts[task.task]), (task,))
        # before the next generation task (priority): what is left after the last one stays small
        future = self.client.submit(pagemerge.write_unit, str(self.tmp), self.table.layout, unit, sync=self.sync,
                                    pure=False, priority=1, key=f"unidask-lay-{task.task}-{id(self)}")
        self.laying[future] = unit

    def collect(self, block: bool = False) -> None:
        """Take in the units the workers laid out: the leaves they share written once complete. A
        unit that failed otherwise than on its shard (its worker lost) is laid out here."""
        from distributed import wait

        if self.failed is None and self.laying and block:
            try:
                wait(list(self.laying), timeout=merge.STALL_MIN)
            except TimeoutError:
                pass
        for future in [f for f in self.laying if f.done() or block]:
            unit = self.laying.pop(future)
            if self.failed is not None:
                future.cancel()
                continue
            try:
                fragments = future.result() if future.done() else None
            except (db.BadFile, pagemerge.NotPages) as e:
                self._fail(e)
                continue
            except Exception as e:   # noqa: BLE001 - a worker's fault, not the shard's: here
                log.debug("unit of task %d failed on a worker (%s): laid out here", unit.tasks[0].task, e)
                fragments = None
            try:
                if fragments is None:   # lost, or still not back at the end: the same bytes, here
                    future.cancel()
                    fragments = pagemerge.write_unit(str(self.tmp), self.table.layout, unit)
                for fragment in fragments:
                    self.fragments[fragment.first_row] = fragment
                pagemerge.write_complete(self.fd, self.table.layout, self.fragments)
            except Exception as e:   # noqa: BLE001
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.failed = self.failed or f"{type(e).__name__}: {e}"
        log.debug("the merge behind the generation gives up (the run merges at its end): %s", self.failed)

    def finish(self) -> merge.MergeReport | None:
        """The database, once every task is staged: what is left written, checked, proven and
        published; its report (seconds: this finish, the merge after the last task). None where
        it gave up: the caller merges as ``unidask merge`` does."""
        start = time.monotonic()
        try:
            paths, odd = self.rd.entries()
            if odd:   # refused by name by the merge after
                self._fail(RuntimeError(f"odd entries in {self.rd.shards}"))
            self.add([p for p in paths if p not in self.checks])
            self.collect(block=True)
            if self.failed is None and len(self.owners) != self.expected.n_tasks:
                self._fail(RuntimeError(f"{self.expected.n_tasks - len(self.owners)} task(s) not staged"))
            if self.failed is not None:
                self.abandon()
                return None
            for check in self.checks.values():
                check.result()
            self.flushing.close()
            report = merge.MergeReport(self.out, self.expected.n_tasks, shards=list(map(str, self.added)),
                                       duplicates=self.duplicates)
            merge.finish_pages(self.tmp, self.table, self.root, list(self.fragments.values()), self.owners,
                               list(self.checks.values()), self.expected.n_tasks, report)
            merge.publish(self.tmp, self.out)
        except (Stopped, KeyboardInterrupt):
            self.abandon()
            raise
        except Exception as e:   # noqa: BLE001 - the merge after the run does it again, and says what fails
            self._fail(e)
            self.abandon()
            return None
        finally:
            self.close()
        report.bytes_read = sum(p.stat().st_size for p in self.added)
        report.seconds = time.monotonic() - start
        report.behind = True
        return report

    def close(self) -> None:
        if self.client is not None and self.laying:
            with contextlib.suppress(Exception):   # a client closed with its cluster has nothing left to cancel
                self.client.cancel(list(self.laying))
            self.laying.clear()
        self.checker.shutdown(wait=True, cancel_futures=True)
        self.flushing.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def abandon(self) -> None:
        """Nothing published: the file being built removed (a failed or stopped run's)."""
        self.failed = self.failed or "abandoned"
        try:
            self.close()
        finally:
            db.remove_files(self.tmp)
