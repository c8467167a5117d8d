"""The two kinds of failure a user sees: their input is wrong (exit 2) or the run went wrong (exit 1)."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator


class UnidaskError(Exception):
    """A failure reported to the user as one line, never a traceback."""

    exit_code = 1


class InputError(UnidaskError, ValueError):
    """Bad config, bad arguments or a file that is not what it should be."""

    exit_code = 2


class RunError(UnidaskError, RuntimeError):
    """The run could not finish: missing tasks, a failing worker, a full disk."""

    exit_code = 1


class Stopped(RunError):
    """Stopped by a signal (SLURM's, before the walltime) after staging every finished task."""

    exit_code = 3


class Interrupted(Stopped):
    """Stopped by a Ctrl-C (SIGINT), after staging every finished task."""


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """An OSError while writing the user's ``path`` as one line: a path that cannot be written is
    theirs to change (exit 2); a full or failing disk is not (exit 1)."""
    try:
        yield
    except OSError as e:
        error = RunError if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else InputError
        raise error(f"cannot write {path}: {e.strerror or e}") from e
