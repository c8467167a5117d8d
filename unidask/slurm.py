"""Everything about SLURM behind one small interface: render and submit the job scripts, and stop
cleanly on the signal SLURM sends before the walltime."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterator

from .config import Spec
from .errors import InputError, RunError, Stopped

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


_stop_message: str | None = None


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """Turn SLURM's pre-walltime signal (USR1, or TERM) into :class:`Stopped` in the main thread,
    so the driver stages every shard out before it exits. Later signals are ignored meanwhile."""
    global _stop_message

    def handler(signum, frame):
        global _stop_message
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        _stop_message = (f"stopped by {signal.Signals(signum).name} (walltime near?): every finished "
                         "task is staged; submit again to finish, it resumes")
        raise Stopped(_stop_message)

    _stop_message = None
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _stop_message = None
        for s, h in previous.items():
            signal.signal(s, h)


def check_stop() -> None:
    """Raise :class:`Stopped` if a stop signal came. The handler raises it already, but Python
    drops an exception raised inside a finalizer: a signal landing in a Dask future's ``__del__``
    would be lost, and the run would go on to its walltime. The driver calls this between tasks."""
    if _stop_message is not None:
        raise Stopped(_stop_message)


def template(name: str) -> str:
    return files("unidask").joinpath("jobscripts", name).read_text()


def render(script: str, directives: list[str], env: dict[str, str]) -> str:
    """The script with its ``#SBATCH`` lines replaced by ``directives`` and ``env`` exported first."""
    lines = script.splitlines()
    body = [line for line in lines[1:] if not line.startswith("#SBATCH")]
    at = next(i for i, line in enumerate(body) if not line.startswith("#"))  # after the comments
    head = [lines[0], *(f"#SBATCH {d}" for d in directives)]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(head + body[:at] + exports + body[at:]) + "\n"


def seconds_to_walltime(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def walltime_seconds(text: str) -> int:
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not m:
        raise InputError(f"--time {text!r}: expected HH:MM:SS (or D-HH:MM:SS)")
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


@dataclass
class Submission:
    generate_job: str | None
    merge_job: str | None
    scripts: dict[str, str]
    logs: Path
    status: int | None = None      # the merge job's exit status, with --wait


def job_scripts(spec: Spec, config: Path, overrides: list[str], *, nodes: int, time_limit: str,
                partition: str | None, account: str | None) -> dict[str, str]:
    """The rendered generation and merge scripts for ``spec``."""
    logs = spec.run_dir / "logs"
    common = [f"--partition={partition}"] * bool(partition) + [f"--account={account}"] * bool(account)
    stop_before = min(int(spec.cluster["stop_before"]), max(60, walltime_seconds(time_limit) // 2))
    generate = [f"--job-name=unidask-{spec.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                "--exclusive", f"--time={time_limit}", f"--signal=B:USR1@{stop_before}",
                f"--output={logs}/%x-%j.out", *common]
    merge = [f"--job-name=unidask-merge-{spec.name}", "--nodes=1", "--ntasks=1",
             f"--time={time_limit}", f"--output={logs}/%x-%j.out", *common]
    env = {"UNIDASK_PYTHON": sys.executable}
    args = " ".join(shlex.quote(a) for a in [str(config), *sum((["--set", o] for o in overrides), [])])
    return {"generate": render(template("generate.sbatch"), generate, env) + f"# args: {args}\n",
            "merge": render(template("merge.sbatch"), merge, env) + f"# args: {args}\n"}


def sbatch(script: Path, args: list[str], extra: list[str] = (), *, wait: bool = False) -> tuple[str, int]:
    """Submit ``script``; return the job id and, with ``wait``, the job's exit status."""
    cmd = ["sbatch", "--parsable", *extra, *(["--wait"] if wait else []), str(script), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise InputError("sbatch not found: is this a SLURM login node? (see cluster/ for a local SLURM)") from None
    job = r.stdout.strip().split(";")[0].splitlines()[0] if r.stdout.strip() else ""
    if not job:
        said = " / ".join(line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip())
        raise RunError(f"sbatch refused {script.name}: {said}")   # one line, however many sbatch wrote
    return job, r.returncode


def submit(spec: Spec, config: str | os.PathLike, overrides: list[str] = (), *, nodes: int = 2,
           time_limit: str = "01:00:00", partition: str | None = None, account: str | None = None,
           dry_run: bool = False, wait: bool = False, echo: Callable[[str], None] = print) -> Submission:
    """Render both job scripts, submit generation, then merge with ``--dependency=afterok``."""
    config = Path(config).absolute()
    scripts = job_scripts(spec, config, list(overrides), nodes=nodes, time_limit=time_limit,
                          partition=partition, account=account)
    logs = spec.run_dir / "logs"
    sub = Submission(None, None, scripts, logs)
    if dry_run:
        return sub
    from .driver import prepare_run_dir

    prepare_run_dir(spec, resume=True, private=True)
    jobs = spec.run_dir / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args = [str(config), *sum((["--set", o] for o in overrides), [])]
    paths = {}
    for name, text in scripts.items():
        paths[name] = jobs / f"{name}-{stamp}.sbatch"
        paths[name].write_text(text)
    sub.generate_job, _ = sbatch(paths["generate"], args)
    sub.merge_job, status = sbatch(paths["merge"], args, [f"--dependency=afterok:{sub.generate_job}",
                                                          "--kill-on-invalid-dep=yes"], wait=wait)
    if wait:
        # a merge job cancelled because generation failed also "ends" with 0 under sbatch --wait;
        # SLURM creates a job's output file only when it starts, so that tells the two apart
        ran = any(logs.glob(f"*-{sub.merge_job}.out"))
        sub.status = status if ran else 1
        if not ran:
            echo(f"generation job {sub.generate_job} did not complete (see {logs}); merge job "
                 f"{sub.merge_job} was cancelled. Submit again to resume.")
    return sub
