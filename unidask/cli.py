"""The ``unidask`` command: each subcommand a few lines over the Python API. Parsing the command
line's own syntax (``--set``, ``--ids``, ``--time``) happens here, in click parameter types."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from typing import Any

import click

from ._version import __version__
from .core import progress
from .core.errors import UnidaskError
from .core.fmt import duration

log = logging.getLogger(__name__)


class Override(click.ParamType):
    """``section.key=value`` -> ``("section.key", value)``, the value read as TOML."""

    name = "SECTION.KEY=VALUE"

    def convert(self, value: Any, param, ctx) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        from .spec.config import parse_override

        try:
            return parse_override(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class IdRange(click.ParamType):
    """``A:B`` (either end may be left out) -> ``(A, B)`` with None for a missing end."""

    name = "A:B"

    def convert(self, value: Any, param, ctx) -> tuple[int | None, int | None]:
        if isinstance(value, tuple):
            return value
        a, sep, b = value.partition(":")
        try:
            if sep:
                return (int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            pass
        self.fail(f"{value!r}: expected A:B, e.g. 0:1000", param, ctx)


class Walltime(click.ParamType):
    """``HH:MM:SS`` or ``D-HH:MM:SS``, checked, kept as given."""

    name = "HH:MM:SS"

    def convert(self, value: Any, param, ctx) -> str:
        from .spec.config import walltime_seconds

        try:
            walltime_seconds(value)
        except ValueError as e:
            self.fail(f"{value!r} {e}", param, ctx)
        return value


set_option = click.option("--set", "overrides", multiple=True, type=Override(),
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
def run(config: str, overrides: tuple[tuple[str, Any], ...], resume: bool, no_merge: bool) -> None:
    """Run CONFIG: generate, stage every node's shard, merge."""
    from .core.errors import Interrupted
    from .cost.sizing import resolve
    from .execute.driver import run as run_spec
    from .execute.stopping import stop_on_signal
    from .spec.config import load_config
    from .store.rundir import RunDir

    spec = resolve(load_config(config, dict(overrides)))
    rd = RunDir(spec.run_dir)
    log.info("unidask %s: %s x %s %s in %d task(s) -> %s", __version__, f"{spec.count:,}", spec.kind,
             spec.dtype, spec.n_tasks, spec.run_dir)
    try:
        with stop_on_signal():
            result = run_spec(spec, resume=resume, merge=not no_merge)
    except Interrupted:
        # what a Ctrl-C leaves, and the command that finishes it
        argv = list((click.get_current_context().obj or {}).get("argv", ["run", config]))
        again = shlex.join(["unidask", *argv, *([] if "--resume" in argv else ["--resume"])])
        done = len(rd.staged_tasks())
        raise Interrupted(f"interrupted: {done:,} of {spec.n_tasks:,} tasks staged in {spec.run_dir}; "
                      f"to finish: {again}") from None
    if result.complete is not None:
        click.echo(f"complete: {result.complete} holds all {spec.count:,} unitaries; nothing to do")
        return
    # every staged file (first copies and deltas, this invocation's and earlier ones'), which the
    # merge reads: result.shards holds only the final stage-outs that had something new
    if result.skipped_tasks == spec.n_tasks:   # nothing to generate: the merge's line says the rest
        if result.merged is None:
            click.echo(f"nothing to do: all {spec.n_tasks:,} tasks are staged in {rd.shards}")
    else:
        click.echo(f"wrote {result.written:,} unitaries in {duration(result.seconds)} "
                   f"({result.rate:,.0f}/s) on {len(result.per_node)} node(s); "
                   f"{len(rd.staged_shards()):,} shard file(s) in {rd.shards}")
    if result.merged is not None:
        click.echo(result.merged.summary())
    if result.written:   # where the time went: what a faster start, generation or merge would save
        click.echo(f"time: start {duration(result.start_seconds)}, generation {duration(result.seconds)}"
                   + (f", merge after the last task {duration(result.merged.seconds)}" if result.merged else ""))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--nodes", type=click.IntRange(min=1), help="Nodes of the generation job (cluster.nodes).")
@click.option("--time", "time_limit", type=Walltime(), help="Walltime of each job (cluster.walltime).")
@click.option("--partition", help="SLURM partition (cluster.partition).")
@click.option("--account", help="SLURM account (cluster.account).")
@click.option("--sbatch", "extra", multiple=True, metavar="OPTION",
              help="One more sbatch option for both jobs, e.g. --sbatch=--qos=high (repeatable; "
                   "after cluster.job_extra_directives).")
@click.option("--dry-run", is_flag=True, help="Print the job scripts and the jobs' spec, submit nothing.")
@click.option("--wait", is_flag=True, help="Wait for both jobs; exit with the merge job's status.")
def submit(config: str, overrides: tuple[tuple[str, Any], ...], nodes: int | None, time_limit: str | None,
           partition: str | None, account: str | None, extra: tuple[str, ...], dry_run: bool,
           wait: bool) -> int:
    """Submit CONFIG to SLURM: the generation job, then the merge job after it. Every job
    parameter comes from the config's [cluster]; these options override it."""
    from .execute.slurm import submit as submit_jobs
    from .spec.config import load_config

    flags = {"cluster.nodes": nodes, "cluster.walltime": time_limit, "cluster.partition": partition,
             "cluster.account": account}
    given = {**dict(overrides), **{k: v for k, v in flags.items() if v is not None}}
    spec = load_config(config, given)
    if extra:
        spec = load_config(config, {**given, "cluster.job_extra_directives":
                                    [*spec.cluster.job_extra_directives, *extra]})
    sub = submit_jobs(spec, dry_run=dry_run, wait=wait)
    if dry_run:
        for name, text in sub.scripts.items():
            click.echo(f"# ---- {name}.sbatch ----\n{text}")
        click.echo(f"# ---- {sub.spec_path} ----\n{sub.spec_text}", nl=False)
        return 0
    click.echo(f"submitted generation job {sub.generate_job} and merge job {sub.merge_job} "
               f"(after it succeeds)\nlogs: {sub.logs}/\ndashboard: once job {sub.generate_job} runs, "
               f"its log ({sub.logs}/unidask-{spec.name}-{sub.generate_job}.out) gives the link and "
               "the ssh tunnel to it")
    if wait:
        click.echo(f"merge job {sub.merge_job} ended with status {sub.status}")
        return sub.status or 0
    return 0


@cli.command("tls")
@click.argument("run_dir", type=click.Path(file_okay=False))
def tls_args(run_dir: str) -> None:
    """Make RUN_DIR's TLS certificates if missing; print the dask scheduler/worker flags for them."""
    from .execute.tls import cli_args

    click.echo(" ".join(cli_args(run_dir)))


@cli.command()
@click.option("--interface", default="", help="The network interface to use (cluster.interface).")
@click.option("--towards", metavar="HOST", help="The host to be reached from (the scheduler).")
def address(interface: str, towards: str | None) -> None:
    """Print this node's address that the other nodes reach (job scripts: a worker's --host)."""
    from .execute.network import node_address

    click.echo(node_address(interface or None, towards))


@cli.command("config")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--get", "key", metavar="SECTION.KEY", help="Print one value only.")
@click.option("--dask-env", is_flag=True, help="Print unidask's Dask settings as shell exports (job scripts).")
@click.option("--job-env", is_flag=True,
              help="Print what a generation job needs (run dir paths, security, Dask settings) as shell exports.")
def show_config(config: str, overrides: tuple[tuple[str, Any], ...], key: str | None, dask_env: bool,
                job_env: bool) -> int:
    """Print CONFIG as unidask reads it: defaults, overrides and paths filled in (JSON)."""
    from .execute.slurm import job_env as job_exports
    from .spec.config import dask_exports, load_config
    from .store.rundir import RunDir

    spec = load_config(config, dict(overrides))
    data = spec.to_dict()
    if dask_env or job_env:
        click.echo("\n".join([*(job_exports(spec, RunDir(spec.run_dir)) if job_env else []), *dask_exports()]))
        return 0
    if key is None:
        click.echo(json.dumps(data, indent=2))
        return 0
    section, _, name = key.partition(".")
    try:
        value = data[section][name]
    except KeyError as e:
        raise click.UsageError(f"no config key {key!r}") from e
    c = spec.cluster
    if key == "cluster.max_in_flight" and value is None:   # the value the run will use
        value = (c.in_flight(c.nodes * c.local_per_node()) if c.mode == "local"
                 else "2 per worker thread + 4, once the workers have joined")
    elif key == "cluster.workers" and value == "auto" and c.mode == "local":
        value = c.local_per_node()
    elif key == "run.task_size" and value == "auto":
        from .cost.sizing import resolve

        value = resolve(spec).task_size
    click.echo("null" if value is None else json.dumps(value) if isinstance(value, (list, tuple, dict)) else value)
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output database (default RUN_DIR/NAME.db).")
@click.option("--append", is_flag=True, help="Add shards to an existing output instead of rebuilding it.")
@click.option("--skip-bad", is_flag=True, help="Merge the good shards, list the rejected ones.")
def merge(run_dir: str, out: str | None, append: bool, skip_bad: bool) -> int:
    """Merge the staged shards of RUN_DIR into one database. Exits 1 when tasks are missing."""
    from .store.merge import merge as merge_run

    report = merge_run(run_dir, out, append=append, skip_bad=skip_bad)
    click.echo(report.summary())
    return 0 if report.complete and not report.rejected else 1


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
def clean(run_dir: str, dry_run: bool) -> None:
    """Remove what RUN_DIR's run no longer needs, never the only copy of a task: once its merged
    database holds every task (checked again), the staged shards, set-aside files and this
    machine's leftover live shards; before that, only stage those leftovers."""
    from .store.clean import clean as clean_run

    report = clean_run(run_dir, dry_run=dry_run)
    for p in report.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {p}")
    click.echo(("(dry run) " if dry_run else "") + report.summary())


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(run_dir: str, as_json: bool) -> int:
    """Tasks done and missing in RUN_DIR, per node."""
    from .views.status import status as run_status

    return show(run_status(run_dir), as_json)


def show(figures: Any, as_json: bool) -> int:
    """Print what a ``to_dict``/``format`` object says: JSON for scripts, else for a person."""
    click.echo(json.dumps(figures.to_dict(), indent=2) if as_json else figures.format())
    return 0


@cli.command("plan")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--nodes", type=click.IntRange(min=1), help="Nodes (default: the config's cluster.nodes).")
@click.option("--cores", type=click.IntRange(min=1),
              help="Cores per node (default: this machine's, shared out as local mode does).")
@click.option("--seconds-per-unitary", type=click.FloatRange(min=0, min_open=True),
              help="The generator's cost on the nodes, where it differs from this machine's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@set_option
def plan_cmd(config: str, nodes: int | None, cores: int | None, seconds_per_unitary: float | None,
             as_json: bool, overrides: tuple[tuple[str, Any], ...]) -> int:
    """What CONFIG's run will be: tasks, duration, core-hours, bytes, shards, merge, warnings."""
    from .cost.estimate import estimate
    from .spec.config import load_config

    # an "auto" task size is sized by the plan, for its --nodes and --cores
    return show(estimate(load_config(config, dict(overrides)), nodes, cores, seconds_per_unitary), as_json)


@cli.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info(db: str, as_json: bool) -> int:
    """What DB holds: rows, matrices, generator, seed, tasks, when merged, size."""
    from .views.info import info as db_info

    return show(db_info(db), as_json)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="report.html", show_default=True)
def report(run_dir: str, out: str) -> None:
    """Write a self-contained HTML report of how RUN_DIR's run went."""
    from .views.report import report as write_report

    click.echo(f"report written to {write_report(run_dir, out)}")


@cli.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["npy", "h5", "txt"]),
              help="Default: from OUT: .npy, .h5 or .hdf5; else txt (OUT a directory; up to 1000 files "
                   "unless --format txt asks for more).")
@click.argument("out", type=click.Path())
@click.option("--ids", type=IdRange(), help="Export ids A to B-1 only.")
@click.option("--unique", type=click.Choice(["circuit", "unitary"]),
              help="Only the first row of each distinct circuit, or unitary up to a global phase.")
@click.option("--chunk-rows", type=click.IntRange(min=1),
              help="HDF5: rows a chunk (default: about 64 KiB; larger for scans, smaller for random reads).")
@click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5: compress the chunks.")
def export(db: str, fmt: str | None, out: str, ids: tuple[int | None, int | None] | None,
           unique: str | None, chunk_rows: int | None, compression: str | None) -> None:
    """Export DB as one .npy array (k, n, n) with its metadata beside it, one HDF5 file, or one
    .txt file per unitary in OUT."""
    from .store.export import IdsOutOfRange
    from .store.export import export as export_db

    try:
        n = export_db(db, fmt, out, ids, unique, chunk_rows=chunk_rows, compression=compression)
    except IdsOutOfRange as e:
        raise click.BadParameter(str(e), param_hint="'--ids'") from e
    click.echo(f"exported {n:,} unitaries to {out}")


@cli.command()
@click.argument("db", type=click.Path(dir_okay=False))
@click.option("--against", type=click.Path(dir_okay=False), metavar="CONFIG",
              help="Also check it is the data CONFIG makes (some tasks are generated again).")
@click.option("--sample", type=click.IntRange(min=1), default=3, show_default=True,
              help="With --against: how many tasks, evenly spread, to generate again.")
@click.option("--full", is_flag=True, help="With --against: generate every task again.")
@click.option("--stats", "with_stats", is_flag=True,
              help="Also test that the data follows the law its generator states (a line per test).")
@click.option("--stats-rows", type=click.IntRange(min=100), default=5000, show_default=True,
              help="With --stats: rows sampled (with a fixed seed).")
@set_option
@click.pass_context
def verify(ctx: click.Context, db: str, against: str | None, sample: int, full: bool, with_stats: bool,
           stats_rows: int, overrides: tuple[tuple[str, Any], ...]) -> int:
    """Check DB: every planned task whole and unaltered, nothing else, every matrix finite and
    unitary, the total; with --stats, its distribution too. Exit 0 only when all holds (1: it does
    not; 3: --stats could not test its distribution)."""
    from .spec.config import load_config
    from .views.stats import check
    from .views.verify import verify as verify_db

    given = {name for name in ("sample", "full", "overrides", "stats_rows")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    for name, flag, needs in (("sample", "--sample", against), ("full", "--full", against),
                              ("overrides", "--set", against), ("stats_rows", "--stats-rows", with_stats)):
        if name in given and not needs:
            needed = "--stats" if name == "stats_rows" else "--against CONFIG"
            raise click.UsageError(f"{flag} does nothing without {needed}")
    if {"sample", "full"} <= given:
        raise click.UsageError("--sample does nothing with --full (every task is generated again)")
    verdict = verify_db(db, load_config(against, dict(overrides)) if against else None, sample=sample, full=full)
    click.echo(verdict.line())
    if not (with_stats and verdict.ok):
        return 0 if verdict.ok else 1
    result = check(db, stats_rows)
    for c in result.checks:
        click.echo(c.line())
    click.echo(result.summary())
    return {"OK": 0, "FAILED": 1, "NOT TESTED": 3}[result.verdict]


@cli.command("generators")
def list_generators() -> None:
    """List the generators and their parameters."""
    from .spec.generators import LAWS, PLUGIN_PARAMS, REGISTRY

    for g in REGISTRY.values():
        click.echo(f"{g.kind}: {g.doc} (law {g.law})")
        for name, p in g.params.items():
            click.echo(f"    {name}: {p.describe()}")
    click.echo("module:function: your own function(rng, count, **params) -> (count, n, n) array "
               "[, list of meta dicts]; its keyword parameters become generator keys, and")
    for name, p in PLUGIN_PARAMS.items():
        click.echo(f"    {name}: {p.describe()}")
    click.echo(f"    its law, for verify --stats: @unidask.law(LAW) on the function, LAW one of {', '.join(LAWS)}")
    click.echo("every kind also takes dtype: complex128 (default) or complex64")


def one_line(text: str) -> str:
    """An error as one printable line, whatever a damaged file put in it."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and an exit status, never a traceback."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    handler = progress.log_to_stderr()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        code = cli.main(args=argv, prog_name="unidask", standalone_mode=False, obj={"argv": argv})
    except click.ClickException as e:   # a usage error is one line too, as every other error
        click.echo(f"unidask: error: {e.format_message()}", err=True)
        code = e.exit_code
    except UnidaskError as e:
        click.echo(f"unidask: error: {one_line(str(e))}", err=True)
        code = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("unidask: interrupted", err=True)
        code = 130
    finally:
        progress.log.removeHandler(handler)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
