"""Export a unidask database to the formats users already have: one ``.npy`` array (np.load),
one HDF5 file (h5py, the format of numerical physics), or one text file per unitary (np.loadtxt).
Every export streams the database in batches (flat memory at any size) and keeps what the database
knows beside the matrices: the ids, the per-row metadata (a circuit), the run's spec."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import files
from .dataset import Dataset
from .db import check_database, check_pages
from .errors import InputError, writing
from .progress import Progress

FORMATS = ("npy", "h5", "txt")
SUFFIXES = {".npy": "npy", ".h5": "h5", ".hdf5": "h5"}
TXT_UNASKED = 1000   # text files an export writes without --format txt
log = logging.getLogger("unidask")
BATCH_BYTES = 8 << 20   # a batch passes through SQLite, bytes and numpy: about 4 copies


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
           ids: tuple[int | None, int | None] | None = None, unique: str | None = None) -> int:
    """Write unitaries ``ids`` (``(start, stop)``, default all) of ``db`` as

    - ``npy``: one array ``(k, n, n)`` in ``OUT``, and beside it ``OUT.json`` (the database's meta,
      the run's spec, the ids) and, where rows carry metadata, ``OUT.meta.jsonl`` (``{"id", "meta"}``
      a line);
    - ``h5``: datasets ``unitaries`` ``(k, n, n)`` (chunked), ``ids`` and, where rows carry
      metadata, ``meta`` (a JSON string a row), the meta and spec as the file's attributes;
    - ``txt``: one file per unitary (``OUT/ID.txt``) that ``np.loadtxt(f, dtype=complex)`` reads
      back exactly.

    ``fmt`` None: from ``out``'s suffix (``.npy``, ``.h5``/``.hdf5``), else ``txt``, but only up to
    :data:`TXT_UNASKED` files (thousands of small files are what unidask exists to avoid: more must
    be asked for). ``unique``: ``"circuit"`` or ``"unitary"``, only the first row of each distinct
    circuit or unitary (:meth:`Dataset.unique_ids`); how many were dropped is logged. Returns how
    many unitaries were written."""
    writers = {"npy": _export_npy, "h5": _export_h5, "txt": _export_txt}
    if fmt is not None and fmt not in writers:
        raise InputError(f"unknown export format {fmt!r} ({', '.join(FORMATS)})")
    out = Path(out)
    check_database(Path(db), None, what="database")
    check_pages(Path(db))   # a damaged file is refused before anything is written
    with Dataset(db, mmap=False) as ds:   # one pass: read() keeps the RSS flat
        start, stop = id_range(ds, ids)
        if fmt is None:
            fmt = SUFFIXES.get(out.suffix.lower(), "txt")
            if fmt == "txt" and stop - start > TXT_UNASKED:
                raise InputError(f"{out} does not end in .npy or .h5: that would be {stop - start:,} "
                                 f"text files, one per unitary; write one array to {out}.npy or "
                                 f"{out}.h5, or ask for the files with --format txt")
        keep = None
        if unique is not None:
            keep = ds.unique_ids(unique)
            keep = keep[(keep >= start) & (keep < stop)]
        with writing(out):
            written = writers[fmt](Rows(ds, start, stop, keep), out)
        if keep is not None:
            present = _present(ds, start, stop)
            log.info("dropped %s of %s rows that repeat an earlier %s", f"{present - written:,}",
                     f"{present:,}", unique)
        return written


@dataclass
class Rows:
    """What an export writes: the rows ``start:stop`` of ``ds`` (only the ids in ``keep``, if given)."""
    ds: Dataset
    start: int
    stop: int
    keep: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.keep) if self.keep is not None else _present(self.ds, self.start, self.stop)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The rows in id order, a few MB at a time, with a progress bar."""
        ds = self.ds
        size = max(1, BATCH_BYTES // max(1, ds.row_bytes))
        progress = Progress(self.stop - self.start, desc="export")
        for ids, batch in ds.batches(size, self.start, self.stop):
            progress.update(len(ids))
            if self.keep is not None:
                mine = np.isin(ids, self.keep)
                ids, batch = ids[mine], batch[mine]
            if len(ids):
                yield ids, batch
        progress.close()

    def metas(self, ids: np.ndarray) -> list[tuple[int, Any]]:
        """``(id, metadata)`` of the rows ``ids`` that carry metadata."""
        if not len(ids):
            return []
        rows = self.ds.con.execute("SELECT id, meta FROM unitaries WHERE id >= ? AND id <= ? AND meta "
                                   "IS NOT NULL ORDER BY id", (int(ids[0]), int(ids[-1]))).fetchall()
        wanted = set(ids.tolist()) if self.keep is not None else None
        return [(i, self.ds.parse_meta(i, m)) for i, m in rows if wanted is None or i in wanted]


def _present(ds: Dataset, start: int, stop: int) -> int:
    return ds.con.execute("SELECT count(*) FROM unitaries WHERE id >= ? AND id < ?",
                          (start, stop)).fetchone()[0]


def described(ds: Dataset, ids: Any) -> dict[str, Any]:
    """What an export says of itself: the database's meta (its spec as JSON) and the ids."""
    meta = {k: v for k, v in ds.meta.items() if k != "spec"}
    return {"source": str(ds.path), "meta": meta, "spec": ds.spec, "ids": ids}


def _export_npy(rows: Rows, out: Path) -> int:
    ds, present = rows.ds, rows.count
    sidecar, metas = out.with_name(out.name + ".json"), out.with_name(out.name + ".meta.jsonl")
    k, nxt, gaps = 0, rows.start, None   # gaps: the ids, once one is missing (else a range says it)
    with files.publishing(out, mode=None) as tmp, files.publishing(metas, mode=None) as tmp_metas, \
            open(tmp, "wb") as array, open(tmp_metas, "w") as lines:   # the user's, to share
        # the header, then the rows as they come: written, not mapped, so nothing of the array
        # stays resident (dirty pages of a map count in the RSS until written back)
        np.lib.format.write_array_header_2_0(array, {"descr": np.lib.format.dtype_to_descr(ds.dtype),
                                                     "fortran_order": False,
                                                     "shape": (present, ds.dim, ds.dim)})
        for ids, batch in rows.batches():
            array.write(batch.data)   # C-contiguous: no copy
            if gaps is None and not (ids[0] == nxt and ids[-1] - ids[0] + 1 == len(ids)):
                gaps = [np.arange(rows.start, nxt)]
            if gaps is not None:
                gaps.append(ids)
            nxt = int(ids[-1]) + 1
            lines.writelines(json.dumps({"id": i, "meta": m}) + "\n" for i, m in rows.metas(ids))
            k += len(batch)
        has_metas = lines.tell() > 0
    if not has_metas:
        metas.unlink()
    ids = {"start": rows.start, "stop": nxt} if gaps is None else np.concatenate(gaps).tolist()
    files.write_atomic(sidecar, json.dumps(described(ds, ids), indent=1) + "\n", mode=None)
    return k


def _export_h5(rows: Rows, out: Path) -> int:
    try:
        import h5py
    except ImportError as e:
        raise InputError("export to HDF5 needs h5py: pip install 'unidask[hdf5]'") from e
    ds, present = rows.ds, rows.count
    chunk = (max(1, min(present, (1 << 20) // max(1, ds.row_bytes))), ds.dim, ds.dim)   # about 1 MB a chunk
    with files.publishing(out, mode=None) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_dataset("unitaries", shape=(present, ds.dim, ds.dim), chunks=chunk if present else None,
                                dtype=ds.dtype.newbyteorder("="))
        id_set = f.create_dataset("ids", shape=(present,), dtype=np.int64)
        meta_set = None
        k = 0
        for ids, batch in rows.batches():
            data[k:k + len(batch)] = batch
            id_set[k:k + len(batch)] = ids
            if metas := rows.metas(ids):
                if meta_set is None:
                    meta_set = f.create_dataset("meta", shape=(present,), dtype=h5py.string_dtype())
                at = np.searchsorted(ids, [i for i, _ in metas]) + k
                for j, (_, m) in zip(at, metas):
                    meta_set[j] = json.dumps(m)
            k += len(batch)
        about = described(ds, {"start": rows.start, "stop": rows.stop})
        for key, value in about["meta"].items():
            f.attrs[key] = value
        f.attrs["spec"] = json.dumps(ds.spec, sort_keys=True)
        f.attrs["source"] = about["source"]
    return k


def _export_txt(rows: Rows, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    width = len(str(rows.ds.id_range[1] - 1))
    k = 0
    for ids_, batch in rows.batches():
        for i, u in zip(ids_, batch):
            # %.18e keeps every bit of a float64 (and of a float32 widened to it)
            np.savetxt(out / f"{i:0{width}d}.txt", u.astype(np.complex128), fmt="%.18e")
            k += 1
    return k
