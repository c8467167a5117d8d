"""Check a unidask database end to end: the integrity invariant (the merge's own check, db.task_faults),
every matrix finite and unitary, the totals against the run's count, and (against a config) that it
is the data that config makes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..core import files
from ..core.errors import InputError
from ..core.progress import Progress
from ..spec import generators, plan
from ..spec.config import Spec
from ..store import db as dbfile
from ..store.dataset import Dataset
from ..store.db import BadFile, Expected, check_database, check_pages, reading, task_faults
from ..store.pages import Unreadable

SAMPLE = 3          # tasks generated again by --against, evenly spread (--full: all of them)
SCAN_ROWS = 20_000  # rows read at a time for the unitarity check


@dataclass
class Verdict:
    path: str
    rows: int = 0
    tasks: int = 0
    expected_tasks: int = 0
    max_error: float = 0.0
    tolerance: tuple[float, str] = (0.0, "")   # the bound and whose (generators.tolerance)
    regenerated: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            bound, whose = self.tolerance
            text = (f"OK: {self.path}: {self.rows:,} unitaries in {self.tasks}/{self.expected_tasks} "
                    f"tasks, checksums match, max |U^H U - I| = {self.max_error:.1e} <= {bound:g} ({whose})")
            return text + (f", {self.regenerated} task(s) regenerated identically" if self.regenerated else "")
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return f"FAILED: {self.path}: " + "; ".join(self.problems[:3]) + more


def verify(db: str | os.PathLike, against: Spec | None = None, *, sample: int = SAMPLE,
           full: bool = False) -> Verdict:
    """Check the database ``db``: every task of its run's plan present and sound (ids, counts, dims,
    byte lengths, recomputed checksums), nothing else in it, every matrix finite and unitary, the
    total equal to the run's count. With ``against``: the database must be that config's run, and
    ``sample`` of its tasks (``full``: all) are generated again and compared byte for byte."""
    path = Path(db)
    if (why := files.regular(path)) is not None:
        raise InputError(f"{path}: {why}")
    v = Verdict(str(path))
    meta = check_database(path, None, what="database")   # not a unidask database at all: exit 2
    try:
        check_pages(path)
        spec = _recorded_spec(path, meta)
        expected = Expected.of(spec, first=path)
        with reading(path) as con:
            _check_contents(con, v, spec, expected, meta)
            _check_served(path, con, v, spec)
            if against is not None and not v.problems:
                if against.task_size == "auto":   # sized when it ran: the database says how
                    against = replace(against, task_size=spec.task_size)
                _regenerate(con, v, spec, against, None if full else sample)
    except BadFile as e:
        v.problems.append(e.reason)
    return v


def _recorded_spec(path: Path, meta: dict[str, str]) -> Spec:
    try:
        spec = Spec.from_dict(json.loads(meta["spec"]), str(path), recorded=True)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadFile(path, f"its recorded run spec is unreadable ({e})") from e
    if spec.fingerprint != meta.get("fingerprint") or spec.dtype != meta.get("dtype"):
        raise BadFile(path, "its recorded run spec does not match its fingerprint or dtype")
    return spec


def _check_contents(con, v: Verdict, spec: Spec, expected: Expected, meta: dict[str, str]) -> None:
    v.expected_tasks = spec.n_tasks
    progress = Progress(spec.count, desc="verify: checksums")
    v.problems += [reason for _, reason in task_faults(con, expected, checked=progress.update)]
    progress.close()
    _check_unitary(con, v, spec, expected)
    present = [t for (t,) in con.execute("SELECT task FROM tasks")]
    v.tasks = len(present)
    missing = sorted(set(range(spec.n_tasks)) - set(present))
    if missing:
        v.problems.append(f"{len(missing)} task(s) missing: {plan.ranges(missing)}")
    v.rows = con.execute("SELECT count(*) FROM unitaries").fetchone()[0]
    if v.rows != spec.count:
        v.problems.append(f"holds {v.rows:,} unitaries, the run asked for {spec.count:,}")
    if "rows" in meta and meta["rows"] != str(v.rows):
        v.problems.append(f"its meta says {meta['rows']} rows, it holds {v.rows}")


def _check_served(path: Path, con, v: Verdict, spec: Spec) -> None:
    """The bytes ``Dataset`` serves, where it reads the pages directly: every task's checksum
    recomputed from them too (SQL's reads were checked above)."""
    with Dataset(path) as ds:
        reader = ds.direct
        if reader is None:
            return
        progress = Progress(spec.count, desc="verify: pages")
        try:
            for task, count, digest in con.execute("SELECT task, count, checksum FROM tasks ORDER BY task"):
                base = task * spec.task_size
                if not (0 <= base and base + count <= reader.layout.rows):
                    v.problems.append(f"task {task} lies outside the rows its page layout holds")
                    continue
                rows = reader.rows(np.arange(base, base + count))
                if dbfile.checksum(rows.data, count) != digest:
                    v.problems.append(f"task {task}: the rows read from its pages differ from its checksum")
                progress.update(count)
        except Unreadable as e:
            v.problems.append(f"its pages are not as the merge laid them out ({e})")
        finally:
            progress.close()


def _check_unitary(con, v: Verdict, spec: Spec, expected: Expected) -> None:
    """Every well-formed row finite and unitary within the run's tolerance (a NaN is not)."""
    n = expected.dim
    if not n:
        return   # no row to take a size from: task_faults has said what is wrong
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    tolerance, whose = generators.tolerance(spec)
    v.tolerance = (tolerance, whose)
    cursor = con.execute("SELECT id, data FROM unitaries WHERE dim = ? AND typeof(data) = 'blob' AND "
                         "length(data) = ? ORDER BY id", (n, n * n * dtype.itemsize))
    bad: list[int] = []
    progress = Progress(spec.count, desc="verify: unitarity")
    while rows := cursor.fetchmany(SCAN_ROWS):
        u = np.frombuffer(b"".join(r[1] for r in rows), dtype).reshape(-1, n, n)
        err = generators.unitarity_errors(u)
        err[~np.isfinite(u).all(axis=(1, 2))] = np.inf
        bad += [rows[i][0] for i in np.flatnonzero(~(err <= tolerance))]
        v.max_error = max(v.max_error, float(err.max()))
        progress.update(len(rows))
    progress.close()
    if bad:
        v.problems.append(f"{len(bad)} matrix(es) not finite or not unitary within {tolerance:g} ({whose}) "
                          f"(ids {plan.ranges(bad[:20])}{', ...' if len(bad) > 20 else ''}); "
                          f"max |U^H U - I| = {v.max_error:.1e}")


def _regenerate(con, v: Verdict, spec: Spec, against: Spec, sample: int | None) -> None:
    """Generate tasks again from ``against`` and compare them byte for byte with the stored ones."""
    if against.fingerprint != spec.fingerprint:
        v.problems.append(f"not the data of {against.source} (count, task_size, seed or generator "
                          "differ)")
        return
    present = sorted(t for (t,) in con.execute("SELECT task FROM tasks"))
    picks = present if sample is None else sorted(
        {present[k * (len(present) - 1) // max(1, sample - 1)] for k in range(min(sample, len(present)))})
    for t in picks:
        array, metas = generators.generate(against, t)
        base = t * against.task_size
        stored = con.execute("SELECT data, meta FROM unitaries WHERE id >= ? AND id < ? ORDER BY id",
                             (base, base + against.task_count(t))).fetchall()
        made = array.astype(array.dtype.newbyteorder("<")).tobytes()
        if b"".join(r[0] for r in stored) != made or [r[1] for r in stored] != (metas or [None] * len(array)):
            v.problems.append(f"task {t} differs from what {against.source} generates")
        v.regenerated += 1

