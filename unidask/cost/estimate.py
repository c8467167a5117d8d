"""``unidask plan CONFIG``: what a run will be, before it spends queue time: tasks and their time,
duration and core-hours, shards and bytes on local and shared storage, the merged database and
its merge, and warnings (scheduler-bound, too few tasks per worker, too many shards).

The generator's cost is measured here, on this machine, with a short calibration (the nodes may
be faster or slower: ``--seconds-per-unitary`` overrides it); the one-of-a-kind parts use the
figures of the benchmark (README, Performance and Scale).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.fmt import duration, size
from ..spec.config import Spec
from . import sizing
from .sizing import SCHEDULER_CPU, SCHEDULER_LOAD, TASKS_PER_WORKER

MERGE_BYTES_S = 230e6    # merge throughput at n = 4 on 2 cores, the slowest case measured
MERGE_FILE_S = 1.1e-3    # and per staged file, over its bytes (benchmark "shards", 2 cores)
MERGE_FILES_SHARE = 0.3  # the files' share of the merge's time beyond which plan warns


@dataclass
class Estimate:
    tasks: int
    task_size: int
    unitaries: int
    seconds_per_unitary: float
    nodes: int
    workers_per_node: int
    cores_per_node: int
    row_bytes: float
    stage_every: float
    shard_per: str
    measured: bool = True     # the generator's cost measured here, not given
    warnings: list[str] = field(default_factory=list)

    @property
    def workers(self) -> int:
        return self.nodes * self.workers_per_node

    @property
    def task_seconds(self) -> float:
        """A task's time, longer where a node's workers outnumber its cores and share them."""
        return self.task_size * self.seconds_per_unitary * max(1.0, self.workers_per_node / self.cores_per_node)

    @property
    def wall_seconds(self) -> float:
        """Rounds of tasks over the workers, or what the scheduler can hand out, whichever is slower."""
        rounds = math.ceil(self.tasks / self.workers) * (self.task_seconds + SCHEDULER_CPU)
        return max(rounds, self.tasks * SCHEDULER_CPU)

    @property
    def core_hours(self) -> float:
        return self.wall_seconds * self.nodes * min(self.workers_per_node, self.cores_per_node) / 3600

    @property
    def data_bytes(self) -> int:
        return int(self.unitaries * self.row_bytes)

    @property
    def shards(self) -> int:
        """Staged files: per shard, one per stage-out while it writes (a process shard's segments;
        a node shard's first copy, then its deltas), and the final one."""
        writers = self.workers if self.shard_per == "process" else self.nodes
        return writers * (1 + int(self.wall_seconds // self.stage_every))

    @property
    def local_bytes(self) -> int:
        """A node's peak use of its local disk: a node shard holds the node's whole share until the
        end; process shards hold what was written since the last stage-out, and the segment
        sealed then while it is copied (two intervals' worth)."""
        share = self.data_bytes / self.nodes
        if self.shard_per != "process" or self.wall_seconds <= 0:
            return int(share)
        return int(min(share, 2 * share * self.stage_every / self.wall_seconds))

    @property
    def merge_seconds(self) -> float:
        return self.data_bytes / MERGE_BYTES_S + self.shards * MERGE_FILE_S

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **{k: getattr(self, k) for k in (
            "workers", "task_seconds", "wall_seconds", "core_hours", "data_bytes", "local_bytes", "shards",
            "merge_seconds")}}

    def format(self) -> str:
        spu = self.seconds_per_unitary
        per_unitary = f"{spu * 1e6:,.1f} µs" if spu < 1e-3 else duration(spu)
        lines = [
            f"tasks       {self.tasks:,} of {self.task_size:,} unitaries, {duration(self.task_seconds)} each "
            f"({per_unitary} a unitary, {'measured here' if self.measured else 'as given'})",
            f"workers     {self.workers:,} ({self.nodes:,} node(s) x {self.workers_per_node})",
            f"duration    about {duration(self.wall_seconds)} of generation, {self.core_hours:,.1f} core-hours",
            f"data        {size(self.data_bytes)} merged; at most about {size(self.local_bytes)} of local "
            "disk per node",
            f"shards      about {self.shards:,} staged file(s) of {size(self.data_bytes / self.shards)} on average "
            f"({self.shard_per} shards, " + ("a segment" if self.shard_per == "process" else "a delta")
            + f" per stage-out every {duration(self.stage_every)})",
            f"merge       about {duration(self.merge_seconds)}",
        ]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def estimate(spec: Spec, nodes: int | None = None, cores: int | None = None,
             seconds_per_unitary: float | None = None) -> Estimate:
    """The run ``spec`` on ``nodes`` nodes of ``cores`` cores (default: the config's nodes, and
    this machine's cores per node as local mode shares them out). A ``task_size = "auto"`` is
    sized for those workers."""
    per_unitary, row = sizing.calibrate(spec)
    per_unitary = seconds_per_unitary or per_unitary
    on_cluster = nodes is not None or cores is not None
    nodes = nodes or spec.cluster.nodes
    cores_per_node = cores or spec.cluster.local_cores()
    per_node = spec.cluster.workers_per_node(cores_per_node)
    spec = sizing.resolve(spec, workers=nodes * per_node if on_cluster else None, measured=(per_unitary, row))
    e = Estimate(tasks=spec.n_tasks, task_size=spec.task_size, unitaries=spec.count,
                 seconds_per_unitary=per_unitary, nodes=nodes, workers_per_node=per_node,
                 cores_per_node=cores_per_node, row_bytes=row, stage_every=spec.storage.stage_every,
                 shard_per=spec.storage.shard_per, measured=seconds_per_unitary is None)
    if (cores or per_node > cores_per_node) and (said := spec.cluster.cores_warning(cores_per_node)):
        e.warnings.append(said)
    rate = e.workers / e.task_seconds if e.task_seconds > 0 else math.inf
    capacity = SCHEDULER_LOAD / SCHEDULER_CPU
    if rate > capacity and e.wall_seconds > 60:   # a minute's run is not worth a warning
        good = math.ceil(e.workers * SCHEDULER_CPU / SCHEDULER_LOAD / e.seconds_per_unitary)
        # tasks big enough for the scheduler, and still TASKS_PER_WORKER of them each: at most
        # this many workers (W^2 <= load * count * s/unitary / (TASKS_PER_WORKER * cpu per task))
        most = int(math.sqrt(SCHEDULER_LOAD * e.unitaries * e.seconds_per_unitary / TASKS_PER_WORKER / SCHEDULER_CPU))
        few = (f"; a run of {e.unitaries:,} keeps at most about {most:,} workers busy with "
               f"{TASKS_PER_WORKER}+ such tasks each" if most < e.workers else "")
        e.warnings.append(f"scheduler-bound: {e.workers:,} workers finish {rate:,.0f} tasks/s, more than "
                          f"the scheduler hands out at half its core ({capacity:,.0f}/s): set run.task_size "
                          f">= {good:,}" + few)
    if e.tasks < TASKS_PER_WORKER * e.workers:
        e.warnings.append(f"{e.tasks:,} tasks for {e.workers:,} workers: fewer than {TASKS_PER_WORKER} each, "
                          "so the run ends unevenly and backup tasks have little to run; a smaller "
                          "run.task_size gives more")
    opening, copying = e.shards * MERGE_FILE_S, e.data_bytes / MERGE_BYTES_S
    if opening > MERGE_FILES_SHARE * copying and opening > 60:
        e.warnings.append(f"about {e.shards:,} staged files of {size(e.data_bytes / e.shards)} on average: "
                          f"opening them adds {duration(opening)} to the merge's {duration(copying)} of "
                          "copying; a longer storage.stage_every or storage.shard_per = \"node\" gives fewer")
    local = spec.local_dir
    while not local.exists() and local != local.parent:
        local = local.parent
    st = os.statvfs(local)
    free = st.f_bavail * st.f_frsize
    if e.local_bytes > free:
        e.warnings.append(f"a node's local shards ({size(e.local_bytes)} at most) exceed the free space "
                          f"of {local} here ({size(free)}): check the nodes' local disks")
    return e
