"""Stopping on a signal: SLURM's pre-walltime USR1 (or a TERM), or a Ctrl-C (INT), becomes
:class:`Stopped` in the main thread, so the driver stages every shard out before it exits
(status 3)."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from .errors import Stopped

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_stop_message: str | None = None


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """Turn a stop signal into :class:`Stopped`; later signals are ignored meanwhile."""
    global _stop_message

    def handler(signum, frame):
        global _stop_message
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if signum == signal.SIGINT:
            _stop_message = "interrupted: every finished task is staged; run again with --resume to finish"
        else:
            _stop_message = (f"stopped by {signal.Signals(signum).name} (walltime near?): every finished "
                             "task is staged; submit again to finish, it resumes")
        raise Stopped(_stop_message)

    _stop_message = None
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _stop_message = None
        for s, h in previous.items():
            signal.signal(s, h)


def check_stop() -> None:
    """Raise :class:`Stopped` if a stop signal came. The handler raises it already, but Python
    drops an exception raised inside a finalizer: a signal landing in a Dask future's ``__del__``
    would be lost, and the run would go on to its walltime. The driver calls this between tasks."""
    if _stop_message is not None:
        raise Stopped(_stop_message)
