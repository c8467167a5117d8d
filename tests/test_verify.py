"""`unidask verify`: a one-line verdict, exit 0 only when everything holds."""

import shutil
import sqlite3

from conftest import REPO, run_main, write_config


def test_verify_good_database(haar_run, tmp_path, capsys):
    spec, db = haar_run
    cfg = write_config(tmp_path / "same.toml", run={"count": 20000, "task_size": 1000})
    code, out, _ = run_main("verify", db, "--against", cfg, capsys=capsys)
    assert code == 0 and out.startswith("OK: ") and "20/20 tasks" in out and "regenerated" in out
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
