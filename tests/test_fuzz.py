"""Fuzz the merge with damaged staged shards: whatever is done to them, the merge either refuses
naming the file, or writes a database whose every task is byte for byte the fault-free one.

A seeded generator of damage (bytes, truncation, rows, tasks, ids, counts, checksums rewritten to
match, metadata, duplicates, dims, lengths, types, extra tables, columns, views). The normal suite
runs ``FUZZ_CASES`` cases with a fixed seed; ``UNIDASK_FUZZ_CASES=5000 UNIDASK_FUZZ_SEED=...``
runs more (a failing case prints its seed and its damage, to replay it alone)."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest

import unidask
from unidask import RunDir
from unidask.store import db
from unidask.execute import worker

from conftest import write_config

FUZZ_CASES = int(os.environ.get("UNIDASK_FUZZ_CASES", 300))
FUZZ_SEED = int(os.environ.get("UNIDASK_FUZZ_SEED", 20261130))
TASK_SIZE, TASKS = 20, 9


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run dir with three staged shards (task 4 in two of them), and its fault-free merge."""
    base = tmp_path_factory.mktemp("fuzz")
    spec = unidask.load_config(write_config(base / "f.toml", run={"count": TASK_SIZE * TASKS - 7,
                                                                  "task_size": TASK_SIZE}))
    RunDir(spec.run_dir).prepare(spec, resume=False)
    old = os.environ.get("UNIDASK_NODE")
    for node, tasks in (("n1", range(0, 5)), ("n2", range(4, 7)), ("n3", range(7, TASKS))):
        os.environ["UNIDASK_NODE"] = node
        for t in tasks:
            worker.generate_task(spec, t, "a")
        worker.stage_out(spec, "a", final=True)
    os.environ.pop("UNIDASK_NODE") if old is None else os.environ.__setitem__("UNIDASK_NODE", old)
    report = unidask.merge(spec.run_dir, base / "reference.db")
    assert report.complete
    return spec, tasks_of(report.out)


def tasks_of(path: Path) -> dict[int, tuple]:
    """task -> (its tasks row's count and checksum, its rows (id, dim, data, meta))."""
    con = db.connect_readonly(path)
    try:
        out = {}
        for task, count, checksum in con.execute("SELECT task, count, checksum FROM tasks"):
            rows = con.execute("SELECT id, dim, data, meta FROM unitaries WHERE id >= ? AND id < ? ORDER BY id",
                               (task * TASK_SIZE, (task + 1) * TASK_SIZE)).fetchall()
            out[task] = (count, checksum, rows)
        return out
    finally:
        con.close()


# -- the damage ------------------------------------------------------------------------------------

def rewrite_checksum(con: sqlite3.Connection, task: int) -> None:
    """What an adversary does after editing rows: make the tasks row agree with them."""
    base = task * TASK_SIZE
    rows = con.execute("SELECT count(*) FROM unitaries WHERE id >= ? AND id < ?", (base, base + TASK_SIZE)).fetchone()[0]
    con.execute("UPDATE tasks SET checksum = ?, count = ? WHERE task = ?",
                (db.task_checksum(con, "main", base, TASK_SIZE), rows, task))


STRUCTURAL = {0, 2, 3, 7, 10, 11, 15, 17, 21}


def sql_damage(r: random.Random, path: Path) -> str:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        tasks = [t for (t,) in con.execute("SELECT task FROM tasks")] or [0]
        t = r.choice(tasks)
        ids = (t * TASK_SIZE, t * TASK_SIZE + TASK_SIZE)
        i = r.randrange(*ids)
        match = r.randrange(22)
        # and rewrite the task's checksum and count to match, where the edit breaks its shape; an
        # edit of a task's bytes with a matching checksum is a forgery, not damage: the checksum
        # cannot see it (README, Reliability), only `verify --against --full` can
        fix = match in STRUCTURAL and r.random() < 0.5
        if match == 0:
            con.execute("DELETE FROM unitaries WHERE id >= ? AND id < ?", (i, ids[1]))
        elif match == 1:
            con.execute("UPDATE unitaries SET data = randomblob(length(data)) WHERE id = ?", (i,))
        elif match == 2:
            con.execute("UPDATE unitaries SET data = randomblob(length(data) + ?) WHERE id = ?", (r.choice([-16, 16, 1]), i))
        elif match == 3:
            con.execute("UPDATE unitaries SET dim = ? WHERE id = ?", (r.choice([0, 2, 5, -1, 4.0, "4"]), i))
        elif match == 4:
            con.execute("UPDATE tasks SET count = count + ? WHERE task = ?", (r.choice([-1, 1, -5]), t))
            fix = False
        elif match == 5:
            con.execute("UPDATE tasks SET checksum = ? WHERE task = ?", (r.choice(["", "0" * 32, "x"]), t))
            fix = False
        elif match == 6:
            con.execute("DELETE FROM tasks WHERE task = ?", (t,))
            fix = False
        elif match == 7:   # a task outside the plan, whole and with a genuine checksum
            new = r.choice([TASKS, 7777, -1])
            con.execute("INSERT INTO unitaries(id, dim, data) SELECT id - ? + ?, dim, data FROM unitaries "
                        "WHERE id >= ? AND id < ?", (ids[0], new * TASK_SIZE, *ids))
            con.execute("INSERT INTO tasks SELECT ?, seed, count, node, worker, started, finished, checksum "
                        "FROM tasks WHERE task = ?", (new, t))
            t = new
        elif match == 8:   # rows of no task
            con.execute("INSERT INTO unitaries(id, dim, data) SELECT id + ?, dim, data FROM unitaries "
                        "WHERE id = ?", (r.choice([10**6, TASKS * TASK_SIZE + 3]), ids[0]))
            fix = False
        elif match == 9:
            con.execute("UPDATE unitaries SET meta = ? WHERE id = ?", (r.choice(['{"a": 1}', "", "x"]), i))
        elif match == 10:
            con.execute("UPDATE unitaries SET data = CAST(data AS TEXT) WHERE id = ?", (i,))
        elif match == 11:
            con.execute("UPDATE unitaries SET data = NULL WHERE id = ?", (i,)) if r.random() < 0.5 else \
                con.execute("UPDATE unitaries SET meta = x'00ff' WHERE id = ?", (i,))
        elif match == 12:
            con.execute("UPDATE meta SET value = ? WHERE key = ?",
                        r.choice([("0123456789abcdef", "fingerprint"), ("1", "schema_version"),
                                  ("complex64", "dtype"), ("{}", "spec")]))
            fix = False
        elif match == 13:
            con.execute(r.choice(["CREATE TABLE extra(x)", "ALTER TABLE unitaries ADD COLUMN extra",
                                  "CREATE VIEW v AS SELECT 1", "CREATE TRIGGER tr AFTER INSERT ON meta BEGIN SELECT 1; END",
                                  "CREATE INDEX ix ON unitaries(dim)"]))
            fix = False
        elif match == 14:   # rows swapped between two ids of the task: same bytes, another order
            j = r.randrange(*ids)
            con.execute("UPDATE unitaries SET id = -id WHERE id IN (?, ?)", (i, j))
            con.execute("UPDATE unitaries SET id = CASE -id WHEN ? THEN ? ELSE ? END WHERE id < 0", (i, j, i))
        elif match == 15:   # a row moved into another task's range
            con.execute("UPDATE OR IGNORE unitaries SET id = ? WHERE id = ?", (r.randrange(TASKS * TASK_SIZE), i))
        elif match == 16:
            con.execute("UPDATE tasks SET task = ? WHERE task = ?", (r.choice([t + 1, t + 100]), t))
            fix = False
        elif match == 17:
            con.execute("DELETE FROM unitaries")
        elif match == 18:
            con.execute("UPDATE unitaries SET data = zeroblob(length(data)) WHERE id >= ? AND id < ?", ids)
        elif match == 19:
            con.execute("UPDATE tasks SET count = CAST(count AS TEXT) WHERE task = ?", (t,))
            fix = False
        elif match == 20:
            con.execute("DROP TABLE tasks")
            fix = False
        else:
            con.execute("UPDATE unitaries SET data = data || x'00' WHERE id = ?", (i,))
        if fix:
            rewrite_checksum(con, t)
        return f"sql#{match}{' +checksum' if fix else ''} task {t} id {i}"
    finally:
        con.close()


def byte_damage(r: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return "empty already"
    if r.random() < 0.4:
        cut = r.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}"
    k = r.randrange(1, 8)
    for _ in range(k):
        at = r.randrange(len(data))
        data[at] ^= 1 << r.randrange(8)
    path.write_bytes(bytes(data))
    return f"{k} bit(s) flipped"


def tree_pages(data: bytes, root: int, page_size: int) -> list[int]:
    """The pages of a table b-tree from ``root``, read here independently of the readers under test."""
    out, level = [], [root]
    while level and len(out) < 10_000:
        out += level
        nxt = []
        for p in level:
            base = (p - 1) * page_size
            if data[base] != 0x05:
                continue
            n = struct.unpack(">H", data[base + 3:base + 5])[0]
            for i in range(n):
                q = struct.unpack(">H", data[base + 12 + 2 * i:base + 14 + 2 * i])[0]
                nxt.append(struct.unpack(">I", data[base + q:base + q + 4])[0])
            nxt.append(struct.unpack(">I", data[base + 8:base + 12])[0])
        level = [p for p in nxt if 1 < p <= len(data) // page_size and p not in out]
    return out


def page_damage(r: random.Random, path: Path) -> str:
    """Structure-aware damage: one field of the header, or of a page of the unitaries b-tree (its
    type, cell count, content start, a cell pointer, a cell's first bytes: a child's page number or
    a payload size and rowid, the right-most pointer), set to a value chosen to mislead (another
    page of the tree, the root, 0, one off, all ones)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    if found is None:   # an earlier damage took the table
        return byte_damage(r, path)
    root = found[0]
    data = bytearray(path.read_bytes())
    tree = tree_pages(bytes(data), root, page_size)
    page = r.choice(tree)
    base = (page - 1) * page_size
    interior = data[base] == 0x05
    n = struct.unpack(">H", data[base + 3:base + 5])[0]
    k = r.randrange(max(n, 1))
    at = base + (12 if interior else 8) + 2 * k
    cell = base + struct.unpack(">H", data[at:at + 2])[0]
    fields = {"page size": (16, 2), "versions": (18, 2), "reserved": (20, 1), "page count": (28, 4),
              "freelist trunk": (32, 4), "freelist count": (36, 4), "largest root": (52, 4),
              "type": (base, 1), "freeblock": (base + 1, 2), "cell count": (base + 3, 2),
              "content start": (base + 5, 2), "cell pointer": (at, 2), "cell head": (cell, 4)}
    if interior:
        fields["right-most"] = (base + 8, 4)
    name = r.choice(sorted(fields))
    where, width = fields[name]
    old = int.from_bytes(data[where:where + width], "big")
    new = r.choice([old + 1, old - 1, 0, (1 << (8 * width)) - 1, r.choice(tree), root, old ^ 0x80])
    data[where:where + width] = (new % (1 << (8 * width))).to_bytes(width, "big")
    path.write_bytes(bytes(data))
    return f"page {page} {name}: {old} -> {new}"


def file_damage(r: random.Random, shards: list[Path], spare: Path) -> str:
    victim = r.choice(shards)
    match = r.randrange(4)
    if match == 0:
        victim.write_bytes(b"")
    elif match == 1:   # another shard's copy under a second name: legitimate, merged once
        shutil.copy(victim, victim.with_name("copy-" + victim.name))
    elif match == 2:   # a task from another shard, its rows replaced, its genuine checksum kept
        other = r.choice([s for s in shards if s != victim] or shards)
        con = sqlite3.connect(victim, isolation_level=None)
        con.execute("ATTACH ? AS o", (str(other),))
        t = r.choice([t for (t,) in con.execute("SELECT task FROM o.tasks")])
        con.execute("DELETE FROM unitaries WHERE id >= ? AND id < ?", (t * TASK_SIZE, (t + 1) * TASK_SIZE))
        con.execute("DELETE FROM tasks WHERE task = ?", (t,))
        con.execute("INSERT INTO unitaries(id, dim, data) SELECT id, dim, zeroblob(length(data)) FROM o.unitaries "
                    "WHERE id >= ? AND id < ?", (t * TASK_SIZE, (t + 1) * TASK_SIZE))
        con.execute("INSERT INTO tasks SELECT * FROM o.tasks WHERE task = ?", (t,))
        con.close()
    else:
        shutil.copy(spare, victim)   # a database of another run
    return f"file#{match} {victim.name}"


def damage(r: random.Random, shards: list[Path], spare: Path) -> list[str]:
    done = []
    for _ in range(r.choice([1, 1, 2, 3])):
        kind = r.random()
        if kind < 0.55:
            path = r.choice(shards)
            try:
                done.append(f"{path.name}: {sql_damage(r, path)}")
            except sqlite3.DatabaseError as e:   # an earlier damage made it unwritable
                done.append(f"{path.name}: ({e})")
        elif kind < 0.85:
            path = r.choice(shards)
            try:
                what = page_damage(r, path) if r.random() < 0.5 else byte_damage(r, path)
            except sqlite3.DatabaseError as e:   # an earlier damage made it unreadable
                what = f"({e})"
            done.append(f"{path.name}: {what}")
        else:
            try:
                done.append(file_damage(r, shards, spare))
            except sqlite3.DatabaseError as e:
                done.append(f"file: ({e})")
    return done


# -- the property ----------------------------------------------------------------------------------

def test_the_merge_refuses_damage_or_gives_the_fault_free_tasks(good_run, tmp_path, config):
    spec, reference = good_run
    other = config("other.toml", run={"count": TASK_SIZE * TASKS - 7, "task_size": TASK_SIZE, "seed": 99})
    RunDir(other.run_dir).prepare(other, resume=False)
    os.environ["UNIDASK_NODE"] = "x"
    worker.generate_task(other, 0, "o")
    spare = Path(worker.stage_out(other, "o", final=True)["path"])
    os.environ.pop("UNIDASK_NODE")
    outcomes = {"refused": 0, "identical": 0, "with missing tasks": 0}
    for case in range(FUZZ_CASES):
        r = random.Random(FUZZ_SEED + case)
        run = tmp_path / f"case{case}"
        shutil.copytree(spec.run_dir, run, ignore=shutil.ignore_patterns("*.db-journal"))
        shards = RunDir(run).staged_shards()
        done = damage(r, shards, spare)
        out = tmp_path / f"out{case}.db"
        skip_bad = r.random() < 0.3
        where = f"case {case} (UNIDASK_FUZZ_SEED={FUZZ_SEED + case} UNIDASK_FUZZ_CASES=1): {done}"
        try:
            report = unidask.merge(run, out, skip_bad=skip_bad)
        except unidask.UnidaskError as e:
            assert isinstance(e, unidask.InputError), f"{where}: {e!r}"
            assert any(str(p) in str(e) for p in RunDir(run).shards.iterdir()) or "no shard" in str(e), \
                f"{where}: the refusal names no file: {e}"
            assert not out.exists(), where
            outcomes["refused"] += 1
        else:
            merged = tasks_of(out)
            assert set(merged) <= set(reference) and set(merged) | set(report.missing) == set(reference), where
            for task, value in merged.items():
                assert value == reference[task], f"{where}: task {task} differs from the fault-free merge"
            if report.complete:
                assert unidask.verify(out).ok, where
            outcomes["identical" if report.complete else "with missing tasks"] += 1
        shutil.rmtree(run)
        out.unlink(missing_ok=True)
    print(outcomes)
    # the harness must reach both ends, or it tests nothing
    assert outcomes["refused"] > FUZZ_CASES // 10 and outcomes["identical"] > FUZZ_CASES // 20, outcomes


def test_damaged_databases_get_one_line_everywhere(good_run, tmp_path, capsys):
    """A merged database damaged at random, given to verify, export, Dataset and status: a verdict,
    or one line and exit 2; never a traceback, never an OK for what is not the planned data."""
    from conftest import run_main

    spec, reference = good_run
    merged = spec.run_dir.parent / "reference.db"
    for case in range(FUZZ_CASES // 5):
        r = random.Random(FUZZ_SEED - case)
        bad = tmp_path / f"bad{case}.db"
        shutil.copy(merged, bad)
        try:
            done = [sql_damage(r, bad) if r.random() < 0.6 else byte_damage(r, bad)]
        except sqlite3.DatabaseError as e:
            done = [f"({e})"]
        where = f"case {case}: {done}"
        code, out, err = run_main("verify", bad, capsys=capsys)
        assert "Traceback" not in out + err and (out + err).count("\n") == 1, f"{where}: {out}{err}"
        assert (code == 1 and out.startswith("FAILED: ")) or (code == 2 and str(bad) in err) or \
            (code == 0 and tasks_of(bad) == reference), f"{where}: {out}{err}"
        for suffix in (".npy", ".h5"):
            code, out, err = run_main("export", bad, tmp_path / f"x{case}{suffix}", capsys=capsys)
            assert code in (0, 2) and "Traceback" not in err and err.count("\n") <= 1, f"{where}: {err}"
        try:
            with unidask.Dataset(bad) as ds:
                ds[0:len(ds)], ds[r.randrange(max(1, len(ds)))]
        except (unidask.InputError, IndexError):
            pass
        # the Dataset's own line (a file it reads through SQL) is not the next case's verify's: the
        # merged file's bytes vary with the time of its merge, and with them which case warns
        _, err = capsys.readouterr()
        assert "Traceback" not in err and err.count("\n") <= 1, f"{where}: {err}"
    # status of a run dir whose shards are damaged: counts what passes, names what does not
    run = tmp_path / "run"
    shutil.copytree(spec.run_dir, run)
    for path in RunDir(run).staged_shards()[:2]:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    code, out, err = run_main("status", run, capsys=capsys)
    assert code == 0 and "Traceback" not in err and "not counted" in out, out + err
