"""Numbers, sizes and times as people read them: the one place every message, page and report
takes its words for a duration, a size or a moment from."""

from __future__ import annotations

import math
import time


def duration(seconds: float | None) -> str:
    """``3725`` -> ``"1 h 02 min"``; a person's reading of a duration, not a clock's."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 0.0995:
        return f"{max(0.0, seconds) * 1e3:.2g} ms"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def size(nbytes: float) -> str:
    """``1.5e9`` -> ``"1.5 GB"``: bytes in the unit that reads best."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def clock(t: float | None) -> str:
    """A wall-clock time in the viewer's local time; the date only when it is not today."""
    if t is None:
        return "-"
    fmt = "%H:%M:%S" if time.localtime(t)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, time.localtime(t))


def moment(t: float | None) -> str:
    """A date and time in the viewer's local time, with its zone: for records read later."""
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))
