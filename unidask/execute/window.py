"""The tasks in flight: at most a window of them submitted at once, refilled in batches as they
finish, with backup copies of stragglers; which copy of a task counts. The driver waits on it,
woken by each completion."""

from __future__ import annotations

import itertools
import logging
from typing import Iterable

from distributed import Client, Future, as_completed

from ..core import daskapi
from ..core.errors import RunError, UnidaskError
from ..spec import generators
from ..spec.config import Spec
from . import worker
from .stragglers import Stragglers

log = logging.getLogger(__name__)


class Window:
    """Generation tasks of one run on ``client``: ``size`` in flight at most, the next submitted
    once a quarter of the window has finished (one message for many tasks: Dask's cost per task
    is less in a batch)."""

    def __init__(self, client: Client, spec: Spec, attempt: str, tasks: Iterable[int], size: int,
                 stage: bool = False):
        """``stage``: each task stages its shard out as it ends (:func:`worker.generate_task`)."""
        self.client, self.spec, self.attempt, self.size, self.stage = client, spec, attempt, size, stage
        self.prefix = generators.get(spec.kind).label(spec.params)
        self.todo = iter(tasks)
        self.refill = max(1, size // 4)
        # results fetched on the client's event loop as they finish, not by a round trip each
        self.completed = as_completed(with_results=True, raise_errors=False)
        self.task_of: dict[Future, int] = {}   # every copy in flight -> its task
        self.backed_up: set[int] = set()        # tasks with a backup copy running
        self.submit(size)

    def submit(self, n: int) -> None:
        """Submit up to ``n`` more tasks, in one message."""
        batch = list(itertools.islice(self.todo, n))
        if batch:
            new = self.client.map(worker.generate_task, [self.spec] * len(batch), batch,
                                  [self.attempt] * len(batch), [self.stage] * len(batch),
                                  key=[(self.prefix, t) for t in batch],
                                  pure=False, retries=2)
            self.add(new, batch)

    def add(self, futures: list[Future], tasks: list[int]) -> None:
        self.task_of.update(zip(futures, tasks))
        self.completed.update(futures)

    def __len__(self) -> int:
        """The copies in flight (a task and its backup count twice)."""
        return len(self.task_of)

    def wait(self, timeout: float) -> list[tuple[Future, dict]]:
        """The copies that finished, with their summaries, as soon as one has (at most
        ``timeout`` seconds: [] if none did)."""
        return daskapi.next_completed(self.completed, timeout)

    def finished(self, future: Future) -> int | None:
        """The task a finished copy completes, its other copy cancelled; None where the other
        copy finished first. Raises the task's error."""
        if future.status == "cancelled" or (task := self.task_of.pop(future, None)) is None:
            return None
        if future.status == "error":
            raise task_error(future)
        future.release()
        if task in self.backed_up:
            for other in [f for f, t in self.task_of.items() if t == task]:
                del self.task_of[other]   # a backup, or the straggler it backed up: not needed
                other.cancel()
            self.backed_up.discard(task)
        if self.size - len(self.task_of) >= self.refill:
            self.submit(self.size - len(self.task_of))
        return task

    def back_up(self, stragglers: Stragglers, workers: list[str], now: float) -> int:
        """Start a second copy of each task that has run much longer than its peers, on another
        worker; whichever copy finishes first is kept. Returns how many were started."""
        # generation tasks only: their keys are (prefix, task); stage-outs and backups are not
        running = {address: [k for k in keys if isinstance(k, (tuple, list)) and len(k) == 2 and k[0] == self.prefix]
                   for address, keys in self.client.processing().items()}
        pending, started = set(self.task_of.values()), 0
        for key, address, seconds in stragglers.due(running, now):
            task = int(key[1])
            others = [w for w in workers if w != address]
            if task in self.backed_up or task not in pending or not others:
                continue
            backup = self.client.submit(worker.generate_task, self.spec, task, self.attempt, self.stage, workers=others,
                                        allow_other_workers=False, key=(f"{self.prefix}-backup", task), pure=False,
                                        retries=2)
            self.backed_up.add(task)
            self.add([backup], [task])
            started += 1
            log.info("task %d has run %.0f s on %s (the median task: %.2f s): a backup copy started "
                     "on another worker", task, seconds, address, stragglers.median)
        return started

    def cancel(self) -> list[Future]:
        """Stop waiting on every copy in flight; returns them, for the client to cancel."""
        self.completed.clear()
        inflight, self.task_of = list(self.task_of), {}
        return inflight


def task_error(future: Future) -> UnidaskError:
    """The error of a failed task, for one line to the user: unidask's own errors as they are (a
    worker's bad input still exits 2), anything else a RunError naming the task."""
    exc = future.exception()
    if isinstance(exc, UnidaskError):
        return exc
    return RunError(f"task {future.key[1]} failed: {type(exc).__name__}: {exc}")
