"""One driver per run dir at a time: a lock file in the run dir, on shared storage.

A network filesystem may not have POSIX locks (sshfs) or have unreliable ones (NFS without a working
lockd), so the lock is a file created with ``O_EXCL`` (atomic on NFSv3+ and SFTP) naming its holder's
host and process, and refreshed (its mtime) every :data:`BEAT` seconds while the run lives. A lock
whose holder is gone is taken over: on this host, when its process no longer runs, and never while
it does (a driver stopped with Ctrl-Z refreshes nothing, yet it will go on); when the SLURM job it
ran in has ended; else when it has not been refreshed for :data:`STALE` seconds (the hosts' clocks
agree to well within that on a cluster, through NTP). A holder that finds its lock changed under
it (damaged, or taken over while it was stopped) stops at its next look, in one line: two drivers
never write one run dir."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from ..core import files
from ..core.errors import InputError, RunError
from . import identity

BEAT = 10.0
STALE = 120.0

log = logging.getLogger(__name__)


def holder_of(path: Path) -> dict:
    """What a lock file says of its holder (empty where it cannot be read: being written, damaged)."""
    try:
        return parsed(path.read_bytes())
    except OSError:
        return {}


def parsed(data: bytes) -> dict:
    try:
        found = json.loads(data)
    except ValueError:   # UnicodeDecodeError too
        return {}
    return found if isinstance(found, dict) else {}


def stale(path: Path, holder: dict) -> str | None:
    """Why the lock at ``path`` is stale (its holder is gone), or None while it may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    pid, job = holder.get("pid"), holder.get("job")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        started = files.process_start(pid) if pid > 0 else 0
        if not started or holder.get("start", started) != started:
            return f"its process {pid} on this host is gone"
        return None   # alive, if stopped: it may go on, so its lock holds however old
    if isinstance(job, str) and identity.job_ended(job):   # its node may have crashed: SLURM knows
        return f"its SLURM job {job} has ended"
    if age > STALE:
        return f"it was last refreshed {age:.0f} s ago"
    return None


class Held:
    """A run lock held: :meth:`check` raises once it is no longer this run's."""

    def __init__(self, path: Path):
        self.path = path
        self.lost: str | None = None   # why, set by the refresher

    def check(self) -> None:
        if self.lost is not None:
            raise RunError(f"{self.path}: {self.lost}; this run stops so that two drivers never write one "
                           "run dir (everything finished is staged); see who holds it, then --resume")


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[Held]:
    """Hold the run lock at ``path`` for the ``with`` block, refreshing it; raise
    :class:`InputError` naming the holder where another live run holds it."""
    token = secrets.token_hex(8)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": files.process_start(os.getpid()),
            "job": identity.job_id(), "token": token, "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            holder = holder_of(path)
            if (why := stale(path, holder)) is None:
                held = f"{_described(holder)}; its lock is {path}" if holder else \
                    f"its lock {path} cannot be read: being written, or damaged"
                raise InputError(f"{path.parent}: another unidask run is using this run dir ({held}): wait "
                                 f"for it to end (a stopped one too: fg or kill -CONT it); its lock is taken "
                                 f"over once its process or SLURM job has ended, or, held from another "
                                 f"host, once not refreshed for {STALE:.0f} s") from None
            _take_over(path, holder, why)
            continue
        except OSError as e:
            raise InputError(f"{path.parent}: cannot create the run lock {path.name}: {e.strerror or e}") from e
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine) + "\n")
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise RunError(f"{path}: could not take the run lock (another run kept taking it)")
    stop, held = threading.Event(), Held(path)
    beat = threading.Thread(target=_refresh, args=(held, token, stop), name="unidask-run-lock", daemon=True)
    beat.start()
    try:
        yield held
    finally:
        stop.set()
        beat.join()
        if holder_of(path).get("token") == token:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def merging(path: Path) -> Iterator[None]:
    """For a merge: the run lock, where the run dir takes one; where this user cannot write it
    (another's run, read from a shared view), only a refusal while a live run holds it."""
    if os.access(path.parent, os.W_OK):
        with run_lock(path):
            yield
        return
    holder = holder_of(path)
    if os.path.lexists(path) and stale(path, holder) is None:
        raise InputError(f"{path.parent}: a unidask run is using this run dir ({_described(holder)}): merge "
                         "it once that run has ended")
    yield


def _take_over(path: Path, holder: dict, why: str) -> None:
    """Move a stale lock aside, unless another run took it over first (then its new lock stays)."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return   # someone else moved it: race them for a fresh one
    if holder_of(aside).get("token") != holder.get("token"):   # not the lock we judged: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    else:
        log.warning("%s: taking over the run lock of %s (%s)", path.parent, _described(holder), why)
    aside.unlink(missing_ok=True)


def _described(holder: dict) -> str:
    """The holder a lock file names, as far as it can be read (it may be damaged)."""
    said = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    since = holder.get("since")
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        with contextlib.suppress(OverflowError, ValueError, OSError):
            said += time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since))
    return said


def _refresh(held: Held, token: str, stop: threading.Event) -> None:
    path = held.path
    while not stop.wait(BEAT):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            held.lost = "the run lock is gone (removed by someone else)"
            return
        except OSError:   # a filesystem that hiccups (EMFILE, EIO): the next beat tries again
            continue
        if (holder := parsed(data)).get("token") != token:
            held.lost = (f"the run lock was taken over by {_described(holder)}" if holder.get("token") else
                         "the run lock was changed by someone else (it no longer names this run)")
            return
        with contextlib.suppress(OSError):
            os.utime(path)
