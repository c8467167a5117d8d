"""Everything about SLURM behind one small interface: its environment variables, rendering and
submitting the job scripts (``sbatch``), and asking the queue (``squeue``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from . import files
from .config import Spec, format_override
from .errors import InputError, RunError
from .rundir import RunDir

log = logging.getLogger("unidask")


# -- the environment SLURM gives a job -------------------------------------------------------------

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


def node_address(interface: str | None = None, towards: str | None = None) -> str:
    """An address of this node that the other nodes can reach: ``interface``'s (dask-jobqueue's
    meaning), else the one this node reaches ``towards`` (the scheduler) from, else the one the
    default route leaves by, else (a compute node often has no default route) the first address
    of an interface that is up and not loopback. Dask's own guess falls back to 127.0.0.1 where
    there is no default route: a scheduler or worker there is unreachable."""
    names = [interface] if interface else [name for _, name in socket.if_nameindex() if name != "lo"]
    if not interface:
        for target in filter(None, (towards, "192.0.2.1")):   # TEST-NET-1: any default route
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))   # nothing is sent: the kernel picks the route and its source
                return s.getsockname()[0]
    for name in names:
        if (address := _interface_address(name)) is not None:
            return address
    if interface:
        raise InputError(f"cluster.interface {interface!r}: no IPv4 address on this node "
                         f"({', '.join(n for _, n in socket.if_nameindex())} exist)")
    return "127.0.0.1"


def login_address(interface: str | None = None) -> str:
    """An address of this (login) host that the compute nodes can reach, for a scheduler here
    (``mode = "slurm"``): ``interface``'s, else the one this host reaches SLURM's nodes from (their
    ``NodeAddr``). A login node's default route often leads out to the users, not to the nodes."""
    if interface:
        return node_address(interface)
    try:
        addrs = subprocess.run(["sinfo", "-h", "-N", "-o", "%o"], capture_output=True, text=True,
                               timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        addrs = []
    return node_address(towards=addrs[0] if addrs else None)


def _interface_address(name: str) -> str | None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:   # SIOCGIFADDR
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def walltime_seconds(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not m:
        raise InputError(f"walltime {text!r}: expected HH:MM:SS (or D-HH:MM:SS)")
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


# -- the job scripts -------------------------------------------------------------------------------

def template(name: str) -> str:
    return resources.files("unidask").joinpath("jobscripts", name).read_text()


def render(script: str, directives: list[str], env: dict[str, str]) -> str:
    """The script with its ``#SBATCH`` lines replaced by ``directives`` and ``env`` exported first."""
    lines = script.splitlines()
    body = [line for line in lines[1:] if not line.startswith("#SBATCH")]
    at = next(i for i, line in enumerate(body) if not line.startswith("#"))  # after the comments
    head = [lines[0], *(f"#SBATCH {d}" for d in directives)]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(head + body[:at] + exports + body[at:]) + "\n"


def job_env(spec: Spec) -> list[str]:
    """What a generation job needs to know of its run, as shell exports: the run dir's paths (of
    this job, from ``SLURM_JOB_ID``) and the run's security."""
    rd = RunDir(spec.run_dir)
    values = {"RUN_DIR": rd.path, "LOGS": rd.logs, "SCHEDULER_FILE": rd.scheduler_file(job_id() or "local"),
              "SECURITY": spec.cluster.security, "SCHEDULER_HOST": node_address(spec.cluster.interface),
              "INTERFACE": spec.cluster.interface or ""}
    return [f"export {k}={shlex.quote(str(v))}" for k, v in values.items()]


@dataclass
class Submission:
    generate_job: str | None
    merge_job: str | None
    scripts: dict[str, str]
    logs: Path
    status: int | None = None      # the merge job's exit status, with --wait
    args: list[str] = field(default_factory=list)


def job_scripts(spec: Spec, config: Path, args: list[str], *, nodes: int, time_limit: str,
                partition: str | None, account: str | None) -> dict[str, str]:
    """The rendered generation and merge scripts for ``spec``; ``args`` follow CONFIG."""
    logs = RunDir(spec.run_dir).logs
    common = [f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
    stop_before = min(int(spec.cluster.stop_before), max(60, walltime_seconds(time_limit) // 2))
    # --no-kill: a node that fails takes only its own workers; the run goes on without them
    generate = [f"--job-name=unidask-{spec.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                "--exclusive", "--no-kill", f"--time={time_limit}", f"--signal=B:USR1@{stop_before}",
                f"--output={logs}/%x-%j.out", *common]
    merge = [f"--job-name=unidask-merge-{spec.name}", "--nodes=1", "--ntasks=1",
             f"--time={time_limit}", f"--output={logs}/%x-%j.out", *common]
    env = {"UNIDASK_PYTHON": sys.executable}
    line = "# args: " + " ".join(shlex.quote(a) for a in [str(config), *args]) + "\n"
    return {"generate": render(template("generate.sbatch"), generate, env) + line,
            "merge": render(template("merge.sbatch"), merge, env) + line}


def sbatch(script: Path, args: list[str], extra: list[str] = (), *, wait: bool = False) -> tuple[str, int]:
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


def queued(jobs: list[str]) -> list[str]:
    """Which of ``jobs`` are still in the queue (pending or running)."""
    if not jobs:
        return []
    try:
        return subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True,
                              text=True, timeout=60).stdout.split()
    except (OSError, subprocess.TimeoutExpired):   # no answer is no evidence of a queued job
        return []


def submit(spec: Spec, config: str | os.PathLike, overrides: Mapping[str, Any] = {}, *, nodes: int = 2,
           time_limit: str = "01:00:00", partition: str | None = None, account: str | None = None,
           dry_run: bool = False, wait: bool = False) -> Submission:
    """Render both job scripts, submit generation, then merge with ``--dependency=afterok``.
    ``overrides`` (``{"section.key": value}``) reach both jobs as ``--set`` arguments."""
    config = Path(config).absolute()
    args = [a for key, value in overrides.items() for a in ("--set", format_override(key, value))]
    scripts = job_scripts(spec, config, args, nodes=nodes, time_limit=time_limit, partition=partition,
                          account=account)
    rd = RunDir(spec.run_dir)
    sub = Submission(None, None, scripts, rd.logs, args=args)
    if dry_run:
        return sub
    rd.prepare(spec, resume=True)
    rd.logs.mkdir(mode=0o700, exist_ok=True)
    rd.jobs.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = {}
    for name, text in scripts.items():
        paths[name] = files.write_atomic(rd.jobs / f"{name}-{stamp}.sbatch", text)
    sub.generate_job, _ = sbatch(paths["generate"], [str(config), *args])
    sub.merge_job, status = sbatch(paths["merge"], [str(config), *args],
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
