"""``unidask info DB``: what a unidask database holds, on one screen (or as JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core import files
from ..core.errors import InputError
from ..core.fmt import moment, size
from ..store.db import BadFile, check_database, reading


@dataclass
class Info:
    path: str
    rows: int
    dim: int
    dtype: str
    kind: str
    generator: dict[str, Any]    # the generator's parameters, as recorded
    seed: int
    count: int                   # what the run planned
    task_size: int
    tasks: int                   # tasks in the file
    tasks_planned: int
    merged: float | None         # when the merge wrote it (None: a shard, or an older merge)
    bytes: int
    fingerprint: str
    unidask_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:

        params = ", ".join(f"{k}={v}" for k, v in self.generator.items() if k != "kind") or "-"
        complete = self.tasks == self.tasks_planned and self.rows == self.count
        state = (f"complete: {self.tasks:,} of {self.tasks_planned:,} tasks, each checked by the merge "
                 "(unidask verify DB checks it all again)" if complete else
                 f"INCOMPLETE: {self.tasks:,} of {self.tasks_planned:,} tasks, {self.rows:,} of "
                 f"{self.count:,} unitaries")
        rows = [("rows", f"{self.rows:,} unitaries of {self.dim}x{self.dim} {self.dtype}"),
                ("generator", f"{self.kind} ({params})"),
                ("seed", f"{self.seed} (tasks of {self.task_size:,}: the data depends on both)"),
                ("tasks", state),
                ("merged", moment(self.merged) if self.merged else "- (a shard, or merged by an "
                                                                  "older unidask)"),
                ("size", f"{size(self.bytes)} on disk"),
                ("run", f"fingerprint {self.fingerprint}, unidask {self.unidask_version}")]
        return "\n".join([self.path, *(f"  {k:<10} {v}" for k, v in rows)])


def info(db: str | os.PathLike) -> Info:
    """What ``db`` holds, from its meta and its tasks table (no scan of the rows)."""
    path = Path(db)
    if (why := files.regular(path)) is not None:
        raise InputError(f"{path}: {why}")
    try:
        meta = check_database(path, None, what="database")
        spec = json.loads(meta["spec"])
        with reading(path) as con:
            tasks, rows = con.execute("SELECT count(*), coalesce(sum(count), 0) FROM tasks").fetchone()
            dim = (con.execute("SELECT dim FROM unitaries LIMIT 1").fetchone() or (0,))[0]
    except BadFile as e:
        raise InputError(f"{path}: not a unidask database ({e.reason})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a unidask database (unreadable meta: {e})") from e
    run, generator = spec["run"], spec["generator"]
    count, task_size = int(run["count"]), int(run["task_size"])
    return Info(path=str(path), rows=int(meta.get("rows", rows)), dim=dim, dtype=meta["dtype"],
                kind=generator.get("kind", "?"), generator=generator, seed=int(run["seed"]),
                count=count, task_size=task_size, tasks=tasks, tasks_planned=-(-count // task_size),
                merged=float(meta["merged"]) if "merged" in meta else None,
                bytes=path.stat().st_size, fingerprint=meta.get("fingerprint", "?"),
                unidask_version=meta.get("unidask_version", "?"))
