"""Progress for long steps: a tqdm bar on a terminal, periodic lines of the ``unidask`` logger
elsewhere (SLURM logs)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

from tqdm import tqdm

from .fmt import size

log = logging.getLogger("unidask")


class Progress:
    """Count ``unit`` towards ``total`` (``unit="B"``: bytes, shown as kB, MB, GB); ``extra`` text
    (e.g. tasks done) rides along."""

    def __init__(self, total: int, *, unit: str = "unitaries", desc: str = "unidask", initial: int = 0,
                 interval: float = 10.0):
        self.total, self.n, self.unit, self.desc = total, initial, unit, desc
        self.interval, self.start = interval, time.monotonic()
        self.last = self.start
        self.initial = initial
        self.bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
            # tqdm's SI prefixes (k, M, G) on the unit: "unitaries" after a space, "B" as "MB"
            self.bar = tqdm(total=total, initial=initial, unit=unit if unit == "B" else f" {unit}",
                            unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.05)

    def update(self, n: float, extra: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix_str(extra, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info(self.line(extra))

    def line(self, extra: str = "") -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
        if self.unit == "B":
            done, rate_text = f"{size(self.n)} of {size(self.total)}", f"{size(rate)}/s"
        else:
            done, rate_text = f"{self.n:,}/{self.total:,} {self.unit}", f"{rate:,.0f} {self.unit}/s"
        text = f"{self.desc}: {done} ({pct:.1f}%), {rate_text}, ETA {eta}"
        return f"{text}, {extra}" if extra else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LineFormatter(logging.Formatter):
    """unidask's messages as bare lines; a warning says it is one."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def log_to_stderr() -> logging.Handler:
    """Show the ``unidask`` logger's messages on stderr, one line each (the CLI's view)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


@contextlib.contextmanager
def messages_shown() -> Iterator[None]:
    """For a call of the Python API where the caller configured no logging at all (no handler on
    the root logger nor on ``unidask``'s): unidask's messages and progress on stderr as the CLI
    shows them, and distributed's INFO lines held back (its warnings still shown), while it lasts.
    A caller who configured logging gets what they configured."""
    if logging.getLogger().handlers or log.handlers:
        yield
        return
    handler, dask_log = log_to_stderr(), logging.getLogger("distributed")
    level = dask_log.level
    dask_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
        log.propagate = True
        dask_log.setLevel(level)
