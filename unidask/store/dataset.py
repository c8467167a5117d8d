"""Read a merged unidask database (or a staged shard) as numpy arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core import files
from ..core.errors import InputError
from . import pageread, pages
from .db import COLUMNS, connect_readonly, read_meta

log = logging.getLogger(__name__)


class Dataset:
    """A unidask database (merged, or a staged shard), read-only.

    ``ds[i]`` is the unitary with global id ``i`` (``task * task_size + idx``; in a complete
    dataset ids run from 0 to ``len(ds) - 1``), ``ds[a:b:step]`` and ``ds[array_of_ids]`` a
    ``(k, n, n)`` array, indexed as numpy indexes a sequence of that length (negative ids count
    from the end, any step, an id out of range is an IndexError; booleans are refused). Arrays come
    back writable and owned by the caller. ``ds.meta_of(i)`` is the metadata stored with unitary
    ``i`` (a circuit's gates and QASM), ``ds.meta`` the database's own.

    A Dataset pickles as its path, and every process and every thread opens its own connection
    when it first reads: it can go to a ``multiprocessing`` pool or a PyTorch ``DataLoader``
    with any start method, and be read from many threads at once.
    """

    def __init__(self, path: str | os.PathLike, mmap: bool = True):
        self.path, self.mmap = Path(path), mmap
        if (why := files.regular(self.path)) is not None:
            raise InputError(f"{self.path}: {why}")
        self._local = threading.local()
        self._cons: list[tuple[int, sqlite3.Connection]] = []
        try:
            self.meta = read_meta(self.con)
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self.spec: dict[str, Any] = json.loads(self.meta["spec"])
            self.meta["schema_version"]
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError) as e:
            self.close()
            raise InputError(f"{self.path}: not a unidask database ({e})") from e

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "mmap": self.mmap}   # connections do not travel

    def __setstate__(self, state: dict[str, Any]) -> None:
        Dataset.__init__(self, state["path"], state["mmap"])

    @property
    def con(self) -> sqlite3.Connection:
        """This thread's connection, opened on its first use (in this process)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.con = connect_readonly(self.path, check_same_thread=False)  # closed by close()
            # read through a memory map, not a read() per page: random minibatches are page
            # lookups all over the file (README, Reading for training). The mapped pages count in
            # RSS (the kernel drops them as it needs): a one-pass reader, an export, does without
            if self.mmap:
                local.con.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            local.pid = os.getpid()
            self._cons.append((local.pid, local.con))
        return local.con

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, {len(self)} x {self.dim}x{self.dim} {self.dtype.name})"

    def __len__(self) -> int:
        self._fresh()
        return self._len

    def _fresh(self) -> None:
        """Forget what was counted where another client wrote the file since (its header's change
        counter, which every rollback-journal commit moves)."""
        if self._pages is not None:
            try:
                self._pages.current()
            except pages.Unreadable as e:
                self._untrusted(e)
            return
        try:
            counter = pages.change_counter(self.path)
        except OSError:
            return   # the reads say what is wrong
        if self.__dict__.get("_counter", counter) != counter:
            for name in ("_len", "id_range", "ids_by_position"):
                self.__dict__.pop(name, None)
        self.__dict__["_counter"] = counter

    @cached_property
    def _len(self) -> int:
        # the rows SQLite holds: a proven page layout's count, else SQLite's own (meta's "rows" is
        # what the merge wrote, and other clients may have changed the table since)
        if self._pages is not None:
            return self._pages.layout.rows
        return self._query("SELECT count(*) FROM unitaries").fetchone()[0]

    @cached_property
    def dim(self) -> int:
        row = self._query("SELECT dim FROM unitaries LIMIT 1").fetchone()
        return row[0] if row else 0

    @cached_property
    def id_range(self) -> tuple[int, int]:
        """(smallest id, largest id + 1)."""
        if self._pages is not None:
            return (0, self._pages.layout.rows)
        # apart: together SQLite scans the table, alone each is one descent of the b-tree
        lo = self._query("SELECT min(id) FROM unitaries").fetchone()[0]
        hi = self._query("SELECT max(id) FROM unitaries").fetchone()[0]
        return (0, 0) if lo is None else (lo, hi + 1)

    @cached_property
    def _pages(self) -> pageread.PageReader | None:
        """Where the file is proven to be as the page merge left it (``pageread``), its rows read
        straight from the map of its pages; else None: through SQL (the same rows)."""
        layout = pages.Layout.from_meta(self.meta) if self.mmap else None
        if layout is None or "layout.change_counter" not in self.meta or self.meta.get("layout.dense") != "1":
            return None
        try:
            columns = [r[1] for r in self._query("PRAGMA table_info(unitaries)")]
            root = self._query("SELECT rootpage FROM sqlite_schema WHERE type = 'table' AND name = 'unitaries'"
                               ).fetchone()
            if columns != list(COLUMNS["unitaries"]) or root is None or layout.dim != self.dim \
                    or layout.row_bytes != self.row_bytes:
                raise pageread.Changed(f"{self.path}: its table is not the one the merge laid out")
            return pageread.PageReader(self.path, layout, int(root[0]), int(self.meta["layout.change_counter"]))
        except (ValueError, TypeError) as e:
            self._untrusted(pages.Unreadable(f"{self.path}: its recorded layout is unreadable ({e})"))
        except pages.Unreadable as e:
            self._untrusted(e)
        return None

    @property
    def direct(self) -> pageread.PageReader | None:
        """The reader of the pages this Dataset serves rows from without SQL, or None (SQL)."""
        return self._pages

    def _untrusted(self, e: pages.Unreadable) -> None:
        """Read by SQL from now on: the pages are not what SQLite reads (a warning), or the file
        is not the merge's any more (quietly: another client wrote it, which is the user's right)."""
        (log.debug if isinstance(e, pageread.Changed) else log.warning)("%s; reading it through SQL", e)
        if (reader := self.__dict__.pop("_pages", None)) is not None:
            reader.close()   # its map and descriptor, not kept for reads that no longer use them
        for name in ("_len", "id_range", "ids_by_position"):
            self.__dict__.pop(name, None)
        self.__dict__["_pages"] = None

    def _paged(self, ids: np.ndarray) -> np.ndarray:
        assert self._pages is not None   # called only where the pages are readable
        try:
            return self._pages.rows(ids).view(self.dtype).reshape(len(ids), self.dim, self.dim)
        except pages.Unreadable as e:
            self._untrusted(e)
            return self._take(ids)   # SQLite's rows, or its IndexError for what it does not hold

    def _query(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.con.execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: damaged database ({e})") from e

    @property
    def row_bytes(self) -> int:
        """Bytes of one matrix."""
        return self.dim * self.dim * self.dtype.itemsize

    @cached_property
    def _rows_per_read(self) -> int:
        """Rows one query concatenates: SQLite's strings stop at 1 GB; far less keeps memory flat."""
        return max(1, READ_BYTES // max(1, self.row_bytes))

    def _out_of_range(self, i: Any) -> IndexError:
        return IndexError(f"{self.path}: id {i} is out of range: the dataset holds ids "
                          f"{self.id_range[0]}:{self.id_range[1]}")

    def _joined(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Read parts as one ``(k, n, n)`` array (no copy for one part)."""
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate(arrays) if arrays else np.zeros((0, self.dim, self.dim), self.dtype)

    def parse_meta(self, i: int, text: str | None) -> Any:
        """Row ``i``'s stored metadata (JSON text) as Python; a damaged one is an InputError."""
        try:
            return None if text is None else json.loads(text)
        except (TypeError, ValueError) as e:
            raise InputError(f"{self.path}: damaged database (the meta of id {i} is not JSON: {e})") from e

    def _read(self, where: str, args: tuple) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, (k, n, n) writable array)`` of the rows ``where`` selects, in id order.

        SQLite concatenates the rows' ids and blobs itself (``group_concat``): a Python object per
        row cost more than the read (README, Performance). The ids say in which order the blobs
        came, so the result is in id order whatever order SQLite aggregated them in."""
        sql = (f"SELECT group_concat(id), CAST(group_concat(data, x'') AS BLOB) FROM "
               f"(SELECT id, data FROM unitaries {where})")
        try:
            text, blob = self._query(sql, args).fetchone()
            ids = np.array(text.split(","), dtype=np.int64) if text else np.zeros(0, np.int64)
            out = np.frombuffer(bytearray(blob or b""), dtype=self.dtype).reshape(len(ids), self.dim, self.dim)
        except (sqlite3.DatabaseError, TypeError, ValueError) as e:   # rows that are not matrices
            raise InputError(f"{self.path}: damaged database ({type(e).__name__}: {str(e)[:120]})") from e
        if len(ids) > 1 and (np.diff(ids) <= 0).any():
            order = np.argsort(ids, kind="stable")
            ids, out = ids[order], out[order]
        return ids, out

    def _ids(self, key: Any) -> int | range | np.ndarray:
        """``key`` as an id, a range of ids or an array of ids (of any shape), by numpy's rules
        for the first axis of an array of ``id_range[1]`` items."""
        self._fresh()
        n = self.id_range[1]
        if isinstance(key, (list, tuple, range)):
            if isinstance(key, range) or (key and all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in key)):
                if (bad := next((i for i in key if not -n <= i < n), None)) is not None:
                    raise self._out_of_range(bad)   # before numpy makes it a float
                key = np.asarray(key, dtype=np.int64)
            else:
                key = np.asarray(key)
                if key.size == 0:
                    key = key.astype(np.int64)
        if isinstance(key, (bool, np.bool_)):
            raise TypeError("Dataset indices must not be a single boolean (numpy would add an axis "
                            "to the whole dataset); for a mask, index with a boolean array")
        if isinstance(key, slice):
            return range(*key.indices(n))
        if isinstance(key, (int, np.integer)) or (isinstance(key, np.ndarray) and key.ndim == 0
                                                  and key.dtype.kind in "iu"):
            i = int(key)
            if not -n <= i < n:
                raise self._out_of_range(i)
            return i % n if n else i
        if isinstance(key, np.ndarray) and key.dtype == bool and key.ndim == 1:
            if len(key) != n:
                raise IndexError(f"boolean index did not match indexed array along axis 0; size of axis "
                                 f"is {n} but size of corresponding boolean axis is {len(key)}")
            return np.flatnonzero(key)
        if isinstance(key, np.ndarray) and key.ndim >= 1 and key.dtype.kind in "iu":
            ids = key
            if ids.size and ((lo := ids.min()) < -n or ids.max() >= n):
                raise self._out_of_range(ids[(ids < -n) | (ids >= n)][0])
            if ids.size and lo < 0:
                ids = np.where(ids < 0, ids + n, ids)
            return ids.astype(np.int64, copy=False)   # read, never written
        raise IndexError("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis (`None`) and "
                         f"integer or boolean arrays are valid indices (a Dataset got {type(key).__name__}"
                         + (f" of {key.dtype}" if isinstance(key, np.ndarray) else "") + ")")

    def __getitem__(self, key: Any) -> Any:
        """By id, as numpy indexes a ``(ids, n, n)`` array: the first index selects unitaries
        (an id, a slice, a sequence, a range, an integer or boolean array), the others index into
        the matrices (``ds[5, 0, 0]`` is one complex number)."""
        if (type(key) is np.ndarray and key.ndim == 1 and key.dtype.kind in "iu" and key.size
                and self._pages is not None and key.min() >= 0 and key.max() < self._pages.layout.rows):
            return self._paged(key)   # a minibatch, straight to the pages: the rest is numpy's cost
        if not isinstance(key, tuple):
            if key is not Ellipsis and key is not None:
                return self._rows(self._ids(key))
            key = (key,)
        if not key or key[0] is Ellipsis or key[0] is None:   # the whole dataset, as numpy would
            return np.asarray(self)[key]
        if len(key) > 3 and not any(k is Ellipsis or k is None for k in key):
            raise IndexError(f"too many indices for array: array is 3-dimensional, but {len(key)} were indexed")
        ids = self._ids(key[0])
        if isinstance(ids, int):   # a block of its one row, indexed by 0: numpy's rules for an int among arrays
            return self._rows(np.array([ids]))[(0, *key[1:])]
        block = self._rows(ids if isinstance(ids, range) else ids.ravel())
        if isinstance(ids, range):
            return block[(slice(None), *key[1:])]
        # the block holds the rows in the index's order: its own positions, in the index's shape
        return block[(np.arange(ids.size).reshape(ids.shape), *key[1:])]

    def _rows(self, ids: int | range | np.ndarray) -> np.ndarray:
        """The rows of an id, a range of ids or an array of ids (any shape)."""
        if isinstance(ids, int) and self._pages is not None and 0 <= ids < len(self):
            return self._paged(np.array([ids]))[0]
        if isinstance(ids, int):
            found, out = self._read("WHERE id = ?", (ids,))
            if not len(found):
                raise IndexError(f"{self.path}: no unitary with id {ids}")
            return out[0]
        if isinstance(ids, range):
            if not ids:   # e.g. slice(-n - 5, 0, -1): range(-1, 0, -1), no id at all
                return np.zeros((0, self.dim, self.dim), self.dtype)
            if ids.step == 1:
                return self._span(ids.start, ids.stop)
            if abs(ids.step) > SPARSE_STEP:
                return self._take(np.arange(ids.start, ids.stop, ids.step))
            lo, hi = min(ids[0], ids[-1]), max(ids[0], ids[-1]) + 1
            return self._span(lo, hi)[ids.start - lo::ids.step].copy()
        return self._take(ids.ravel()).reshape(*ids.shape, self.dim, self.dim)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(len(ds), n, n)``: the array ``np.asarray(ds)`` (and ``ds.at``) gives."""
        return (len(self), self.dim, self.dim)

    ndim = 3

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """Every row in id order (of an incomplete dataset too: its rows by position)."""
        out = self.at[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    @cached_property
    def at(self) -> "Positions":
        """The rows by position, ``0`` to ``len(ds) - 1``, whatever ids an incomplete dataset lacks:
        what a PyTorch ``DataLoader`` wants (``ds.at`` has ``len`` and ``[k]``)."""
        return Positions(self)

    @cached_property
    def ids_by_position(self) -> np.ndarray | None:
        """Every id in order where the dataset lacks some (positions are not ids), else None."""
        lo, hi = self.id_range
        return None if (lo, hi) == (0, len(self)) else self.ids()

    def _span(self, start: int, stop: int) -> np.ndarray:
        """The unitaries of ids ``start`` to ``stop - 1``, every one present."""
        if self._pages is not None and 0 <= start <= stop <= len(self):
            return self._paged(np.arange(start, stop))
        step = self._rows_per_read
        parts = [self._read("WHERE id >= ? AND id < ?", (a, min(stop, a + step)))[1]
                 for a in range(start, stop, step)]
        out = self._joined(parts)
        if len(out) != stop - start:
            raise IndexError(f"{self.path}: ids {start}:{stop} are not all present "
                             f"({len(out)} of {stop - start})")
        return out

    def present(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(the ids of ids that the dataset holds, their unitaries)``, in id order; ``ids``
        distinct. Each read by rowid, the ids bound as one JSON array a query."""
        if self._pages is not None:   # ids 0 ... len - 1, every one there
            found = np.sort(ids[(ids >= 0) & (ids < len(self))])
            return found, self._paged(found)
        step = self._rows_per_read
        parts = [self._read("WHERE id IN (SELECT value FROM json_each(?))",
                            (json.dumps(ids[a:a + step].tolist()),)) for a in range(0, len(ids), step)]
        found = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
        return found, self._joined([o for _, o in parts])

    def _take(self, want: np.ndarray) -> np.ndarray:
        """The unitaries of an array of ids, in its order, repeats allowed (a random minibatch):
        each distinct id read once (:meth:`present`)."""
        if self._pages is not None and (not len(want) or (want.min() >= 0 and want.max() < len(self))):
            return self._paged(want)   # any order, repeats and all: each row's place is computed
        unique = np.unique(want)
        ids, out = self.present(unique)
        if len(ids) != len(unique):
            missing = np.setdiff1d(unique, ids)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IndexError(f"{self.path}: no unitary with id {missing[0]}{more}")
        return out if np.array_equal(unique, want) else out[np.searchsorted(unique, want)]

    def meta_of(self, i: int) -> Any:
        """The JSON metadata stored with unitary ``i`` (e.g. its circuit), or None."""
        key = self._ids(i)
        if not isinstance(key, int):
            raise TypeError("meta_of takes one id")
        row = self._query("SELECT meta FROM unitaries WHERE id = ?", (key,)).fetchone()
        if row is None:
            raise IndexError(f"{self.path}: no unitary with id {i}")
        return self.parse_meta(i, row[0])

    def batches(self, size: int = 10_000, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, unitaries) in id order, ``size`` at a time, over ids in [start, stop)."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"batch size must be an integer >= 1, not {size!r}")
        stop = self.id_range[1] if stop is None else stop
        if self._pages is not None:   # ids 0 ... len - 1, every one there
            step = size
            for a in range(max(start, 0), min(stop, len(self)), step):
                ids = np.arange(a, min(a + step, stop, len(self)))
                yield ids, self._paged(ids)
            return
        last = start - 1
        while True:
            ids, out = self._read("WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
                                  (last, stop, min(size, self._rows_per_read)))
            if not len(ids):
                return
            last = int(ids[-1])
            yield ids, out

    def split(self, seed: int = 0, **fractions: float) -> dict[str, np.ndarray]:
        """Ids split by fraction, e.g. ``ds.split(seed=0, train=0.8, validation=0.1, test=0.1)``
        -> ``{"train": ids, ...}``, each sorted. Where an id goes depends on the id and the seed
        alone (a hash of both), so the split is the same on every machine and an id keeps its
        part when the dataset grows; the parts' sizes follow the fractions within sampling error."""
        if not fractions or any(not 0 <= f <= 1 for f in fractions.values()) \
                or abs(sum(fractions.values()) - 1) > 1e-9:
            raise ValueError(f"split fractions must be in [0, 1] and sum to 1, not {fractions}")
        ids = self.ids()
        u = uniform_of(ids, seed)
        edges = np.cumsum([0.0, *fractions.values()])
        edges[-1] = 1.0
        return {name: ids[(u >= lo) & (u < hi)] for name, lo, hi in zip(fractions, edges, edges[1:])}

    def ids(self) -> np.ndarray:
        """The id of every row, sorted: ``0 ... len(ds) - 1`` in a complete dataset, with the
        missing tasks' ids left out of an incomplete one."""
        return np.fromiter((i for (i,) in self._query("SELECT id FROM unitaries ORDER BY id")),
                           dtype=np.int64)

    def unique_ids(self, by: str = "circuit", decimals: int = 9) -> np.ndarray:
        """The ids of the first row of each distinct circuit (``by="circuit"``: the same stored
        circuit) or unitary (``by="unitary"``: equal up to a global phase, compared to ``decimals``
        places), sorted: a random-circuit dataset without its duplicates, as circuit-synthesis
        training wants it. The database keeps every row (every task stays whole and checkable)."""
        if by == "circuit":
            if self._query("SELECT 1 FROM unitaries WHERE meta IS NULL LIMIT 1").fetchone():
                raise InputError(f"{self.path}: rows without a stored circuit: deduplicate "
                                 "these by='unitary'")
            firsts = (i for (i,) in self._query("SELECT min(id) FROM unitaries GROUP BY meta"))
            return np.sort(np.fromiter(firsts, dtype=np.int64))
        if by != "unitary":
            raise ValueError(f"by must be 'circuit' or 'unitary', not {by!r}")
        seen: set[bytes] = set()
        keep = []
        for ids, batch in self.batches():
            for i, u in zip(ids, up_to_phase(batch, decimals)):
                key = hashlib.blake2b(u.tobytes(), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, batch in self.batches():
            yield from batch

    def close(self) -> None:
        """Close the connections this process opened (in every thread)."""
        if (reader := self.__dict__.pop("_pages", None)) is not None:
            reader.close()
        mine = [c for pid, c in self._cons if pid == os.getpid()]
        self._cons = [(pid, c) for pid, c in self._cons if pid != os.getpid()]
        self._local = threading.local()
        for con in mine:
            con.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Positions:
    """``ds.at``: a Dataset by position, ``at[k]`` the k-th row in id order, indexed as numpy
    indexes an array of ``len(ds)`` rows; on a complete dataset positions are the ids."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Any) -> Any:
        ids = self.ds.ids_by_position
        if ids is None:
            return self.ds[key]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if (isinstance(key, tuple) and not key) or first is Ellipsis or first is None:
            return self[:][key]
        picked = ids[first]   # numpy's rules and errors over positions
        return self.ds[(picked if isinstance(picked, np.ndarray) else int(picked), *rest)]


MMAP_BYTES = 1 << 40      # the whole file, as far as the address space goes
READ_BYTES = 64 << 20   # at most this many bytes of matrices per query
SPARSE_STEP = 16   # a slice with a longer step reads its ids one by one, not the span between


def up_to_phase(u: np.ndarray, decimals: int) -> np.ndarray:
    """Each matrix times the global phase that makes its first entry of modulus > 1e-6 real and
    positive, rounded to ``decimals`` places: equal for unitaries equal up to a global phase."""
    flat = u.reshape(len(u), -1)
    first = np.argmax(np.abs(flat) > 1e-6, axis=1)
    pivot = flat[np.arange(len(u)), first]
    out = np.round(flat * (np.abs(pivot) / np.where(pivot == 0, 1, pivot))[:, None], decimals)
    return out + 0.0   # -0.0 and 0.0 alike


def uniform_of(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) for each id, from the id and the seed alone (SplitMix64)."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
