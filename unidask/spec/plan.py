"""Tasks and their seeds: task i makes ``task_count(i)`` unitaries from
``SeedSequence(seed, spawn_key=(i,))``, so its data depends on nothing but the config and i."""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

import numpy as np

if TYPE_CHECKING:
    from .config import Spec


def n_tasks(count: int, task_size: int) -> int:
    """Tasks of a run of ``count`` unitaries, ``task_size`` each (the last may be short)."""
    return -(-count // task_size)


def task_count(count: int, task_size: int, task: int) -> int:
    """Unitaries in task ``task``."""
    return min(task_size, count - task * task_size)


def rng(spec: Spec, task: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.seed, spawn_key=(task,))))


def seed_label(spec: Spec, task: int) -> str:
    return f"{spec.seed}/{task}"


def todo(spec: Spec, staged: Collection[int] = frozenset()) -> range | list[int]:
    """Task numbers still to run (all of them when nothing is staged)."""
    if not staged:
        return range(spec.n_tasks)
    return [t for t in range(spec.n_tasks) if t not in staged]


def ranges(tasks: Collection[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``, for messages that name missing tasks."""
    out, tasks = [], sorted(tasks)
    i = 0
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        out.append(str(tasks[i]) if i == j else f"{tasks[i]}-{tasks[j]}")
        i = j + 1
    return ", ".join(out)
