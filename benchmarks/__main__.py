"""``python -m benchmarks [--quick] [--json FILE]``: every comparison side by side in one process,
contenders alternating, at least 3 rounds; prints medians and ratios."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from unidask.core.errors import Stopped

from . import work

REPO = Path(__file__).resolve().parent.parent


class Bench:
    def __init__(self, quick: bool, rounds: int, base: Path):
        self.quick, self.rounds, self.base = quick, rounds, base
        self.rows: list[dict] = []
        self.pool: dict[int, ProcessPoolExecutor] = {}
        self.forkserver = multiprocessing.get_context("forkserver")
        self.forkserver.set_forkserver_preload(["benchmarks.work", "scipy.stats"])

    def fresh(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.base))

    checked = 0   # databases whose integrity_check passed: every one a section wrote

    def check(self, where: Path) -> None:
        """Every SQLite database under ``where`` (or ``where`` itself) through ``PRAGMA
        integrity_check``, before it is removed: a figure from a file SQLite cannot read is void."""
        for p in [where] if where.is_file() else sorted(where.rglob("*")):
            if not p.is_file() or p.is_symlink():
                continue
            with open(p, "rb") as f:
                if f.read(16) != b"SQLite format 3\0":
                    continue
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                result = con.execute("PRAGMA integrity_check").fetchall()
            finally:
                con.close()
            if result != [("ok",)]:
                raise SystemExit(f"benchmark void: {p} fails integrity_check: {result[:3]}")
            self.checked += 1

    def shared_db(self) -> Path:
        """The seed's one shared database, in WAL mode, its table made."""
        p = self.fresh("s") / "shared.db"
        con = sqlite3.connect(p)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE u(id INTEGER PRIMARY KEY, dim INTEGER, data BLOB)")
        con.close()
        return p

    def parallel(self, fn, procs: int, count: int, dim: int, path: str, task: int, fresh: bool = False) -> dict:
        """Run ``fn`` in ``procs`` processes at once; rate over the wall time of the slowest.

        ``fresh``: in new processes, as unidask's workers are each run. Processes that ran earlier
        sections have their heap grown and faulted in: measured, up to 30% faster on the short
        runs of --quick, which made the end-to-end ratios depend on which sections ran before.
        They fork from a server that imported what they need, so the clock holds no imports."""
        if fresh:
            pool = ProcessPoolExecutor(procs, mp_context=self.forkserver)
        else:
            pool = self.pool.setdefault(procs, ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")))
        start_at = time.time() + 0.2 + count * dim * dim * 2e-7     # after every process made its data
        futures = [pool.submit(fn, path, seed, count, dim, start_at, task) for seed in range(procs)]
        out = [f.result() for f in futures]
        if fresh:
            pool.shutdown()
        wall = max(o["end"] for o in out) - start_at
        return {"rate": procs * count / wall, "locked": sum(o.get("locked", 0) for o in out),
                "stall": max(o.get("stall", 0.0) for o in out)}

    def record(self, section: str, case: str, results: dict[str, list[dict]], baseline: str) -> None:
        base = statistics.median(r["rate"] for r in results[baseline])
        for name, rs in results.items():
            med = statistics.median(r["rate"] for r in rs)
            row = {"section": section, "case": case, "contender": name, "rate": med,
                   "ratio": med / base if base else None,
                   # the median of each round's ratio: the machine's drift over minutes cancels
                   "paired": statistics.median(r["rate"] / b["rate"] for r, b in zip(rs, results[baseline]))
                   if all(b["rate"] for b in results[baseline]) else None}
            if any("locked" in r and r["locked"] for r in rs) or name == "seed shared db":
                row["locked"] = sum(r.get("locked", 0) for r in rs)
                row["stall"] = max(r.get("stall", 0.0) for r in rs)
            if all("driver_ms" in r for r in rs):
                row["driver_ms"] = statistics.median(r["driver_ms"] for r in rs)
                row["driver_core"] = statistics.median(r["driver_core"] for r in rs)
                row["task_size"] = sorted({r["task_size"] for r in rs})
            self.rows.append(row)
            print(format_row(row), flush=True)

    def alternate(self, contenders: dict, section: str, case: str, baseline: str, rounds: int = 0
                  ) -> dict[str, list[dict]]:
        results: dict[str, list[dict]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(max(rounds, self.rounds)):
            # each round starts with the next contender: none always runs first (or after the same one)
            for name in names[r % len(names):] + names[:r % len(names)]:
                run = contenders[name]
                # no contender pays for the writeback of the one before: the thousands of small
                # files of file-per-unitary, flushed during the next round's unidask run, gave
                # 0.75x the bare loop at n=4, 2 workers, in one run of this section; 0.95x with this
                os.sync()
                results[name].append(run())
        self.record(section, case, results, baseline)
        return results

    # 1. write path
    def write_path(self) -> None:
        for dim in (4, 16, 32):
            task = work.TASK_SIZE[dim] // (10 if self.quick else 1)
            count = task * (2 if self.quick else 3)   # per process: ~0.6 s of work at tasks of 0.2 s
            txt = max(200, count // 250)
            for procs in (1, 2, 4):
                def run(fn, count=count, path=None, name="p"):
                    return self.parallel(fn, procs, count, dim, path or str(self.fresh(name) / "p"), task)
                def seed_():
                    return run(work.seed_shared_db, path=str(self.shared_db()))
                self.alternate({"unidask shard": lambda: run(work.unidask_shard),
                                "unidask shard, a row a matrix": lambda: run(work.unidask_rows_shard),
                                "unidask node shard": lambda: run(work.unidask_node_shard, path=str(self.fresh("n") / "node.db")),
                                "seed shared db": seed_,
                                "np.savetxt per file": lambda: run(work.savetxt_files, count=txt, path=str(self.fresh("t"))),
                                "raw sequential bytes": lambda: run(work.raw_bytes)},
                               "write", f"n={dim} procs={procs} task={task}", "unidask shard")
                self.clean()

    # 2. generation
    def generation(self) -> None:
        from scipy.stats import unitary_group

        from unidask.spec.generators.haar import haar

        for dim in (2, 4, 8, 16, 32, 64):
            count = max(200, (200_000 if not self.quick else 40_000) // (dim * dim) * 4)
            per_call = min(count, 2000 if self.quick else 5000)

            def timed(fn, n):
                t = time.perf_counter()
                fn(n)
                return {"rate": n / (time.perf_counter() - t)}

            rng = np.random.default_rng(0)
            self.alternate({
                "unidask haar": lambda: timed(lambda n: haar(rng, n, dim=dim), count),
                "scipy rvs per call": lambda: timed(lambda n: [unitary_group.rvs(dim, random_state=rng) for _ in range(n)], per_call),
                "scipy rvs size=": lambda: timed(lambda n: unitary_group.rvs(dim, size=n, random_state=rng), count),
            }, "generate", f"n={dim}", "unidask haar")

    # 3. end to end
    def run_unidask(self, count: int, dim: int, task: int | str, workers: int, shard_per: str = "process",
                    backups: bool = True, stop_one_after: float | None = None, nodes: int = 1,
                    stage_every: float = 300.0, shared: Path | None = None, merge: bool = False) -> dict:
        """One run; ``stop_one_after``: SIGSTOP one worker process that many seconds in, for good
        (a node in an NFS stall), and kill it at the end. ``nodes``: simulated nodes of
        ``workers`` each; ``shared``: the run dir under it (another filesystem: stage-outs copy).
        The result carries the bytes staged to the run dir over the data's. ``merge``: the rate
        is to one merged database, start to end, the merge's share beside it."""
        import threading

        import unidask
        from unidask.cost import sizing

        d = self.fresh("e")
        run_dir = Path(tempfile.mkdtemp(dir=shared)) / "run" if shared else d / "run"
        spec = sizing.resolve(unidask.load_config(None, data={
            "run": {"name": "bench", "count": count, "task_size": task, "run_dir": str(run_dir)},
            "generator": {"dim": dim},
            "storage": {"local_dir": str(d / "local"), "shard_per": shard_per, "stage_every": stage_every},
            "cluster": {"nodes": nodes, "workers": workers, "dashboard_address": "127.0.0.1:0", "backups": backups}}))
        stopped: list[psutil.Process] = []

        def stop_one() -> None:
            time.sleep(stop_one_after)
            for p in psutil.Process().children(recursive=True):
                if "spawn_main" in " ".join(p.cmdline()):
                    p.suspend()
                    stopped.append(p)
                    return

        if stop_one_after is not None:
            threading.Thread(target=stop_one, daemon=True).start()
        # the driver's process holds the local cluster's scheduler too: its own CPU per task is
        # what a SLURM job's first node spends beside its workers (issue 18: reserve a core?)
        own = psutil.Process()
        written = disk_written()   # synced first: the clock starts after
        before, start = sum(own.cpu_times()[:2]), time.monotonic()
        try:
            result = unidask.run(spec, merge=merge)
            wall = time.monotonic() - start
            rate = count / wall if merge else result.rate
            cpu = sum(own.cpu_times()[:2]) - before
            if merge:
                return {"rate": rate, "merge_share": result.merged.seconds / wall, "behind": result.merged.behind,
                        "start_share": result.start_seconds / wall,
                        "written_x": (disk_written() - written) / (count * dim * dim * 16)}
            staged = sum(r["bytes"] for r in unidask.RunDir(spec.run_dir).read_stages())
            return {"rate": rate, "driver_ms": 1000 * cpu / spec.n_tasks, "driver_core": cpu / (time.monotonic() - start),
                    "task_size": spec.task_size, "staged_x": staged / (count * dim * dim * 16)}
        finally:
            for p in stopped:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            self.check(d)
            shutil.rmtree(d, ignore_errors=True)   # only the rate is kept: free the disk for the next
            if shared:
                self.check(run_dir.parent)
                shutil.rmtree(run_dir.parent, ignore_errors=True)

    def run_bare(self, count: int, dim: int, task: int, workers: int) -> dict:
        return self.parallel(work.bare_loop, workers, count // workers, dim, str(self.fresh("b") / "p"), task,
                             fresh=True)

    def end_to_end(self) -> None:
        for dim in (4, 16):
            # ten tasks per worker at two workers; --quick: two, of half the size
            task = work.TASK_SIZE[dim] // (2 if self.quick else 1)
            count = task * (4 if self.quick else 20)
            txt = max(200, count // 200)
            for workers in (1, 2):
                def files_(): return self.parallel(work.file_per_unitary, workers, txt // workers, dim, str(self.fresh("f")), task)
                contenders = {"unidask run": lambda: self.run_unidask(count, dim, task, workers),
                              "unidask run, node shard": lambda: self.run_unidask(count, dim, task, workers, "node"),
                              "bare multiprocessing loop": lambda: self.run_bare(count, dim, task, workers),
                              "file per unitary": files_}
                if self.quick:   # each run starts a cluster: keep --quick under 2 minutes
                    del contenders["unidask run, node shard"]
                self.alternate(contenders, "end to end", f"n={dim} workers={workers} task={task}", "unidask run")
                self.clean()

    # 3e. time to one database: a run and its merge, start to end, against the seed's own script
    # (2 processes, batches of 100,000, into one shared WAL database with synchronous=OFF)
    def one_database(self) -> None:
        count, workers, batch = (200_000 if self.quick else 4_000_000), 2, 100_000

        def seed_():
            p = self.shared_db()
            written = disk_written()
            r = self.parallel(work.seed_script, workers, count // workers, 4, str(p), batch, fresh=True)
            r["written_x"] = (disk_written() - written) / (count * 4 * 4 * 16)   # once all it left dirty is written
            self.check(p.parent)
            shutil.rmtree(p.parent)
            return r

        ours = "unidask run + merge, task_size auto"
        results = self.alternate({ours: lambda: self.run_unidask(count, 4, "auto", workers, merge=True),
                                  "seed's script": seed_},
                                 "one database", f"{count / 1e6:g}M U(4), {workers} processes", ours)
        assert all(r["behind"] for r in results[ours]), "the database was not built behind the generation"
        for case, key, name in (("% of unidask's time", "merge_share", "merge after the last task"),
                                ("% of unidask's time", "start_share", "start: calibration, cluster"),
                                ("bytes written / data", "written_x", "unidask run + merge"),
                                ("bytes written / data", "written_x", "seed's script")):
            rs = results["seed's script" if name == "seed's script" else ours]
            value = statistics.median(r[key] for r in rs)
            row = {"section": "one database", "case": case, "contender": name,
                   "rate": 100 * value if case.startswith("%") else value, "ratio": None}
            self.rows.append(row)
            print(format_row(row), flush=True)
        self.clean()

    # 3a. what periodic stage-outs cost a node's generation: a run several times longer than
    # the interval, against the same run staged only at the end (2 simulated nodes of 1 worker)
    # With the run dir on this disk a stage-out is a rename; on another filesystem (a loop-mounted
    # ext4 image on the same disk, where root can make one: shared storage with no bandwidth of its
    # own, the worst case) it is a copy, on each worker's background thread.
    def staging(self) -> None:
        # the image beside the benchmark's directory: clean() empties that one
        with other_filesystem(self.base.with_name(f"{self.base.name}-other"), 40 << 30) as shared:
            for dim, seconds in ((4, 40), (16, 30)):
                task = work.TASK_SIZE[dim] * 2
                rate = {4: 450_000, 16: 50_000}[dim]   # about this machine's, 2 workers: runs of about ``seconds``
                count = task * (4 if self.quick else round(rate * seconds / task))
                every = (0.5,) if self.quick else (10, 3)

                def run(every: float, shared: Path | None = None) -> dict:
                    return self.run_unidask(count, dim, task, 1, nodes=2, stage_every=every, shared=shared)

                contenders = {"staged at the end": lambda: run(3600)}
                contenders.update({f"stage_every = {e}": lambda e=e: run(e) for e in every})
                if shared is not None:
                    contenders.update({"other fs, staged at the end": lambda: run(3600, shared),
                                       f"other fs, stage_every = {every[0]}": lambda: run(every[0], shared)})
                self.staging_case(contenders, dim, count)
        self.clean()

    def staging_case(self, contenders: dict, dim: int, count: int) -> None:
        results = self.alternate(contenders, "staging", f"n={dim} 2 nodes x 1 count={count:,}", "staged at the end")
        for name, rs in results.items():
            row = {"section": "staged/data", "case": f"n={dim} bytes to the run dir", "contender": name,
                   "rate": statistics.median(r["staged_x"] for r in rs), "ratio": None}
            self.rows.append(row)
            print(format_row(row), flush=True)

    # 3b. what the task size costs: Dask spends a few ms of CPU per task, the bare loop nothing
    def task_size(self) -> None:
        dim, workers = 4, 2
        count = 100_000 if self.quick else 1_000_000
        for task in (2_000, 25_000) if self.quick else (2_000, 10_000, 50_000, 250_000):
            self.alternate({
                "unidask run": lambda: self.run_unidask(count, dim, task, workers),
                "bare multiprocessing loop": lambda: self.run_bare(count, dim, task, workers),
            }, "task size", f"n={dim} workers={workers} task={task}", "unidask run")
            self.clean()

    # 3c. the one-of-a-kind parts with many workers: the driver's and scheduler's CPU per task
    # (tasks of one U(2): nothing but that cost), and task_size = "auto" against fixed sizes
    def scheduler(self) -> None:
        tasks = 200 if self.quick else 3000
        for workers in (2, 4) if self.quick else (2, 16, 32):   # --quick: only that it works
            self.alternate({"unidask run": lambda: self.run_unidask(tasks, 2, 1, workers)},
                           "scheduler", f"empty tasks workers={workers}", "unidask run")
            self.clean()

    def auto_size(self) -> None:
        count, workers = (200_000, 4) if self.quick else (2_000_000, 32)
        contenders = {"task_size auto": lambda: self.run_unidask(count, 4, "auto", workers)}
        for task in (20_000,) if self.quick else (5_000, 20_000, 50_000, 100_000, 200_000):
            contenders[f"task_size {task}"] = lambda task=task: self.run_unidask(count, 4, task, workers)
        # a run here varies by about 10%: more rounds than elsewhere, for medians that tell apart
        results = self.alternate(contenders, "auto size", f"n=4 workers={workers} count={count}",
                                 "task_size auto", rounds=3 if self.quick else 5)
        # then auto against the fastest fixed size of those, in pairs: the fastest of five noisy
        # medians is lucky as well as fast
        best = max((name for name in contenders if name != "task_size auto"),
                   key=lambda name: statistics.median(r["rate"] for r in results[name]))
        self.alternate({"task_size auto": contenders["task_size auto"], best: contenders[best]}, "auto size",
                       "paired with the fastest fixed", "task_size auto", rounds=3 if self.quick else 8)
        self.clean()

    # 3d. backup tasks: what they cost a healthy run, what they save with one stopped worker
    def stragglers(self) -> None:
        dim, workers = 16, 2
        task = work.TASK_SIZE[dim] // (2 if self.quick else 1)
        count = task * (4 if self.quick else 20)
        self.alternate({"unidask run": lambda: self.run_unidask(count, dim, task, workers),
                        "backups off": lambda: self.run_unidask(count, dim, task, workers, backups=False)},
                       "stragglers", f"healthy, n={dim} workers={workers} task={task}", "unidask run")
        if not self.quick:   # each such run waits out a stopped worker: tens of seconds
            self.alternate({"unidask run": lambda: self.run_unidask(count, dim, task, workers, stop_one_after=1.0),
                            "backups off": lambda: self.run_unidask(count, dim, task, workers, backups=False,
                                                                    stop_one_after=1.0)},
                           "stragglers", f"one of {workers} workers stopped 1 s in", "unidask run")
        self.clean()

    # 3e. `unidask plan` against the run it plans: its duration of generation over the run's
    # (first task started to last finished), and its merged bytes over the database's
    def plan(self) -> None:
        import unidask
        from unidask.cost.estimate import estimate
        from unidask.views.report import task_rows

        circuits = {"kind": "circuit", "qubits": 3, "depth": 10, "gate_set": ["h", "s", "t", "cx"]}
        for name, generator, count, task in (("circuits 3q depth 10", circuits, 4000, 100),
                                             ("U(4)", {"dim": 4}, 200_000 if self.quick else 2_000_000, 20_000)):
            walls, sizes = [], []
            for _ in range(1 if self.quick else self.rounds):
                d = self.fresh("plan")
                spec = unidask.load_config(None, data={
                    "run": {"name": "bench", "count": count, "task_size": task, "run_dir": str(d / "run")},
                    "generator": generator, "storage": {"local_dir": str(d / "local")},
                    "cluster": {"dashboard_address": "127.0.0.1:0"}})
                plan = estimate(spec).to_dict()
                result = unidask.run(spec)
                rows = task_rows(d / "run")
                walls.append(plan["wall_seconds"] / (max(r[3] for r in rows) - min(r[2] for r in rows)))
                sizes.append(plan["data_bytes"] / result.merged.out.stat().st_size)
                self.clean()
            for what, ratios in (("wall plan/run", walls), ("bytes plan/run", sizes)):
                row = {"section": "plan", "case": f"{name} count={count:,}", "contender": what,
                       "rate": statistics.median(ratios), "ratio": None}
                self.rows.append(row)
                print(format_row(row), flush=True)

    # 4. merge
    def merge(self) -> None:
        import unidask
        from unidask.store import db
        from unidask.core import files

        # n = 4 and 16: written page by page; n = 64 (a row larger than a page's local payload)
        # and circuits (rows with meta): by SQLite
        full = 160_000 * 16 * 16 * 16   # bytes of data, the same for each case
        cases = {4: {"dim": 4}, 16: {"dim": 16}, 64: {"dim": 64},
                 "circuits": {"kind": "circuit", "qubits": 3, "depth": 10}}
        for dim, generator in cases.items():
            d = self.fresh("m")
            n = generator.get("dim", 8)
            count = full // (16 if self.quick else 1) // (n * n * 16)
            if "kind" in generator:   # a circuit's generation is slow: fewer rows, the same per-row work
                count //= 16
            spec = unidask.load_config(None, data={
                "run": {"name": "m", "count": count, "task_size": max(1, min(1000, count // 40)),
                        "run_dir": str(d / "run")},
                "generator": generator, "storage": {"local_dir": str(d / "local")},
                "cluster": {"nodes": 4, "workers": 1, "dashboard_address": "127.0.0.1:0"}})
            unidask.run(spec, merge=False)
            shards = sorted((d / "run" / "shards").glob("*.db"))
            size = sum(p.stat().st_size for p in shards)

            def merge_():
                out = d / "out.db"
                t = time.perf_counter()
                unidask.merge(d / "run", out)   # fsyncs its output
                r = {"rate": size / (time.perf_counter() - t) / 1e6, "proof": proof_seconds(out)}
                self.check(out)
                out.unlink()
                return r

            def cp_(sync=False):
                target = d / "copies"
                target.mkdir(exist_ok=True)
                t = time.perf_counter()
                subprocess.run(["cp", *map(str, shards), str(target)], check=True)
                if sync:   # as durable as the merge's output
                    subprocess.run(["sync", *map(str, target.iterdir())], check=True)
                r = {"rate": size / (time.perf_counter() - t) / 1e6}
                shutil.rmtree(target)
                return r

            def sqlite_copy():
                """SQLite's fastest row copy: each shard's rows appended whole into a new database
                (its transfer path, no row decoding), then synced; no checks, no task order"""
                target = d / "copies"
                target.mkdir(exist_ok=True)
                t = time.perf_counter()
                for p in shards:
                    con = sqlite3.connect(target / p.name, isolation_level=None)
                    con.execute(f"PRAGMA page_size = {page_size}")
                    con.execute("PRAGMA journal_mode = OFF")
                    con.executescript(db.SCHEMA)
                    con.execute("ATTACH DATABASE ? AS s", (f"file:{p}?mode=ro&immutable=1",))
                    con.execute("INSERT INTO unitaries SELECT * FROM s.unitaries")
                    con.close()
                    files.fsync_path(target / p.name)
                r = {"rate": size / (time.perf_counter() - t) / 1e6}
                shutil.rmtree(target)
                return r

            page_size = db.page_size(shards[0])
            case = f"{'n=' * (n == dim)}{dim}, 4 shards, {size / 1e6:.0f} MB"
            results = self.alternate({"unidask merge": merge_, "cp": cp_, "cp, then sync": lambda: cp_(True),
                                      "SQLite row copy, then sync": sqlite_copy}, "merge MB/s", case, "unidask merge")
            proofs = [r["proof"] for r in results["unidask merge"] if r["proof"] is not None]
            if proofs:   # the merge's proof of its table (inside its time): its share of the merge
                share = statistics.median(p * r["rate"] * 1e6 / size for p, r in zip(proofs, results["unidask merge"]))
                row = {"section": "merge MB/s", "case": case, "contender": "proof's share of the merge",
                       "rate": share, "ratio": None}
                self.rows.append(row)
                print(format_row(row), flush=True)
            self.clean()

    # 4c. the merge spread over hosts: cluster/hosts.sh's 3 hosts (network namespaces of this one
    # machine), the run dir on the shared network filesystem they each mount (sshfs); the merge
    # run on node1 alone (threads) against the same with Dask workers on the 3 hosts. Root only:
    # python -m benchmarks --only hosts_merge
    def hosts_merge(self) -> None:
        base = self.fresh("h")
        env = {**os.environ, "UNIDASK_SLURM_DIR": str(base / "slurm"), "UNIDASK_SLURM_HOSTS": "1",
               "UNIDASK_HOSTS_DIR": str(base / "slurm" / "hosts"), "UNIDASK_SLURM_SHARED": str(base / "shared"),
               "PYTHONPATH": str(REPO)}
        r = subprocess.run([str(REPO / "cluster" / "start.sh"), "3", "2"], env=env, capture_output=True, text=True)
        if r.returncode:
            print(f"hosts_merge: skipped, the hosts cannot start: {r.stderr.strip()[-300:]}", flush=True)
            return
        procs: list[subprocess.Popen] = []
        try:
            shared = base / "shared"
            count = 200_000 if self.quick else 800_000
            subprocess.run([sys.executable, "-m", "benchmarks.work", "hosts_data", str(shared / "run"), str(count),
                            str(base / "local")], env=env, cwd=REPO, check=True)
            size = sum(p.stat().st_size for p in (shared / "run" / "shards").glob("*.db"))

            def on(k: int, *cmd: str, **kw) -> subprocess.Popen:
                return subprocess.Popen([str(REPO / "cluster" / "hosts.sh"), "exec", str(k), *cmd], env=env,
                                        cwd=REPO, **kw)

            procs.append(on(1, sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "10.77.0.11",
                            "--port", "8786", "--no-dashboard", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for k in (1, 2, 3):
                procs.append(on(k, sys.executable, "-m", "distributed.cli.dask_worker", "tcp://10.77.0.11:8786",
                                "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--local-directory",
                                f"/tmp/unidask-bench-worker{k}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

            def merge_(hosts: int):
                p = on(1, sys.executable, "-m", "benchmarks.work", "hosts_merge", str(shared / "run"),
                       str(shared / "out.db"), "tcp://10.77.0.11:8786" if hosts > 1 else "", str(hosts),
                       stdout=subprocess.PIPE, text=True)
                seconds = float(p.communicate(timeout=600)[0].split()[-1])
                assert p.returncode == 0
                return {"rate": size / seconds / 1e6}

            self.alternate({"unidask merge on node1, threads": lambda: merge_(1),
                            "unidask merge on 3 hosts' Dask workers": lambda: merge_(3)},
                           "merge MB/s", f"n=4, 3 hosts, sshfs, {size / 1e6:.0f} MB", "unidask merge on node1, threads")
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            subprocess.run([str(REPO / "cluster" / "stop.sh")], env=env, capture_output=True)
            self.clean()

    # 4b. many shards: the merge of a run's deltas (a stage-out every 1, 4 or 16 tasks) against
    # the same data in 4 shards: what a merge pays per file
    def shards(self) -> None:
        import unidask
        from unidask import RunDir
        from unidask.cost import estimate
        from unidask.execute import worker

        tasks, task_size, dim = (96, 200, 4) if self.quick else (512, 2000, 4)
        layouts = {"4 shards": tasks // 4, **{f"segments of {k} task{'s' * (k > 1)}": k for k in (16, 4, 1)}}
        runs, staged = {}, {}
        for name, every in layouts.items():   # a segment per stage-out
            d = self.fresh(f"s{every}")
            spec = unidask.load_config(None, data={
                "run": {"name": "s", "count": tasks * task_size, "task_size": task_size, "run_dir": str(d / "run")},
                "generator": {"dim": dim}, "storage": {"local_dir": str(d / "local")},
                "cluster": {"nodes": 1, "workers": 1}})
            RunDir(spec.run_dir).prepare(spec, resume=False)
            os.environ["UNIDASK_NODE"] = "n"
            stages = []
            for t in range(tasks):
                worker.generate_task(spec, t, "a")
                if (t + 1) % every == 0:
                    stages.append(worker.stage_out(spec, "a", final=t + 1 == tasks))
            runs[name], staged[name] = d, stages
        # a stage-out's cost to the worker: its segment sealed and renamed into the run dir
        for name, stages in staged.items():
            for kind, some in (("first", stages[:1]), ("later", stages[1:])):
                row = {"section": "stage-out ms", "case": f"n={dim}, {name}",
                       "contender": f"{kind}, {statistics.median(r['bytes'] for r in some) / 1e6:.1f} MB",
                       "rate": 1e3 * statistics.median(r["seconds"] for r in some), "ratio": None}
                self.rows.append(row)
                print(format_row(row), flush=True)
        files = {name: sorted((d / "run" / "shards").glob("*.db")) for name, d in runs.items()}
        size = sum(p.stat().st_size for p in files["4 shards"])

        def merge_(d):
            out = d / "out.db"
            t = time.perf_counter()
            unidask.merge(d / "run", out)
            r = {"rate": size / (time.perf_counter() - t) / 1e6}
            self.check(out)
            out.unlink()
            return r

        contenders = {f"unidask merge, {name}: {len(files[name])} files, "
                      f"{sum(p.stat().st_size for p in files[name]) / len(files[name]) / 1e6:.1f} MB each":
                      (lambda d=d: merge_(d)) for name, d in runs.items()}
        case = f"n={dim}, the same {size / 1e6:.0f} MB"
        results = self.alternate(contenders, "merge MB/s", case, next(iter(contenders)))
        # what unidask plan expects of each (bytes at MERGE_BYTES_S, MERGE_FILE_S a file), the
        # ratio against that layout's measured merge
        for contender, name in zip(contenders, runs):
            rate = size / 1e6 / (size / estimate.MERGE_BYTES_S + len(files[name]) * estimate.MERGE_FILE_S)
            row = {"section": "merge MB/s", "case": case, "contender": f"plan's estimate, {len(files[name])} files",
                   "rate": rate, "ratio": rate / statistics.median(r["rate"] for r in results[contender])}
            self.rows.append(row)
            print(format_row(row), flush=True)
        self.clean()

    # 6. reading a dataset back, as training reads it
    def read(self) -> None:
        import unidask

        d = self.fresh("r")
        count = 200_000 if self.quick else 2_000_000
        spec = unidask.load_config(None, data={
            "run": {"name": "r", "count": count, "task_size": 10_000, "run_dir": str(d / "run")},
            "generator": {"dim": 4}, "storage": {"local_dir": str(d / "local")},
            "cluster": {"nodes": 2, "workers": 1, "dashboard_address": "127.0.0.1:0"}})
        unidask.run(spec)
        db_path = unidask.RunDir(d / "run").database("r")
        npy = d / "r.npy"
        unidask.export(db_path, "npy", npy)
        ds = unidask.Dataset(db_path)
        minibatches = np.random.default_rng(0).integers(0, count, (400, 256))
        mapped = np.load(npy, mmap_mode="r")

        def scan_unidask():
            t, n = time.perf_counter(), 0
            for _, batch in ds.batches(100_000):
                n += len(batch)
            return {"rate": n / (time.perf_counter() - t)}

        def scan_npy():
            t = time.perf_counter()
            n = len(np.load(npy))
            return {"rate": n / (time.perf_counter() - t)}

        def random_unidask():
            t = time.perf_counter()
            for ids in minibatches:
                ds[ids]
            return {"rate": len(minibatches) / (time.perf_counter() - t)}

        def random_npy():
            t = time.perf_counter()
            for ids in minibatches:
                mapped[ids]
            return {"rate": len(minibatches) / (time.perf_counter() - t)}

        # HDF5 exports, read with plain h5py (its fancy reads want sorted distinct ids): chunks of
        # 64 KiB (the export's default) and of about 1 MiB (its default before)
        import h5py

        h5s = {}
        for label, rows in (("64 KiB", None), ("1 MiB", 4096)):
            unidask.export(db_path, "h5", d / f"r-{rows}.h5", chunk_rows=rows)
            h5s[label] = h5py.File(d / f"r-{rows}.h5", "r")["unitaries"]
        sorted_batches = [np.unique(ids) for ids in minibatches]

        def random_h5(data):
            def read():
                t = time.perf_counter()
                for ids in sorted_batches:
                    data[ids]
                return {"rate": len(sorted_batches) / (time.perf_counter() - t)}
            return read

        case = f"{count / 1e6:g}M U(4), {npy.stat().st_size / 1e6:.0f} MB"
        # one epoch of each first, untimed, as a training loop's later epochs find them: the page
        # cache warm for both, and every leaf the minibatches touch checked once (README, The
        # database format: a one-time cost, measured here apart)
        t = time.perf_counter()
        for ids in minibatches:
            ds[ids]
        first = time.perf_counter() - t
        for ids in minibatches:
            mapped[ids]
        row = {"section": "read 256/s", "case": case + ", random ids", "contender": "unidask ds[ids], first epoch",
               "rate": len(minibatches) / first, "ratio": None}
        self.rows.append(row)
        print(format_row(row), flush=True)
        self.alternate({"unidask Dataset.batches": scan_unidask, "np.load of the .npy": scan_npy},
                       "read scan", case, "unidask Dataset.batches")
        self.alternate({"unidask ds[ids]": random_unidask, "memory-mapped .npy": random_npy,
                        **{f"h5py, chunks of {label}": random_h5(data) for label, data in h5s.items()}},
                       "read 256/s", case + ", random ids", "unidask ds[ids]")
        for data in h5s.values():
            data.file.close()
        ds.close()
        mapped = None   # its map closed before the files go
        self.clean()

    # 5. memory
    def memory(self) -> None:
        d = self.fresh("mem")
        cfg = d / "big.toml"
        cfg.write_text(f'[run]\nname = "big"\ncount = 100_000_000\ntask_size = 10_000\nrun_dir = "{d}/run"\n'
                       f'[generator]\ndim = 2\n[storage]\nlocal_dir = "{d}/local"\n'
                       '[cluster]\nnodes = 1\nworkers = 2\ndashboard_address = "127.0.0.1:0"\n')
        with open(d / "stderr", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "unidask.cli", "run", str(cfg)],
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        driver, workers = 0, 0
        end = time.monotonic() + (8 if self.quick else 40)
        ps = psutil.Process(proc.pid)
        while time.monotonic() < end and proc.poll() is None:
            try:
                driver = max(driver, ps.memory_info().rss)
                for c in ps.children(recursive=True):
                    workers = max(workers, c.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)   # as SLURM would before the walltime: stage out, stop
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the driver and its workers
            raise RuntimeError("unidask run did not stop within 120 s of SIGUSR1") from None
        if proc.returncode != Stopped.exit_code:
            raise RuntimeError(f"unidask run exited {proc.returncode} on SIGUSR1, not {Stopped.exit_code}: "
                               + (d / "stderr").read_text()[-2000:])
        for name, value in (("driver peak RSS, plan of 1e8 in tasks of 1e4", driver),
                            ("worker peak RSS, tasks of 1e4 x 2x2", workers)):
            row = {"section": "memory MB", "case": name, "contender": "unidask", "rate": value / 1e6, "ratio": None}
            self.rows.append(row)
            print(format_row(row), flush=True)
        self.clean()

    def clean(self) -> None:
        for p in self.base.iterdir():
            self.check(p)
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        for pool in self.pool.values():
            pool.shutdown()


def disk_written(where: Path | None = None) -> int:
    """Bytes written to the disk that holds ``where`` (default: this benchmark's temp dir) since it
    started, once every dirty page is written (``os.sync``; outside the timed part): the disk's own
    count (``/sys/dev/block/MAJOR:MINOR/stat``, sectors written), which every process's writes and
    the kernel's writeback reach alike."""
    os.sync()
    st = os.stat(where or os.environ.get("UNIDASK_BENCH_DIR", "/var/tmp"))
    stat = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    return int(stat.read_text().split()[6]) * 512 if stat.exists() else 0


def proof_seconds(out: Path) -> float | None:
    """Seconds of the merge's proof of the table it wrote (``pageread.prove``), run again on its
    output; None where the merge was SQLite's (no page layout)."""
    from unidask.store import db, pageread, pages

    con = db.connect_readonly(out)
    try:
        layout = pages.Layout.from_meta(db.read_meta(con))
        root = con.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'unitaries'").fetchone()[0]
        ids = np.array([t * int(json.loads(db.read_meta(con)["spec"])["run"]["task_size"])
                        for (t,) in con.execute("SELECT task FROM tasks ORDER BY task")])
        counts = np.array([c for (c,) in con.execute("SELECT count FROM tasks ORDER BY task")])
    finally:
        con.close()
    if layout is None:
        return None
    starts = np.concatenate(([0], np.cumsum(counts)))

    def id_of(rows: np.ndarray) -> np.ndarray:
        task = np.searchsorted(starts, rows, "right") - 1
        return ids[task] + rows - starts[task]

    t = time.perf_counter()
    pageread.prove(out, layout, root, id_of)
    return time.perf_counter() - t


@contextlib.contextmanager
def other_filesystem(base: Path, size: int):
    """A filesystem of its own (an ext4 image, loop-mounted) under ``base``; None where this
    process cannot make one (not root, no mkfs.ext4)."""
    image, mnt = base / "other.img", base / "other"
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        yield None
        return
    mnt.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                                                      capture_output=True).returncode == 0
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)])
        shutil.rmtree(base, ignore_errors=True)


def format_row(r: dict) -> str:
    ratio = f"{r['ratio']:6.2f}x" if r.get("ratio") is not None else "       "
    if r.get("paired") is not None and r["paired"] != 1.0:
        ratio += f" (paired {r['paired']:.2f}x)"
    extra = f"  locked {r['locked']}, longest stall {r['stall']:.2f} s" if "locked" in r else ""
    if "driver_ms" in r:
        extra += (f"  driver+scheduler {r['driver_ms']:.1f} ms CPU/task ({r['driver_core']:.0%} of a core), "
                  f"task_size {'/'.join(map(str, r['task_size']))}")
    return f"{r['section']:<11} {r['case']:<26} {r['contender']:<27} {r['rate']:>13,.1f}  {ratio}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes: about 2.5 minutes on 2 cores")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--only", nargs="*", default=["write", "generation", "end_to_end", "one_database", "staging", "task_size", "scheduler", "auto_size", "stragglers", "plan",
                                                  "merge", "shards", "memory", "read"])
    args = ap.parse_args()
    # one BLAS thread everywhere, as in a Dask worker: a bare loop must not win by using more cores
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    logging.getLogger("distributed").setLevel(logging.WARNING)
    base = Path(tempfile.mkdtemp(prefix="unidask-bench-", dir=os.environ.get("UNIDASK_BENCH_DIR", "/var/tmp")))
    bench = Bench(args.quick, max(3, args.rounds), base)
    print(f"unidask benchmarks on {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, SQLite {sqlite3.sqlite_version}; medians of {bench.rounds} rounds; "
          "rates in unitaries/s unless the section says otherwise; ratio = contender / unidask", flush=True)
    print(f"{'section':<11} {'case':<26} {'contender':<27} {'median':>13}  ratio")
    start = time.monotonic()
    try:
        for name in args.only:
            t = time.monotonic()
            getattr(bench, {"write": "write_path", "generation": "generation"}.get(name, name))()
            print(f"({name}: {time.monotonic() - t:.0f} s)", flush=True)
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"done in {time.monotonic() - start:.0f} s; {bench.checked} database(s) written, each passed "
          "PRAGMA integrity_check")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "cores": os.cpu_count(),
                                         "quick": args.quick, "rows": bench.rows}, indent=2))


if __name__ == "__main__":
    main()
