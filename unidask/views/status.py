"""What a run directory holds, from the files alone (works after the cluster is gone)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core import files
from ..core.fmt import size
from ..spec import plan
from ..store import db
from ..store.rundir import RunDir


@dataclass
class ShardStatus:
    path: str
    bytes: int
    staged: float                    # the file's mtime: when it was staged
    node: str = "?"
    tasks: int = 0
    unitaries: int = 0
    first_start: float | None = None
    last_finish: float | None = None
    error: str | None = None         # why its tasks do not count: unreadable, damaged


@dataclass
class RunStatus:
    run_dir: str
    name: str
    count: int
    tasks_expected: int
    tasks_done: int
    missing: list[int]
    unitaries: int
    bytes: int
    rate: float | None               # unitaries per second between the first start and last finish
    shards: list[ShardStatus] = field(default_factory=list)
    live: dict[str, Any] | None = None   # the running driver's figures (RUN_DIR/live.json), if fresh

    @property
    def tasks_missing(self) -> int:
        return len(self.missing)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks_missing": self.tasks_missing, "missing": plan.ranges(self.missing)}

    def format(self) -> str:
        lines = [f"run {self.name} in {self.run_dir}"]
        if (live := self.live) is not None:
            ago = max(0.0, time.time() - live["updated"])
            written = live["tasks_done"]
            lines.append(f"running on {live['host']} (pid {live['pid']}, figures of {ago:.0f} s ago): "
                         f"{written}/{self.tasks_expected} tasks written, {live['rate']:,.0f} unitaries/s; "
                         f"{self.tasks_done} of them staged (safe), {max(0, written - self.tasks_done)} "
                         "only on the nodes' local disks until the next stage-out")
        lines += [f"tasks: {self.tasks_done}/{self.tasks_expected} done, {self.tasks_missing} missing"
                 + (f" ({plan.ranges(self.missing)})" if self.missing else ""),
                 f"unitaries: {self.unitaries:,}/{self.count:,} staged, {size(self.bytes)}"
                 + (f", {self.rate:,.0f}/s" if self.rate else ""),
                 "", f"{'node':<16} {'tasks':>7} {'unitaries':>12} {'MB':>9}  {'staged at':<19}  shard"]
        for s in self.shards:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.staged))
            lines.append(f"{s.node:<16} {s.tasks:>7} {s.unitaries:>12,} {s.bytes / 1e6:>9.1f}  "
                         f"{when:<19}  {Path(s.path).name}"
                         + (f"  (not counted: {s.error})" if s.error else ""))
        return "\n".join(lines)


def _shard_status(p: Path, reason: str | None) -> ShardStatus:
    """A staged shard's figures; only its file's where it fails a check (``reason``)."""
    st = p.lstat()
    entry = ShardStatus(str(p), st.st_size, st.st_mtime, node=p.stem.rsplit("-", 1)[0], error=reason)
    if reason is not None:
        return entry
    con = db.connect_readonly(p)
    try:
        nodes = [n for (n,) in con.execute("SELECT DISTINCT node FROM tasks")]
        entry.tasks, entry.unitaries, entry.first_start, entry.last_finish = con.execute(
            "SELECT count(*), coalesce(sum(count), 0), min(started), max(finished) FROM tasks").fetchone()
    finally:
        con.close()
    entry.node = ",".join(map(str, nodes)) or entry.node
    return entry


def status(run_dir: str | os.PathLike) -> RunStatus:
    """Tasks done and missing, and per staged shard: node, tasks, unitaries, bytes, stage time. A
    task is done only where its shard passes every check of the merge."""
    rd = RunDir(run_dir)
    spec = rd.spec()
    done, bad = rd.checked_tasks(spec)
    staged, odd = rd.entries()
    shards = [_shard_status(p, bad.get(p)) for p in sorted([*staged, *odd])]
    starts = [s.first_start for s in shards if s.first_start]
    ends = [s.last_finish for s in shards if s.last_finish]
    unitaries = sum(spec.task_count(t) for t in done)
    span = max(ends) - min(starts) if starts and ends else 0.0
    return RunStatus(run_dir=str(rd.path), name=spec.name, count=spec.count, tasks_expected=spec.n_tasks,
                     tasks_done=len(done), missing=[t for t in range(spec.n_tasks) if t not in done],
                     unitaries=unitaries, bytes=sum(s.bytes for s in shards),
                     rate=unitaries / span if span else None, shards=shards, live=_live(rd))


LIVE_FOR = 60.0   # seconds: older figures are of a driver that no longer runs (killed, its host lost)


def _live(rd: RunDir) -> dict[str, Any] | None:
    """The running driver's figures, where it wrote them lately."""
    if files.owned_file(rd.live_path) is not None:   # not there, or not the driver's (a FIFO would block)
        return None
    try:
        live = json.loads(rd.live_path.read_text())
        fresh = time.time() - float(live["updated"]) < LIVE_FOR
        live["tasks_done"], live["rate"], live["host"], live["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return live if fresh else None
