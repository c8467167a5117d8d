"""Merge: check every staged shard, then combine them into one database built beside the target
and renamed into place when complete.

Staged shards never change, so they are read read-only and immutable (no locks on the network
filesystem), with ``trusted_schema`` off and a check that nothing in them is a view or trigger.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import plan, shard
from .errors import InputError, RunError
from .progress import Progress

ATTACH_BATCH = 8  # SQLite attaches at most 10 databases by default
COLUMNS = {"meta": ["key", "value"],
           "unitaries": ["id", "task", "idx", "dim", "data", "meta"],
           "tasks": ["task", "seed", "count", "node", "worker", "started", "finished", "checksum"]}


class BadShard(InputError):
    """A staged shard that must not be merged; the message names the file and the reason."""


@dataclass
class MergeReport:
    out: Path
    expected_tasks: int
    shards: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    tasks: int = 0
    duplicates: int = 0          # tasks found in more than one shard, with identical data
    missing: list[int] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        rate = self.bytes_read / self.seconds / 1e6 if self.seconds else 0.0
        text = (f"merged {len(self.shards)} shard(s) into {self.out}: {self.rows:,} unitaries, "
                f"{self.tasks}/{self.expected_tasks} tasks, {rate:,.0f} MB/s")
        if self.duplicates:
            text += f", {self.duplicates} duplicate task(s) kept once"
        for path, reason in self.rejected:
            text += f"\nrejected {path}: {reason}"
        if self.missing:
            text += f"\nincomplete: {len(self.missing)} task(s) missing: {plan.ranges(self.missing)}"
        return text


def check_shard(path: Path, fingerprint: str) -> None:
    """Raise :class:`BadShard` unless ``path`` is a whole, intact shard of this run."""
    try:
        con = shard.connect_readonly(path)
    except sqlite3.Error as e:
        raise BadShard(f"{path}: cannot open ({e})") from None
    try:
        if (ok := con.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
            raise BadShard(f"{path}: damaged ({ok})")
        objects = con.execute("SELECT type, name FROM sqlite_master").fetchall()
        active = [f"{t} {n}" for t, n in objects if t in ("view", "trigger")]
        active += [f"virtual table {n}" for t, n in objects if t == "table" and n in COLUMNS and
                   con.execute("SELECT sql FROM sqlite_master WHERE name = ?", (n,)).fetchone()[0]
                   .upper().startswith("CREATE VIRTUAL")]
        if active:
            raise BadShard(f"{path}: holds {', '.join(active)}; refused, nothing in a shard may run")
        for table, columns in COLUMNS.items():
            found = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            if found != columns:
                raise BadShard(f"{path}: not a unidask shard (table {table!r} "
                               f"{'missing' if not found else 'has columns ' + ', '.join(found)})")
        meta = shard.read_meta(con)
        version = meta.get("schema_version", "")
        if not version.isdigit() or int(version) > shard.SCHEMA_VERSION:
            raise BadShard(f"{path}: schema_version {version!r} is newer than this unidask reads "
                           f"({shard.SCHEMA_VERSION}); upgrade unidask")
        if meta.get("fingerprint") != fingerprint:
            raise BadShard(f"{path}: belongs to another run (fingerprint {meta.get('fingerprint')}, "
                           f"this run's is {fingerprint})")
    except sqlite3.DatabaseError as e:
        raise BadShard(f"{path}: not a readable SQLite database ({e})") from None
    finally:
        con.close()


def merge(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, append: bool = False,
          skip_bad: bool = False, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
          ) -> MergeReport:
    """Merge the staged shards of ``run_dir`` into ``out`` (default ``RUN_DIR/NAME.db``).

    ``append`` adds to an existing ``out`` instead of rebuilding it; ``skip_bad`` merges the good
    shards and lists the rejected ones instead of refusing the merge.
    """
    run_dir = Path(run_dir)
    record = plan.load_run(run_dir)
    spec = record["spec"]
    task_size = spec["run"]["task_size"]
    expected = -(-spec["run"]["count"] // task_size)
    out = Path(out) if out is not None else run_dir / f"{spec['run']['name']}.db"
    paths = plan.staged_shards(run_dir)
    if not paths:
        raise InputError(f"{plan.shard_dir(run_dir)}: no staged shards to merge")
    report = MergeReport(out, expected)
    good = []
    for p in paths:
        try:
            check_shard(p, record["fingerprint"])
            good.append(p)
        except BadShard as e:
            if not skip_bad:
                raise
            report.rejected.append((str(p), str(e).removeprefix(f"{p}: ")))
    if not good:
        raise InputError(f"{run_dir}: no shard could be merged")

    start = time.monotonic()
    tmp = shard.temp_name(out)
    shard.remove_stale_temps(out)
    try:
        con = _open_target(tmp, out if append and out.exists() else None, record)
        try:
            progress = Progress(sum(p.stat().st_size for p in good), unit="MB", desc="merge",
                                scale=1e-6)
            for i in range(0, len(good), ATTACH_BATCH):
                batch = good[i:i + ATTACH_BATCH]
                for j, p in enumerate(batch):
                    con.execute(f"ATTACH DATABASE ? AS s{j}", (f"file:{p.absolute()}?mode=ro&immutable=1",))
                for j, p in enumerate(batch):
                    try:
                        report.duplicates += _merge_one(con, f"s{j}", p)
                        report.shards.append(str(p))
                    except BadShard as e:
                        if not skip_bad:
                            raise
                        report.rejected.append((str(p), str(e).removeprefix(f"{p}: ")))
                    progress.update(p.stat().st_size)
                for j in range(len(batch)):
                    con.execute(f"DETACH DATABASE s{j}")
            progress.close()
            report.rows = con.execute("SELECT count(*) FROM unitaries").fetchone()[0]
            done = {t for (t,) in con.execute("SELECT task FROM tasks")}
            report.tasks = len(done)
            report.missing = [t for t in range(expected) if t not in done]
            con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            [("rows", str(report.rows)), ("tasks", str(report.tasks))])
            con.execute("PRAGMA journal_mode = DELETE")
        finally:
            con.close()
        shard.fsync_path(tmp)
        os.replace(tmp, out)
        shard.fsync_path(out.parent)
    except sqlite3.Error as e:
        raise RunError(f"merge into {out} failed: {e}") from None
    except OSError as e:
        raise RunError(f"merge into {out} failed: {e.strerror or e} ({e.filename or out})") from None
    finally:
        tmp.unlink(missing_ok=True)
    report.bytes_read = sum(p.stat().st_size for p in good)
    report.seconds = time.monotonic() - start
    return report


def _open_target(tmp: Path, existing: Path | None, record: dict) -> sqlite3.Connection:
    if existing is not None:
        check_shard(existing, record["fingerprint"])  # the same checks hold for a merged result
        shutil.copyfile(existing, tmp)
    con = sqlite3.connect(tmp, isolation_level=None, uri=True)
    con.execute("PRAGMA trusted_schema = OFF")
    # the temp file is thrown away on any failure and never seen under its final name, so its
    # journal need not survive a crash: keep it in memory (ROLLBACK still works)
    con.execute("PRAGMA journal_mode = MEMORY")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -65536")
    if existing is None:
        con.executescript(shard.SCHEMA)
        meta = shard.database_meta(record["spec"], record["fingerprint"])
        con.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
    return con


def _merge_one(con: sqlite3.Connection, alias: str, path: Path) -> int:
    """Copy one attached shard in one transaction; return how many of its tasks were already there."""
    con.execute("BEGIN")
    try:
        overlap = con.execute(f"SELECT s.task, s.checksum = m.checksum FROM {alias}.tasks AS s "
                              "JOIN main.tasks AS m ON s.task = m.task").fetchall()
        differ = [t for t, same in overlap if not same]
        if differ:
            raise BadShard(f"{path}: task(s) {plan.ranges(differ)} differ from the copy already "
                           "merged from another shard; refusing to choose")
        if overlap:
            new = "WHERE task NOT IN (SELECT task FROM main.tasks)"
            con.execute(f"INSERT INTO main.unitaries SELECT * FROM {alias}.unitaries {new}")
            con.execute(f"INSERT INTO main.tasks SELECT * FROM {alias}.tasks {new}")
        else:
            # plain INSERT ... SELECT * lets SQLite use its transfer optimisation
            con.execute(f"INSERT INTO main.unitaries SELECT * FROM {alias}.unitaries")
            con.execute(f"INSERT INTO main.tasks SELECT * FROM {alias}.tasks")
        con.execute("COMMIT")
    except sqlite3.IntegrityError as e:
        con.execute("ROLLBACK")
        raise BadShard(f"{path}: rows clash with rows already merged ({e})") from None
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return len(overlap)
