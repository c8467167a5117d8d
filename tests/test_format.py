"""SQLite's file format as the page writer and the two page readers use it, proven against SQLite
itself (README, "The database format"): tables past the lock-byte page at every page size, three
interior levels, merges of one and many shards and appends at every page size; the merged-file
reader against copies, forged layouts, rows changed by other clients and structural damage; the
shard reader against crafted shards. Every database made here passes ``PRAGMA integrity_check``
and every row is compared with SQLite's own read."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import unidask
from unidask import RunDir
from unidask.execute import worker
from unidask.store import db, pageread, pages, pagewrite, shardread

from conftest import cli, merged_data, run_main, shard_data, write_config

def quick(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- the writer, against SQLite ------------------------------------------------------------------


def sqlite_file(path: Path, page_size: int) -> int:
    """A database made by SQLite with unidask's schema: the unitaries table's root page."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size = {page_size}")
    con.execute("PRAGMA journal_mode = DELETE")
    con.executescript(db.SCHEMA)
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    return root


def pattern(ids: np.ndarray, row: int) -> np.ndarray:
    """Each row's bytes, from its id: any row read back in another's place shows (a window of
    0, 1, ... 250, 0, 1, ... from an offset of the id's; a copy a row)."""
    base = (np.arange(row + 251) % 251).astype(np.uint8)
    return np.lib.stride_tricks.sliding_window_view(base, row)[(np.asarray(ids) * 131) % 251]


def write_table(path: Path, page_size: int, rows: int, row: int, dim: int = 1) -> pages.Layout:
    """``rows`` rows of ``pattern`` data (ids 0 ... rows - 1) written by the page writer into a
    file SQLite made, a few MiB at a time."""
    chunk = max(1, (8 << 20) // row)
    root = sqlite_file(path, page_size)
    fd = os.open(path, os.O_RDWR)
    try:
        layout = pages.layout_for(page_size, os.path.getsize(path) // page_size + 1, row, dim, max(rows - 1, 0), rows)
        writer = pagewrite.TableWriter(fd, layout, root)
        for a in range(0, rows, chunk):
            ids = np.arange(a, min(a + chunk, rows))
            writer.add(ids, pattern(ids, row))
        return writer.finish()
    finally:
        os.close(fd)


def sqlite_agrees(path: Path, rows: int, row: int) -> None:
    """SQLite's integrity_check passes, and SQLite reads every row as written, in id order."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        cursor = con.execute("SELECT id, data FROM unitaries ORDER BY id")
        at = 0
        while batch := cursor.fetchmany(max(1, (8 << 20) // row)):
            ids = np.array([i for i, _ in batch])
            assert np.array_equal(ids, np.arange(at, at + len(batch)))
            assert b"".join(d for _, d in batch) == pattern(ids, row).tobytes()
            at += len(batch)
        assert at == rows
    finally:
        con.close()


def depth(path: Path, root: int, page_size: int) -> int:
    """Levels of the table's b-tree: the left-most path followed down."""
    with open(path, "rb") as f:
        levels, page = 1, root
        while True:
            f.seek((page - 1) * page_size)
            head = f.read(page_size)
            if head[0] == pages.LEAF:
                return levels
            pointer = struct.unpack(">H", head[12:14])[0]
            page, levels = struct.unpack(">I", head[pointer:pointer + 4])[0], levels + 1


@pytest.fixture
def big_dir(tmp_path) -> Iterator[Path]:
    """A directory whose files (a GiB or more) are removed when the test ends: pytest keeps every
    test's tmp_path to the session's end, and the big layer's would fill ~20 GB."""
    yield tmp_path
    for p in list(tmp_path.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.big
@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
def test_a_table_past_the_lock_byte_page_is_sound_at_every_page_size(big_dir, page_size):
    """The page holding byte 2^30 is never a page of the table: a file past 1 GiB at each page
    size, rows one a leaf (the largest that fit), so the leaves themselves cross it."""
    row = page_size - 35 - 16 - 8
    lock = pages.lock_page(page_size)
    rows = lock + 40
    path = big_dir / "t.db"
    layout = write_table(path, page_size, rows, row)
    assert layout.per_leaf == 1 and layout.end > lock and os.path.getsize(path) > pages.LOCK_BYTE
    sqlite_agrees(path, rows, row)
    with open(path, "rb") as f:   # the lock-byte page was never written: SQLite's own zeros (or a hole)
        f.seek((lock - 1) * page_size)
        assert f.read(page_size) == bytes(page_size)


@pytest.mark.big
def test_interior_pages_that_reach_the_lock_byte_page_skip_it(big_dir):
    """The leaves end just before the lock-byte page: the first interior page would be it."""
    page_size, row = 65536, 65536 - 60
    root = sqlite_file(big_dir / "probe.db", page_size)
    first = os.path.getsize(big_dir / "probe.db") // page_size + 1
    rows = pages.lock_page(page_size) - first
    layout = write_table(big_dir / "t.db", page_size, rows, row)
    assert layout.end == pages.lock_page(page_size) and root
    sqlite_agrees(big_dir / "t.db", rows, row)


@pytest.mark.parametrize("page_size", [512, 1024])
def test_three_interior_levels_are_sound(tmp_path, page_size):
    fanout = (page_size - 12) // 15   # the writer's interior fan-out
    rows = pages.layout_for(page_size, 3, 16, 1, 10**6).per_leaf * (fanout ** 2 + 1)
    path = tmp_path / "t.db"
    layout = write_table(path, page_size, rows, 16)
    root = sqlite3.connect(path).execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    assert depth(path, root, page_size) == 4 and layout.leaves > 1
    sqlite_agrees(path, rows, 16)
    pageread.prove(path, layout, root, lambda r: r)


@pytest.mark.parametrize("damage", ["leaf rowid", "leaf count", "interior key", "interior child", "page count"])
def test_the_merge_s_proof_finds_what_is_not_as_written(tmp_path, damage):
    """``prove`` (the merge's check before it publishes) passes the writer's table and finds each
    kind of difference, naming it."""
    path = tmp_path / "t.db"
    layout = write_table(path, 1024, 30_000, 16)
    root = sqlite3.connect(path).execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    pageread.prove(path, layout, root, lambda r: r)
    data = bytearray(path.read_bytes())
    leaf = (int(layout.leaf_page(7)) - 1) * 1024
    top = (root - 1) * 1024
    cell = top + struct.unpack(">H", data[top + 12:top + 14])[0]
    if damage == "leaf rowid":
        at = leaf + struct.unpack(">H", data[leaf + 8:leaf + 10])[0] + 1
        data[at + 1] ^= 0x01
    elif damage == "leaf count":
        data[leaf + 4] -= 1
    elif damage == "interior key":
        data[cell + 5] ^= 0x01
    elif damage == "interior child":
        data[cell + 3] ^= 0x01
    else:
        data[28:32] = struct.pack(">I", struct.unpack(">I", data[28:32])[0] - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(pages.Unreadable, match="leaf page|interior page|pages"):
        pageread.prove(path, layout, root, lambda r: r)


def test_the_lock_byte_page_is_skipped_by_the_layout():
    """Leaf k on page first_leaf + k, but one page further from the lock-byte page on, at every
    page size; a layout never begins on it."""
    for exp in range(9, 17):
        ps = 1 << exp
        lock = pages.lock_page(ps)
        lay = pages.layout_for(ps, lock - 3, 64, 2, 10, 10)
        got = lay.leaf_page(np.arange(6))
        assert got.tolist() == [lock - 3, lock - 2, lock - 1, lock + 1, lock + 2, lock + 3]
        assert pages.layout_for(ps, lock, 64, 2, 10, 10).first_leaf == lock + 1


@pytest.mark.big
def test_a_short_write_is_written_on(big_dir):
    """Linux writes at most 0x7ffff000 bytes a call: one ``pwrite_all`` of 2.2 GB is a real short
    write, written on from where it stopped (the source: zero pages, no memory)."""
    size = (1 << 31) + (64 << 20)
    data = np.zeros(size, np.uint8)
    data[-4096:] = 7   # the tail, past the first call's cap, must land too
    path = big_dir / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwrite(fd, data[:size], 0) < size   # the kernel's cap: what makes the loop necessary
        os.ftruncate(fd, 0)
        pagewrite.pwrite_all(fd, data, 4096)
        assert os.fstat(fd).st_size == size + 4096
        assert os.pread(fd, 4096, size) == b"\x07" * 4096
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_during_the_page_merge_is_one_line_and_leaves_nothing(config, tmp_path, monkeypatch, capsys):
    spec = config(run={"count": 4000, "task_size": 500})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    monkeypatch.setenv("UNIDASK_NODE", "n1")
    for t in range(spec.n_tasks):
        worker.generate_task(spec, t, "a")
    worker.stage_out(spec, "a", final=True)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small)], check=True)
    try:
        code, out, err = run_main("merge", spec.run_dir, "--out", str(small / "t.db"), capsys=capsys)
        assert code == 1 and "full" in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not any(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


# --- the merge, against SQLite's read of the shards -------------------------------------------


def stage_tasks(spec, node: str, tasks) -> None:
    old = os.environ.get("UNIDASK_NODE")
    os.environ["UNIDASK_NODE"] = node
    try:
        for t in tasks:
            worker.generate_task(spec, t, "a")
        worker.stage_out(spec, "a", final=True)
    finally:
        os.environ.pop("UNIDASK_NODE") if old is None else os.environ.__setitem__("UNIDASK_NODE", old)


def shard_rows(spec) -> dict[int, bytes]:
    """Every planned task's rows as SQLite reads them from the staged shards: id -> data."""
    out: dict[int, bytes] = {}
    for path in sorted(RunDir(spec.run_dir).shards.glob("*.db")):
        out.update(shard_data(path))
    return out


@quick(30)
@given(page_exp=st.integers(9, 16), dim=st.integers(1, 5), task_size=st.integers(1, 300),
       tasks=st.integers(1, 12), shards=st.integers(1, 4), append=st.booleans(), seed=st.integers(0, 2**16),
       packed=st.booleans())
def test_every_merge_is_sound_and_holds_the_shards_rows(tmp_path_factory, page_exp, dim, task_size, tasks, shards,
                                                        append, seed, packed):
    """Page sizes 512 to 65536 x dims x one and many shards (tasks in more than one) x
    ``merge --append`` x shards of packed tasks or of a row per matrix: integrity_check passes,
    every row is SQLite's read of the shards, and ``Dataset`` reads each one the same."""
    from unidask.store import shard

    pack_max = shard.PACK_MAX
    shard.PACK_MAX = pack_max if packed else 0
    try:
        _every_merge(tmp_path_factory, page_exp, dim, task_size, tasks, shards, append, seed)
    finally:
        shard.PACK_MAX = pack_max


def _every_merge(tmp_path_factory, page_exp, dim, task_size, tasks, shards, append, seed):
    page_size = 1 << page_exp
    assume(16 * dim * dim + 16 <= page_size - 35 or dim > 3)   # rows too large for a page: SQLite's merge, also tested
    base = tmp_path_factory.mktemp("m")
    count = task_size * tasks - (seed % task_size)
    spec = unidask.load_config(write_config(base / "r.toml", run={"count": count, "task_size": task_size, "seed": seed},
                                            generator={"dim": dim}, storage={"page_size": page_size}))
    RunDir(spec.run_dir).prepare(spec, resume=False)
    rng = random.Random(seed)
    owners = {t: rng.sample(range(shards), rng.randint(1, shards)) for t in range(spec.n_tasks)}
    first = sorted(range(spec.n_tasks), key=lambda t: rng.random())[:max(1, spec.n_tasks // 2)] if append else []
    for s in range(shards):
        stage_tasks(spec, f"n{s}", [t for t in first if s in owners[t]])
    if append:
        unidask.merge(spec.run_dir)
    for s in range(shards):
        stage_tasks(spec, f"m{s}", [t for t in range(spec.n_tasks) if s in owners[t] and t not in first])
    report = unidask.merge(spec.run_dir, append=append)
    assert report.complete and report.rows == count
    want = shard_rows(spec)
    got = merged_data(report.out)
    assert [i for i, _ in got] == list(range(count)) and all(want[i] == d for i, d in got)
    with unidask.Dataset(report.out) as ds:
        assert len(ds) == count
        rows = ds[np.arange(count)].reshape(count, -1).view(np.uint8)
        assert all(bytes(rows[i]) == want[i] for i in range(count))


# --- the merged-file reader: never a byte SQLite would not return ------------------------------


def sql_rows(path: Path) -> dict[int, bytes]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT id, data FROM unitaries"))
    finally:
        con.close()


def served_as_sql(path: Path, damaged: bool = False) -> None:
    """Every id ``Dataset`` serves (one at a time, as a batch, by position, whole) is SQLite's row.
    ``damaged``: a file SQLite reads only in part: each id read alone, as SQLite reads it, or an
    error where SQLite has no such row."""
    want = sql_rows(path) if not damaged else {}
    if damaged:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        served = 0
        with unidask.Dataset(path) as ds:
            for i in range(20000):
                try:
                    row = con.execute("SELECT data FROM unitaries WHERE id = ?", (i,)).fetchone()
                except sqlite3.DatabaseError:
                    row = None
                try:
                    got = ds[i].tobytes()
                except (IndexError, unidask.InputError):
                    got = None
                assert got is None or (row is not None and got == row[0]), i
                served += got is not None
        con.close()
        assert served >= 19_000   # the rest of the file is still read
        return
    ids = sorted(want)
    with unidask.Dataset(path) as ds:
        assert len(ds) == len(ids) and ds.shape[0] == len(ids)
        whole = np.asarray(ds)
        assert whole.shape[0] == len(ids)
        assert all(whole[k].tobytes() == want[i] for k, i in enumerate(ids))
        assert all(ds.at[k].tobytes() == want[ids[k]] for k in range(0, len(ids), 97))
        probe = np.array(ids[::7])
        assert all(r.tobytes() == want[int(i)] for i, r in zip(probe, ds[probe]))
        for i in range(0, max(ids) + 2, 331):
            if i in want:
                assert ds[i].tobytes() == want[i]
            else:
                with pytest.raises(IndexError):
                    ds[i]


@pytest.fixture
def merged(haar_run, tmp_path) -> Path:
    """A fresh copy of the shared run's page-merged database (20,000 U(4))."""
    spec, reference = haar_run
    path = tmp_path / "copy.db"
    shutil.copy(reference, path)
    with unidask.Dataset(path) as ds:
        assert ds.direct is not None   # the case under test: the pages are read directly
    return path


def test_a_vacuumed_copy_with_the_merge_s_counter_is_read_as_sql_reads_it(merged, tmp_path, capsys):
    copy = tmp_path / "vacuumed.db"
    con = sqlite3.connect(merged)
    con.execute(f"VACUUM INTO '{copy}'")
    con.close()
    want = pages.change_counter(merged)
    con = sqlite3.connect(copy, isolation_level=None)
    while pages.change_counter(copy) < want:   # ordinary writes bring the counter to the merge's
        con.execute("INSERT OR REPLACE INTO meta VALUES ('note', ?)", (str(pages.change_counter(copy)),))
    con.close()
    assert pages.change_counter(copy) == want
    served_as_sql(copy)
    code, out, err = run_main("verify", copy, capsys=capsys)
    assert code == 0 and out.startswith("OK")


@pytest.mark.parametrize("shift", [1, -3, 100_000])
def test_a_forged_layout_is_read_as_sql_reads_it(merged, shift, caplog):
    """One transaction moves ``layout.first_leaf`` and sets the counter it produces."""
    con = sqlite3.connect(merged, isolation_level=None)
    first = int(con.execute("SELECT value FROM meta WHERE key = 'layout.first_leaf'").fetchone()[0])
    con.execute("BEGIN")
    con.execute("UPDATE meta SET value = ? WHERE key = 'layout.first_leaf'", (str(first + shift),))
    con.execute("UPDATE meta SET value = ? WHERE key = 'layout.change_counter'", (str(pages.change_counter(merged) + 1),))
    con.execute("COMMIT")
    con.close()
    with caplog.at_level(logging.WARNING):
        served_as_sql(merged)
    assert "reading it through SQL" in caplog.text


@pytest.mark.parametrize("change", ["DELETE FROM unitaries WHERE id = 1234",
                                    "INSERT INTO unitaries SELECT 20000, dim, data, meta FROM unitaries WHERE id = 5",
                                    "UPDATE unitaries SET data = zeroblob(256) WHERE id = 777"])
def test_rows_changed_by_another_client_are_read_as_sql_reads_them(merged, change):
    con = sqlite3.connect(merged)
    con.execute(change)
    con.commit()
    con.close()
    served_as_sql(merged)


@pytest.mark.parametrize("direct", [True, False])
def test_a_dataset_open_while_another_client_writes_reads_the_new_rows(merged, direct):
    with unidask.Dataset(merged, mmap=direct) as ds:
        before = ds[10].copy()
        assert len(ds) == 20000 and (ds.direct is not None) == direct
        con = sqlite3.connect(merged)
        con.execute("UPDATE unitaries SET data = zeroblob(256) WHERE id = 10")
        con.execute("DELETE FROM unitaries WHERE id = 11")
        con.commit()
        con.close()
        assert not ds[10].any() and before.any()
        assert len(ds) == 19999 and ds.ids_by_position is not None and ds.at[11].tobytes() == ds[12].tobytes()
        with pytest.raises(IndexError):
            ds[11]


MAP_REFUSED = """
import resource, sqlite3, sys, numpy as np, unidask
path = sys.argv[1]
ds = unidask.Dataset(path)
ds.dim   # its connection opened before the limit
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (3 << 20), resource.RLIM_INFINITY))
try:
    np.memmap(path, np.uint8, "r")
    print("mapped")
except OSError:
    print("refused")
con = sqlite3.connect(path)
print(all(ds[i].tobytes() == con.execute("SELECT data FROM unitaries WHERE id = ?", (i,)).fetchone()[0]
          for i in (0, 123, 19999)), ds.direct is None)
"""


def test_a_refused_memory_map_reads_through_sql(merged):
    """The kernel refuses the map (the address space limited below the file's size): the rows
    come through SQL, with one warning, not an error on every read."""
    proc = subprocess.run([sys.executable, "-c", MAP_REFUSED, str(merged)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["refused", "True", "True"], proc.stdout + proc.stderr
    assert "cannot map" in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def leaf_of(path: Path, row: int) -> tuple[int, int]:
    """The file offset of the leaf holding ``row`` of the merged table, and its page size."""
    meta = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta"))
    layout = pages.Layout.from_meta(meta)
    return (int(layout.leaf_page(row // layout.per_leaf)) - 1) * layout.page_size, layout.page_size


def structural(r: random.Random, data: bytearray, path: Path) -> str:
    """One structure-aware change to a merged file: a field of the header, of a leaf (type, cell
    count, content start, a cell pointer, a cell's payload size, rowid or record header) or of an
    interior page (a child, a key, the right-most pointer, the cell count)."""
    con = sqlite3.connect(path)
    meta = dict(con.execute("SELECT key, value FROM meta"))
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    layout = pages.Layout.from_meta(meta)
    ps = layout.page_size
    leaf = (int(layout.leaf_page(r.randrange(layout.leaves))) - 1) * ps
    n = struct.unpack(">H", data[leaf + 3:leaf + 5])[0]
    cell = leaf + struct.unpack(">H", data[leaf + 8 + 2 * (k := r.randrange(n)):leaf + 10 + 2 * k])[0]
    interior = (root - 1) * ps if data[(root - 1) * ps] == pages.INTERIOR else None   # the table's top page
    fields = {
        "header page size": (16, 2), "header versions": (18, 2), "header reserved": (20, 1),
        "header counter": (24, 4), "header page count": (28, 4), "header freelist": (32, 8),
        "header auto_vacuum": (52, 4), "leaf type": (leaf, 1), "leaf freeblock": (leaf + 1, 2),
        "leaf cell count": (leaf + 3, 2), "leaf content start": (leaf + 5, 2),
        "cell pointer": (leaf + 8 + 2 * k, 2), "cell payload size": (cell, 2), "cell rowid": (cell + 2, 3),
        "cell record header": (cell + 5, 3),
    }
    if interior is not None:
        m = struct.unpack(">H", data[interior + 3:interior + 5])[0]
        icell = interior + struct.unpack(">H", data[interior + 12:interior + 14])[0] if m else interior + 12
        fields |= {"interior child": (icell, 4), "interior key": (icell + 4, 3), "interior right": (interior + 8, 4),
                   "interior cell count": (interior + 3, 2)}
    name = r.choice(sorted(fields))
    at, width = fields[name]
    old = int.from_bytes(data[at:at + width], "big")
    new = r.choice([old + 1, old - 1, 0, (1 << (8 * width)) - 1, r.randrange(1 << (8 * width)), old ^ 0x80])
    data[at:at + width] = (new % (1 << (8 * width))).to_bytes(width, "big")
    return f"{name} {old} -> {new}"


@quick(60)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_structurally_damaged_merged_file_is_never_read_otherwise_than_sql(haar_run, tmp_path_factory, seed):
    """Whatever field is changed, each id ``Dataset`` serves is the row SQLite returns for it, or
    an error where SQLite has none or fails."""
    spec, reference = haar_run
    path = tmp_path_factory.mktemp("s") / "bad.db"
    data = bytearray(reference.read_bytes())
    what = structural(random.Random(seed), data, reference)
    path.write_bytes(bytes(data))
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ds = unidask.Dataset(path)
    except unidask.InputError:
        return   # not readable as a database at all: SQLite says so too (one line)
    try:
        for i in list(range(0, 20000, 53)) + [19999]:
            try:
                row = con.execute("SELECT data FROM unitaries WHERE id = ?", (i,)).fetchone()
            except sqlite3.DatabaseError:
                row = "error"
            try:
                got = ds[i].tobytes()
            except (IndexError, unidask.InputError):
                got = None
            # SQLite's row, or an error (SQLite may fail on the same damage elsewhere: a bound
            # Dataset looks up); never other bytes, never a row where SQLite has none
            assert got is None or (row not in ("error", None) and got == row[0]), f"{what}: id {i}"
    finally:
        ds.close()
        con.close()


def test_a_damaged_cell_pointer_is_never_served(merged, caplog, capsys):
    """#38's case: two bytes of one cell pointer changed in a leaf."""
    at, ps = leaf_of(merged, 485)
    with open(merged, "r+b") as f:
        f.seek(at + 8 + 2 * 5)
        f.write(b"\x12\x34")
    with caplog.at_level(logging.WARNING):
        served_as_sql(merged, damaged=True)
    assert caplog.text.count("reading it through SQL") == 1
    code, out, err = run_main("verify", merged, capsys=capsys)
    assert code == 1 and out.startswith("FAILED")


def test_verify_checks_the_pages_dataset_serves(merged, capsys):
    """A matrix's bytes changed in its leaf: SQL's checksum finds it, and so does the same check
    of the rows read from the pages (what ``Dataset`` serves)."""
    at, ps = leaf_of(merged, 3000)
    data = bytearray(merged.read_bytes())
    cell = at + struct.unpack(">H", data[at + 8:at + 10])[0]
    data[cell + 40] ^= 0x01
    merged.write_bytes(bytes(data))
    code, out, err = run_main("verify", merged, capsys=capsys)
    assert code == 1 and "read from its pages differ" in out, out


# --- the shard reader: crafted shards ----------------------------------------------------------


def small_shard(path: Path, page_size: int = 1024, rows: int = 600, row: int = 256, dim: int = 4,
                auto_vacuum: bool = False) -> int:
    """A shard of unidask's schema with a few interior pages: SQLite's own rows."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"PRAGMA page_size = {page_size}")
    con.execute(f"PRAGMA auto_vacuum = {'FULL' if auto_vacuum else 'NONE'}")
    con.execute("PRAGMA journal_mode = DELETE")
    con.executescript(db.SCHEMA)
    con.executemany("INSERT INTO unitaries VALUES (?, ?, ?, NULL)",
                    [(i, dim, pattern(np.array([i]), row).tobytes()) for i in range(rows)])
    root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
    con.close()
    return root


def crafted(kind: str, path: Path) -> int:
    """A crafted shard of ``kind`` at ``path``: its unitaries root page."""
    ps = 1024
    root = small_shard(path, ps, auto_vacuum=kind == "auto_vacuum")
    if kind == "freelist":   # a free page left by SQLite, then a trunk that names a leaf
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("CREATE TABLE x(a)")
        con.execute("INSERT INTO x VALUES (zeroblob(5000))")
        con.execute("DROP TABLE x")
        con.close()
    data = bytearray(path.read_bytes())
    page = lambda p: (p - 1) * ps   # noqa: E731
    kids = lambda p: [struct.unpack(">I", data[page(p) + q:page(p) + q + 4])[0]   # noqa: E731
                      for q in [*(struct.unpack(">H", data[page(p) + 12 + 2 * i:page(p) + 14 + 2 * i])[0]
                                  for i in range(struct.unpack(">H", data[page(p) + 3:page(p) + 5])[0])), 8]]
    assert data[page(root)] == pages.INTERIOR or kind in ("page size 0", "page size odd")
    if kind == "cycle":   # an interior page below the root points back at it
        child = kids(root)[0]
        target = child if data[page(child)] == pages.INTERIOR else root
        data[page(target) + 8:page(target) + 12] = struct.pack(">I", root)
    elif kind == "self":   # the root points at itself from every cell
        for i in range(struct.unpack(">H", data[page(root) + 3:page(root) + 5])[0]):
            q = struct.unpack(">H", data[page(root) + 12 + 2 * i:page(root) + 14 + 2 * i])[0]
            data[page(root) + q:page(root) + q + 4] = struct.pack(">I", root)
        data[page(root) + 8:page(root) + 12] = struct.pack(">I", root)
    elif kind == "shared child":   # the right-most pointer at the first cell's child
        data[page(root) + 8:page(root) + 12] = struct.pack(">I", kids(root)[0])
    elif kind == "page size 0":
        data[16:18] = b"\x00\x00"
    elif kind == "page size odd":
        data[16:18] = struct.pack(">H", 1000)
    elif kind == "reserved bytes":
        data[20] = 8
    elif kind == "wal":
        data[18:20] = b"\x02\x02"
    elif kind == "truncated":
        data = data[:-ps]
    elif kind == "freelist":
        data[32:36] = struct.pack(">I", kids(root)[1])
    elif kind == "rowids out of order":   # the first child and the right-most one swapped
        first, right = kids(root)[0], kids(root)[-1]
        p0 = struct.unpack(">H", data[page(root) + 12:page(root) + 14])[0]
        data[page(root) + p0:page(root) + p0 + 4] = struct.pack(">I", right)
        data[page(root) + 8:page(root) + 12] = struct.pack(">I", first)
    elif kind == "lock-byte child":
        q = struct.unpack(">H", data[page(root) + 12:page(root) + 14])[0]
        data[page(root) + q:page(root) + q + 4] = struct.pack(">I", pages.lock_page(ps))
    path.write_bytes(bytes(data))
    return root


CRAFTED = ["cycle", "self", "shared child", "page size 0", "page size odd", "reserved bytes", "auto_vacuum", "wal",
           "truncated", "freelist", "rowids out of order", "lock-byte child"]


@pytest.mark.parametrize("kind", CRAFTED)
def test_a_crafted_shard_is_refused_by_the_shard_reader(tmp_path, kind):
    root = crafted(kind, tmp_path / "s.db")
    with pytest.raises(pages.Unreadable):
        reader = shardread.TableReader(tmp_path / "s.db", root, 256, 4)
        reader.rows(0, 600)


def test_the_crafted_shards_are_sound_before_they_are_crafted(tmp_path):
    """The shard the crafting starts from reads back as SQLite reads it (the test can fail)."""
    root = small_shard(tmp_path / "s.db")
    ids, rows = shardread.TableReader(tmp_path / "s.db", root, 256, 4).rows(0, 600)
    assert ids.tolist() == list(range(600)) and np.array_equal(rows, pattern(ids, 256))


@pytest.mark.parametrize("kind", ["cycle", "self", "shared child", "freelist", "rowids out of order", "truncated"])
def test_a_crafted_staged_shard_ends_the_merge_in_one_line(config, tmp_path, kind, monkeypatch, per_row_shards):
    """The crafted tree in a staged shard of a run: ``unidask merge`` refuses it in one line,
    exit 2, within a bound that only a hang reaches, and publishes nothing."""
    spec = config(run={"count": 600, "task_size": 100}, storage={"page_size": 1024})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    monkeypatch.setenv("UNIDASK_NODE", "n1")
    for t in range(spec.n_tasks):
        worker.generate_task(spec, t, "a")
    worker.stage_out(spec, "a", final=True)
    (shard,) = RunDir(spec.run_dir).shards.glob("*.db")
    shard.write_bytes(craft_real(kind, shard.read_bytes()))
    proc = cli("merge", spec.run_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and str(shard) in proc.stderr
    assert not (spec.run_dir / "t.db").exists()


def craft_real(kind: str, data: bytes) -> bytes:
    """``kind`` done to a real shard's bytes (its unitaries table found through SQLite)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s.db"
        p.write_bytes(data)
        con = sqlite3.connect(p)
        root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
        ps = con.execute("PRAGMA page_size").fetchone()[0]
        con.close()
        out = bytearray(data)
        page = lambda q: (q - 1) * ps   # noqa: E731
        assert out[page(root)] == pages.INTERIOR
        n = struct.unpack(">H", out[page(root) + 3:page(root) + 5])[0]
        cells = [struct.unpack(">H", out[page(root) + 12 + 2 * i:page(root) + 14 + 2 * i])[0] for i in range(n)]
        kids = [struct.unpack(">I", out[page(root) + c:page(root) + c + 4])[0] for c in [*cells, 8]]
        if kind == "cycle":
            out[page(kids[0]) + 8:page(kids[0]) + 12] = struct.pack(">I", root) if out[page(kids[0])] == 5 else \
                out[page(kids[0]) + 8:page(kids[0]) + 12]
            if out[page(kids[0])] != 5:   # a leaf below: the root's right-most pointer back at the root
                out[page(root) + 8:page(root) + 12] = struct.pack(">I", root)
        elif kind == "self":
            for c in cells:
                out[page(root) + c:page(root) + c + 4] = struct.pack(">I", root)
            out[page(root) + 8:page(root) + 12] = struct.pack(">I", root)
        elif kind == "shared child":
            out[page(root) + 8:page(root) + 12] = struct.pack(">I", kids[0])
        elif kind == "freelist":
            out[32:36] = struct.pack(">I", kids[-1])
            out[36:40] = struct.pack(">I", 1)
        elif kind == "rowids out of order":
            out[page(root) + cells[0]:page(root) + cells[0] + 4] = struct.pack(">I", kids[-1])
            out[page(root) + 8:page(root) + 12] = struct.pack(">I", kids[0])
        elif kind == "truncated":
            out = out[:-ps]
        return bytes(out)


# --- a real run past 4 GiB ------------------------------------------------------------------


@pytest.mark.big
@pytest.mark.cluster
def test_a_real_run_past_4_gib_merges_sound_and_equal_to_its_shards(big_dir):
    """A real run (Haar U(63), 64 KiB pages: a row a leaf) whose database passes 1, 2 and 4 GiB:
    integrity_check ok, every row SQLite's read of the shards, ``Dataset`` and ``verify`` agree."""
    dim, row = 63, 63 * 63 * 16
    count = (4 << 30) // row + 2000
    cfg = write_config(big_dir / "big.toml", run={"count": count, "task_size": 4000},
                       generator={"dim": dim}, storage={"page_size": 65536})
    proc = cli("run", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = big_dir / "run" / "t.db"
    assert os.path.getsize(out) > 4 << 30
    con = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    shards = sorted((big_dir / "run" / "shards").glob("*.db"))
    seen = 0
    with unidask.Dataset(out) as ds:
        assert ds.direct is not None and len(ds) == count
        for s in shards:
            sc = db.connect_readonly(s)
            for task, in sc.execute("SELECT task FROM tasks ORDER BY task"):
                lo, hi = task * 4000, min((task + 1) * 4000, count)
                want = b"".join(d for (d,) in sc.execute(
                    "SELECT data FROM blocks WHERE id >= ? AND id < ? ORDER BY id", (lo, hi)))
                got = b"".join(d for (d,) in con.execute(
                    "SELECT data FROM unitaries WHERE id >= ? AND id < ? ORDER BY id", (lo, hi)))
                assert got == want and ds[lo:hi].tobytes() == want, task
                seen += hi - lo
            sc.close()
    con.close()
    assert seen >= count
