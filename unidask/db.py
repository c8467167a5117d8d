"""A unidask database, shard or merged: the schema, opening one read-only, its meta, the task
checksum, the page-size model, and the checks a file must pass before any of it is read."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import xxhash

from . import generators, plan
from .errors import InputError

if TYPE_CHECKING:
    from .config import Spec

SCHEMA_VERSION = 2  # 2: no task/idx columns in unitaries; XXH3-128 checksums
SCHEMA = files("unidask").joinpath("schema.sql").read_text()
AUTO_PAGE_SIZES = tuple(2 ** k for k in range(12, 17))   # 4 KiB ... 64 KiB
MMAP_SIZE = 1 << 40  # map all of a file (SQLite caps it at its build's limit, 2 GiB by default)
SUFFIXES = ("", "-journal", "-wal", "-shm")  # a database file and its companions


def _columns() -> dict[str, list[str]]:
    """Each table's columns, in order, as schema.sql makes them."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(SCHEMA)
        tables = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        con.close()


COLUMNS = _columns()


class BadFile(InputError):
    """A staged shard or database that must not be read on; the message names the file and why."""

    def __init__(self, path: Path, reason: str):
        lines = [line.strip() for line in reason.splitlines() if line.strip()]   # one line, always
        reason = "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def checksum(data: bytes, metas: Sequence[str | None]) -> str:
    """A task's checksum: XXH3-128 of its data blobs in id order, then each row's meta (NUL for
    none). It tells two copies of a task apart and finds damaged rows; nothing adversarial, so a
    hash at memory speed (blake2b was a large share of the write path at n = 32)."""
    h = xxhash.xxh3_128(data)
    h.update(b"".join(b"\0" if m is None else m.encode() for m in metas))
    return h.hexdigest()


def connect_readonly(path: str | os.PathLike) -> sqlite3.Connection:
    """Open a finished database (a staged shard, a merged result) read-only, without locking, and
    without trusting its schema: nothing in the file gets to run."""
    uri = f"file:{Path(path).absolute()}?mode=ro&immutable=1"
    con = sqlite3.connect(uri, uri=True)
    con.execute("PRAGMA trusted_schema = OFF")
    return con


def page_size(path: str | os.PathLike) -> int:
    """The page size of the finished database at ``path``."""
    con = connect_readonly(path)
    try:
        return con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()


def page_size_for(row_bytes: int) -> int:
    """``storage.page_size = "auto"``: the largest page size whose file, for rows of ``row_bytes``
    of matrix data, is within 10% of the smallest. A 64 KiB page holds only three 16 KiB rows
    (n = 32, complex128) and one of n = 48, wasting a quarter and nearly half of the file; smaller
    pages keep most of such a row on full overflow pages. At n <= 24 it stays 64 KiB."""
    def file_bytes_per_row(page: int) -> float:
        # SQLite's table leaf cell layout (fileformat2.html, "Cell Payload Overflow Pages")
        payload = row_bytes + 8                  # record header, dim and a NULL meta
        max_local, min_local = page - 35, (page - 12) * 32 // 255 - 23
        local, overflow = payload, 0
        if payload > max_local:
            k = min_local + (payload - min_local) % (page - 4)
            local = k if k <= max_local else min_local
            overflow = -(-(payload - local) // (page - 4))
        cell = local + 4 * bool(overflow) + 9 + 2   # + size and rowid varints, cell pointer
        return page / ((page - 8) // cell) + overflow * page

    sizes = {page: file_bytes_per_row(page) for page in AUTO_PAGE_SIZES}
    return max(page for page, size in sizes.items() if size <= 1.1 * min(sizes.values()))


def database_meta(spec: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """The ``meta`` rows every database of a run (shard or merged) starts with."""
    from . import __version__

    return {"schema_version": str(SCHEMA_VERSION), "dtype": spec["generator"]["dtype"],
            "fingerprint": fingerprint, "task_size": str(spec["run"]["task_size"]),
            "spec": json.dumps(spec, sort_keys=True), "unidask_version": __version__}


def read_meta(con: sqlite3.Connection, schema: str = "main") -> dict[str, str]:
    return dict(con.execute(f"SELECT key, value FROM {schema}.meta"))


def remove_files(path: Path) -> None:
    """Remove a database and its journal, WAL and shared-memory files."""
    for suffix in SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def rows_of(paths: Iterable[Path], sql: str) -> Iterator[tuple]:
    """The rows of ``sql`` in each finished database, read-only; unreadable files are skipped here
    and reported by the merge."""
    for p in paths:
        try:
            con = connect_readonly(p)
            try:
                rows = con.execute(sql).fetchall()
            finally:
                con.close()
        except sqlite3.Error:
            continue
        yield from rows


def tasks_of(paths: Iterable[Path]) -> dict[int, str]:
    """Task -> checksum over finished databases."""
    return dict(rows_of(paths, "SELECT task, checksum FROM tasks"))


def check_database(path: Path, fingerprint: str | None, what: str = "shard") -> dict[str, str]:
    """Raise :class:`BadFile` unless ``path`` is a database of this run (``fingerprint``; None:
    of the run its meta names), of this schema, with nothing in it that could run: what must hold
    before any of it is read. Its pages: :func:`check_pages`; its rows: :func:`check_tasks`.
    ``what`` names the file in the reasons (a shard, a merged database). Returns its meta."""
    with reading(path) as con:
        objects = con.execute("SELECT type, name FROM sqlite_master").fetchall()
        active = [f"{t} {n}" for t, n in objects if t in ("view", "trigger")]
        active += [f"virtual table {n}" for t, n in objects if t == "table" and n in COLUMNS and
                   con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (n,)).fetchone()[0]
                   .upper().startswith("CREATE VIRTUAL")]
        if active:
            raise BadFile(path, f"holds {', '.join(active)}; refused, nothing in a {what} may run")
        for table in ("meta", *(t for t in COLUMNS if t != "meta")):  # meta's version explains the rest
            found = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            if found != COLUMNS[table]:
                raise BadFile(path, f"not a unidask {what} (table {table!r} "
                              f"{'missing' if not found else 'has columns ' + ', '.join(found)})")
            if table == "meta":
                meta = read_meta(con)
                version = meta.get("schema_version", "")
                if version != str(SCHEMA_VERSION):
                    newer = version.isdigit() and int(version) > SCHEMA_VERSION
                    raise BadFile(path, f"schema_version {version!r} is {'newer' if newer else 'older'} than "
                                  f"this unidask reads ({SCHEMA_VERSION}); "
                                  + ("upgrade unidask" if newer else "merge it with the unidask that wrote it"))
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise BadFile(path, f"belongs to another run (fingerprint {meta.get('fingerprint')}, "
                          f"this run's is {fingerprint})")
    return meta


def check_pages(path: Path) -> None:
    """Raise :class:`BadFile` unless SQLite's ``quick_check`` finds every page of ``path`` sound."""
    with reading(path) as con:
        con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")   # faster, and less of the merge's CPU
        if (ok := con.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
            raise BadFile(path, f"damaged ({ok})")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """``path`` opened read-only for a check; errors name the file."""
    try:
        con = connect_readonly(path)
    except sqlite3.Error as e:
        raise BadFile(path, f"cannot open ({e})") from e
    try:
        with blame(path):
            yield con
    finally:
        con.close()


@contextlib.contextmanager
def blame(path: Path) -> Iterator[None]:
    """Errors while reading a file's rows are that file's fault: name it."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        raise BadFile(path, f"rows clash with rows already merged ({e})") from e
    except sqlite3.DatabaseError as e:
        raise BadFile(path, f"not a readable SQLite database ({e})") from e


# -- the integrity invariant ---------------------------------------------------------------------------

CHUNK_BYTES = 64 << 20   # a task's rows are hashed this much at a time


@dataclass(frozen=True)
class Expected:
    """What every task of a run must be: the plan's tasks, each with ``task_count(t)`` rows of ids
    ``t * task_size ...``, each a ``dim x dim`` matrix of ``itemsize``-byte numbers. ``dim`` is None
    where the config does not say (a plugin generator): then every row must have the dim of the
    first one checked."""

    n_tasks: int
    task_size: int
    count: int
    itemsize: int
    dim: int | None = None

    @classmethod
    def of(cls, spec: Spec) -> "Expected":
        return cls(spec.n_tasks, spec.task_size, spec.count, np.dtype(spec.dtype).itemsize,
                   generators.matrix_dim(spec.kind, spec.params))

    def task_count(self, task: int) -> int:
        return plan.task_count(self.count, self.task_size, task)


def task_faults(con: sqlite3.Connection, expected: Expected, schema: str = "main"
                ) -> Iterator[tuple[int | None, str]]:
    """Everything that breaks the integrity invariant in the tasks of ``schema``, as (task, what is
    wrong), task None for the file as a whole: a task outside the plan, a count that is not the
    plan's, rows missing, of another dim or byte length, a checksum that its rows do not give, rows
    that belong to no task. The one check behind merge, verify, status and resume."""
    dim = expected.dim
    accounted = 0
    for task, count, recorded in con.execute(f"SELECT task, count, checksum FROM {schema}.tasks ORDER BY task"):
        if not (isinstance(task, int) and 0 <= task < expected.n_tasks):
            yield task, f"task {task!r} is not in the run's plan (tasks 0-{expected.n_tasks - 1})"
            continue
        if count != expected.task_count(task):
            yield task, f"task {task} records {count!r} unitaries, the plan has {expected.task_count(task)}"
            continue
        base = task * expected.task_size
        rows, dims, lengths, types = con.execute(
            f"SELECT count(*), group_concat(DISTINCT dim), group_concat(DISTINCT length(data)), "
            f"group_concat(DISTINCT typeof(data) || '/' || typeof(meta)) "
            f"FROM {schema}.unitaries WHERE id >= ? AND id < ?", (base, base + expected.task_size)).fetchone()
        accounted += rows
        if rows != count:
            yield task, f"task {task} has {rows} rows, it records {count}"
            continue
        if not set(str(types).split(",")) <= {"blob/null", "blob/text"}:
            yield task, f"task {task} has rows whose data or meta is of the wrong type ({types})"
            continue
        found = sorted((int(d) if d.lstrip("-").isdigit() else d for d in str(dims).split(",")), key=str)
        if dim is None and len(found) == 1 and isinstance(found[0], int) and found[0] > 0:
            dim = found[0]
        if found != [dim]:
            yield task, f"task {task} has rows of dim {', '.join(map(str, found))}, the run's is {dim}"
            continue
        if str(lengths) != str(dim * dim * expected.itemsize):
            lengths = ", ".join(sorted(str(lengths).split(","), key=lambda x: (len(x), x)))
            yield task, (f"task {task} has rows of {lengths} bytes, a {dim}x{dim} matrix of this "
                         f"run is {dim * dim * expected.itemsize}")
            continue
        if task_checksum(con, schema, base, count, dim * dim * expected.itemsize) != recorded:
            yield task, f"task {task}: checksum mismatch (its rows are damaged or altered)"
    total = con.execute(f"SELECT count(*) FROM {schema}.unitaries").fetchone()[0]
    if total != accounted:
        yield None, f"{total - accounted} row(s) belong to no task of the file"


def task_checksum(con: sqlite3.Connection, schema: str, base: int, count: int, row_bytes: int) -> str:
    """The checksum of a task's rows as stored, recomputed (:func:`checksum`): the rows are
    concatenated inside SQLite, a chunk at a time, so Python touches each chunk once, not each row."""
    h = xxhash.xxh3_128()
    metas = []
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    factory, con.text_factory = con.text_factory, bytes   # the concatenated blobs come back whole
    try:
        for start in range(base, base + count, step):
            data, meta = con.execute(
                f"SELECT group_concat(data, x''), group_concat(coalesce(meta, char(0)), '') "
                f"FROM {schema}.unitaries WHERE id >= ? AND id < ?", (start, min(start + step, base + count))
            ).fetchone()
            h.update(data or b"")
            metas.append(meta or b"")
    finally:
        con.text_factory = factory
    h.update(b"".join(metas))
    return h.hexdigest()


def check_tasks(path: Path, expected: Expected) -> dict[int, str]:
    """Raise :class:`BadFile` naming the first task of ``path`` that breaks the integrity
    invariant; return task -> checksum of a file that keeps it."""
    with reading(path) as con:
        con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
        for task, reason in task_faults(con, expected):
            raise BadFile(path, reason)
        return dict(con.execute("SELECT task, checksum FROM tasks"))


def check(path: Path, fingerprint: str, expected: Expected) -> dict[int, str]:
    """Every check a staged shard must pass (meta and schema, pages, tasks); its task -> checksum."""
    check_database(path, fingerprint)
    check_pages(path)
    return check_tasks(path, expected)
