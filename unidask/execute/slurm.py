"""Submitting to SLURM: rendering the job scripts (every parameter quoted, from ``[cluster]``),
``sbatch``, and what ``sinfo`` says of the nodes. The job's own environment (node, job id, the
queue) is :mod:`identity`'s; the addresses hosts reach each other by, :mod:`network`'s."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..core import files
from ..core.errors import InputError, RunError
from ..spec.config import Spec, walltime_seconds
from ..store.identity import job_id
from ..store.rundir import RunDir
from .network import dashboard_address, node_address

log = logging.getLogger(__name__)


# -- the job scripts -------------------------------------------------------------------------------

def template(name: str) -> str:
    return resources.files(__package__).joinpath("jobscripts", name).read_text()


def render(script: str, directives: list[str], env: dict[str, str]) -> str:
    """The script with its ``#SBATCH`` lines replaced by ``directives`` and ``env`` exported first."""
    lines = script.splitlines()
    body = [line for line in lines[1:] if not line.startswith("#SBATCH")]
    at = next(i for i, line in enumerate(body) if not line.startswith("#"))  # after the comments
    head = [lines[0], *(f"#SBATCH {d}" for d in directives)]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(head + body[:at] + exports + body[at:]) + "\n"


def job_env(spec: Spec, rd: RunDir) -> list[str]:
    """What a generation job needs to know of its run, as shell exports: the run dir's paths (of
    this job, from ``SLURM_JOB_ID``), the run's security, its workers per node and where the
    scheduler and its dashboard listen."""
    c = spec.cluster
    host = node_address(c.interface)
    values = {"RUN_DIR": rd.path, "LOGS": rd.logs, "SCHEDULER_FILE": rd.scheduler_file(job_id() or "local"),
              "SECURITY": c.security, "SCHEDULER_HOST": host, "INTERFACE": c.interface or "",
              "WORKERS": c.workers, "DASHBOARD": dashboard_address(c.dashboard_address, host),
              "MAX_RESUBMITS": c.max_resubmits}
    return [f"export {k}={shlex.quote(str(v))}" for k, v in values.items()]


@dataclass
class Submission:
    generate_job: str | None
    merge_job: str | None
    scripts: dict[str, str]
    logs: Path
    spec_path: Path
    spec_text: str
    status: int | None = None      # the merge job's exit status, with --wait


def directive(option: str) -> str:
    """One ``#SBATCH`` option with its value quoted (sbatch unquotes it), so a value with spaces
    stays one value."""
    name, eq, value = option.partition("=")
    return f"{name}={shlex.quote(value)}" if eq and shlex.quote(value) != value else option


def job_scripts(spec: Spec, spec_path: Path, logs: Path) -> dict[str, str]:
    """The rendered generation and merge scripts for ``spec``, whose resolved copy each job reads
    from ``spec_path``: every job parameter from ``[cluster]``."""
    c = spec.cluster
    common = [*([f"--partition={c.partition}"] if c.partition else []),
              *([f"--account={c.account}"] if c.account else []), *c.job_extra_directives]
    stop_before = min(int(c.stop_before), max(60, walltime_seconds(c.job_walltime()) // 2))
    # --no-kill: a node that fails takes only its own workers; the run goes on without them.
    # --requeue: stopped before its walltime (or preempted), the job requeues itself under its own
    # id, which the merge job's dependency names; its log grows across the requeues (append)
    generate = [f"--job-name=unidask-{spec.name}", f"--nodes={c.nodes}", "--ntasks-per-node=1",
                "--exclusive", "--no-kill", f"--time={c.job_walltime()}", f"--signal=B:USR1@{stop_before}",
                "--requeue", "--open-mode=append", f"--output={logs}/%x-%j.out", *common]
    merge = [f"--job-name=unidask-merge-{spec.name}", "--nodes=1", "--ntasks=1",
             f"--time={c.job_walltime()}", f"--output={logs}/%x-%j.out", *common]
    env = {"UNIDASK_PYTHON": sys.executable}
    line = f"# args: {shlex.quote(str(spec_path))}\n"
    return {"generate": render(template("generate.sbatch"), list(map(directive, generate)), env) + line,
            "merge": render(template("merge.sbatch"), list(map(directive, merge)), env) + line}


def sbatch(script: Path, args: list[str], extra: Sequence[str] = (), *, wait: bool = False) -> tuple[str, int]:
    """Submit ``script``; return the job id and, with ``wait``, the job's exit status."""
    cmd = ["sbatch", "--parsable", *extra, *(["--wait"] if wait else []), str(script), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise InputError("sbatch not found: is this a SLURM login node? (see cluster/ for a local SLURM)") from e
    job = r.stdout.strip().split(";")[0].splitlines()[0] if r.stdout.strip() else ""
    if not job:
        said = " / ".join(line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip())
        raise RunError(f"sbatch refused {script.name}: {said}")   # one line, however many sbatch wrote
    return job, r.returncode


def check_accepts(script: str) -> None:
    """Ask SLURM whether it would take the job ``script`` (``sbatch --test-only``); raise with
    SLURM's reason where it would not."""
    check = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True)
    if check.returncode != 0:
        reason = [line for line in check.stderr.splitlines() if "error" in line] or [check.stderr.strip()]
        raise RunError(f"SLURM refuses the worker jobs: {reason[-1]}")


def node_cores(partition: str | None = None) -> int | None:
    """The CPUs of the smallest node of ``partition`` (else of every partition), None where SLURM
    gives no answer here."""
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%c", *(["-p", partition] if partition else [])],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    cpus = [int(x) for x in r.stdout.split() if x.isdigit()]
    return min(cpus) if r.returncode == 0 and cpus else None


def submit(spec: Spec, *, dry_run: bool = False, wait: bool = False) -> Submission:
    """Write the run's resolved spec for its jobs (``RUN_DIR/jobs/spec-*.json``: the job reads it
    instead of the config, which may change or not be there), render both job scripts, submit
    generation, then merge with ``--dependency=afterok``. A ``task_size = "auto"`` keeps the
    size its run.json records (a resubmitted run), else the generation job sizes it on its first
    node, for the job's nodes and their cores."""
    rd = RunDir(spec.run_dir)
    spec = rd.sized(spec)
    if (cores := node_cores(spec.cluster.partition)) and (said := spec.cluster.cores_warning(cores)):
        log.warning("%s (SLURM's nodes here have %d)", said, cores)   # --exclusive: the job gets them all
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spec_path = rd.jobs / f"spec-{stamp}.json"
    sub = Submission(None, None, job_scripts(spec, spec_path, rd.logs), rd.logs, spec_path,
                     json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    if dry_run:
        return sub
    if spec.task_size == "auto":
        rd.create()   # the job records the run, once it has sized its tasks
    else:
        rd.prepare(spec, resume=True)
    rd.logs.mkdir(mode=0o700, exist_ok=True)
    rd.jobs.mkdir(mode=0o700, exist_ok=True)
    files.write_atomic(spec_path, sub.spec_text)
    paths = {}
    for name, text in sub.scripts.items():
        paths[name] = files.write_atomic(rd.jobs / f"{name}-{stamp}.sbatch", text)
    sub.generate_job, _ = sbatch(paths["generate"], [str(spec_path)])
    sub.merge_job, status = sbatch(paths["merge"], [str(spec_path)],
                                   [f"--dependency=afterok:{sub.generate_job}", "--kill-on-invalid-dep=yes"],
                                   wait=wait)
    if wait:
        # a merge job cancelled because generation failed also "ends" with 0 under sbatch --wait;
        # SLURM creates a job's output file only when it starts, so that tells the two apart
        ran = any(rd.logs.glob(f"*-{sub.merge_job}.out"))
        sub.status = status if ran else 1
        if not ran:
            log.warning("generation job %s did not complete (see %s); merge job %s was cancelled. "
                        "Submit again to resume.", sub.generate_job, rd.logs, sub.merge_job)
    return sub
