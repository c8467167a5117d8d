"""Merge real staged shards: duplicates, conflicts, bad files, append, atomic output."""

import shutil
import os
import sqlite3
import sys

import numpy as np
import pytest

import unidask
from unidask import RunDir
from unidask.spec import generators
from unidask.store import db, pagemerge, pages, shard
from unidask.execute import worker

from conftest import merged_data, messages, run_main, shard_data


def stage(spec, node, tasks, monkeypatch, attempt="a"):
    """Write ``tasks`` into node ``node``'s shard and stage it, as the workers of a run would."""
    monkeypatch.setenv("UNIDASK_NODE", node)
    for t in tasks:
        worker.generate_task(spec, t, attempt)
    out = worker.stage_out(spec, attempt, final=True)
    return RunDir(spec.run_dir).shards / out["path"].rsplit("/", 1)[1]


@pytest.fixture
def staged_run(config, monkeypatch):
    """A run dir with two staged shards covering all 20 tasks, task 5 in both."""
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    a = stage(spec, "n1", range(0, 10), monkeypatch)
    b = stage(spec, "n2", range(5, 20), monkeypatch)
    return spec, a, b


def test_duplicate_tasks_are_kept_once(staged_run):
    spec, a, b = staged_run
    report = unidask.merge(spec.run_dir)
    assert report.complete and report.rows == 2000 and report.tasks == 20
    assert report.duplicates == 5
    data = merged_data(report.out)
    assert [i for i, _ in data] == list(range(2000))
    with unidask.Dataset(report.out) as ds:
        assert len(ds) == 2000


def test_differing_copies_fail_and_leave_no_output(staged_run, capsys):
    spec, a, b = staged_run
    con = sqlite3.connect(b)
    con.execute("UPDATE unitaries SET data = zeroblob(256) WHERE id = 777")
    con.execute("UPDATE tasks SET checksum = 'tampered' WHERE task = 7")
    con.commit()
    con.close()
    code, out, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2
    assert str(b) in err and "differ" in err and err.count("\n") == 1
    assert not any(spec.run_dir.glob("*.db")) and not any(spec.run_dir.glob(".*tmp*"))


def test_missing_tasks_are_reported(config, monkeypatch, capsys):
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    stage(spec, "n1", [0, 1, 2, 7], monkeypatch)
    code, out, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 1
    assert "16 task(s) missing: 3-6, 8-19" in out
    with unidask.Dataset(spec.run_dir / "t.db") as ds:
        assert len(ds) == 400
        with pytest.raises(IndexError, match="not all present"):
            ds[0:800]


def test_a_shard_of_schema_2_merges_beside_packed_ones(config, monkeypatch, capsys):
    """A shard staged by the unidask before packed tasks (schema 2: no blocks table, a row per
    matrix) merges with this one's, page by page and by SQLite, to the rows of a run of one kind."""
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    with monkeypatch.context() as m:
        m.setattr(shard, "PACK_MAX", 0)
        old = stage(spec, "old", range(0, 10), monkeypatch)
    _sql(old, "DROP TABLE blocks", "UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    stage(spec, "new", range(5, 20), monkeypatch)
    whole = [(t * 100 + i, u.tobytes()) for t in range(20) for i, u in enumerate(generators.generate(spec, t)[0])]
    report = unidask.merge(spec.run_dir)
    assert report.complete and report.duplicates == 5 and merged_data(report.out) == whole
    report.out.unlink()
    monkeypatch.setattr(pages, "fits", lambda *a: False)   # SQLite's merge, as for rows over a page
    assert run_main("merge", spec.run_dir, capsys=capsys)[0] == 0
    assert merged_data(report.out) == whole


TILING = {   # task 3's four blocks of 25 rows (ids 300, 325, 350, 375), changed as a forger would
    "the last block gone": ("DELETE FROM blocks WHERE id = 375", "task 3 has 75 packed rows, it records 100"),
    "a block gone": ("DELETE FROM blocks WHERE id = 325", r"task 3 has packed rows off its ids \(at id 350, not 325\)"),
    "a block moved": ("UPDATE blocks SET id = 326 WHERE id = 325", r"task 3 has packed rows off its ids \(at id 326, not 325\)"),
    "two blocks overlap": ("UPDATE blocks SET data = CAST(data || substr(data, 1, 256) AS BLOB) WHERE id = 325",
                           r"task 3 has packed rows off its ids \(at id 350, not 351\)"),
    "a block of part of a matrix": ("UPDATE blocks SET data = substr(data, 1, 1000) WHERE id = 375",
                                    "task 3 has packed rows of blob 1000 bytes at id 375"),
    "a block beyond the task": ("INSERT INTO blocks SELECT 2050, dim, data FROM blocks WHERE id = 300",
                                r"1 block\(s\) of packed rows belong to no task"),
}


@pytest.mark.parametrize("kind", TILING)
def test_blocks_that_do_not_tile_their_task_are_refused(kind, config, monkeypatch, capsys):
    """A task's blocks must tile its ids exactly, each whole matrices: a block gone, moved,
    overlapping, cut, or beside the tasks is refused by name (the checksum rewritten to match, as
    a careful forger would), by the page merge and by SQLite's."""
    import re

    monkeypatch.setattr(shard, "BLOCK_BYTES", 25 * 256)
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    bad = stage(spec, "n1", range(0, 20), monkeypatch)
    _sql(bad, TILING[kind][0])
    con = sqlite3.connect(bad)   # the checksum of the blocks as they now are, the plan's count kept
    data = b"".join(d for (d,) in con.execute("SELECT data FROM blocks WHERE id >= 300 AND id < 400 ORDER BY id"))
    con.execute("UPDATE tasks SET checksum = ? WHERE task = 3", (db.checksum(data, 100),))
    con.commit()
    con.close()
    for how in ("pages", "sql"):
        with monkeypatch.context() as m:
            if how == "sql":
                m.setattr(pages, "fits", lambda *a: False)
            code, _, err = run_main("merge", spec.run_dir, capsys=capsys)
        assert code == 2 and str(bad) in err and re.search(TILING[kind][1], err), (how, err)
        assert err.count("\n") == 1 and not (spec.run_dir / "t.db").exists()


def test_append_adds_new_shards(config, monkeypatch, tmp_path):
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    stage(spec, "n1", range(0, 10), monkeypatch)
    out = tmp_path / "merged.db"
    first = unidask.merge(spec.run_dir, out)
    assert first.tasks == 10 and not first.complete
    stage(spec, "n2", range(10, 20), monkeypatch)
    second = unidask.merge(spec.run_dir, out, append=True)
    assert second.complete and second.rows == 2000 and second.duplicates == 10


def test_append_to_what_is_not_a_merged_database_of_this_run(haar_run, tmp_path, capsys):
    spec, merged = haar_run
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x(a)")
    foreign = tmp_path / "foreign.db"
    shutil.copy(merged, foreign)
    _sql(foreign, "UPDATE meta SET value = 'x' WHERE key = 'fingerprint'")
    for out, reason in ((other, "not a unidask database (table 'meta' missing)"),
                        (foreign, "belongs to another run")):
        before = out.read_bytes()
        code, _, err = run_main("merge", spec.run_dir, "--append", "-o", out, capsys=capsys)
        assert code == 2 and err.startswith(f"unidask: error: cannot append to {out}: {reason}"), err
        assert err.count("\n") == 1 and out.read_bytes() == before


BAD_SHARDS = {
    "truncated": lambda good, p: p.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 3]),
    "random bytes": lambda good, p: p.write_bytes(bytes(range(256)) * 64),
    "not a unidask shard": lambda good, p: sqlite3.connect(p).execute("CREATE TABLE x(a)"),
    "trigger": lambda good, p: (shutil.copy(good, p), _sql(p, "CREATE TRIGGER t AFTER INSERT ON meta "
                                                          "BEGIN DELETE FROM meta; END")),
    "view": lambda good, p: (shutil.copy(good, p), _sql(p, "CREATE VIEW v AS SELECT * FROM tasks")),
    "virtual table": lambda good, p: (shutil.copy(good, p), _sql(p, "CREATE VIRTUAL TABLE other USING rtree(id, a, b)")),
    "newer schema": lambda good, p: (shutil.copy(good, p),
                                     _sql(p, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")),
    "older schema": lambda good, p: (shutil.copy(good, p),   # schema 1 had task and idx columns
                                     _sql(p, "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
                                          "ALTER TABLE unitaries ADD COLUMN task INTEGER")),
    "another run": lambda good, p: (shutil.copy(good, p),
                                    _sql(p, "UPDATE meta SET value = 'x' WHERE key = 'fingerprint'")),
    # a tasks row whose unitaries are not in the shard
    "rows missing": lambda good, p: (shutil.copy(good, p), _sql(p, "UPDATE tasks SET task = 15 WHERE task = 3")),
    # edits that keep a task self-consistent (count and checksum rewritten to match its rows)
    "half a task": lambda good, p: (shutil.copy(good, p), _sql(p, "DELETE FROM unitaries WHERE id >= 350 AND id < 400"),
                                    _match(p, 3)),
    "a task emptied": lambda good, p: (shutil.copy(good, p), _sql(p, "DELETE FROM unitaries WHERE id >= 300 AND id < 400"),
                                       _match(p, 3)),
    "a task outside the plan": lambda good, p: (shutil.copy(good, p), _sql(
        p, "INSERT INTO unitaries(id, dim, data) SELECT id - 300 + 777700, dim, data FROM unitaries WHERE id >= 300 AND id < 400",
        "INSERT INTO tasks SELECT 7777, seed, count, node, worker, started, finished, checksum FROM tasks WHERE task = 3")),
    "a flipped byte": lambda good, p: (shutil.copy(good, p), _sql(
        p, "UPDATE unitaries SET data = CAST(substr(data, 1, 9) || x'ff' || substr(data, 11) AS BLOB) WHERE id = 345")),
    "a blob of the wrong length": lambda good, p: (shutil.copy(good, p), _sql(
        p, "UPDATE unitaries SET data = substr(data, 2) WHERE id = 345"), _match(p, 3)),
    "a dim that disagrees": lambda good, p: (shutil.copy(good, p), _sql(p, "UPDATE unitaries SET dim = 5 WHERE id = 345"),
                                             _match(p, 3)),
}
# the same damage to a shard whose tasks are packed (table blocks, a task of 100 U(4) in one; the layout of a
# run's shards, where the rows above are a row per matrix's: rows with meta, very large tasks)
PACKED_DAMAGE = {
    "half a task": lambda good, p: (shutil.copy(good, p), _sql(
        p, "UPDATE blocks SET data = substr(data, 1, 50 * 256) WHERE id = 300"), _match(p, 3)),
    "a task emptied": lambda good, p: (shutil.copy(good, p), _sql(p, "DELETE FROM blocks WHERE id = 300"), _match(p, 3)),
    "a task outside the plan": lambda good, p: (shutil.copy(good, p), _sql(
        p, "INSERT INTO blocks SELECT 777700, dim, data FROM blocks WHERE id = 300",
        "INSERT INTO tasks SELECT 7777, seed, count, node, worker, started, finished, checksum FROM tasks WHERE task = 3")),
    "a flipped byte": lambda good, p: (shutil.copy(good, p), _sql(
        p, "UPDATE blocks SET data = CAST(substr(data, 1, 4509) || x'ff' || substr(data, 4511) AS BLOB) WHERE id = 300")),
    "a blob of the wrong length": lambda good, p: (shutil.copy(good, p), _sql(
        p, "UPDATE blocks SET data = substr(data, 2) WHERE id = 300")),
    "a dim that disagrees": lambda good, p: (shutil.copy(good, p), _sql(p, "UPDATE blocks SET dim = 5 WHERE id = 300"),
                                             _match(p, 3)),
    "a block of no task": lambda good, p: (shutil.copy(good, p), _sql(
        p, "INSERT INTO blocks SELECT 1250, dim, data FROM blocks WHERE id = 300")),
    "blocks in an older schema": lambda good, p: (shutil.copy(good, p),
                                                  _sql(p, "UPDATE meta SET value = '2' WHERE key = 'schema_version'")),
}
REASONS = {"truncated": "damaged|not a readable|cannot open", "random bytes": "not a readable",
           "not a unidask shard": "not a unidask shard", "trigger": "trigger t", "view": "view v",
           "virtual table": "virtual table other",
           "newer schema": "newer", "older schema": "older than this unidask reads","another run": "another run",
           "rows missing": "task 15 has 0 rows|task 15 has 0 of its 100 unitaries",
           "half a task": "task 3 records 50 unitaries, the plan has 100",
           "a task emptied": "task 3 records 0 unitaries, the plan has 100",
           "a task outside the plan": r"task 7777 is not in the run's plan \(tasks 0-19\)",
           "a flipped byte": "task 3: checksum mismatch",
           "a blob of the wrong length": "task 3 has rows of 255, 256 bytes|task 3 has packed rows of blob 25599 bytes",
           "a dim that disagrees": "task 3 has rows of dim 4, 5|task 3 has rows of dim 5, the run's is 4",
           "a block of no task": r"1 block\(s\) of packed rows belong to no task",
           "blocks in an older schema": "table 'blocks' has columns id, dim, data in a file of schema_version 2"}


def _match(path, task):
    """Rewrite task ``task``'s count and checksum to agree with its rows, as a careful forger would."""
    con = sqlite3.connect(path)
    n = con.execute("SELECT count(*) FROM unitaries WHERE id >= ? AND id < ?", (task * 100, task * 100 + 100)).fetchone()[0]
    digest = db.task_checksum(con, "main", task * 100, 100)
    if (block := con.execute("SELECT data FROM blocks WHERE id = ?", (task * 100,)).fetchone()) is not None:
        n, digest = len(block[0]) // 256, db.checksum(block[0], len(block[0]) // 256)
    con.execute("UPDATE tasks SET count = ?, checksum = ? WHERE task = ?", (n, digest, task))
    con.commit()
    con.close()


def _sql(path, *statements):
    con = sqlite3.connect(path)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


@pytest.mark.parametrize("kind, layout", [(k, "rows") for k in BAD_SHARDS] +
                         [(k, "packed") for k in {**BAD_SHARDS, **PACKED_DAMAGE}])
def test_bad_shards_are_refused_then_skipped(kind, layout, config, monkeypatch, capsys):
    import re

    if layout == "rows":
        monkeypatch.setattr(shard, "PACK_MAX", 0)
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    good = stage(spec, "n1", range(0, 10), monkeypatch)
    bad = RunDir(spec.run_dir).shards / "zz-bad.db"
    {**BAD_SHARDS, **PACKED_DAMAGE}[kind](good, bad) if layout == "packed" else BAD_SHARDS[kind](good, bad)
    code, out, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and str(bad) in err and re.search(REASONS[kind], err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (spec.run_dir / "t.db").exists()
    code, out, err = run_main("merge", spec.run_dir, "--skip-bad", capsys=capsys)
    assert code == 1 and f"rejected {bad}" in out and "missing: 10-19" in out
    assert len(merged_data(spec.run_dir / "t.db")) == 1000


def test_merge_of_nothing(tmp_path, config, capsys):
    code, _, err = run_main("merge", tmp_path / "nowhere", capsys=capsys)
    assert code == 2 and "not a unidask run directory" in err
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    code, _, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and "no staged shards to merge" in err


def test_damage_only_quick_check_sees_is_refused(config, monkeypatch, capsys):
    """The merge copies rows while another thread runs quick_check on the shards: a shard damaged
    where the copy never reads (its freelist) must still be refused before its rows commit."""
    spec = config()
    RunDir(spec.run_dir).prepare(spec, resume=False)
    stage(spec, "n1", range(0, 10), monkeypatch)
    bad = stage(spec, "n2", range(10, 20), monkeypatch)
    # tasks 15-19 deleted whole (a valid shard of tasks 10-14, with free pages), then its first
    # freelist trunk page made to point past the end of the file
    _sql(bad, "DELETE FROM blocks WHERE id >= 1500", "DELETE FROM tasks WHERE task >= 15")
    with open(bad, "r+b") as f:
        header = f.read(100)
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size   # how the header writes 64 KiB
        trunk = int.from_bytes(header[32:36], "big")
        assert trunk > 0          # the deletes left a freelist
        f.seek((trunk - 1) * page_size)
        f.write((0xFFFFFF00).to_bytes(4, "big"))
    code, out, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and str(bad) in err and "damaged" in err, err
    assert not (spec.run_dir / "t.db").exists()
    code, out, err = run_main("merge", spec.run_dir, "--skip-bad", capsys=capsys)
    assert code == 1 and f"rejected {bad}" in out and "missing: 10-19" in out
    assert [i for i, _ in merged_data(spec.run_dir / "t.db")] == list(range(1000))


def test_merge_into_a_missing_directory(haar_run, tmp_path, capsys):
    spec, _ = haar_run
    out = tmp_path / "missing" / "m.db"
    code, _, err = run_main("merge", spec.run_dir, "-o", out, capsys=capsys)
    assert code == 2 and err == f"unidask: error: cannot write {out}: no directory {out.parent}\n", err
    assert list(tmp_path.iterdir()) == []


def test_a_copy_with_its_genuine_checksum_over_wrong_rows_is_refused(staged_run, capsys):
    """Task 7 in both shards: in b its rows zeroed, its tasks row (the genuine checksum) kept. The
    merge must not keep b's copy: it refuses b by name, and --skip-bad keeps a's."""
    spec, a, b = staged_run
    _sql(b, "UPDATE blocks SET data = zeroblob(100 * 256) WHERE id = 700")
    code, _, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and str(b) in err and "task 7: checksum mismatch" in err, err
    assert not (spec.run_dir / "t.db").exists()
    code, out, _ = run_main("merge", spec.run_dir, "--skip-bad", capsys=capsys)
    assert code == 1 and f"rejected {b}" in out and "missing: 10-19" in out
    with unidask.Dataset(spec.run_dir / "t.db") as ds:
        assert np.abs(ds[700:800]).max() > 0


def test_temporaries_are_owner_only_while_built(tmp_path):
    """A stage-out's or a merge's file is built under a temp name, which SQLite would create 0644:
    another user could read a shard while it is built. It is created 0600 first; the merged
    database is then published with the mode the umask gives (meant to be shared)."""
    import stat

    from unidask.core import files

    with files.publishing(tmp_path / "staged.db") as tmp:
        con = sqlite3.connect(tmp)
        con.execute("CREATE TABLE t(a)")
        con.commit()
        con.close()
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "staged.db").stat().st_mode) == 0o600
    old = os.umask(0o027)
    try:
        assert files.shared_mode() == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("generator, paged", [
    ({"kind": "haar", "dim": 4}, True),
    ({"kind": "haar", "dim": 3, "dtype": "complex64"}, True),
    ({"kind": "orthogonal", "dim": 7}, True),
    ({"kind": "haar", "dim": 64}, False),   # a row over a 64 KiB page's local payload: SQLite's overflow pages
    ({"kind": "circuit", "qubits": 2, "depth": 3}, False),   # rows with meta
])
def test_the_merge_writes_pages_sqlite_reads_as_its_own(config, monkeypatch, generator, paged):
    """The merge lays the unitaries table's pages itself where it can: the database passes
    SQLite's integrity_check, and holds exactly the rows, tasks and meta of the staged shards as
    SQLite reads them; with its layout in meta. Rows it cannot lay (meta, overflow) are merged by
    SQLite, to the same rows."""
    generator = dict(generator)
    dtype = generator.pop("dtype", "complex128")
    spec = config(run={"count": 2500 if generator.get("dim") != 64 else 60, "task_size": 100 if generator.get("dim") != 64 else 6},
                  generator={**generator, "dtype": dtype})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    n = spec.n_tasks
    shards = [stage(spec, "n1", range(0, n, 2), monkeypatch),            # interleaved tasks, one duplicated
              stage(spec, "n2", [*range(1, n, 2), 4], monkeypatch)]
    report = unidask.merge(spec.run_dir)
    assert report.complete and report.duplicates == 1 and report.rows == spec.count
    con = sqlite3.connect(report.out)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    expected_rows, expected_tasks = {}, {}
    for p in shards:
        with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as s:
            for r in shard_data(s, full=True):
                expected_rows.setdefault(r[0], r)
            for r in s.execute("SELECT * FROM tasks"):   # a duplicate's row: the first shard's, as merged
                expected_tasks.setdefault(r[0], r)
    assert con.execute("SELECT * FROM unitaries ORDER BY id").fetchall() == [expected_rows[i] for i in sorted(expected_rows)]
    assert con.execute("SELECT * FROM tasks ORDER BY task").fetchall() == [expected_tasks[t] for t in sorted(expected_tasks)]
    meta = db.read_meta(con)
    con.close()
    assert ("layout.per_leaf" in meta) == paged
    if paged:
        assert int(meta["layout.rows"]) == spec.count and meta["layout.page_size"] == str(db.page_size(report.out))
    assert unidask.verify(report.out).ok


def test_a_unit_of_more_shards_than_are_kept_open(config, monkeypatch):
    """A unit whose tasks lie in more shards than the merge keeps open (a run of many segments):
    every shard it reads stays open until its rows are gathered; the same rows as SQLite reads."""
    spec = config(run={"count": 1200, "task_size": 100}, generator={"kind": "haar", "dim": 4})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    shards = [stage(spec, f"n{k}", range(k, spec.n_tasks, 6), monkeypatch) for k in range(6)]
    monkeypatch.setattr(pagemerge.Readers, "KEEP", 2)
    report = unidask.merge(spec.run_dir)
    assert report.complete and report.rows == spec.count
    con = sqlite3.connect(report.out)
    assert "layout.per_leaf" in db.read_meta(con)   # written page by page
    rows = {}
    for p in shards:
        with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as s:
            rows.update((r[0], r) for r in shard_data(s, full=True))
    assert con.execute("SELECT * FROM unitaries ORDER BY id").fetchall() == [rows[i] for i in sorted(rows)]
    con.close()


def test_the_page_merge_in_units_on_dask_workers_writes_the_same_table(config, monkeypatch, tmp_path):
    """The page merge split into units of a few rows (leaves shared between units, their rows
    sent back to the merging process), inline and as Dask tasks on real worker processes: the
    same rows, tasks and layout as one unit, integrity_check ok. A damaged shard found by a
    worker is refused by name, as without workers."""
    import psutil
    from distributed import Client, LocalCluster

    merge_module = sys.modules["unidask.store.merge"]   # unidask.merge is the function

    spec = config(run={"count": 2500, "task_size": 97}, generator={"kind": "haar", "dim": 3, "dtype": "complex64"})
    RunDir(spec.run_dir).prepare(spec, resume=False)
    n = spec.n_tasks
    stage(spec, "n1", range(0, n, 2), monkeypatch)
    bad = stage(spec, "n2", range(1, n, 2), monkeypatch)

    def merged(name, client=None):
        report = unidask.merge(spec.run_dir, tmp_path / f"{name}.db", client=client)
        assert report.complete and report.rows == spec.count
        with sqlite3.connect(report.out) as con:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            meta = {k: v for k, v in db.read_meta(con).items() if k.startswith("layout.") and k != "layout.change_counter"}
            return (con.execute("SELECT * FROM unitaries ORDER BY id").fetchall(),
                    con.execute("SELECT * FROM tasks ORDER BY task").fetchall(), meta)

    whole = merged("whole")
    assert whole[2] and int(whole[2]["layout.per_leaf"]) > 97   # a leaf holds more than a task: shared leaves
    monkeypatch.setattr(pagemerge, "UNIT_BYTES", 200 * 72)       # units of 3 tasks or so
    assert merged("units") == whole
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(setattr, pagemerge, "UNIT_BYTES", 200 * 72)
        assert merged("workers", client) == whole
        # a worker stopped for good (SIGSTOP): its units are written by the merging process
        stopped = psutil.Process(next(iter(client.run(os.getpid).values())))
        monkeypatch.setattr(merge_module, "STALL_MIN", 0.5)
        stopped.suspend()
        try:
            with messages() as lines:
                assert merged("stopped", client) == whole
            assert any("not back from a worker" in line for line in lines), lines
        finally:
            stopped.resume()
        with open(bad, "r+b") as f:   # one row's bytes in the last page changed: its task's checksum fails
            f.seek(-200, os.SEEK_END)
            f.write(b"\xff" * 8)
        with pytest.raises(db.BadFile, match=f"{bad.name}.*checksum"):
            unidask.merge(spec.run_dir, tmp_path / "bad.db", client=client)
