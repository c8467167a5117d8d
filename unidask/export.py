"""Export a unidask database for users of np.load (one ``.npy`` array) and np.loadtxt (one text
file per unitary)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import files
from .dataset import Dataset
from .db import check_database, check_pages
from .errors import InputError, writing

FORMATS = ("npy", "txt")
TXT_UNASKED = 1000   # text files an export writes without --format txt


class IdsOutOfRange(InputError):
    """An id range that the database does not hold."""


def id_range(ds: Dataset, ids: tuple[int | None, int | None] | None) -> tuple[int, int]:
    """``(start, stop)`` (either may be None: the dataset's own end) checked within the dataset."""
    lo, hi = ds.id_range
    start, stop = ids or (None, None)
    start, stop = lo if start is None else start, hi if stop is None else stop
    if not (lo <= start < stop <= hi):
        raise IdsOutOfRange(f"ids {start}:{stop} are out of range: {ds.path} holds ids {lo}:{hi}")
    return start, stop


def export(db: str | os.PathLike, fmt: str | None, out: str | os.PathLike,
           ids: tuple[int | None, int | None] | None = None) -> int:
    """Write unitaries ``ids`` (``(start, stop)``, default all) of ``db`` as one ``.npy`` array
    ``(k, n, n)``, or as one ``.txt`` file per unitary (``OUT/ID.txt``) that
    ``np.loadtxt(f, dtype=complex)`` reads back exactly. ``fmt`` None: ``npy`` where ``out``
    ends in ``.npy``, else ``txt``, but only up to :data:`TXT_UNASKED` files (thousands of small
    files are what unidask exists to avoid: more must be asked for). Returns how many were written."""
    writers = {"npy": _export_npy, "txt": _export_txt}
    if fmt is not None and fmt not in writers:
        raise InputError(f"unknown export format {fmt!r} ({' or '.join(FORMATS)})")
    out = Path(out)
    check_database(Path(db), None, what="database")
    check_pages(Path(db))   # a damaged file is refused before anything is written
    with Dataset(db) as ds:
        start, stop = id_range(ds, ids)
        if fmt is None:
            fmt = "npy" if out.suffix == ".npy" else "txt"
            if fmt == "txt" and stop - start > TXT_UNASKED:
                raise InputError(f"{out} does not end in .npy: that would be {stop - start:,} text files, one "
                                 f"per unitary; write one array to {out}.npy, or ask for the files with "
                                 "--format txt")
        with writing(out):
            return writers[fmt](ds, start, stop, out)


def _export_npy(ds: Dataset, start: int, stop: int, out: Path) -> int:
    present = ds.con.execute("SELECT count(*) FROM unitaries WHERE id >= ? AND id < ?",
                             (start, stop)).fetchone()[0]
    with files.publishing(out, mode=None) as tmp:   # the user's file, to share as they like
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=ds.dtype.newbyteorder("="),
                                          shape=(present, ds.dim, ds.dim))
        k = 0
        for _, batch in ds.batches(start=start, stop=stop):
            array[k:k + len(batch)] = batch
            k += len(batch)
        array.flush()
        del array
    return present


def _export_txt(ds: Dataset, start: int, stop: int, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    width = len(str(ds.id_range[1] - 1))
    k = 0
    for ids_, batch in ds.batches(start=start, stop=stop):
        for i, u in zip(ids_, batch):
            # %.18e keeps every bit of a float64 (and of a float32 widened to it)
            np.savetxt(out / f"{i:0{width}d}.txt", u.astype(np.complex128), fmt="%.18e")
            k += 1
    return k
