"""The ``unidask`` command: each subcommand a few lines over the Python API."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

import click

from . import __version__
from .errors import UnidaskError

set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config key (repeatable), e.g. --set run.count=1000.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unidask")
def cli() -> None:
    """Generate millions of unitary matrices on a cluster, into one SQLite database."""


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--resume", is_flag=True, help="Skip tasks already staged in the run dir and finish the rest.")
@click.option("--no-merge", is_flag=True, help="Stop after staging the shards.")
def run(config: str, overrides: tuple[str, ...], resume: bool, no_merge: bool) -> None:
    """Run CONFIG: generate, stage every node's shard, merge."""
    from .config import load_config
    from .driver import run as run_spec

    spec = load_config(config, list(overrides))
    click.echo(f"unidask {__version__}: {spec.count:,} x {spec.kind} {spec.dtype} in "
               f"{spec.n_tasks} task(s) -> {spec.run_dir}", err=True)
    from .slurm import stop_on_signal

    with stop_on_signal():
        result = run_spec(spec, resume=resume, merge=not no_merge)
    click.echo(f"wrote {result.written:,} unitaries in {result.seconds:.1f} s "
               f"({result.rate:,.0f}/s) on {len(result.per_node)} node(s); "
               f"{len(result.shards)} shard(s) staged in {spec.run_dir / 'shards'}")
    if result.merged is not None:
        click.echo(result.merged.summary())


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--time", "time_limit", default="01:00:00", show_default=True, help="Walltime, HH:MM:SS.")
@click.option("--partition", help="SLURM partition.")
@click.option("--account", help="SLURM account.")
@click.option("--dry-run", is_flag=True, help="Print the job scripts, submit nothing.")
@click.option("--wait", is_flag=True, help="Wait for both jobs; exit with the merge job's status.")
def submit(config: str, overrides: tuple[str, ...], nodes: int, time_limit: str, partition: str | None,
           account: str | None, dry_run: bool, wait: bool) -> int:
    """Submit CONFIG to SLURM: the generation job, then the merge job after it."""
    from .config import load_config
    from .slurm import submit as submit_jobs, walltime_seconds

    spec = load_config(config, list(overrides))
    walltime_seconds(time_limit)
    sub = submit_jobs(spec, config, list(overrides), nodes=nodes, time_limit=time_limit,
                      partition=partition, account=account, dry_run=dry_run, wait=wait)
    if dry_run:
        for name, text in sub.scripts.items():
            click.echo(f"# ---- {name}.sbatch ----\n{text}")
        return 0
    click.echo(f"submitted generation job {sub.generate_job} and merge job {sub.merge_job} "
               f"(after it succeeds)\nlogs: {sub.logs}/\ndashboard: once job {sub.generate_job} runs, "
               f"its first node N (squeue -j {sub.generate_job} -o %N) serves it on port 8787; from your "
               f"machine: ssh -N -L 8787:N:8787 {os.environ.get('HOSTNAME') or socket.gethostname()}, "
               "then open http://localhost:8787/unidask")
    if wait:
        click.echo(f"merge job {sub.merge_job} ended with status {sub.status}")
        return sub.status or 0
    return 0


@cli.command("tls")
@click.argument("run_dir", type=click.Path(file_okay=False))
def tls_args(run_dir: str) -> None:
    """Make RUN_DIR's TLS certificates if missing; print the dask scheduler/worker flags for them."""
    from .tls import cli_args

    click.echo(" ".join(cli_args(run_dir)))


@cli.command("config")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--get", "key", metavar="SECTION.KEY", help="Print one value only.")
@click.option("--dask-env", is_flag=True, help="Print unidask's Dask settings as shell exports (job scripts).")
def show_config(config: str, overrides: tuple[str, ...], key: str | None, dask_env: bool) -> int:
    """Print CONFIG as unidask reads it: defaults, overrides and paths filled in (JSON)."""
    from .config import dask_exports, load_config

    data = load_config(config, list(overrides)).to_dict()
    if dask_env:
        click.echo("\n".join(dask_exports()))
        return 0
    if key is None:
        click.echo(json.dumps(data, indent=2))
        return 0
    section, _, name = key.partition(".")
    try:
        click.echo(data[section][name])
    except KeyError:
        raise click.UsageError(f"no config key {key!r}") from None
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output database (default RUN_DIR/NAME.db).")
@click.option("--append", is_flag=True, help="Add shards to an existing output instead of rebuilding it.")
@click.option("--skip-bad", is_flag=True, help="Merge the good shards, list the rejected ones.")
def merge(run_dir: str, out: str | None, append: bool, skip_bad: bool) -> int:
    """Merge the staged shards of RUN_DIR into one database. Exits 1 when tasks are missing."""
    from .merge import merge as merge_run

    report = merge_run(run_dir, out, append=append, skip_bad=skip_bad)
    click.echo(report.summary())
    return 0 if report.complete and not report.rejected else 1


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(run_dir: str, as_json: bool) -> int:
    """Tasks done and missing in RUN_DIR, per node."""
    from .status import format_status, status as run_status

    st = run_status(run_dir)
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="report.html", show_default=True)
def report(run_dir: str, out: str) -> None:
    """Write a self-contained HTML report of how RUN_DIR's run went."""
    from .report import report as write_report

    click.echo(f"report written to {write_report(run_dir, out)}")


@cli.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["npy", "txt"]),
              help="Default: npy when OUT ends in .npy, else txt (OUT a directory).")
@click.argument("out", type=click.Path())
@click.option("--ids", metavar="A:B", help="Export ids A to B-1 only.")
def export(db: str, fmt: str | None, out: str, ids: str | None) -> None:
    """Export DB as one .npy array (k, n, n) or one .txt file per unitary in OUT."""
    from .dataset import export as export_db

    n = export_db(db, fmt or ("npy" if out.endswith(".npy") else "txt"), out, ids)
    click.echo(f"exported {n:,} unitaries to {out}")


@cli.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), metavar="CONFIG",
              help="Also check it is the data CONFIG makes (some tasks are generated again).")
@set_option
def verify(db: str, against: str | None, overrides: tuple[str, ...]) -> int:
    """Check DB: checksums, ids, unitarity, completeness. Exit 0 only when all holds."""
    from .config import load_config
    from .verify import verify as verify_db

    verdict = verify_db(db, load_config(against, list(overrides)) if against else None)
    click.echo(verdict.line())
    return 0 if verdict.ok else 1


@cli.command("generators")
def list_generators() -> None:
    """List the generators and their parameters."""
    from .generators import PLUGIN_PARAMS, REGISTRY

    for g in REGISTRY.values():
        click.echo(f"{g.kind}: {g.doc}")
        for name, p in g.params.items():
            click.echo(f"    {name}: {p.describe()}")
    click.echo("module:function: your own function(rng, count, **params) -> (count, n, n) array "
               "[, list of meta dicts]; its keyword parameters become generator keys, and")
    for name, p in PLUGIN_PARAMS.items():
        click.echo(f"    {name}: {p.describe()}")
    click.echo("every kind also takes dtype: complex128 (default) or complex64")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and an exit status, never a traceback."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        code = cli.main(args=argv, prog_name="unidask", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except UnidaskError as e:
        click.echo(f"unidask: error: {e}", err=True)
        code = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("unidask: interrupted", err=True)
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
