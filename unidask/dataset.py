"""Read a merged unidask database (or a staged shard) as numpy arrays."""

from __future__ import annotations

import json
import os
import sqlite3
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import files
from .db import connect_readonly, read_meta
from .errors import InputError


class Dataset:
    """A unidask database (merged, or a staged shard), read-only.

    ``ds[i]`` is the unitary with global id ``i`` (``task * task_size + idx``; in a complete
    dataset ids run from 0 to ``len(ds) - 1``), ``ds[a:b]`` a ``(k, n, n)`` array.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if (why := files.regular(self.path)) is not None:
            raise InputError(f"{self.path}: {why}")
        try:
            self.con = connect_readonly(self.path)
            self.meta = read_meta(self.con)
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self.spec: dict[str, Any] = json.loads(self.meta["spec"])
            self.meta["schema_version"]
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{self.path}: not a unidask database ({e})") from e

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, {len(self)} x {self.dim}x{self.dim} {self.dtype.name})"

    def __len__(self) -> int:
        return self._len

    @cached_property
    def _len(self) -> int:
        if "rows" in self.meta:  # recorded by the merge, saves a full scan
            return int(self.meta["rows"])
        return self._query("SELECT count(*) FROM unitaries").fetchone()[0]

    @cached_property
    def dim(self) -> int:
        row = self._query("SELECT dim FROM unitaries LIMIT 1").fetchone()
        return row[0] if row else 0

    @cached_property
    def id_range(self) -> tuple[int, int]:
        """(smallest id, largest id + 1)."""
        lo, hi = self._query("SELECT min(id), max(id) FROM unitaries").fetchone()
        return (0, 0) if lo is None else (lo, hi + 1)

    def _query(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.con.execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise InputError(f"{self.path}: damaged database ({e})") from e

    def _read(self, sql: str, args: tuple) -> tuple[list[int], np.ndarray]:
        try:
            rows = self._query(sql, args).fetchall()
            ids = [r[0] for r in rows]
            flat = np.frombuffer(b"".join(r[1] for r in rows), dtype=self.dtype)
            return ids, flat.reshape(len(rows), self.dim, self.dim)
        except (sqlite3.DatabaseError, TypeError, ValueError) as e:   # rows that are not matrices
            raise InputError(f"{self.path}: damaged database ({type(e).__name__}: {str(e)[:120]})") from e

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.id_range[1])
            if step != 1:
                return self[start:stop][::step]
            ids, out = self._read("SELECT id, data FROM unitaries WHERE id >= ? AND id < ? ORDER BY id",
                                  (start, stop))
            if len(ids) != max(0, stop - start):
                raise IndexError(f"{self.path}: ids {start}:{stop} are not all present "
                                 f"({len(ids)} of {stop - start})")
            return out
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.id_range[1] if key < 0 else 0)
            ids, out = self._read("SELECT id, data FROM unitaries WHERE id = ?", (i,))
            if not ids:
                raise IndexError(f"{self.path}: no unitary with id {key}")
            return out[0]
        if isinstance(key, (list, tuple, np.ndarray)):
            ids = np.asarray(key)
            if ids.ndim == 1 and (ids.dtype.kind in "iu" or ids.size == 0):
                return self._take(ids.astype(np.int64))
        raise TypeError(f"Dataset indices must be integers, slices or 1-D integer arrays, not "
                        f"{type(key).__name__}")

    def _take(self, key: np.ndarray) -> np.ndarray:
        """The unitaries of an array of ids, in its order, repeats allowed (a random minibatch):
        each distinct id read once, by rowid, the ids bound as one JSON array."""
        want = np.where(key < 0, key + self.id_range[1], key)
        unique = np.unique(want)
        ids, out = self._read("SELECT id, data FROM unitaries WHERE id IN (SELECT value FROM json_each(?)) "
                              "ORDER BY id", (json.dumps(unique.tolist()),))
        if len(ids) != len(unique):
            missing = np.setdiff1d(unique, ids)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IndexError(f"{self.path}: no unitary with id {missing[0]}{more}")
        return out[np.searchsorted(unique, want)]

    def meta_of(self, i: int) -> Any:
        """The JSON metadata stored with unitary ``i`` (e.g. its circuit), or None."""
        row = self._query("SELECT meta FROM unitaries WHERE id = ?", (i,)).fetchone()
        if row is None:
            raise IndexError(f"{self.path}: no unitary with id {i}")
        return None if row[0] is None else json.loads(row[0])

    def batches(self, size: int = 10_000, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, unitaries) in id order, ``size`` at a time, over ids in [start, stop)."""
        stop = self.id_range[1] if stop is None else stop
        last = start - 1
        while True:
            ids, out = self._read("SELECT id, data FROM unitaries WHERE id > ? AND id < ? "
                                  "ORDER BY id LIMIT ?", (last, stop, size))
            if not ids:
                return
            last = ids[-1]
            yield np.asarray(ids), out

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, batch in self.batches():
            yield from batch

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
