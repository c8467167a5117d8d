"""What a run directory holds, from the files alone (works after the cluster is gone)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from . import plan, shard


def status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Tasks done and missing, and per staged shard: node, tasks, unitaries, bytes, stage time."""
    run_dir = Path(run_dir)
    record = plan.load_run(run_dir)
    run = record["spec"]["run"]
    expected = -(-run["count"] // run["task_size"])
    done: set[int] = set()
    shards = []
    for p in plan.staged_shards(run_dir):
        entry: dict[str, Any] = {"path": str(p), "bytes": p.stat().st_size, "staged": p.stat().st_mtime}
        try:
            con = shard.connect_readonly(p)
            try:
                tasks = [t for (t,) in con.execute("SELECT task FROM tasks")]
                nodes = [n for (n,) in con.execute("SELECT DISTINCT node FROM tasks")]
                rows, first, last = con.execute(
                    "SELECT coalesce(sum(count), 0), min(started), max(finished) FROM tasks").fetchone()
            finally:
                con.close()
            entry.update(node=",".join(nodes) or p.stem.rsplit("-", 1)[0], tasks=len(tasks),
                         unitaries=rows, first_start=first, last_finish=last)
            done.update(tasks)
        except sqlite3.Error as e:
            entry.update(node="?", tasks=0, unitaries=0, error=str(e))
        shards.append(entry)
    missing = [t for t in range(expected) if t not in done]
    starts = [s["first_start"] for s in shards if s.get("first_start")]
    ends = [s["last_finish"] for s in shards if s.get("last_finish")]
    unitaries = sum(min(run["task_size"], run["count"] - t * run["task_size"]) for t in done)
    span = max(ends) - min(starts) if starts and ends else 0.0
    return {"run_dir": str(run_dir), "name": run["name"], "count": run["count"],
            "tasks_expected": expected, "tasks_done": len(done), "tasks_missing": len(missing),
            "missing": plan.ranges(missing), "unitaries": unitaries,
            "bytes": sum(s["bytes"] for s in shards), "rate": unitaries / span if span else None,
            "shards": shards}


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['name']} in {st['run_dir']}",
             f"tasks: {st['tasks_done']}/{st['tasks_expected']} done, {st['tasks_missing']} missing"
             + (f" ({st['missing']})" if st["tasks_missing"] else ""),
             f"unitaries: {st['unitaries']:,}/{st['count']:,} staged, {st['bytes'] / 1e6:,.1f} MB"
             + (f", {st['rate']:,.0f}/s" if st["rate"] else ""),
             "", f"{'node':<16} {'tasks':>7} {'unitaries':>12} {'MB':>9}  {'staged at':<19}  shard"]
    for s in st["shards"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["staged"]))
        lines.append(f"{s['node']:<16} {s['tasks']:>7} {s['unitaries']:>12,} {s['bytes'] / 1e6:>9.1f}  "
                     f"{when:<19}  {Path(s['path']).name}"
                     + (f"  (unreadable: {s['error']})" if "error" in s else ""))
    return "\n".join(lines)
