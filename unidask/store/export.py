"""Export a unidask database to the formats users already have: one ``.npy`` array (np.load),
one HDF5 file (h5py, the format of numerical physics), or one text file per unitary (np.loadtxt).
Every export streams the database in batches (flat memory at any size) and keeps what the database
knows beside the matrices: the ids, the per-row metadata (a circuit), the run's spec."""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core import files
from ..core.errors import InputError, writing
from ..core.progress import Progress
from .dataset import Dataset
from .db import check_database, check_pages

FORMATS = ("npy", "h5", "txt")
COMPRESSIONS = ("gzip", "lzf")   # what plain h5py reads, with no plugin
# HDF5 reads whole chunks: 64 KiB (256 U(4)) keeps a random minibatch's reads near its rows, and
# a scan still reads megabytes a call; h5py's guide: 10 KiB to 1 MiB
H5_CHUNK_BYTES = 64 << 10
H5_ID_CHUNK = 8192
SUFFIXES = {".npy": "npy", ".h5": "h5", ".hdf5": "h5"}
TXT_UNASKED = 1000   # text files an export writes without --format txt
log = logging.getLogger(__name__)
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
           ids: tuple[int | None, int | None] | None = None, unique: str | None = None, *,
           chunk_rows: int | None = None, compression: str | None = None) -> int:
    """Write unitaries ``ids`` (``(start, stop)``, default all) of ``db`` as

    - ``npy``: one array ``(k, n, n)`` in ``OUT``, and beside it ``OUT.json`` (the database's meta,
      the run's spec, the ids) and, where rows carry metadata, ``OUT.meta.jsonl`` (``{"id", "meta"}``
      a line);
    - ``h5``: datasets ``unitaries`` ``(k, n, n)`` in chunks of ``chunk_rows`` rows (default about
      64 KiB: a random read pays little beyond its rows), ``compression`` none, ``"gzip"`` or
      ``"lzf"``; ``ids`` (chunked) and, where rows carry metadata, ``meta`` (a JSON string a row);
      the file's attributes: the database's meta (numbers as numbers, times in ISO 8601), the run's
      ``dim``, ``kind``, ``dtype``, ``law``, ``seed``, ``count``, ``task_size``, the ids exported,
      the spec as JSON;
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
    if compression is not None and compression not in COMPRESSIONS:
        raise InputError(f"unknown compression {compression!r} ({', '.join(COMPRESSIONS)})")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise InputError(f"chunk_rows must be a number of rows >= 1, got {chunk_rows!r}")
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
        h5 = {"chunk_rows": chunk_rows, "compression": compression}
        if fmt != "h5" and any(v is not None for v in h5.values()):
            raise InputError(f"chunk_rows and compression are HDF5's: {out} is written as {fmt}")
        with writing(out):
            written = writers[fmt](Rows(ds, start, stop, keep), out, **(h5 if fmt == "h5" else {}))
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
    """What an export says of itself: the database's meta (numbers as numbers, times in ISO 8601;
    its spec as JSON) and the ids."""
    meta = {k: typed_meta(k, v) for k, v in ds.meta.items() if k != "spec"}
    return {"source": str(ds.path), "meta": meta, "spec": ds.spec, "ids": ids}


TEXT_META = {"fingerprint", "dtype", "unidask_version"}   # text even where it reads as a number
TIME_META = {"merged"}                                    # epoch seconds in the database


def typed_meta(key: str, value: str) -> Any:
    """A meta value (text in SQLite) as what it is: an int, a float, a time in ISO 8601 (UTC)."""
    if key in TEXT_META:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if key in TIME_META:
        return datetime.datetime.fromtimestamp(number, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return int(value) if value.strip().lstrip("-").isdigit() else number


def run_attributes(ds: Dataset) -> dict[str, Any]:
    """What an h5py user looks for at the top of the file: the run's dims, kind, dtype, law, seed,
    count and task size as attributes of their own (a seed beyond int64 as its digits)."""
    run, generator = ds.spec["run"], ds.spec["generator"]
    seed = int(run["seed"])
    return {"dim": ds.dim, "kind": generator["kind"], "dtype": ds.dtype.name, "law": ds.spec.get("law", ""),
            "seed": seed if seed < 2 ** 63 else str(seed), "count": int(run["count"]),
            "task_size": int(run["task_size"])}


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
    held = {"start": rows.start, "stop": nxt} if gaps is None else np.concatenate(gaps).tolist()
    files.write_atomic(sidecar, json.dumps(described(ds, held), indent=1) + "\n", mode=None)
    return k


def _export_h5(rows: Rows, out: Path, chunk_rows: int | None = None, compression: str | None = None) -> int:
    try:
        import h5py
    except ImportError as e:
        raise InputError("export to HDF5 needs h5py: pip install 'unidask[hdf5]'") from e
    ds, present = rows.ds, rows.count
    chunk_rows = min(present, chunk_rows or max(1, H5_CHUNK_BYTES // max(1, ds.row_bytes)))
    chunked = {"compression": compression} if present else {}   # h5py chunks nothing of size 0
    with files.publishing(out, mode=None) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_dataset("unitaries", shape=(present, ds.dim, ds.dim), dtype=ds.dtype.newbyteorder("="),
                                chunks=(chunk_rows, ds.dim, ds.dim) if present else None, **chunked)
        id_set = f.create_dataset("ids", shape=(present,), dtype=np.int64,
                                  chunks=(min(present, H5_ID_CHUNK),) if present else None, **chunked)
        meta_set = None
        k = 0
        for ids, batch in rows.batches():
            data[k:k + len(batch)] = batch
            id_set[k:k + len(batch)] = ids
            if metas := rows.metas(ids):
                if meta_set is None:
                    meta_set = f.create_dataset("meta", shape=(present,), dtype=h5py.string_dtype(),
                                                chunks=(chunk_rows,), **chunked)
                at = np.searchsorted(ids, [i for i, _ in metas]) + k
                for j, (_, m) in zip(at, metas):
                    meta_set[j] = json.dumps(m)
            k += len(batch)
        about = described(ds, {"start": rows.start, "stop": rows.stop})
        for key, value in {**about["meta"], **run_attributes(ds)}.items():
            f.attrs[key] = value
        f.attrs["ids_start"], f.attrs["ids_stop"] = rows.start, rows.stop
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
