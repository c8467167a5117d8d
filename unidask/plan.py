"""Tasks and their seeds: task i makes ``spec.task_count(i)`` unitaries from
``SeedSequence(seed, spawn_key=(i,))``, so its data depends on nothing but the config and i.
Also the run dir's layout: run.json, the staged shards, which tasks they hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import Spec
from .errors import InputError
from .shard import staged_tasks


def rng(spec: Spec, task: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(spec.seed, spawn_key=(task,))))


def seed_label(spec: Spec, task: int) -> str:
    return f"{spec.seed}/{task}"


def shard_dir(run_dir: Path) -> Path:
    return run_dir / "shards"


def load_run(run_dir: Path) -> dict:
    """The run's record (run.json): its fingerprint and spec."""
    path = Path(run_dir) / "run.json"
    try:
        record = json.loads(path.read_text())
        record["fingerprint"], record["spec"]["run"]["task_size"]
    except FileNotFoundError:
        raise InputError(f"{run_dir}: not a unidask run directory (no run.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable run record ({e})") from None
    return record


def staged_shards(run_dir: Path) -> list[Path]:
    # temporary files of a stage-out in progress start with "." and never end in .db
    return sorted(shard_dir(run_dir).glob("[!.]*.db"))


def todo(spec: Spec, staged: set[int] = frozenset()) -> range | list[int]:
    """Task numbers still to run (all of them when nothing is staged)."""
    if not staged:
        return range(spec.n_tasks)
    return [t for t in range(spec.n_tasks) if t not in staged]


def done(spec: Spec) -> set[int]:
    """Tasks present in the run's staged shards."""
    return set(staged_tasks(staged_shards(spec.run_dir)))


def ranges(tasks: list[int] | range) -> str:
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
