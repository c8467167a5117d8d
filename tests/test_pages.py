"""The unitaries table written page by page (``pages.py``): every file SQLite reads back as written,
and its own ``PRAGMA integrity_check`` passes, for any page size, matrix size, row count and ids
(gaps, and the lengths where a rowid's varint grows)."""

from __future__ import annotations

import os
import sqlite3
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from unidask.store import db, pages, pagewrite, shardread


def table(path, page_size: int, ids: np.ndarray, data: np.ndarray, dim: int, chunk: int = 1000,
          tasks: int = 3) -> pages.Layout:
    """A database made by SQLite with unidask's schema and a few tasks rows, then its unitaries
    written by the page writer."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size = {page_size}")
    con.execute("PRAGMA journal_mode = DELETE")
    con.executescript(db.SCHEMA)
    con.executemany("INSERT INTO tasks VALUES (?, '0/1', 1, 'n', 'w', 0, 1, 'x')", [(t,) for t in range(tasks)])
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    fd = os.open(path, os.O_RDWR)
    try:
        writer = pagewrite.TableWriter(fd, pages.layout_for(page_size, os.path.getsize(path) // page_size + 1,
                                                        data.shape[1], dim, int(ids[-1]) if len(ids) else 0), root)
        for lo in range(0, len(ids), chunk):
            writer.add(ids[lo:lo + chunk], data[lo:lo + chunk])
        return writer.finish()
    finally:
        os.close(fd)


def read_back(path) -> tuple[str, list]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("PRAGMA integrity_check").fetchone()[0],
                con.execute("SELECT id, dim, data, meta FROM unitaries ORDER BY id").fetchall())
    finally:
        con.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_exp=st.integers(9, 16), dim=st.integers(1, 9), count=st.integers(0, 3000),
       start=st.sampled_from([0, 1, 100, 127, 16_000, 16_383, 2_097_000, 268_435_000, 2**53 - 5000]),
       gaps=st.booleans(), chunk=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_every_table_the_writer_makes_is_sound_and_reads_back(tmp_path_factory, page_exp, dim, count, start, gaps,
                                                              chunk, seed):
    page_size = 1 << page_exp
    row = dim * dim * 16 // (4 if dim > 4 else 1)   # some rows of a complex64 size, some of complex128
    assume(pages.fits(row, page_size))
    rng = np.random.default_rng(seed)
    ids = start + (np.cumsum(rng.integers(1, 40, count)) if gaps else np.arange(count))
    data = rng.integers(0, 256, (count, row), dtype=np.uint8)
    path = tmp_path_factory.mktemp("t") / "t.db"
    layout = table(path, page_size, ids, data, dim, chunk)
    check, rows = read_back(path)
    assert check == "ok"
    assert [r[0] for r in rows] == ids.tolist() and {r[1] for r in rows} <= {dim}
    assert all(r[2] == data[i].tobytes() and r[3] is None for i, r in enumerate(rows))
    assert layout.rows == count and os.path.getsize(path) % page_size == 0
    header = path.read_bytes()[:100]
    assert struct.unpack(">I", header[28:32])[0] == os.path.getsize(path) // page_size


def test_a_wrong_key_in_an_interior_page_is_what_integrity_check_finds(tmp_path):
    """The check the tests rely on can fail: the same file with one interior key off by one."""
    ids, data = np.arange(5000), np.zeros((5000, 256), np.uint8)
    path = tmp_path / "t.db"
    layout = table(path, 4096, ids, data, 4)
    assert read_back(path)[0] == "ok" and layout.leaves > 1
    con = sqlite3.connect(path)
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * 4096)
        page = bytearray(f.read(4096))
        cell = struct.unpack(">H", page[12:14])[0]
        page[cell + 5] ^= 0x01   # the first child's key: one more or one less
        f.seek((root - 1) * 4096)
        f.write(page)
    assert read_back(path)[0] != "ok"


def test_rows_must_come_in_id_order(tmp_path):
    with pytest.raises(ValueError, match="increasing id order"):
        table(tmp_path / "t.db", 4096, np.array([3, 2]), np.zeros((2, 16), np.uint8), 1)


def test_a_row_larger_than_a_page_is_left_to_sqlite():
    assert pages.fits(62 * 62 * 16, 65536) and not pages.fits(64 * 64 * 16, 65536)


@pytest.mark.cluster
def test_a_dataset_reads_the_merged_pages_as_sql_reads_the_rows(config, tmp_path):
    """``Dataset`` reads a database in the merge's layout from the map of its pages: every way of
    indexing gives what SQL gives (a copy of the file that one write has touched reads through
    SQL); and once the file has been written by anyone, it no longer trusts the layout."""
    import shutil

    import unidask

    spec = config(run={"count": 3000, "task_size": 250}, generator={"kind": "haar", "dim": 3})
    merged = unidask.run(spec).merged.out
    touched = tmp_path / "touched.db"
    shutil.copyfile(merged, touched)
    con = sqlite3.connect(touched)
    with con:
        con.execute("INSERT INTO meta VALUES ('touched', 'yes')")   # a write, of no row of the table
    con.close()
    paged, plain = unidask.Dataset(merged), unidask.Dataset(touched)
    assert paged._pages is not None and plain._pages is None
    rng = np.random.default_rng(1)
    keys = [0, 2999, -1, slice(None), slice(10, 500), slice(2999, None, -7), slice(5, 5), [7, 7, 3, 2999],
            rng.integers(0, 3000, 256), rng.integers(0, 3000, 256).astype(np.uint32), np.arange(100, 300),
            np.array([], np.int64)]
    for key in keys:
        np.testing.assert_array_equal(paged[key], plain[key], err_msg=str(key))
    batches = [(i.copy(), u.copy()) for i, u in paged.batches(size=700)]
    assert [i.tolist() for i, _ in batches] == [i.tolist() for i, _ in plain.batches(size=700)]
    # a row changed by sqlite3 in the merged file itself: the change counter moves, SQL is read
    con = sqlite3.connect(merged)
    with con:
        con.execute("UPDATE unitaries SET data = zeroblob(length(data)) WHERE id = 5")
    con.close()
    again = unidask.Dataset(merged)
    assert again._pages is None and not again[5].any()


def sqlite_table(path, page_size: int, ids: list[int], row: int, dim: int, seed: int, metas: bool = False) -> int:
    """A table as a worker's shard holds it, written by SQLite's INSERTs (in the order given: a
    shuffled order splits pages mid-way), some rows deleted; its root page."""
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size = {page_size}")
    con.execute("PRAGMA journal_mode = DELETE")
    con.executescript(db.SCHEMA)
    con.execute("BEGIN")
    con.executemany("INSERT INTO unitaries VALUES (?, ?, ?, ?)",
                    [(i, dim, rng.integers(0, 256, row, dtype=np.uint8).tobytes(), "m" if metas and i % 7 == 0 else None)
                     for i in ids])
    con.execute("COMMIT")
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_exp=st.integers(9, 16), dim=st.integers(1, 6), count=st.integers(1, 2000),
       start=st.sampled_from([0, 127, 16_383, 2**40]), shuffled=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_the_table_reader_reads_what_sqlite_reads(tmp_path_factory, page_exp, dim, count, start, shuffled, seed):
    """A shard's rows read from its pages (``TableReader``), any id range, equal SQL's."""
    page_size, row = 1 << page_exp, dim * dim * 16
    assume(pages.fits(row, page_size))
    rng = np.random.default_rng(seed)
    ids = (start + np.cumsum(rng.integers(1, 5, count))).tolist()
    if shuffled:
        rng.shuffle(ids)
    path = tmp_path_factory.mktemp("r") / "s.db"
    root = sqlite_table(path, page_size, ids, row, dim, seed)
    reader = shardread.TableReader(path, root, row, dim)
    con = sqlite3.connect(path)
    lo, hi = sorted(int(i) for i in rng.choice(sorted(ids) + [start, max(ids) + 1], 2))
    want = con.execute("SELECT id, data FROM unitaries WHERE id >= ? AND id < ? ORDER BY id", (lo, hi)).fetchall()
    con.close()
    got_ids, got = reader.rows(int(lo), int(hi))
    assert got_ids.tolist() == [i for i, _ in want]
    assert [bytes(r) for r in got] == [d for _, d in want]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(st.tuples(st.integers(0, 4000), st.integers(-40, 40), st.integers(1, 40)), min_size=1, max_size=8),
       row=st.integers(1, 24), shuffled=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_a_gather_puts_every_row_where_asked(tmp_path_factory, runs, row, shuffled, seed):
    """Rows from any offsets of a file (runs of one step, as a leaf's cells, and odd ones) into
    any rows of an array: each one's bytes where asked, whether copied as a strided run or one by one."""
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("g") / "f"
    path.write_bytes(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    starts = np.concatenate([np.clip(a + step * np.arange(n), 0, 8192 - row) for a, step, n in runs])
    rows = np.arange(len(starts) + 5)
    into = rng.permutation(rows)[:len(starts)] if shuffled else rows[3:3 + len(starts)]
    out = np.zeros((len(rows), row), np.uint8)
    pages.Mapped(path, row).gather(starts, out=out, into=into)
    data = np.frombuffer(path.read_bytes(), np.uint8)
    want = np.zeros_like(out)
    for k, i in zip(starts, into):
        want[i] = data[k:k + row]
    assert np.array_equal(out, want)


def test_rows_of_another_shape_are_left_to_sql(tmp_path):
    root = sqlite_table(tmp_path / "m.db", 4096, list(range(100)), 256, 4, 1, metas=True)
    with pytest.raises(pages.Unreadable, match="another (shape|size)"):
        shardread.TableReader(tmp_path / "m.db", root, 256, 4).rows(0, 100)
    root = sqlite_table(tmp_path / "d.db", 4096, list(range(100)), 256, 4, 1)
    with pytest.raises(pages.Unreadable, match="another size"):
        shardread.TableReader(tmp_path / "d.db", root, 64, 2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spots=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=20),
       cut=st.one_of(st.none(), st.integers(0, 2**20)))
def test_a_damaged_file_is_unreadable_or_read_never_a_crash(tmp_path_factory, spots, cut):
    """Bytes overwritten anywhere, or the file cut: the reader gives rows (the merge checks them
    against the task's checksum) or says Unreadable, nothing else; every read stays in the file."""
    base = tmp_path_factory.mktemp("d")
    path = base / "s.db"
    if not hasattr(test_a_damaged_file_is_unreadable_or_read_never_a_crash, "good"):
        good = base / "good.db"
        root = sqlite_table(good, 1024, list(range(0, 3000, 2)), 64, 2, 7)
        test_a_damaged_file_is_unreadable_or_read_never_a_crash.good = good.read_bytes(), root
    data, root = test_a_damaged_file_is_unreadable_or_read_never_a_crash.good
    damaged = bytearray(data)
    for at, value in spots:
        damaged[at % len(damaged)] = value
    path.write_bytes(bytes(damaged[:cut] if cut is not None else damaged))
    try:
        reader = shardread.TableReader(path, root, 64, 2)
        for lo, hi in ((0, 3000), (500, 501), (1000, 2000)):
            ids, rows = reader.rows(lo, hi)
            assert len(ids) == len(rows) and rows.shape[1:] == (64,)
    except pages.Unreadable:
        pass
