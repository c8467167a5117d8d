"""Which node and which job this process is, from the environment SLURM gives a job, and whether
a job is still queued: what a shard's name and a run's lock record, and ask about, without the
rest of SLURM."""

from __future__ import annotations

import os
import socket
import subprocess


def node_name() -> str:
    """This node's identity: ``UNIDASK_NODE``, else SLURM's node name, else the host name."""
    return os.environ.get("UNIDASK_NODE") or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def job_nodes() -> int:
    """Nodes of this job (1 outside SLURM)."""
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or 1)


def submit_host() -> str:
    """Where the user submitted from (the login node an ssh tunnel goes through)."""
    return os.environ.get("SLURM_SUBMIT_HOST") or socket.gethostname()


def _squeue(jobs: list[str], states: str | None = None) -> list[str] | None:
    """Which of ``jobs`` SLURM lists (in ``states``, default pending or running); None where it
    gave no answer. An ended job's id is invalid to squeue: simply not listed."""
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i", *(["-t", states] if states else []), "-j", ",".join(jobs)],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.split() if r.returncode == 0 or "Invalid job id" in r.stderr else None


def queued(jobs: list[str]) -> list[str]:
    """Which of ``jobs`` are still in the queue (pending or running)."""
    return (_squeue(jobs) or []) if jobs else []   # no answer is no evidence of a queued job


def job_ended(job: str) -> bool | None:
    """Whether SLURM job ``job`` has ended: left the queue, or completing (None: no answer from
    SLURM here)."""
    listed = _squeue([job], "PD,CF,R,S")
    return None if listed is None else job not in listed

