"""Stopping on a signal: SLURM's pre-walltime USR1 (or a TERM), or a Ctrl-C (INT), becomes
:class:`Stopped` in the main thread, so the driver stages every shard out before it exits
(status 3)."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from ..core.errors import Interrupted, Stopped

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_stopped: Stopped | None = None   # what the signal meant, for check_stop


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """Turn a stop signal into :class:`Stopped` (a Ctrl-C into :class:`Interrupted`); later
    signals are ignored meanwhile."""
    global _stopped

    def handler(signum, frame):
        global _stopped
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if signum == signal.SIGINT:
            _stopped = Interrupted("interrupted: every finished task is staged; run again with --resume to finish")
        else:
            _stopped = Stopped(f"stopped by {signal.Signals(signum).name} (walltime near?): every finished "
                               "task is staged; submit again to finish, it resumes")
        raise _stopped

    _stopped = None
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _stopped = None
        for s, h in previous.items():
            signal.signal(s, h)


def check_stop() -> None:
    """Raise :class:`Stopped` if a stop signal came. The handler raises it already, but Python
    drops an exception raised inside a finalizer: a signal landing in a Dask future's ``__del__``
    would be lost, and the run would go on to its walltime. The driver calls this between tasks."""
    if _stopped is not None:
        raise type(_stopped)(str(_stopped))
