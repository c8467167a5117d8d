"""A unidask database, shard or merged: the schema, opening one read-only, its meta, the task
checksum, the page-size model, and the checks a file must pass before any of it is read."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import xxhash

from ..core import files
from ..core.errors import InputError
from ..spec import generators, plan

if TYPE_CHECKING:
    from ..spec.config import Spec

SCHEMA_VERSION = 3  # 2: no task/idx columns in unitaries; XXH3-128 checksums. 3: shards pack tasks (blocks)
READS = ("2", "3")  # the versions read: 2's files are 3's without blocks (the merged tables are the same)
SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text()
SHARD_SCHEMA = SCHEMA + resources.files(__package__).joinpath("shard.sql").read_text()
AUTO_PAGE_SIZES = tuple(2 ** k for k in range(12, 17))   # 4 KiB ... 64 KiB
MMAP_SIZE = 1 << 40  # map all of a file (SQLite caps it at its build's limit, 2 GiB by default)
SUFFIXES = ("", "-journal", "-wal", "-shm")  # a database file and its companions


def _columns(schema: str) -> dict[str, list[str]]:
    """Each table's columns, in order, as ``schema`` makes them."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(schema)
        tables = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        con.close()


COLUMNS = _columns(SCHEMA)
BLOCK_COLUMNS = _columns(SHARD_SCHEMA)["blocks"]


class BadFile(InputError):
    """A staged shard or database that must not be read on; the message names the file and why."""

    def __init__(self, path: Path, reason: str):
        lines = [line.strip() for line in reason.splitlines() if line.strip()]   # one line, always
        reason = "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):   # raised in a Dask worker, raised again in the driver
        return type(self), (self.path, self.reason)


def checksum(data: bytes | memoryview, metas: Sequence[str | None] | int) -> str:
    """A task's checksum: XXH3-128 of its data blobs in id order, then each row's meta (NUL for
    none; ``metas`` a number: that many rows without). It tells two copies of a task apart and
    finds damaged rows; nothing adversarial, so a hash at memory speed (blake2b was a large share
    of the write path at n = 32)."""
    h = xxhash.xxh3_128(data)
    h.update(bytes(metas) if isinstance(metas, int) else b"".join(b"\0" if m is None else m.encode() for m in metas))
    return h.hexdigest()


def connect_readonly(path: str | os.PathLike, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open a finished database (a staged shard, a merged result) read-only, without locking, and
    without trusting its schema: nothing in the file gets to run."""
    if (why := files.regular(Path(path))) is not None:   # never open a FIFO or device: it would block
        raise sqlite3.OperationalError(f"unable to open database file: {why}")
    # immutable: SQLite would read a WAL's or a hot journal's changes, this connection would not;
    # both must judge the same bytes, so such a file is refused until SQLite has applied them
    if _journaled(Path(path)):
        raise sqlite3.OperationalError(
            f"a {Path(path).name}-wal or -journal beside it holds changes that sqlite3 would read and "
            "unidask's read-only open would not: open it once with sqlite3 (which applies or rolls them "
            "back), or remove them")
    uri = f"file:{Path(path).absolute()}?mode=ro&immutable=1"
    con = sqlite3.connect(uri, uri=True, check_same_thread=check_same_thread)
    con.execute("PRAGMA trusted_schema = OFF")
    return con


def page_size(path: str | os.PathLike) -> int:
    """The page size of the finished database at ``path``."""
    con = connect_readonly(path)
    try:
        return con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()


def run_page_size(setting: int | str, row_bytes: int | None) -> int:
    """The page size of a run's shards: ``storage.page_size``, or for "auto" :func:`page_size_for`
    rows of ``row_bytes`` (where that is not known, the largest)."""
    if setting != "auto":
        return int(setting)
    return page_size_for(row_bytes) if row_bytes else max(AUTO_PAGE_SIZES)


FIXED_PAGES = 6   # pages of a database that hold no rows: the schema, each table's and index's root


def page_size_for(row_bytes: int, data_bytes: int | None = None) -> int:
    """``storage.page_size = "auto"``: the largest page size whose file, for rows of ``row_bytes``
    of matrix data, is within 10% of the smallest. A 64 KiB page holds only three 16 KiB rows
    (n = 32, complex128) and one of n = 48, wasting a quarter and nearly half of the file; smaller
    pages keep most of such a row on full overflow pages. At n <= 24 it stays 64 KiB.

    ``data_bytes``: for a small file of that much matrix data (a stage-out's delta), the largest
    of those sizes whose :data:`FIXED_PAGES` are at most 5% of it, else the smallest: 64 KiB
    pages made a delta of one 512 KB task 1.7x its data, and the merge reads every byte."""
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
    good = [page for page, size in sizes.items() if size <= 1.1 * min(sizes.values())]
    if data_bytes is not None:
        return max((p for p in good if FIXED_PAGES * p <= data_bytes / 20), default=min(good))
    return max(good)


def database_meta(spec: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """The ``meta`` rows every database of a run (shard or merged) starts with."""
    from .._version import __version__

    return {"schema_version": str(SCHEMA_VERSION), "dtype": spec["generator"]["dtype"],
            "fingerprint": fingerprint, "task_size": str(spec["run"]["task_size"]),
            "spec": json.dumps(spec, sort_keys=True), "unidask_version": __version__}


def read_meta(con: sqlite3.Connection, schema: str = "main") -> dict[str, str]:
    return dict(con.execute(f"SELECT key, value FROM {schema}.meta"))


def remove_files(path: Path) -> None:
    """Remove a database and its journal, WAL and shared-memory files."""
    for suffix in SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")   # a rollback journal's first 8 bytes (fileformat2.html)


def _journaled(path: Path) -> bool:
    """Whether a WAL or a hot rollback journal beside ``path`` holds a writer's unfinished work. A
    journal without SQLite's magic at its head is not hot: SQLite writes the header with the magic
    zeroed and sets it only as it syncs the journal, before its first write to the database file,
    so a writer killed earlier (inside its first transaction, nothing spilled) left the file as it
    was, and SQLite ignores such a journal too."""
    wal, journal = Path(f"{path}-wal"), Path(f"{path}-journal")
    if wal.is_file() and wal.stat().st_size:
        return True
    if not journal.is_file():   # never open a FIFO to read: it would block
        return False
    with contextlib.suppress(OSError), open(journal, "rb") as f:
        return f.read(len(JOURNAL_MAGIC)) == JOURNAL_MAGIC
    return False


def recover(path: Path) -> None:
    """Roll back the hot journal (or replay the WAL) a dead writer left beside the shard ``path``,
    as SQLite does on the next write open: a writer killed inside its first transaction (the
    meta) leaves the file as it was before it, and :func:`never_written` can then tell. Call it
    only for a file whose writer is gone."""
    if not _journaled(path):
        return
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA trusted_schema = OFF")
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()   # the first read rolls back
    except sqlite3.Error:
        pass   # a file that is no database: the checks after this name it
    finally:
        con.close()


def never_written(path: Path) -> bool:
    """True for a shard whose writer died before its first task committed (killed while it created
    the file): empty, or its tables absent or without a row, and no journal or WAL holding more.
    Removing such a file loses nothing; anything else must be staged or left for a person."""
    if _journaled(path):
        return False
    try:
        if files.regular(path) is not None:
            return False
        if path.stat().st_size == 0:
            return True
        con = connect_readonly(path)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return all(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] == 0
                       for t in ("tasks", "unitaries", "blocks") if t in tables)
        finally:
            con.close()
    except (sqlite3.Error, OSError):
        return False


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
        return check_schema(con, path, fingerprint, what)


def check_schema(con: sqlite3.Connection, path: Path, fingerprint: str | None, what: str = "shard",
                 schema: str = "main") -> dict[str, str]:
    """:func:`check_database` of the database open as ``schema`` of ``con`` (an attached shard)."""
    objects = con.execute(f"SELECT type, name, sql FROM {schema}.sqlite_master").fetchall()
    active = [f"{t} {n}" for t, n, _ in objects if t in ("view", "trigger")]
    active += [f"virtual table {n}" for t, n, sql in objects if t == "table" and
               str(sql).upper().lstrip().startswith("CREATE VIRTUAL")]
    if active:
        raise BadFile(path, f"holds {', '.join(active)}; refused, nothing in a {what} may run")
    found: dict[str, list[str]] = {table: [] for table in COLUMNS}
    tables = ", ".join(f"'{t}'" for t in (*COLUMNS, "blocks"))
    for table, column in con.execute(   # every table's columns in one query, in their order
            f"SELECT m.name, c.name FROM {schema}.sqlite_master AS m, pragma_table_info(m.name, ?) AS c "
            f"WHERE m.type = 'table' AND m.name IN ({tables}) ORDER BY m.name, c.cid", (schema,)):
        found.setdefault(table, []).append(column)
    meta: dict[str, str] = {}
    for table in ("meta", *(t for t in COLUMNS if t != "meta")):   # meta's version explains the rest
        if found[table] != COLUMNS[table]:
            raise BadFile(path, f"not a unidask {what} (table {table!r} "
                          f"{'missing' if not found[table] else 'has columns ' + ', '.join(found[table])})")
        if table == "meta":
            meta = read_meta(con, schema)
            version = meta.get("schema_version", "")
            if version not in READS:
                newer = version.isdigit() and int(version) > SCHEMA_VERSION
                raise BadFile(path, f"schema_version {version!r} is {'newer' if newer else 'older'} than "
                              f"this unidask reads ({', '.join(READS)}); "
                              + ("upgrade unidask" if newer else "merge it with the unidask that wrote it"))
    # packed tasks (schema 3's shards); absent from merged databases and from schema 2's files
    if "blocks" in found and (found["blocks"] != BLOCK_COLUMNS or meta.get("schema_version") == "2"):
        raise BadFile(path, f"not a unidask {what} (table 'blocks' has columns {', '.join(found['blocks'])} "
                      f"in a file of schema_version {meta.get('schema_version')})")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise BadFile(path, f"belongs to another run (fingerprint {meta.get('fingerprint')}, "
                      f"this run's is {fingerprint})")
    return meta


def check_pages(path: Path) -> None:
    """Raise :class:`BadFile` unless SQLite's ``quick_check`` finds every page of ``path`` sound."""
    with reading(path) as con:
        _quick_check(con, path)


def _quick_check(con: sqlite3.Connection, path: Path) -> None:
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


# SQLITE_FULL, SQLITE_READONLY (extended codes share the low byte); not IOERR: a cut shard reads so
WRITE_FAULTS = {13, 8}
WRITE_FAULT_WORDS = ("disk is full", "readonly database")


@contextlib.contextmanager
def blame(path: Path) -> Iterator[None]:
    """Errors while reading a file's rows are that file's fault: name it. Not the target's: a full
    disk, a read-only or failing one, are no fault of the file read (SQLite says which)."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if (getattr(e, "sqlite_errorcode", 0) & 0xFF) in WRITE_FAULTS or any(w in str(e) for w in WRITE_FAULT_WORDS):
            raise
        raise BadFile(path, f"not a readable SQLite database ({e})") from e
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
    def of(cls, spec: Spec, first: Path | None = None) -> "Expected":
        """``spec``'s; where it does not say the matrix size (a plugin), the first row of the
        database ``first`` does (where it has none, :func:`task_faults` takes a file's first)."""
        dim = generators.matrix_dim(spec.kind, spec.params)
        if dim is None and first is not None:
            with reading(first) as con:
                row = con.execute("SELECT dim FROM unitaries ORDER BY id LIMIT 1").fetchone() or (con.execute(
                    "SELECT dim FROM blocks ORDER BY id LIMIT 1").fetchone() if packed(con, spec.task_size) else None)
            dim = row[0] if row and isinstance(row[0], int) else None
        return cls(spec.n_tasks, spec.task_size, spec.count, np.dtype(spec.dtype).itemsize, dim)

    def task_count(self, task: int) -> int:
        return plan.task_count(self.count, self.task_size, task)

    @property
    def row_bytes(self) -> int | None:
        """A row's data: a ``dim x dim`` matrix."""
        return None if self.dim is None else self.dim ** 2 * self.itemsize


def task_faults(con: sqlite3.Connection, expected: Expected, schema: str = "main",
                read_elsewhere: frozenset = frozenset(), checked: Callable[[int], None] | None = None
                ) -> Iterator[tuple[int | None, str]]:
    """Everything that breaks the integrity invariant in the tasks of ``schema``, as (task, what is
    wrong), task None for the file as a whole: a task outside the plan, a count that is not the
    plan's, rows missing or off their ids, of another dim, byte length or type, a checksum that its
    rows do not give, rows that belong to no task. The one check behind merge, verify, status and
    resume. The rows of the tasks in ``read_elsewhere`` are left to the caller, who reads them
    anyway (the page merge: :meth:`TaskRows.read` as it copies them). ``checked`` is told each
    task's rows as they are read (a progress bar)."""
    dim = expected.dim
    accounted = blocks_accounted = 0
    blocks = packed(con, expected.task_size, schema)
    for task, count, recorded in con.execute(f"SELECT task, count, checksum FROM {schema}.tasks ORDER BY task"):
        if not (isinstance(task, int) and 0 <= task < expected.n_tasks):
            yield task, f"task {task!r} is not in the run's plan (tasks 0-{expected.n_tasks - 1})"
            continue
        if count != expected.task_count(task):
            yield task, f"task {task} records {count!r} unitaries, the plan has {expected.task_count(task)}"
            continue
        base = task * expected.task_size
        if task in blocks and task in read_elsewhere:   # the caller reads (read_block) the blocks of its ids
            blocks_accounted += con.execute(f"SELECT count(*) FROM {schema}.blocks WHERE id >= ? AND id < ?",
                                            (base, base + count)).fetchone()[0]
        if task in read_elsewhere:
            accounted += 0 if task in blocks else count
            continue
        if dim is None:   # a plugin's: the first row checked sets it
            first = con.execute(f"SELECT dim FROM {schema}.{'blocks' if task in blocks else 'unitaries'} "
                                "WHERE id >= ? ORDER BY id LIMIT 1", (base,)).fetchone()
            dim = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 0
        row_bytes = dim * dim * expected.itemsize
        if task in blocks:
            if checked is not None:
                checked(count)
            reason, n_blocks, _ = read_block(con, schema, task, base, count, dim, row_bytes, recorded)
            blocks_accounted += n_blocks
            if reason:
                yield task, reason
            continue
        # the planned rows' ids only: any other row of the slot is counted as no task's, below (a
        # slot of a task_size far above its count would be read in ~task_size / chunk steps)
        rows = TaskRows.read(con, schema, base, count, dim, row_bytes)
        accounted += rows.count
        if checked is not None:
            checked(rows.count)
        if (reason := rows.fault(con, schema, task, base, count, dim, row_bytes, recorded)):
            yield task, reason
    total = con.execute(f"SELECT count(*) FROM {schema}.unitaries").fetchone()[0]
    if total != accounted:
        yield None, f"{total - accounted} row(s) belong to no task of the file"
    if (total := sum(blocks.values())) != blocks_accounted:
        yield None, f"{total - blocks_accounted} block(s) of packed rows belong to no task of the file"


# A packed task's rows cut apart inside SQLite (substr of a bound BLOB is a BLOB): one call a task,
# for the SQL merge; bound, not joined to the blocks table, which SQLite would read again a row
UNPACK = ("WITH RECURSIVE i(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM i WHERE x < :count - 1) "
          "INSERT INTO main.unitaries(id, dim, data) SELECT :base + x, :dim, substr(:data, x * :step + 1, :step) "
          "FROM i")


def packed(con: sqlite3.Connection, task_size: int, schema: str = "main") -> dict[int, int]:
    """A shard's packed tasks (schema 3, table ``blocks``): task -> how many blocks lie in its
    slot of ids (``task_size`` each)."""
    if not has_blocks(con, schema):
        return {}
    return dict(con.execute(f"SELECT id / ?, count(*) FROM {schema}.blocks GROUP BY 1", (task_size,)))


def has_blocks(con: sqlite3.Connection, schema: str = "main") -> bool:
    """Whether a database holds packed rows (a schema 3 shard with a row in ``blocks``)."""
    return con.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'blocks'"
                       ).fetchone() is not None and \
        con.execute(f"SELECT EXISTS (SELECT 1 FROM {schema}.blocks)").fetchone()[0] == 1


def read_block(con: sqlite3.Connection, schema: str, task: int, base: int, count: int, dim: int, row_bytes: int,
               recorded: str, keep: bool = False) -> tuple[str | None, int, np.ndarray | None]:
    """What is wrong with task ``task``'s packed rows (None: nothing), how many blocks hold them,
    and with ``keep`` the rows, read once for all: the blocks of ids ``base ... base + count - 1``
    tile them exactly (each starts where the one before ends), each a BLOB of whole matrices of
    ``dim`` (:data:`ODD_ROW`'s rules), and the rows' checksum is the recorded one."""
    where = f"FROM {schema}.blocks WHERE id >= ? AND id < ? ORDER BY id"
    blocks = con.execute(f"SELECT id, dim, typeof(data), length(data) {where}", (base, base + count)).fetchall()
    at = base
    for first, stored_dim, kind, length in blocks:
        if stored_dim != dim or type(stored_dim) is not int:
            return f"task {task} has rows of dim {stored_dim!r}, the run's is {dim}", len(blocks), None
        if kind != "blob" or not length or length % row_bytes:
            return (f"task {task} has packed rows of {kind} {length} bytes at id {first}, not whole "
                    f"{dim}x{dim} matrices of this run ({row_bytes} bytes)"), len(blocks), None
        if first != at:
            return f"task {task} has packed rows off its ids (at id {first}, not {at})", len(blocks), None
        at += length // row_bytes
    if at != base + count:
        return f"task {task} has {at - base} packed rows, it records {count}", len(blocks), None
    h = xxhash.xxh3_128()
    out = np.empty((count, row_bytes), np.uint8) if keep else None
    factory, con.text_factory = con.text_factory, bytes
    try:
        for first, data in con.execute(f"SELECT id, data {where}", (base, base + count)):
            h.update(data)
            if out is not None:
                rows = np.frombuffer(data, np.uint8).reshape(-1, row_bytes)
                out[first - base:first - base + len(rows)] = rows
    finally:
        con.text_factory = factory
    h.update(b"\0" * count)
    if h.hexdigest() != recorded:
        return f"task {task}: checksum mismatch (its rows are damaged or altered)", len(blocks), None
    return None, len(blocks), out


# Rows up to this size are concatenated inside SQLite (one call a chunk, not one a row); longer
# ones are streamed row by row, where group_concat's copies would cost more than Python's calls.
CONCAT_BELOW = 1024
# a row that is not a dim x dim matrix of the run's dtype, or whose meta is not text
ODD_ROW = ("typeof(data) != 'blob' OR length(data) != :bytes OR typeof(dim) != 'integer' OR dim != :dim "
           "OR (meta IS NOT NULL AND typeof(meta) != 'text')")


@dataclass
class TaskRows:
    """What one task's slot of ids holds, read in one pass: how many rows, the last id, how many
    are odd (:data:`ODD_ROW`), and their checksum."""

    count: int = 0
    last_id: int | None = None
    odd: int = 0
    metas: int = 0
    digest: str = ""
    data: list = field(default_factory=list)   # with keep: the rows' bytes, in id order

    @classmethod
    def read(cls, con: sqlite3.Connection, schema: str, base: int, size: int, dim: int, row_bytes: int,
             keep: bool = False) -> "TaskRows":
        """``keep``: also the bytes hashed (for a copy of them that needs no second read)."""
        out, h, metas = cls(), xxhash.xxh3_128(), []
        where = f"FROM {schema}.unitaries WHERE id >= :start AND id < :stop"
        concat = 0 < row_bytes < CONCAT_BELOW
        concat_sql = ", group_concat(data, x'')" if concat else ""
        step = max(1, CHUNK_BYTES // row_bytes) if concat else size
        chunks = [(start, min(start + step, base + size)) for start in range(base, base + size, step)]
        factory, con.text_factory = con.text_factory, bytes   # concatenated blobs come back whole
        try:
            for start, stop in chunks:
                n, last, odd, with_meta, *data = con.execute(
                    f"SELECT count(*), max(id), coalesce(sum({ODD_ROW}), 0), count(meta){concat_sql} {where}",
                    {"start": start, "stop": stop, "dim": dim, "bytes": row_bytes}).fetchone()
                out.count, out.odd, out.metas = out.count + n, out.odd + odd, out.metas + with_meta
                out.last_id = last if n else out.last_id
                if concat:
                    h.update(data[0] or b"")
                    if keep:
                        out.data.append(data[0] or b"")
            if out.odd:
                return out   # its digest would say nothing more
            if not concat:
                bounds = {"start": base, "stop": base + size}
                for data, meta in con.execute(f"SELECT data, meta {where} ORDER BY id", bounds):
                    h.update(data)
                    metas.append(b"\0" if meta is None else meta)
                    if keep:
                        out.data.append(data)
            elif out.metas:
                metas += [con.execute(f"SELECT group_concat(coalesce(meta, char(0)), '') {where}",
                                      {"start": start, "stop": stop}).fetchone()[0] or b"" for start, stop in chunks]
            else:
                metas.append(b"\0" * out.count)
        finally:
            con.text_factory = factory
        h.update(b"".join(metas))
        out.digest = h.hexdigest()
        return out

    def fault(self, con: sqlite3.Connection, schema: str, task: int, base: int, count: int, dim: int,
              row_bytes: int, recorded: str) -> str | None:
        """What is wrong with the task, or None."""
        if self.count != count:
            return f"task {task} has {self.count} rows, it records {count}"
        if count and self.last_id != base + count - 1:
            return f"task {task} has rows off its ids (its last is {self.last_id}, not {base + count - 1})"
        if self.odd:   # say how, from a second look at the rows
            dims, lengths, types = (", ".join(map(str, sorted(set(values), key=_order))) for values in zip(*con.execute(
                f"SELECT DISTINCT dim, length(data), typeof(data) || '/' || typeof(meta) FROM {schema}.unitaries "
                "WHERE id >= ? AND id < ?", (base, base + count))))
            if dims != str(dim):
                return f"task {task} has rows of dim {dims}, the run's is {dim}"
            if lengths != str(row_bytes):
                return f"task {task} has rows of {lengths} bytes, a {dim}x{dim} matrix of this run is {row_bytes}"
            return f"task {task} has {self.odd} row(s) whose data or meta is of the wrong type ({types})"
        if self.digest != recorded:
            return f"task {task}: checksum mismatch (its rows are damaged or altered)"
        return None


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def task_checksum(con: sqlite3.Connection, schema: str, base: int, count: int) -> str:
    """The checksum (:func:`checksum`) of the rows of ids ``base ... base + count - 1`` as they are
    stored, whatever their shape (what a forger would write: the tests' tool)."""
    factory, con.text_factory = con.text_factory, bytes
    try:
        rows = con.execute(f"SELECT data, meta FROM {schema}.unitaries WHERE id >= ? AND id < ? ORDER BY id",
                           (base, base + count)).fetchall()
    finally:
        con.text_factory = factory
    h = xxhash.xxh3_128(b"".join(d if isinstance(d, bytes) else str(d).encode() for d, _ in rows))
    h.update(b"".join(b"\0" if m is None else m if isinstance(m, bytes) else str(m).encode() for _, m in rows))
    return h.hexdigest()


def check_tasks(path: Path, expected: Expected) -> dict[int, str]:
    """Raise :class:`BadFile` naming the first task of ``path`` that breaks the integrity
    invariant; return task -> checksum of a file that keeps it."""
    with reading(path) as con:
        return _checked_tasks(con, path, expected)


def _checked_tasks(con: sqlite3.Connection, path: Path, expected: Expected, read_elsewhere: frozenset = frozenset()
                   ) -> dict[int, str]:
    con.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")
    for task, reason in task_faults(con, expected, read_elsewhere=read_elsewhere):
        raise BadFile(path, reason)
    return dict(con.execute("SELECT task, checksum FROM tasks"))


def check(path: Path, fingerprint: str, expected: Expected, read_elsewhere: frozenset = frozenset()) -> dict[int, str]:
    """Every check a staged shard must pass (meta and schema, pages, tasks), on one connection (a
    merge of many small shards pays for each open); its task -> checksum. The rows of the tasks in
    ``read_elsewhere`` are the caller's to check (:func:`task_faults`)."""
    with reading(path) as con:
        check_schema(con, path, fingerprint)
        _quick_check(con, path)
        return _checked_tasks(con, path, expected, read_elsewhere)
