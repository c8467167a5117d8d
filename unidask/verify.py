"""Check a unidask database end to end: checksums, ids, unitarity, completeness, and (against a
config) that it is the data that config makes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import generators, plan
from .db import checksum as task_checksum
from .config import Spec
from .dataset import Dataset

# max |U^H U - I| allowed, per dtype: a few hundred ulps at the sizes unidask makes
TOLERANCE = {"complex128": 1e-10, "complex64": 1e-4}


@dataclass
class Verdict:
    path: str
    rows: int = 0
    tasks: int = 0
    expected_tasks: int = 0
    max_error: float = 0.0
    regenerated: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            text = (f"OK: {self.path}: {self.rows:,} unitaries in {self.tasks}/{self.expected_tasks} "
                    f"tasks, checksums match, max |U^H U - I| = {self.max_error:.1e}")
            return text + (f", {self.regenerated} task(s) regenerated identically" if self.regenerated else "")
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"FAILED: {self.path}: " + "; ".join(self.problems[:3]) + more


def verify(db: str | os.PathLike, against: Spec | None = None, *, sample: int = 3) -> Verdict:
    """Recompute every task's checksum, check ids, counts and unitarity, and list missing tasks.
    With ``against``: the database must be that config's run, and ``sample`` of its tasks are
    generated again and compared byte for byte."""
    with Dataset(db) as ds:
        v = Verdict(str(db))
        run = ds.spec["run"]
        task_size, dtype = run["task_size"], ds.meta["dtype"]
        v.expected_tasks = plan.n_tasks(run["count"], task_size)
        recorded = {t: (c, n) for t, c, n in ds.con.execute("SELECT task, checksum, count FROM tasks")}
        v.tasks = len(recorded)
        seen: dict[int, int] = {}
        current, chunks, metas, expect_idx = None, [], [], 0

        def close_task() -> None:
            if current is None:
                return
            checksum, count = recorded.get(current, (None, None))
            if checksum is None:
                v.problems.append(f"task {current} has rows but no tasks row")
            elif task_checksum(b"".join(chunks), metas) != checksum:
                v.problems.append(f"task {current}: checksum mismatch")
            if count is not None and count != seen[current]:
                v.problems.append(f"task {current}: {seen[current]} rows, tasks row says {count}")

        cursor = ds.con.execute("SELECT id, dim, data, meta FROM unitaries ORDER BY id")
        while rows := cursor.fetchmany(20_000):
            for i, _, data, meta in rows:
                task, idx = divmod(i, task_size)
                if task != current:
                    close_task()
                    current, chunks, metas, expect_idx = task, [], [], 0
                    seen[task] = 0
                if idx != expect_idx:
                    v.problems.append(f"row {i}: task {task} has no row {task * task_size + expect_idx}")
                expect_idx = idx + 1
                seen[task] += 1
                chunks.append(data)
                metas.append(meta)
            n, itemsize = rows[0][1], np.dtype(dtype).itemsize
            if any(r[1] != n or len(r[2]) != n * n * itemsize for r in rows):
                v.problems.append("rows whose dim or data size disagree")
                continue
            u = np.frombuffer(b"".join(r[2] for r in rows), np.dtype(dtype).newbyteorder("<"))
            err = float(generators.unitarity_errors(u.reshape(-1, n, n)).max())
            v.max_error = max(v.max_error, err)
            v.rows += len(rows)
        close_task()
        if v.max_error > TOLERANCE.get(dtype, 1e-10):
            v.problems.append(f"not unitary: max |U^H U - I| = {v.max_error:.1e}")
        missing = [t for t in range(v.expected_tasks) if t not in recorded]
        if missing:
            v.problems.append(f"{len(missing)} task(s) missing: {plan.ranges(missing)}")

        if against is not None:
            if against.fingerprint != ds.meta.get("fingerprint"):
                v.problems.append(f"not the data of {against.source} (count, task_size, seed or "
                                  "generator differ)")
            else:
                present = sorted(recorded)
                picks = sorted({present[k * (len(present) - 1) // max(1, sample - 1)]
                                for k in range(sample)}) if present else []
                for t in picks:
                    array, _ = generators.generate(against, t)
                    start = t * task_size
                    stored = ds[start:start + against.task_count(t)]
                    if stored.tobytes() != array.astype(array.dtype.newbyteorder("<")).tobytes():
                        v.problems.append(f"task {t} differs from what {against.source} generates")
                    v.regenerated += 1
    return v
