"""Backup tasks for stragglers, as MapReduce runs them (Dean and Ghemawat, OSDI 2004, 3.6): a
task that has run much longer than its peers gets a second copy on another worker, and whichever
finishes first is kept. Safe because a unidask task is idempotent: the same seed gives the same
bytes, and a task written twice is kept once by its checksum. A stopped or very slow worker (an NFS
stall, a swapping node, a hung driver) then costs a bounded delay, not the run."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Hashable, Iterable, Mapping

FACTOR = 4.0        # a task is a straggler past this many times the median task time...
FLOOR = 10.0        # ...and never before this many seconds (a task may queue behind one on its worker)
MIN_FINISHED = 3    # no verdict before this many tasks have finished
RECENT = 200        # task times the median is taken over


class Stragglers:
    """When each running task was first seen running, and which have run too long."""

    def __init__(self, factor: float = FACTOR, floor: float = FLOOR):
        self.factor, self.floor = factor, floor
        self.durations: deque[float] = deque(maxlen=RECENT)
        self.seen: dict[Any, tuple[float, str]] = {}   # key -> (first seen running, worker)

    def finished(self, seconds: float) -> None:
        self.durations.append(seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.durations) if self.durations else 0.0

    @property
    def threshold(self) -> float | None:
        """Seconds after which a running task is a straggler; None until enough tasks finished."""
        if len(self.durations) < MIN_FINISHED:
            return None
        return max(self.floor, self.factor * self.median)

    def due(self, processing: Mapping[str, Iterable[Hashable]], now: float
            ) -> list[tuple[Hashable, str, float]]:
        """Given the scheduler's ``{worker: keys running there}``, the tasks that have run longer
        than :attr:`threshold`: (key, worker, seconds)."""
        running = {}
        for address, keys in processing.items():
            for key in keys:
                key = tuple(key) if isinstance(key, list) else key
                first, where = self.seen.get(key, (now, address))
                running[key] = (first if where == address else now, address)   # moved: starts again
        self.seen = running
        limit = self.threshold
        if limit is None:
            return []
        return [(key, address, now - first) for key, (first, address) in running.items() if now - first > limit]
