"""The merge behind the generation (store/behind.py): a run's database built as its tasks are
staged is the one ``unidask merge`` makes of the same shards; a run stopped publishes nothing and
leaves nothing beside its database's name; a shard that fails a check is refused as by the merge."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

import unidask
from unidask import RunDir
from unidask.store import db
from unidask.store.behind import Behind

from conftest import merged_data, run_main, wait_for, write_config

pytestmark = pytest.mark.cluster   # real runs on local clusters of worker processes


def tables(path) -> tuple:
    """A merged database's rows, tasks and meta (its time of merging aside), integrity_check ok."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = {k: v for k, v in con.execute("SELECT key, value FROM meta") if k != "merged"}
        return merged_data(path), con.execute("SELECT * FROM tasks ORDER BY task").fetchall(), meta
    finally:
        con.close()


def leftovers(run_dir) -> list[str]:
    """What a database being built leaves beside its name (its temp, a journal)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".t.db"))


@pytest.mark.parametrize("stage_behind", [0, 60_000])
def test_the_database_built_behind_the_generation_is_the_merge_of_its_shards(config, tmp_path, stage_behind,
                                                                            capsys):
    """Tasks staged one by one (0) or a few at a time, their leaves shared across tasks and shards:
    the run's database, built as they were staged, holds what ``unidask merge`` makes of the same
    shards, and the run's lines say when each phase ended."""
    spec = config(run={"count": 4_050, "task_size": 100, "run_dir": str(tmp_path / "run")},
                  generator={"dim": 4}, storage={"stage_behind": stage_behind})
    result = unidask.run(spec)
    assert result.merged.behind and result.merged.complete and result.merged.rows == 4_050
    assert len(RunDir(spec.run_dir).staged_shards()) > (20 if stage_behind == 0 else 4)
    code, out, _ = run_main("merge", spec.run_dir, "-o", tmp_path / "again.db", capsys=capsys)
    assert code == 0 and "MB/s" in out
    assert tables(result.merged.out) == tables(tmp_path / "again.db")
    assert leftovers(spec.run_dir) == []
    assert "built behind the generation" in result.merged.summary()
    phases = RunDir(spec.run_dir).record()["phases"]   # what the report shows
    assert phases == {"start": result.start_seconds, "generation": result.seconds, "merge": result.merged.seconds}
    assert all(v > 0 for v in phases.values())


def test_a_stopped_run_publishes_nothing_and_its_resume_finishes_the_same(tmp_path):
    """Ctrl-C while the database is being built: no database, nothing beside its name; the resume
    builds it from the staged shards (the earlier ones taken in at its start), the same as a run
    never stopped."""
    cfg = write_config(tmp_path / "s.toml", run={"count": 60_000, "task_size": 500},
                       generator={"dim": 16}, storage={"local_dir": str(tmp_path / "local"), "stage_behind": 0})
    spec = unidask.load_config(cfg)
    driver = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(RunDir(spec.run_dir).staged_shards()) >= 10, "10 staged shards")
        assert leftovers(spec.run_dir)   # being built
        os.killpg(driver.pid, signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 3 and "Traceback" not in err, err
    assert not (spec.run_dir / "t.db").exists() and leftovers(spec.run_dir) == []
    again = subprocess.run([sys.executable, "-m", "unidask.cli", "run", str(cfg), "--resume"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "built behind the generation" in again.stdout, again.stdout
    assert again.stdout.strip().splitlines()[-1].startswith("time: start "), again.stdout
    whole = unidask.run(unidask.load_config(cfg, {"run.run_dir": str(tmp_path / "whole")}))
    assert merged_data(spec.run_dir / "t.db") == merged_data(whole.merged.out)


def test_a_staged_shard_that_fails_a_check_is_refused_as_by_the_merge(config, tmp_path, capsys):
    """A shard damaged once staged (a packed task's bytes flipped, its checksum kept): the database
    built behind is not published; the merge after the run refuses the shard by name."""
    from distributed import Client, LocalCluster

    spec = config(run={"count": 2_000, "task_size": 100, "run_dir": str(tmp_path / "run")}, generator={"dim": 4})
    unidask.run(spec, merge=False)
    shards = RunDir(spec.run_dir).staged_shards()
    bad = shards[-1]
    con = sqlite3.connect(bad)
    first = con.execute("SELECT id FROM blocks LIMIT 1").fetchone()[0]
    task = first // 100
    con.execute("UPDATE blocks SET data = CAST(substr(data, 1, 99) || x'ff' || substr(data, 101) AS BLOB) "
                "WHERE id = ?", (first,))
    con.commit()
    con.close()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        behind = Behind.start(RunDir(spec.run_dir), spec)
        behind.connect(client, sync=False)
        assert behind.finish() is None
    assert not (spec.run_dir / "t.db").exists() and leftovers(spec.run_dir) == []
    code, _, err = run_main("merge", spec.run_dir, capsys=capsys)
    assert code == 2 and str(bad) in err and f"task {task}: checksum mismatch" in err, err
    assert db.check(shards[0], spec.fingerprint, db.Expected.of(spec))   # the others are sound
