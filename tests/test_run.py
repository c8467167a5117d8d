"""End to end on a real local Dask cluster: worker processes, shards on disk, stage-out, merge."""

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import unidask
from unidask import RunDir

from conftest import REPO, cli, merged_data, messages, on_a_terminal, run_main, unitarity_error, wait_for, write_config

pytestmark = pytest.mark.cluster   # every test here runs on a local cluster of worker processes


def test_run_writes_unitary_haar_data(haar_run):
    spec, db = haar_run
    with unidask.Dataset(db) as ds:
        assert len(ds) == 20000
        u = ds[0:20000]
        assert u.shape == (20000, 4, 4)
        assert unitarity_error(u) < 1e-10
        # |U_00|^2 ~ Beta(1, n - 1) for Haar U(n)
        assert stats.kstest(np.abs(u[:, 0, 0]) ** 2, stats.beta(1, 3).cdf).pvalue > 0.01
        assert ds.spec["run"]["seed"] == spec.seed


def test_run_layout_and_public_format(haar_run):
    spec, db = haar_run
    shards = RunDir(spec.run_dir).staged_shards()
    assert sorted(p.name.split("-")[0] for p in shards) == ["node1", "node2"]  # one per simulated node
    assert not list(RunDir(spec.run_dir).shards.glob(".*"))                   # no temp files left
    record = json.loads((spec.run_dir / "run.json").read_text())
    assert record["fingerprint"] == spec.fingerprint
    # the merged file is readable with nothing but sqlite3 and numpy
    con = sqlite3.connect(db)
    meta = dict(con.execute("SELECT key, value FROM meta"))
    assert meta["dtype"] == "complex128" and meta["schema_version"] == "3"
    assert json.loads(meta["spec"])["generator"] == {"kind": "haar", "dtype": "complex128", "dim": 4}
    i, dim, data = con.execute("SELECT id, dim, data FROM unitaries WHERE id = 4321").fetchone()
    assert (i, dim) == (4321, 4)   # id = task * task_size + idx: task 4, its row 321
    u = np.frombuffer(data, meta["dtype"]).reshape(dim, dim)
    assert unitarity_error(u[None]) < 1e-10
    rows = con.execute("SELECT task, seed, count, node FROM tasks ORDER BY task").fetchall()
    assert [r[0] for r in rows] == list(range(20)) and rows[3][1:3] == ("7/3", 1000)
    assert {r[3] for r in rows} == {"node1", "node2"}
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_same_config_same_bytes_whatever_the_layout(config, tmp_path):
    """1 node of 2 workers and 3 nodes of 1 worker give byte-identical merged data."""
    results = []
    for name, layout in (("a", {"nodes": 1, "workers": 2}), ("b", {"nodes": 3, "workers": 1})):
        spec = config(f"{name}.toml", run={"run_dir": str(tmp_path / f"run-{name}"),
                                            "count": 2050, "task_size": 100},
                      storage={"local_dir": str(tmp_path / f"local-{name}")}, cluster=layout)
        result = unidask.run(spec)
        assert len(result.shards) == layout["nodes"] * layout["workers"]   # a shard per process
        results.append(merged_data(result.merged.out))
    assert len(results[0]) == 2050
    assert results[0] == results[1]


def test_four_workers_share_one_node_shard(config):
    spec = config(run={"count": 6000, "task_size": 20}, cluster={"nodes": 1, "workers": 4},
                  storage={"shard_per": "node"})
    result = unidask.run(spec)
    assert len(result.shards) == 1
    con = sqlite3.connect(result.shards[0])
    workers = {w for (w,) in con.execute("SELECT DISTINCT worker FROM tasks")}
    assert len(workers) >= 2                      # several processes wrote this one shard
    assert con.execute("SELECT count(*) FROM tasks").fetchone()[0] == 300
    assert result.merged.rows == 6000 and result.merged.complete


def test_resume_skips_staged_tasks_and_matches(config, tmp_path):
    full = config("full.toml", run={"run_dir": str(tmp_path / "full")})
    reference = merged_data(unidask.run(full).merged.out)

    # a run cut short: only one node's shard made it to the run dir
    spec = config("part.toml", run={"run_dir": str(tmp_path / "part")})
    unidask.run(spec, merge=False)
    kept, *lost = RunDir(spec.run_dir).staged_shards()
    for p in lost:
        p.unlink()
    done_before = RunDir(spec.run_dir).staged_tasks()
    assert 0 < len(done_before) < spec.n_tasks
    finished_before = dict(sqlite3.connect(kept).execute("SELECT task, finished FROM tasks"))

    result = unidask.run(spec, resume=True)
    assert result.skipped_tasks == len(done_before)
    assert result.written == sum(spec.task_count(t) for t in range(spec.n_tasks) if t not in done_before)
    assert merged_data(result.merged.out) == reference
    # what was staged before was not generated again
    con = sqlite3.connect(result.merged.out)
    for task, finished in finished_before.items():
        assert con.execute("SELECT finished FROM tasks WHERE task = ?", (task,)).fetchone()[0] == finished


def test_cli_run_status_and_rerun_refusal(tmp_path):
    cfg = write_config(tmp_path / "cli.toml", run={"count": 1000, "task_size": 250})
    r = cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 1,000 unitaries" in r.stdout and "merged 2 shard(s)" in r.stdout
    assert f"; 2 shard file(s) in {tmp_path / 'run' / 'shards'}\n" in r.stdout, r.stdout
    assert "dashboard: http://127.0.0.1:" in r.stderr
    assert (tmp_path / "run" / "t.db").exists()

    r = cli("status", tmp_path / "run", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["tasks_done"] == 4 and st["tasks_missing"] == 0
    assert st["unitaries"] == 1000 and {s["node"] for s in st["shards"]} == {"node1", "node2"}
    r = cli("status", tmp_path / "run")
    assert "4/4 done" in r.stdout

    # the same config again: the run is complete, and says so
    r = cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == (f"complete: {tmp_path / 'run' / 't.db'} holds all 1,000 "
                                              "unitaries; nothing to do\n"), r.stdout + r.stderr
    assert "complete" not in r.stderr   # said once
    # without its merged database, running again must not mix attempts silently
    (tmp_path / "run" / "t.db").unlink()
    r = cli("run", cfg, cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", cfg, "--resume", cwd=tmp_path)   # every task staged: a merge, no cluster, one line
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("merged 2 shard(s)") and r.stdout.count("\n") == 1, r.stdout
    assert "dashboard" not in r.stderr and "wrote" not in r.stdout, r.stderr
    (tmp_path / "run" / "t.db").unlink()
    r = cli("run", cfg, "--resume", "--no-merge", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == f"nothing to do: all 4 tasks are staged in {tmp_path / 'run' / 'shards'}\n"


def test_shard_per_process_gives_the_same_bytes(config, tmp_path):
    per_node = config("node.toml", run={"run_dir": str(tmp_path / "node")}, storage={"shard_per": "node"},
                      cluster={"nodes": 1, "workers": 2})
    per_process = config("proc.toml", run={"run_dir": str(tmp_path / "proc")}, storage={"shard_per": "process"},
                         cluster={"nodes": 1, "workers": 2})
    a = unidask.run(per_node)
    b = unidask.run(per_process)
    assert len(a.shards) == 1 and len(b.shards) == 2      # one per worker process
    assert b.merged.complete and merged_data(a.merged.out) == merged_data(b.merged.out)


def test_short_tasks_get_a_task_size_hint(config):
    """Tasks far shorter than Dask's per-task cost: the run says which task_size to use instead."""
    spec = config(run={"count": 60_000, "task_size": 100}, generator={"dim": 2},
                  cluster={"nodes": 1, "workers": 1})
    with messages() as lines:
        unidask.run(spec, merge=False)
    [hint] = [line for line in lines if line.startswith("hint:")]
    suggested = int(hint.split("run.task_size = ")[1].split()[0])
    assert "(now 100)" in hint and suggested >= 1000   # 100 U(2) take well under 20 ms


def test_task_size_hint_only_for_short_tasks():
    from unidask.execute.driver import task_size_hint

    assert task_size_hint(1000, [0.2] * 50) is None
    assert "run.task_size = 50000 (now 100)" in task_size_hint(100, [0.001] * 50)


def test_page_size_auto_follows_the_matrix_size_and_a_set_one_is_kept(config, tmp_path):
    """Shards and the merged database of n = 32 get 16 KiB pages under the default "auto"; a
    page size the config sets is kept, and the data is the same."""
    def page_size(path):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("PRAGMA page_size").fetchone()[0]
        finally:
            con.close()

    sizes = {}
    for name, storage in (("auto.toml", {}), ("set.toml", {"page_size": 65536})):
        spec = config(name, run={"name": name[:-5], "count": 400, "task_size": 100, "run_dir": str(tmp_path / name[:-5])},
                      generator={"dim": 32}, storage=storage)
        result = unidask.run(spec)
        assert {page_size(p) for p in result.shards} == {page_size(result.merged.out)}
        sizes[name] = (page_size(result.merged.out), merged_data(result.merged.out))
    assert sizes["auto.toml"][0] == 16384 and sizes["set.toml"][0] == 65536
    assert sizes["auto.toml"][1] == sizes["set.toml"][1]


def test_status_and_resume_count_only_what_the_merge_would_take(config, tmp_path):
    """A staged shard damaged after its stage-out: status does not count its tasks, a resume sets it
    aside (RUN_DIR/rejected/) and generates them again, and the result is the fault-free one."""
    full = config("full.toml", run={"run_dir": str(tmp_path / "full")})
    reference = merged_data(unidask.run(full).merged.out)
    spec = config("part.toml", run={"run_dir": str(tmp_path / "part")})
    unidask.run(spec, merge=False)
    bad, good = RunDir(spec.run_dir).staged_shards()
    con = sqlite3.connect(bad)
    [(task,)] = con.execute("SELECT task FROM tasks ORDER BY task LIMIT 1").fetchall()
    con.execute("UPDATE blocks SET data = zeroblob(length(data)) WHERE id = ?", (task * spec.task_size,))
    con.commit()
    con.close()
    bad_tasks = {t for (t,) in sqlite3.connect(bad).execute("SELECT task FROM tasks")}

    st = unidask.status(spec.run_dir)
    assert st.tasks_done == spec.n_tasks - len(bad_tasks) and set(st.missing) == bad_tasks
    [entry] = [s for s in st.shards if s.path == str(bad)]
    assert f"task {task}: checksum mismatch" in entry.error
    r = cli("status", spec.run_dir)
    assert r.returncode == 0 and "not counted: " in r.stdout and "Traceback" not in r.stderr

    with messages() as lines:
        result = unidask.run(spec, resume=True)
    assert any(line.startswith(f"warning: {bad}: task {task}: checksum mismatch") for line in lines), lines
    assert (spec.run_dir / "rejected" / bad.name).exists() and not bad.exists()
    assert result.written == sum(spec.task_count(t) for t in bad_tasks)
    assert merged_data(result.merged.out) == reference


def test_a_changed_plugin_generator_is_refused_on_resume(tmp_path):
    """A module:function generator edited between a stopped run and its resume would mix two
    versions' rows in one database: its source hash is part of the fingerprint."""
    module = tmp_path / "my_gen.py"
    module.write_text("import numpy as np\n\ndef phases(rng, count):\n"
                      "    return np.exp(2j * np.pi * rng.random((count, 1, 1)))\n")
    cfg = write_config(tmp_path / "p.toml", run={"count": 400, "task_size": 100},
                       generator={"kind": "my_gen:phases"})
    env = {"PYTHONPATH": str(tmp_path)}
    r = cli("run", cfg, "--no-merge", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    module.write_text(module.read_text().replace("2j * np.pi", "1j * np.pi"))
    r = cli("run", cfg, "--resume", cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.count("unidask: error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "generator my_gen:phases changed since this run started" in r.stderr


def test_what_stages_jsonl_names_is_looked_up_only_in_shards(config, tmp_path):
    """stages.jsonl (the driver's record of its stage-outs, where a network filesystem's directory
    cache hides a listing) is only a list of names to look up in shards/: a damaged line is
    skipped, a path elsewhere is not followed, a name no longer there (set aside, cleaned) is not
    listed, and the merge stays whole; the report says which lines it skipped."""
    spec = config(run={"count": 1000, "task_size": 100})
    unidask.run(spec, merge=False)
    rd = RunDir(spec.run_dir)
    shards = rd.staged_shards()
    outside = tmp_path / "outside.db"
    shutil.copyfile(shards[0], outside)
    with open(rd.stages, "a") as f:
        f.write("not json\n[1, 2]\n{\"path\": 7}\n")
        for path in (f"{rd.shards}/../../{outside.name}", outside, rd.shards / "gone-away.db",
                     rd.shards / ".temp.db", rd.shards / "x.db-journal"):   # records, of odd paths
            f.write(json.dumps({"node": "n", "time": 1.0, "seconds": 0.1, "path": str(path)}) + "\n")
    with open(rd.stages, "ab") as f:
        f.write(b"\x00\xff\xfe{\n")   # not even UTF-8
    assert rd.staged_shards() == shards and rd.odd_entries() == {}
    report = unidask.merge(spec.run_dir)
    assert report.complete and sorted(report.shards) == sorted(map(str, shards))
    # the run's report: made from the records there are, the other lines named once
    r = cli("report", spec.run_dir, "-o", tmp_path / "report.html")
    assert r.returncode == 0 and (tmp_path / "report.html").exists(), r.stderr
    assert "stages.jsonl: line(s)" in r.stderr and "are not stage-out records; skipped" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("stages.jsonl") == 1, r.stderr
    # a FIFO in its place (reading one would block): one line, exit 2, and the merge ends
    rd.stages.unlink()
    os.mkfifo(rd.stages)
    r = cli("merge", spec.run_dir)
    assert r.returncode == 2 and r.stderr == f"unidask: error: {rd.stages}: a FIFO, not a regular file\n", r.stderr
    # a link to a record kept elsewhere is not the run's own record either (regular() followed it)
    rd.stages.unlink()
    (tmp_path / "elsewhere.jsonl").write_text("")
    rd.stages.symlink_to(tmp_path / "elsewhere.jsonl")
    r = cli("merge", spec.run_dir)
    assert r.returncode == 2 and r.stderr.startswith(f"unidask: error: {rd.stages}: a symbolic link"), r.stderr


def test_odd_files_in_shards_are_named_never_opened(config, tmp_path):
    """A FIFO, a directory and a socket named like shards in RUN_DIR/shards/: opening a FIFO to read
    would block forever. merge refuses naming it (--skip-bad skips it), status lists it, a resume
    sets it aside, verify refuses it; every command ends."""
    import socket

    spec = config(run={"count": 1000, "task_size": 100})
    unidask.run(spec, merge=False)
    shards = RunDir(spec.run_dir).shards
    os.mkfifo(shards / "a-fifo.db")
    (shards / "b-dir.db").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(shards / "c-sock.db"))

    def unidask_cli(*args):   # a hang fails the test, not the suite
        return subprocess.run([sys.executable, "-m", "unidask.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    r = unidask_cli("merge", spec.run_dir)
    assert r.returncode == 2 and f"{shards / 'a-fifo.db'}: a FIFO, not a regular file; refused" in r.stderr, r.stderr
    r = unidask_cli("merge", spec.run_dir, "--skip-bad")
    assert r.returncode == 1 and f"rejected {shards / 'b-dir.db'}: a directory, not a regular file" in r.stdout
    assert "10/10 tasks" in r.stdout
    r = unidask_cli("status", spec.run_dir)
    assert r.returncode == 0 and "not counted: a socket, not a regular file" in r.stdout and "10/10 done" in r.stdout
    r = unidask_cli("verify", shards / "a-fifo.db")
    assert r.returncode == 2 and "a FIFO, not a regular file" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert unidask.run(spec, resume=True).complete == spec.run_dir / "t.db"   # --skip-bad merged every task
    (spec.run_dir / "t.db").unlink()
    result = unidask.run(spec, resume=True)
    assert result.merged.complete and result.written == 0
    assert sorted(p.name for p in (spec.run_dir / "rejected").iterdir()) == ["a-fifo.db", "b-dir.db", "c-sock.db"]
    sock.close()


def test_status_shows_a_running_run_live(config, tmp_path):
    """Before the first stage-out, `status` still shows how far a running run is: its driver's
    figures (RUN_DIR/live.json), which tasks are staged (safe) and which only written; once the
    run ends, only what the files say."""
    import threading

    from unidask.views.status import status

    spec = config(run={"count": 2000, "task_size": 10}, generator={"kind": "plugin_generators:slow_haar", "delay": 0.2},
                  storage={"stage_every": 300})
    done = threading.Event()
    runner = threading.Thread(target=lambda: (unidask.run(spec), done.set()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while (st := status(spec.run_dir) if (spec.run_dir / "run.json").exists() else None) is None \
            or st.live is None or st.live["tasks_done"] < 5:
        assert time.monotonic() < deadline and not done.is_set(), "no live figures while it ran"
        time.sleep(0.2)
    line = st.format().splitlines()[1]
    assert line.startswith(f"running on {socket.gethostname()} (pid {os.getpid()}, figures of ")
    written = st.live["tasks_done"]
    assert f"{written}/200 tasks written" in line and f"{st.tasks_done} of them staged (safe)" in line
    assert st.tasks_done < written          # nothing staged yet: the old view said 0/200 and nothing else
    runner.join(120)
    assert done.is_set()
    after = status(spec.run_dir)
    assert after.live is None and not (spec.run_dir / "live.json").exists() and after.tasks_done == 200


def test_clean_never_removes_the_only_copy(config, tmp_path, capsys):
    """`unidask clean` removes the staged shards and this machine's leftovers only once the merged
    database holds every task and passes the merge's checks again; before that, or with a damaged
    database, it removes nothing."""
    import shutil

    from conftest import run_main
    from unidask.store import shard

    spec = config(run={"count": 1000, "task_size": 100})
    unidask.run(spec, merge=False)
    staged = RunDir(spec.run_dir).staged_shards()
    code, out, _ = run_main("clean", spec.run_dir, capsys=capsys)
    assert code == 0 and "removed 0 file(s)" in out and "the staged shards stay: no merged database" in out
    assert RunDir(spec.run_dir).staged_shards() == staged

    merged = unidask.merge(spec.run_dir).out
    good = merged.read_bytes()
    con = sqlite3.connect(merged)
    con.execute("UPDATE unitaries SET data = zeroblob(length(data)) WHERE id = 500")   # a task's rows damaged
    con.commit()
    con.close()
    code, out, _ = run_main("clean", spec.run_dir, capsys=capsys)
    assert code == 0 and "removed 0 file(s)" in out and "task 5" in out, out
    assert RunDir(spec.run_dir).staged_shards() == staged

    merged.write_bytes(good)
    leftover = shard.run_local_dir(spec) / "node1-old-p999999.db"
    shutil.copy(staged[0], leftover)     # what a killed run of this machine left on local disk
    code, out, _ = run_main("clean", spec.run_dir, "--dry-run", capsys=capsys)
    assert code == 0 and f"would remove {leftover}" in out and leftover.exists()
    code, out, _ = run_main("clean", spec.run_dir, capsys=capsys)
    assert code == 0 and f"removed {len(staged) + 1} file(s)" in out, out
    assert not RunDir(spec.run_dir).staged_shards() and not leftover.exists()
    assert run_main("verify", merged, capsys=capsys)[0] == 0          # the database is the data now


def test_staged_bytes_grow_with_the_data_not_the_stage_outs(config, tmp_path):
    """Many stage-outs: each stages only the tasks written since the one before (a segment), so
    the bytes written to the run dir stay within 1.5x the data (a whole copy each time made them
    grow with data x stage-outs); the merged data is the same bytes as a run staged once."""
    # the run goes on, a task every quarter second per worker, until 10 stage-outs have staged a
    # segment each: an event, however loaded the machine
    hold = tmp_path / "hold"
    hold.touch()
    gen = {"kind": "plugin_generators:held_haar", "dim": 8, "hold": str(hold)}
    spec = config(run={"count": 60000, "task_size": 125}, generator=gen, storage={"stage_every": 0.2})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(unidask.run, spec)
        try:
            wait_for(lambda: len(RunDir(spec.run_dir).staged_shards()) >= 10 or running.done(), "10 segments staged")
        finally:
            hold.unlink()
        result = running.result(timeout=600)
    stages = RunDir(spec.run_dir).read_stages()
    written = sum(s["bytes"] for s in stages)
    data = 60000 * 8 * 8 * 16
    assert len([s for s in stages if s["path"]]) >= 10, len(stages)   # many stage-outs
    assert written <= 1.5 * data, (written / data, len(stages))
    once = config("once.toml", run={"count": 60000, "task_size": 125, "run_dir": str(tmp_path / "once")},
                  generator=gen, storage={"local_dir": str(tmp_path / "once-local")})
    assert merged_data(result.merged.out) == merged_data(unidask.run(once).merged.out)
    assert result.merged.duplicates == 0


def test_a_damaged_run_record_is_one_line_and_left_as_it_is(config, tmp_path, capsys):
    """run.json cut short, rewritten, or random bytes: every command that reads it says so in one
    line naming it, exits 2, and changes nothing; moved aside, a resume writes it again and keeps
    every staged shard."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    spec = config(run={"count": 1000, "task_size": 100})
    unidask.run(spec, merge=False)
    rd = RunDir(spec.run_dir)
    good = rd.record_path.read_bytes()
    shards = rd.staged_shards()
    cfg = tmp_path / "run.toml"
    structural = [b"", b"[]", b"null", b'"run"', b'{"spec": 5, "fingerprint": "x"}',
                  json.dumps({**json.loads(good), "spec": {"run": {"task_size": 100}}}).encode(),
                  json.dumps({**json.loads(good), "spec": {**json.loads(good)["spec"], "generator": 3}}).encode()]

    def refused(damaged: bytes) -> str:
        """What the commands say of ``damaged`` as run.json, once each has refused it."""
        rd.record_path.write_bytes(damaged)
        for args in (("status", spec.run_dir), ("merge", spec.run_dir), ("report", spec.run_dir, "-o",
                     tmp_path / "r.html"), ("run", cfg, "--resume"), ("clean", spec.run_dir)):
            code, _, err = run_main(*args, capsys=capsys)
            lines = err.splitlines()   # `run` says first what it was asked to run
            assert code == 2 and len(lines) == (2 if args[0] == "run" else 1), (args, damaged, err)
            assert lines[-1].startswith(f"unidask: error: {rd.record_path}: "), (args, damaged, err)
        assert rd.record_path.read_bytes() == damaged and rd.staged_shards() == shards
        assert not (tmp_path / "r.html").exists() and not rd.database("t").exists()
        return err

    for damaged in structural:
        assert "unreadable run record" in refused(damaged)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.integers(0, len(good) - 1).map(lambda n: good[:n]),
                     st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
                         lambda f: good[:f[0]] + bytes([f[1]]) + good[f[0] + 1:]),
                     st.binary(max_size=200)))
    def fuzzed(damaged: bytes) -> None:
        try:
            json.loads(damaged)["spec"]["run"]["task_size"]
            if json.loads(damaged) == json.loads(good):
                return                       # a byte of white space changed: still the record
        except (ValueError, KeyError, TypeError, IndexError):
            pass
        else:
            return                           # still a record, e.g. a changed value: not damage
        refused(damaged)
        tried.append(damaged)

    tried: list[bytes] = []
    fuzzed()
    assert len(tried) >= 15, tried
    rd.record_path.rename(tmp_path / "run.json.bad")
    result = unidask.run(spec, resume=True)
    assert result.merged.complete and result.written == 0
    again, before = json.loads(rd.record_path.read_bytes()), json.loads(good)
    again.pop("phases", None), before.pop("phases")   # where each invocation's time went: its own
    assert again.pop("created") > before.pop("created") and again == before


def test_a_damaged_run_lock_is_one_line_then_taken_over_when_stale(config, tmp_path, capsys):
    """RUN_DIR/lock holding anything (cut short, other JSON types, a `since` out of range): while it
    is fresh, `run` refuses in one line naming it and leaves it; once not refreshed for
    runlock.STALE seconds, a run takes it over and finishes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from unidask.store import runlock

    spec = config(run={"count": 1000, "task_size": 100})
    lock = RunDir(spec.run_dir).lock_path
    spec.run_dir.mkdir(parents=True)
    cfg = tmp_path / "run.toml"
    # no "job" (asked of SLURM: one that has ended frees the lock at once) and not this host (a pid
    # not running there frees it too): what is fuzzed here is a lock that may be alive
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                       st.text(max_size=8).filter(lambda t: t != socket.gethostname()))
    contents = st.one_of(
        st.binary(max_size=64),
        st.dictionaries(st.sampled_from(["host", "pid", "since", "token"]), values).map(
            lambda d: json.dumps(d).encode()),
        st.sampled_from([b"[]", b"null", b'{"since": 1e300}', b'{"since": "x"}', b'{"since": NaN}']))

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(contents)
    def refused(damaged: bytes) -> None:
        lock.write_bytes(damaged)
        code, _, err = run_main("run", cfg, capsys=capsys)
        last = err.splitlines()[-1]
        assert code == 2 and "Traceback" not in err, err
        assert last.startswith(f"unidask: error: {spec.run_dir}: another unidask run is using this run dir ("), err
        assert str(lock) in last and lock.read_bytes() == damaged

    refused()
    lock.write_bytes(b'{"since": "x", "pid": [1]}')
    old = time.time() - runlock.STALE - 60
    os.utime(lock, (old, old))
    code, _, err = run_main("run", cfg, capsys=capsys)
    assert code == 0 and "taking over the run lock of host ?, pid [1] (it was last refreshed" in err, err
    assert not lock.exists() and (spec.run_dir / "t.db").exists()


def test_a_task_size_far_above_the_count(config):
    """run.task_size = 10^15 for 2,000 unitaries: one task, whose slot of ids the checks must not
    walk chunk by chunk (they built ~3.8e9 chunks and were killed at 24 GB)."""
    spec = config(run={"count": 2000, "task_size": 10 ** 15})
    result = unidask.run(spec)
    assert result.merged.complete and result.merged.rows == 2000
    assert unidask.verify(result.merged.out).ok


def test_a_fifo_named_run_json_is_one_line_not_a_hang(tmp_path):
    """Reading a FIFO blocks until someone writes to it: status, merge and clean name it instead."""
    run_dir = tmp_path / "run"
    (run_dir / "shards").mkdir(parents=True, mode=0o700)
    os.mkfifo(run_dir / "run.json")
    for command in ("status", "merge", "clean"):
        r = subprocess.run([sys.executable, "-m", "unidask.cli", command, str(run_dir)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "run.json" in r.stderr and "FIFO" in r.stderr, (command, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr


def test_a_directory_where_the_merged_database_goes_is_refused_before_the_run(config, capsys):
    """RUN_DIR/NAME.db a directory: refused as the run starts, not after all of it generated."""
    spec = config()
    (spec.run_dir / "t.db").mkdir(parents=True)
    code, out, err = run_main("run", spec.source, capsys=capsys)
    assert code == 2 and "t.db: a directory, not a regular file" in err and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("unidask: error: "), err
    assert not (spec.run_dir / "shards").exists() or not any((spec.run_dir / "shards").iterdir())


def held_run(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`unidask run` in its own process group, its tasks held (a quarter second each, 400 tasks on
    2 workers) while a hold file exists; returns it, its config and the hold file."""
    hold = tmp_path / "hold"
    hold.touch()
    cfg = write_config(tmp_path / "held.toml", run={"count": 4000, "task_size": 10},
                       generator={"kind": "plugin_generators:held_haar", "dim": 2, "hold": str(hold)},
                       storage={"stage_every": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    p = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, cfg, hold


def wait_for_staged(run_dir: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has staged a shard (its lock, workers and stage-outs all going)."""
    end = time.monotonic() + timeout
    while not any((run_dir / "shards").glob("*.db")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < end, "no shard staged"
        time.sleep(0.1)


def test_a_stopped_driver_keeps_its_lock(tmp_path):
    """A driver stopped with Ctrl-Z (its whole process group, SIGSTOP) for longer than a lock's
    staleness: a --resume on the same host must not take the run over while its pid lives; once
    continued, the first run finishes alone."""
    p, cfg, hold = held_run(tmp_path)
    run_dir = tmp_path / "run"
    wait_for_staged(run_dir, p)
    os.killpg(p.pid, signal.SIGSTOP)
    try:
        old = time.time() - 10 * 60   # as if stopped for ten minutes: no refresh since
        os.utime(run_dir / "lock", (old, old))
        r = cli("run", cfg, "--resume")
        assert r.returncode == 2 and "another unidask run is using this run dir" in r.stderr, r.stderr
        assert f"pid {p.pid}" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    finally:
        os.killpg(p.pid, signal.SIGCONT)
        hold.unlink()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "merged" in out + err


def test_a_driver_whose_lock_is_damaged_stops_in_one_line(tmp_path):
    """Garbage written over RUN_DIR/lock mid-run: the driver no longer holds it, so it stops at its
    next look, everything finished staged, saying why in one line (it wrote on, and a later
    --resume took over and deleted its live shards). A --resume then finishes the run."""
    p, cfg, hold = held_run(tmp_path)
    run_dir = tmp_path / "run"
    try:
        wait_for_staged(run_dir, p)
        (run_dir / "lock").write_text("garbage\n")
        out, err = p.communicate(timeout=120)   # the lock is looked at every 10 s
    finally:
        hold.unlink(missing_ok=True)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 1 and f"{run_dir / 'lock'}: the run lock was changed by someone else" in last, err
    assert "Traceback" not in err
    (run_dir / "lock").unlink()
    r = cli("run", cfg, "--resume")
    assert r.returncode == 0, r.stderr


HOLD_LOCK = """
import sys
from pathlib import Path
from unidask.store.runlock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()   # until the test closes it
"""


def test_merge_respects_the_run_lock(tmp_path):
    """`unidask merge` while a run holds the run dir (here a real second process holding its lock)
    is refused in one line naming the holder, and merges once it is gone."""
    cfg = write_config(tmp_path / "c.toml", run={"count": 1000, "task_size": 250})
    assert cli("run", cfg, "--no-merge").returncode == 0
    lock = tmp_path / "run" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = cli("merge", tmp_path / "run")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"another unidask run is using this run dir (host {socket.gethostname()}, pid {holder.pid}" in r.stderr
        assert not (tmp_path / "run" / "t.db").exists()
    finally:
        holder.communicate("", timeout=60)
    code, out, shown = on_a_terminal("merge", tmp_path / "run")   # its bar in kB/MB/GB, no "MMB"
    assert code == 0 and out.startswith("merged 2 shard(s)"), out + shown
    assert re.search(r"merge: 100%.*[kMG]?B/s", shown) and "MMB" not in shown and "kMB" not in shown, shown
    assert not lock.exists()   # released


API_RUN = """
import sys
import unidask
result = unidask.run(unidask.load_config(sys.argv[1]))
print(result.merged.rows)
"""


def test_the_python_api_shows_unidask_and_quiets_dask(tmp_path):
    """`unidask.run()` from a script that configured no logging: unidask's lines on stderr as the
    CLI shows them, none of distributed's INFO lines; with logging configured, what it says."""
    cfg = write_config(tmp_path / "c.toml", run={"count": 1000, "task_size": 250})
    r = subprocess.run([sys.executable, "-c", API_RUN, str(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "1000\n", r.stdout + r.stderr
    assert "dashboard: http://127.0.0.1:" in r.stderr and " - INFO - " not in r.stderr, r.stderr
    configured = "import logging; logging.basicConfig(level=logging.INFO)\n" + API_RUN
    shutil.rmtree(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", configured, str(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "INFO:unidask.execute.driver:dashboard: http://" in r.stderr, r.stderr
