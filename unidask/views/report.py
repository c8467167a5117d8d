"""``unidask report``: a self-contained HTML page (bokeh, inline resources) of how a run went, from
the run directory alone: its config and times, progress against the plan, throughput per node, task
durations, stage-outs, and a table per node."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core import files, fmt
from ..core.errors import writing
from ..store import db
from ..store.rundir import RunDir
from . import plots
from .status import RunStatus, status


def task_rows(run_dir: Path) -> list[tuple[int, str, float, float, int]]:
    """(task, node, started, finished, count) of every staged task, each task once."""
    seen: dict[int, tuple] = {}
    for row in db.rows_of(RunDir(run_dir).staged_shards(),
                          "SELECT task, node, started, finished, count FROM tasks"):
        seen.setdefault(row[0], row)
    return sorted(seen.values())


def flat(spec: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"run": {"count": 5}}`` -> ``[("run.count", 5)]``: the config as a person sets it."""
    out: list[tuple[str, Any]] = []
    for k, v in spec.items():
        out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


PAUSE_S = 10.0   # a gap with no task running at least this long is a pause (a stopped run, resumed)


def pauses(rows: list[tuple]) -> list[tuple[float, float]]:
    """The spans in which no task ran for :data:`PAUSE_S` or more: a run stopped and resumed."""
    out, reach = [], None
    for _, _, started, finished, _ in sorted(rows, key=lambda r: r[2]):
        if reach is not None and started - reach >= PAUSE_S:
            out.append((reach, started))
        reach = finished if reach is None else max(reach, finished)
    return out


def _rows(cells: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                   f"<td>{html.escape(v)}</td></tr>" for k, v in cells)


def summary_html(st: RunStatus, record: dict[str, Any], rows: list[tuple], n_stages: int) -> str:
    start = min((r[2] for r in rows), default=None)
    end = max((r[3] for r in rows), default=None)
    missing = st.to_dict()["missing"]
    paused = sum(b - a for a, b in pauses(rows))
    wall = "-" if start is None or end is None else fmt.duration(end - start - paused) + (
        f" running (and {fmt.duration(paused)} paused)" if paused else "")
    facts = [
        ("run dir", st.run_dir),
        ("created", fmt.moment(record.get("created"))),
        ("first task started", fmt.moment(start)),
        ("last task finished", fmt.moment(end)),
        ("wall time", wall),
        ("unitaries", f"{st.unitaries:,} of {st.count:,} staged"),
        ("tasks", f"{st.tasks_done:,} of {st.tasks_expected:,} done"
                  + (f", {st.tasks_missing:,} missing: {missing}" if missing else "")),
        ("throughput", f"{st.rate:,.0f} unitaries/s" if st.rate else "-"),
        ("staged", f"{fmt.size(st.bytes)} in {len(st.shards)} shard(s), {n_stages} stage-out(s)"),
        ("unidask", str(record.get("unidask_version", "?"))),
    ]
    if isinstance(phases := record.get("phases"), dict):   # the last invocation's, as its last line said
        facts.insert(5, ("phases", ", ".join(f"{what} {fmt.duration(phases[key])}" for key, what in (
            ("start", "start"), ("generation", "generation"), ("merge", "merge after the last task"))
            if isinstance(phases.get(key), (int, float)))))
    config = [(k, "" if v is None else str(v)) for k, v in flat(record["spec"]) if k != "run.run_dir"]
    per_node: dict[str, list] = {}
    for _, node, started, finished, count in rows:
        p = per_node.setdefault(node, [0, 0, started, finished])
        p[0] += 1
        p[1] += count
        p[2], p[3] = min(p[2], started), max(p[3], finished)
    nodes = "".join(
        f"<tr><td>{html.escape(n)}</td><td align=right>{t:,}</td><td align=right>{u:,}</td>"
        f"<td align=right>{u / (b - a) if b > a else 0:,.0f}</td></tr>"
        for n, (t, u, a, b) in sorted(per_node.items()))
    return (
        f"<h1>unidask run {html.escape(st.name)}</h1>"
        "<div style='display:flex;gap:3em;flex-wrap:wrap'>"
        f"<div><h3>the run</h3><table>{_rows(facts)}</table>"
        "<h3>nodes</h3><table border=1 cellpadding=4 style='border-collapse:collapse'>"
        "<tr><th>node</th><th>tasks</th><th>unitaries</th><th>unitaries/s</th></tr>"
        f"{nodes}</table></div>"
        f"<div><h3>config</h3><table>{_rows(config)}</table></div></div>")


def data_section(db: Path) -> list:
    """The data against theory: a histogram of each distribution :func:`stats.shown` names, with
    its theory's curve; a line saying why where there is none."""
    from bokeh.layouts import row
    from bokeh.models import Div

    from . import stats

    if not db.exists():
        return [Div(text=f"<h3>the data</h3><p>No merged database yet ({html.escape(str(db))}): "
                         "<code>unidask merge</code> it, then the report shows its distributions.</p>")]
    figures = []
    for i, d in enumerate(stats.shown(db)):
        f = plots.figure(d.title, d.x_label, "density", name=f"data-{i}")
        counts, edges = np.histogram(d.values, bins=40, range=(d.lo, d.hi))   # a density of all values
        f.quad(top=counts / max(1, len(d.values)) / (edges[1] - edges[0]), bottom=0, left=edges[:-1],
               right=edges[1:], fill_alpha=0.5, legend_label=f"the data ({len(d.values):,} values)")
        x = np.linspace(d.lo, d.hi, 400)[1:-1]
        f.line(x, d.theory(x), line_width=2, color="black", legend_label=d.theory_label)
        plots.legend_below(f)
        figures.append(f)
    text = ("<h3>the data against theory</h3><p>Sampled from the merged database; "
            "<code>unidask verify DB --stats</code> tests the same (README, Trust in the numbers).</p>"
            if figures else "<h3>the data</h3><p>No distribution known to unidask for this generator "
            "(<code>unidask verify DB --stats</code> checks what it can).</p>")
    rows = [row(*figures[i:i + 3], sizing_mode="stretch_width") for i in range(0, len(figures), 3)]
    return [Div(text=text, sizing_mode="stretch_width"), *rows]


def report(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import BoxAnnotation, Div, Label, Range1d, Span
    from bokeh.resources import INLINE

    run_dir, out = Path(run_dir), Path(out)
    rd = RunDir(run_dir)
    st = status(run_dir)
    rows = task_rows(run_dir)
    stages = rd.read_stages(warn=True)
    t0 = min((r[2] for r in rows), default=0.0)
    end = max((r[3] for r in rows), default=t0) - t0
    last = max([end, *(s["time"] - t0 for s in stages)])
    span = Range1d(0, max(last, 1e-3) * 1.02)   # every time axis spans the whole run
    nodes = sorted({r[1] for r in rows})
    colour = plots.colours(nodes)
    since = "seconds since the first task started"
    gaps = [(a - t0, b - t0) for a, b in pauses(rows)]

    progress = plots.figure("progress against the plan", since, "unitaries staged", counts="y",
                            x_range=span, name="progress")
    if rows:
        finished = np.array([r[3] - t0 for r in rows])
        order = np.argsort(finished)
        done = np.cumsum(np.array([r[4] for r in rows])[order])
        progress.step(np.r_[0, finished[order]], np.r_[0, done], mode="after", line_width=2)
    progress.add_layout(Span(dimension="width", location=st.count, line_color=plots.PLAN_COLOUR,
                             line_dash="dashed", line_width=2))

    throughput = plots.figure("throughput per node", since, "unitaries/s", counts="y",
                              x_range=span, name="throughput")
    if rows:
        bins = int(np.clip(len(rows) // (4 * len(nodes)), 5, 60))  # a few tasks per bin per node
        edges = np.linspace(0, max(end, 1e-3), bins + 1)
        for n in nodes:
            fin = np.array([r[3] - t0 for r in rows if r[1] == n])
            cnt = np.array([r[4] for r in rows if r[1] == n])
            hist, _ = np.histogram(fin, bins=edges, weights=cnt)
            rate = hist / (edges[1] - edges[0])
            for a, b in gaps:   # no line through a pause: the run was not running
                rate[(edges[1:] > a) & (edges[:-1] < b)] = np.nan
            throughput.line(edges[1:], rate, legend_label=n, color=colour[n], line_width=2)
        plots.legend_below(throughput)
    for a, b in gaps:
        for f in (progress, throughput):
            f.add_layout(BoxAnnotation(left=a, right=b, fill_color=plots.PLAN_COLOUR, fill_alpha=0.2))
        throughput.add_layout(Label(x=a, y=0, x_offset=4, y_offset=4, text=f"paused {fmt.duration(b - a)}",
                                    text_font_size="11px", text_color="#555555"))

    durations = plots.figure("task durations", "seconds", "tasks", counts="y", name="durations")
    durations.quad(top="top", bottom=0, left="left", right="right", fill_alpha=0.7,
                   source=plots.histogram([r[3] - r[2] for r in rows]))

    # what each node had staged as the run went: a step a stage-out (how long one took: the log)
    staging = plots.figure("stage-outs: data staged per node", since, "MB staged", x_range=span, name="stageouts")
    staging.y_range.start = 0
    for n in sorted({s["node"] for s in stages}):
        mine = sorted((s["time"] - t0, s.get("bytes", 0) / 1e6) for s in stages if s["node"] == n)
        times, staged = [t for t, _ in mine], np.cumsum([b for _, b in mine])
        staging.step([0, *times, span.end], [0, *staged, staged[-1]], mode="after", legend_label=n,
                     color=colour.get(n, "black"), line_width=2)
        staging.scatter(times, staged, size=5, color=colour.get(n, "black"))
    if stages:
        plots.legend_below(staging)

    data = data_section(rd.database(st.name))
    summary = Div(sizing_mode="stretch_width", name="summary",
                  text=summary_html(st, rd.record(), rows, len(stages)))
    page = column(summary, row(progress, throughput, sizing_mode="stretch_width"),
                  row(durations, staging, sizing_mode="stretch_width"), *data, sizing_mode="stretch_width")
    with writing(out):
        files.write_atomic(out, file_html(page, INLINE, title=f"unidask report: {st.name}"), mode=None)
    return out
