"""Remove what a run no longer needs, never the only copy of a task: the staged shards and set-aside
files of a run whose merged database holds every task (checked again first, as the merge checks a
shard), and this machine's leftover live shards of the run (staged first where the run is not
complete, so their finished tasks are kept)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.fmt import size
from . import db, shard, staging
from .rundir import RunDir
from .runlock import run_lock


@dataclass
class CleanReport:
    removed: list[Path] = field(default_factory=list)
    bytes: int = 0
    staged: list[Path] = field(default_factory=list)   # leftover live shards staged (their tasks kept)
    kept: str | None = None          # why the staged shards stay

    def summary(self) -> str:
        text = f"removed {len(self.removed)} file(s), {size(self.bytes)}"
        if self.staged:
            text += f"; staged {len(self.staged)} leftover shard(s) of this machine first"
        return text + (f"; the staged shards stay: {self.kept}" if self.kept else "")


def complete_and_sound(rd: RunDir) -> tuple[Path | None, str]:
    """The run's merged database where it holds every planned task (:meth:`RunDir.complete_database`)
    and passes every check of the merge now; else None and why not."""
    spec = rd.spec()
    if (out := rd.complete_database(spec)) is None:
        return None, (f"no merged database {rd.database(spec.name)} holding all {spec.n_tasks} tasks yet "
                      f"(unidask merge {rd.path})")
    try:
        db.check_pages(out)
        db.check_tasks(out, db.Expected.of(spec, first=out))
    except db.BadFile as e:
        return None, f"{out}: {e.reason}"
    return out, ""


def clean(run_dir: str | os.PathLike, *, dry_run: bool = False) -> CleanReport:
    """Remove what the run in ``run_dir`` no longer needs (``dry_run``: only say what). Holds the
    run lock meanwhile: a running driver's live shards are never touched."""
    rd = RunDir(run_dir)
    spec = rd.spec()
    report = CleanReport()
    with run_lock(rd.lock_path):
        merged, why = complete_and_sound(rd)
        if merged is None:   # every copy may be the only one: stage this machine's leftovers, remove nothing
            report.kept = why
            if not dry_run:
                report.staged = staging.salvage(spec)
            return report
        local_dir = shard.run_local_dir(spec)
        for p in [*rd.staged_shards(), *(sorted(rd.rejected.iterdir()) if rd.rejected.is_dir() else []),
                  *(sorted(local_dir.iterdir()) if local_dir.is_dir() else [])]:
            if p.is_symlink() or not p.is_file():
                continue
            report.bytes += p.stat().st_size
            report.removed.append(p)
            if not dry_run:
                p.unlink()
    return report
