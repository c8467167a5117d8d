"""Progress for long steps: a tqdm bar on a terminal, periodic lines of the ``unidask`` logger
elsewhere (SLURM logs)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("unidask")


class Progress:
    """Count ``unit`` towards ``total``; ``extra`` text (e.g. tasks done) rides along."""

    def __init__(self, total: int, *, unit: str = "unitaries", desc: str = "unidask", initial: int = 0,
                 interval: float = 10.0, scale: float = 1.0):
        self.total, self.n, self.unit, self.desc, self.scale = total, initial, unit, desc, scale
        self.interval, self.start = interval, time.monotonic()
        self.last = self.start
        self.initial = initial
        self.bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
            self.bar = tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc,
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int, extra: str = "") -> None:
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
        text = (f"{self.desc}: {self.n * self.scale:,.0f}/{self.total * self.scale:,.0f} {self.unit} "
                f"({pct:.1f}%), {rate * self.scale:,.0f} {self.unit}/s, ETA {eta}")
        return f"{text}, {extra}" if extra else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
