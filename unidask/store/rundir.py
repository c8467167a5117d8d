"""The run directory on shared storage: every path in it, its record (``run.json``), and creating
or refusing one. Nothing else names a file of a run dir.

::

    RUN_DIR/
      run.json                 the spec and fingerprint of the run (what decides the data)
      lock                     the host and pid of the driver running now (runlock.py)
      live.json                its figures every few seconds while it runs (`unidask status`)
      shards/NODE-ATTEMPT[-pPID]-UID.db   staged snapshots, each written whole
      stages.jsonl             one line per stage-out (the report's figures; the shards, by name)
      NAME.db                  the merged database
      tls/                     the run's CA, certificate and key (owner-only)
      scheduler-JOB.json       a generation job's scheduler file
      logs/  jobs/             SLURM job logs and the rendered job scripts
      rejected/                staged shards a resume found damaged, set aside (never merged)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from ..core import files
from ..core.errors import InputError
from ..spec.config import Spec
from . import db

log = logging.getLogger(__name__)


class RunDir:
    """The paths of one run directory, and what is read from and written to it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.record_path = self.path / "run.json"
        self.shards = self.path / "shards"
        self.stages = self.path / "stages.jsonl"
        self.tls = self.path / "tls"
        self.logs = self.path / "logs"
        self.jobs = self.path / "jobs"
        self.rejected = self.path / "rejected"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def live_path(self) -> Path:
        return self.path / "live.json"

    def database(self, name: str) -> Path:
        """The merged database's default path."""
        return self.path / f"{name}.db"

    def scheduler_file(self, job_id: str) -> Path:
        return self.path / f"scheduler-{job_id}.json"

    # -- the record ----------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The run's record (run.json): its fingerprint and spec."""
        path = self.record_path
        if os.path.lexists(path) and (why := files.owned_file(path)) is not None:   # a FIFO would block
            raise InputError(f"{path}: {why}; refused: move it aside, and `unidask run CONFIG --resume` "
                             "with the run's config writes it again")
        try:
            record = json.loads(path.read_text())
            record["fingerprint"], record["spec"]["run"]["task_size"]
        except FileNotFoundError as e:
            raise InputError(f"{self.path}: not a unidask run directory (no run.json)") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._unreadable(e) from e
        return record

    def spec(self) -> Spec:
        """The recorded spec, typed (its generator is not imported again)."""
        return self._spec_of(self.record())

    def _spec_of(self, record: dict[str, Any]) -> Spec:
        try:
            return Spec.from_dict(record["spec"], str(self.record_path), recorded=True)
        except (KeyError, TypeError, AttributeError) as e:
            raise self._unreadable(e) from e

    def _unreadable(self, e: Exception) -> InputError:
        why = (f"no {e}" if isinstance(e, KeyError) else
               "not the JSON object unidask writes" if isinstance(e, (TypeError, AttributeError)) else e)
        return InputError(f"{self.record_path}: unreadable run record ({why}); move it aside and "
                          "`unidask run CONFIG --resume` with the run's config writes it again")

    def sized(self, spec: Spec) -> Spec:
        """``spec`` with the task size this run dir's run.json records, where ``spec`` leaves it
        to ``"auto"`` and the record is of this run: a resume makes the same bytes on any number
        of workers. Otherwise ``spec`` as it is."""
        if spec.task_size != "auto" or not self.record_path.exists():
            return spec
        record = self.record()
        size = record["spec"]["run"]["task_size"]
        sized = dataclasses.replace(spec, task_size=size) if isinstance(size, int) else spec
        return sized if sized.fingerprint == record["fingerprint"] else spec

    def create(self) -> None:
        """Create the run dir, owner-only (it holds the run's TLS key, the scheduler file, the
        shards); fail in one line where it cannot be written."""
        try:
            self.shards.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.path, self.shards):   # a shards/ others may write is a place to plant shards
                if (mode := stat.S_IMODE(d.stat().st_mode)) & 0o077:
                    os.chmod(d, 0o700)
                    if d == self.shards:
                        log.warning("%s was open to others (mode %04o): made owner-only", d, mode)
            tempfile.TemporaryFile(dir=self.path).close()
        except OSError as e:
            raise InputError(f"run_dir {self.path} is not writable: {e.strerror or e}") from e

    def prepare(self, spec: Spec, resume: bool) -> None:
        """Create the run dir (:meth:`create`), refuse one that holds another run, record the
        spec in run.json."""
        self.create()
        record = self.record() if self.record_path.exists() else None
        # the whole record read once: a damaged one is refused before anything starts
        recorded = None if record is None else self._spec_of(record)
        if record is not None and record["fingerprint"] != spec.fingerprint and not any(self.entries()):
            # an attempt that staged nothing (it failed as it started): nothing of it to keep
            log.info("%s: replacing the record of a run that staged nothing (%s)", self.path,
                     self.record_path)
            self.record_path.unlink()
        elif recorded is not None and record is not None and record["fingerprint"] != spec.fingerprint:
            if recorded.code != spec.code and dataclasses.replace(recorded, code=spec.code).fingerprint \
                    == spec.fingerprint:
                raise InputError(f"{self.path}: generator {spec.kind} changed since this run started "
                                 f"(it was {recorded.code or 'built in'}, now {spec.code}): its rows would "
                                 "mix two versions; restore it, or choose another run.run_dir")
            differ = differences(recorded, spec) or "its generator's code differs"
            raise InputError(f"{self.path} holds another run ({differ}): choose another run.run_dir")
        staged = self.staged_shards()
        if staged and not resume:
            raise InputError(f"{self.path} already holds {len(staged)} staged shard(s) of this run: "
                             "pass --resume to finish it, or choose another run.run_dir")
        if not self.record_path.exists():
            from .._version import __version__

            record = {"unidask_version": __version__, "fingerprint": spec.fingerprint,
                      "created": time.time(), "spec": spec.to_dict()}
            files.write_atomic(self.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def note_phases(self, phases: dict[str, float]) -> None:
        """Add to run.json where the last invocation's time went (seconds: ``start``, before the
        first task could run; ``generation``; ``merge``, after the last task), for the report."""
        record = self.record()
        record["phases"] = phases
        files.write_atomic(self.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    # -- staged shards and stage-outs ------------------------------------------------------------

    def entries(self) -> tuple[list[Path], dict[Path, str]]:
        """``shards/`` in one look: the staged shards (:meth:`staged_shards`) and the entries named
        like one that are no regular file of this user's that only they can write
        (:meth:`odd_entries`)."""
        shards, odd = [], {}
        for p in self._listed():   # another user's file is no shard of this run, however it looks
            if (why := files.owned_file(p)) is None:
                shards.append(p)
            else:
                odd[p] = why
        return shards, odd

    def staged_shards(self) -> list[Path]:
        """The staged shards: regular files named ``*.db`` (a stage-out's temporaries start with
        ".": never listed). Anything else of that name is :meth:`odd_entries`, never opened."""
        return self.entries()[0]

    def odd_entries(self) -> dict[Path, str]:
        """Entries of ``shards/`` named like a shard that are no regular file (a FIFO, a socket, a
        directory, a link): what they are."""
        return self.entries()[1]

    def _listed(self) -> list[Path]:
        """``shards/`` as listed, and the shards the run's stage-outs recorded (``stages.jsonl``),
        looked up by name: a network filesystem's directory cache (NFS: up to ``acdirmax``, a
        minute) can hide from one host a file another host staged a moment ago, not a name."""
        listed = set(self.shards.glob("[!.]*.db"))
        for name in self._staged_names():
            path = self.shards / name
            if path not in listed and os.path.lexists(path):   # gone: set aside by a resume, cleaned
                listed.add(path)
        return sorted(listed)

    def _staged_names(self) -> set[str]:
        """The names of the shards ``stages.jsonl`` records (the merge checks every file it opens)."""
        names = {Path(p).name for r in self.read_stages() for p in _paths_of(r) if isinstance(p, str)}
        return {n for n in names if n.endswith(".db") and not n.startswith(".")}

    def complete_database(self, spec: Spec) -> Path | None:
        """The run's merged database, where it exists and holds every task of ``spec``'s run."""
        path = self.database(spec.name)
        if not path.exists():
            return None
        try:
            db.check_database(path, spec.fingerprint, "merged database")
            with db.reading(path) as con:
                tasks = con.execute("SELECT count(*) FROM tasks").fetchone()[0]
        except db.BadFile:
            return None
        return path if tasks == spec.n_tasks else None

    def staged_tasks(self) -> set[int]:
        """Tasks listed in the run's staged shards, unchecked: what the driver counts between
        rounds (the merge checks every one). :meth:`checked_tasks` for what is proven."""
        return set(db.tasks_of(self.staged_shards()))

    def checked_tasks(self, spec: Spec) -> tuple[set[int], dict[Path, str]]:
        """Tasks of the staged shards that pass every check the merge makes (:func:`db.check`),
        and the shards that do not, with why: what status and resume count as done."""
        good: set[int] = set()
        shards, bad = self.entries()
        expected = db.Expected.of(spec)
        for path in shards:
            try:
                good.update(db.check(path, spec.fingerprint, expected))
            except db.BadFile as e:
                bad[path] = e.reason
        return good, bad

    def reject(self, path: Path) -> Path:
        """Set a damaged staged shard aside, where the merge does not look, keeping it for a look."""
        self.rejected.mkdir(mode=0o700, exist_ok=True)
        dest = self.rejected / path.name
        os.replace(path, dest)
        return dest

    def log_stages(self, results: Iterable[dict[str, Any]]) -> None:
        with open(os.open(self.stages, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in results)

    def read_stages(self, warn: bool = False) -> list[dict[str, Any]]:
        """The stage-outs ``stages.jsonl`` records. A line that is not one (the last, torn by a
        driver killed as it wrote; a damaged file) is skipped, and with ``warn`` named in a warning."""
        if not os.path.lexists(self.stages):
            return []
        if (why := files.owned_file(self.stages)) is not None:   # a FIFO would block the read
            raise InputError(f"{self.stages}: {why}")
        try:
            lines = self.stages.read_bytes().splitlines()
        except OSError as e:
            raise InputError(f"cannot read {self.stages}: {e.strerror or e}") from e
        records, skipped = [], []
        for number, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
                if not (isinstance(r, dict) and isinstance(r.get("node"), str)
                        and all(isinstance(r.get(k), (int, float)) for k in ("time", "seconds"))):
                    raise ValueError(line)
                records.append(r)
            except ValueError:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if line.strip():
                    skipped.append(number)
        if warn and skipped:
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            log.warning("%s: line(s) %s are not stage-out records; skipped", self.stages,
                        ", ".join(map(str, skipped[:10])) + more)
        return records


def _paths_of(stage: dict[str, Any]) -> list[Any]:
    """The staged files a line of ``stages.jsonl`` names (older lines name one, as ``path``)."""
    paths = stage.get("paths")
    return paths if isinstance(paths, list) else [stage.get("path")]


def differences(recorded: Spec, spec: Spec) -> str:
    """The settings that decide the data where a run dir's run and a config differ, with both values."""
    pairs = [("run.count", recorded.count, spec.count), ("run.task_size", recorded.task_size, spec.task_size),
             ("run.seed", recorded.seed, spec.seed), ("generator.kind", recorded.kind, spec.kind),
             ("generator.dtype", recorded.dtype, spec.dtype)]
    pairs += [(f"generator.{k}", recorded.params.get(k), spec.params.get(k))
              for k in sorted({*recorded.params, *spec.params})]
    return "; ".join(f"{key} = {mine!r} there, {theirs!r} in the config" for key, mine, theirs in pairs
                     if mine != theirs)
