"""`unidask verify`: a one-line verdict, exit 0 only when everything holds."""

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, on_a_terminal, run_main, write_config


def test_verify_good_database(haar_run, tmp_path, capsys):
    spec, db = haar_run
    cfg = write_config(tmp_path / "same.toml", run={"count": 20000, "task_size": 1000})
    code, out, _ = run_main("verify", db, "--against", cfg, capsys=capsys)
    assert code == 0 and out.startswith("OK: ") and "20/20 tasks" in out and "regenerated" in out
    assert "<= 1e-10 (unidask's for complex128)" in out   # the bound it checked against, and whose
    assert out.count("\n") == 1


def test_verify_finds_what_is_wrong(haar_run, tmp_path, capsys):
    _, db = haar_run
    bad = tmp_path / "bad.db"
    shutil.copy(db, bad)
    con = sqlite3.connect(bad)
    con.execute("UPDATE unitaries SET data = zeroblob(256) WHERE id = 1234")   # flipped bits
    con.execute("DELETE FROM unitaries WHERE id >= 7000 AND id < 8000")
    con.execute("DELETE FROM tasks WHERE task = 7")                              # a missing task
    con.commit()
    con.close()
    code, out, _ = run_main("verify", bad, capsys=capsys)
    assert code == 1 and out.startswith("FAILED: ")
    assert "task 1: checksum mismatch" in out and "not unitary" in out and "1 task(s) missing: 7" in out

    shutil.copy(db, bad)
    con = sqlite3.connect(bad)
    con.execute("DELETE FROM unitaries WHERE id = 2500")                         # a lost row
    con.commit()
    con.close()
    code, out, _ = run_main("verify", bad, capsys=capsys)
    assert code == 1 and "task 2 has 999 rows, it records 1000" in out and "holds 19,999 unitaries" in out

    other = write_config(tmp_path / "other.toml", run={"count": 20000, "task_size": 1000, "seed": 8})
    code, out, _ = run_main("verify", db, "--against", other, capsys=capsys)
    assert code == 1 and "not the data of" in out


def test_verify_refuses_what_is_not_a_database(tmp_path, capsys):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\0" * 5000)
    code, _, err = run_main("verify", junk, capsys=capsys)
    assert code == 2 and str(junk) in err
    code, _, err = run_main("verify", junk, "--against", REPO / "nope.toml", capsys=capsys)
    assert code == 2


def _edit(src, dst, *statements):
    shutil.copy(src, dst)
    con = sqlite3.connect(dst)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()
    return dst


def _match(path, task, task_size=1000):
    """Rewrite a task's count and checksum to agree with its rows, as a careful forger would."""
    from unidask.store import db

    con = sqlite3.connect(path)
    base = task * task_size
    n = con.execute("SELECT count(*) FROM unitaries WHERE id >= ? AND id < ?", (base, base + task_size)).fetchone()[0]
    con.execute("UPDATE tasks SET count = ?, checksum = ? WHERE task = ?",
                (n, db.task_checksum(con, "main", base, task_size), task))
    con.commit()
    con.close()


def test_verify_fails_every_database_that_is_not_the_planned_data(haar_run, tmp_path, capsys):
    """The cases of issue 15, each a database edited after the merge; every one FAILED, one line."""
    _, db = haar_run
    nan = np.full((4, 4), np.nan, complex).tobytes().hex()
    cases = {
        "half a task, count and checksum rewritten": (
            ["DELETE FROM unitaries WHERE id >= 3500 AND id < 4000"], 3, "task 3 records 500 unitaries"),
        "a task outside the plan": (
            ["INSERT INTO unitaries(id, dim, data) SELECT id - 3000 + 7777000, dim, data FROM unitaries "
             "WHERE id >= 3000 AND id < 4000",
             "INSERT INTO tasks SELECT 7777, seed, count, node, worker, started, finished, checksum FROM tasks "
             "WHERE task = 3"], None, "task 7777 is not in the run's plan"),
        "a NaN matrix, checksum rewritten": (
            [f"UPDATE unitaries SET data = x'{nan}' WHERE id = 3003"], 3, "not finite or not unitary"),
        "a blob of the wrong length": (["UPDATE unitaries SET data = substr(data, 2) WHERE id = 3003"], 3,
                                       "rows of 255, 256 bytes"),
        "the merge's row count edited": (["UPDATE meta SET value = '19999' WHERE key = 'rows'"], None,
                                          "its meta says 19999 rows"),
    }
    for name, (statements, rematch, message) in cases.items():
        bad = _edit(db, tmp_path / "bad.db", *statements)
        if rematch is not None:
            _match(bad, rematch)
        code, out, err = run_main("verify", bad, capsys=capsys)
        assert code == 1 and out.startswith("FAILED: ") and message in out and out.count("\n") == 1, (name, out)


def test_verify_regenerates_a_sample_or_everything(haar_run, tmp_path, capsys):
    spec, db = haar_run
    cfg = write_config(tmp_path / "same.toml", run={"count": 20000, "task_size": 1000})
    code, out, _ = run_main("verify", db, "--against", cfg, "--sample", "5", capsys=capsys)
    assert code == 0 and "5 task(s) regenerated identically" in out
    code, out, _ = run_main("verify", db, "--against", cfg, "--full", capsys=capsys)
    assert code == 0 and "20 task(s) regenerated identically" in out
    # a forged task (unitary rows, checksum rewritten to match) only regeneration can see
    forged = _edit(db, tmp_path / "forged.db",
                   f"UPDATE unitaries SET data = x'{np.eye(4, dtype=complex).tobytes().hex()}' WHERE id = 13013")
    _match(forged, 13)
    code, out, _ = run_main("verify", forged, capsys=capsys)
    assert code == 0                                            # whole, sound, unitary: it looks right
    code, out, _ = run_main("verify", forged, "--against", cfg, capsys=capsys)
    assert code == 0                                            # a sample of 3 does not draw task 13
    code, out, _ = run_main("verify", forged, "--against", cfg, "--full", capsys=capsys)
    assert code == 1 and "task 13 differs from what" in out


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_a_database_cut_mid_page_is_one_line_everywhere(haar_run, tmp_path, capsys, cut):
    _, db = haar_run
    data = db.read_bytes()
    cut_db = tmp_path / "cut.db"
    cut_db.write_bytes(data[:int(len(data) * cut) + 100])   # not on a page boundary
    code, out, err = run_main("verify", cut_db, capsys=capsys)
    assert (code == 1 and out.startswith("FAILED: ")) or (code == 2 and str(cut_db) in err), out + err
    assert "Traceback" not in out + err and (out + err).count("\n") == 1
    code, out, err = run_main("export", cut_db, tmp_path / "x.npy", capsys=capsys)
    assert code == 2 and str(cut_db) in err and err.count("\n") == 1 and not (tmp_path / "x.npy").exists(), err


def test_a_wal_beside_a_database_is_refused_everywhere(haar_run, tmp_path, capsys):
    """A copy whose -wal sets row 7 to the identity: sqlite3 reads the identity, so verify,
    info, export and Dataset must not judge the file without it (they read it immutable, which
    ignores a WAL): each refuses in one line naming the file. Once sqlite3 has applied the WAL,
    verify sees the identity and fails the checksum."""
    import unidask

    _, db = haar_run
    identity = np.eye(4, dtype=np.complex128).tobytes()
    writer = tmp_path / "writer.db"
    shutil.copy(db, writer)
    con = sqlite3.connect(writer)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA wal_autocheckpoint = 0")
    con.execute("UPDATE unitaries SET data = ? WHERE id = 7", (identity,))
    con.commit()
    copy = tmp_path / "copy.db"   # the file and its WAL as a writer left them, the change not checkpointed
    shutil.copy(writer, copy)
    shutil.copy(f"{writer}-wal", f"{copy}-wal")
    con.close()
    for args in (("verify", copy), ("info", copy), ("export", copy, tmp_path / "x.npy")):
        assert Path(f"{copy}-wal").stat().st_size > 0
        code, out, err = run_main(*args, capsys=capsys)
        assert code in (1, 2) and "-wal or -journal beside it" in out + err, (args, out, err)
        assert "Traceback" not in out + err and (out + err).count("\n") == 1, (args, out, err)
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(unidask.InputError, match="-wal or -journal beside it"):
        unidask.Dataset(copy)[0]
    con = sqlite3.connect(copy)   # sqlite3 reads the identity, and applies the WAL as it closes
    assert con.execute("SELECT data FROM unitaries WHERE id = 7").fetchone()[0] == identity
    con.close()
    code, out, err = run_main("verify", copy, capsys=capsys)
    assert code == 1 and "task 0" in out, out + err


@pytest.mark.parametrize("args,message", [
    (["--sample", "5"], "--sample does nothing without --against CONFIG"),
    (["--full"], "--full does nothing without --against CONFIG"),
    (["--set", "run.count=5"], "--set does nothing without --against CONFIG"),
    (["--stats-rows", "500"], "--stats-rows does nothing without --stats"),
    (["--against", "c.toml", "--full", "--sample", "2"],
     "--sample does nothing with --full (every task is generated again)"),
])
def test_options_that_do_nothing_are_refused(haar_run, capsys, args, message):
    _, db = haar_run
    code, out, err = run_main("verify", db, *args, capsys=capsys)
    assert code == 2 and out == "" and err == f"unidask: error: {message}\n", err


def test_a_long_verify_shows_progress_on_a_terminal(haar_run):
    """On a terminal, both passes over the rows (checksums, unitarity) draw a progress bar."""
    _, db = haar_run
    code, out, shown = on_a_terminal("verify", db)
    assert code == 0 and out.startswith("OK: "), out
    assert "verify: checksums" in shown and "verify: unitarity" in shown and "20.0k/20.0k" in shown, shown
