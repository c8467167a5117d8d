"""``unidask report``: a self-contained HTML page (bokeh, inline resources) of how a run went,
from the run directory alone: throughput per node over time, task durations, stage-outs, summary."""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from . import db, files
from .errors import writing
from .rundir import RunDir
from .status import status


def task_rows(run_dir: Path) -> list[tuple[int, str, float, float, int]]:
    """(task, node, started, finished, count) of every staged task, each task once."""
    seen: dict[int, tuple] = {}
    for row in db.rows_of(RunDir(run_dir).staged_shards(),
                          "SELECT task, node, started, finished, count FROM tasks"):
        seen.setdefault(row[0], row)
    return sorted(seen.values())


def report(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    run_dir, out = Path(run_dir), Path(out)
    st = status(run_dir)
    rows = task_rows(run_dir)
    t0 = min((r[2] for r in rows), default=0.0)
    nodes = sorted({r[1] for r in rows})
    colour = {n: Category10_10[i % 10] for i, n in enumerate(nodes)}

    throughput = figure(height=300, sizing_mode="stretch_width", title="unitaries per second, per node",
                        x_axis_label="seconds since the first task started", name="throughput")
    if rows:
        end = max(r[3] for r in rows) - t0
        bins = int(np.clip(len(rows) // (4 * len(nodes)), 5, 60))  # a few tasks per bin per node
        edges = np.linspace(0, max(end, 1e-3), bins + 1)
        width = edges[1] - edges[0]
        for n in nodes:
            fin = np.array([r[3] - t0 for r in rows if r[1] == n])
            cnt = np.array([r[4] for r in rows if r[1] == n])
            hist, _ = np.histogram(fin, bins=edges, weights=cnt)
            throughput.line(edges[1:], hist / width, legend_label=n, color=colour[n], line_width=2)
    durations = figure(height=260, sizing_mode="stretch_width", title="task duration",
                       x_axis_label="seconds", y_axis_label="tasks", name="durations")
    if rows:
        d = np.array([r[3] - r[2] for r in rows])
        hist, edges = np.histogram(d, bins=30)
        durations.quad(top=hist, bottom=0, left=edges[:-1], right=edges[1:], fill_alpha=0.7)
    stages = RunDir(run_dir).read_stages()
    staging = figure(height=260, sizing_mode="stretch_width", title="stage-outs",
                     x_axis_label="seconds since the first task started",
                     y_axis_label="stage-out seconds", name="stageouts")
    for n in sorted({s["node"] for s in stages}):
        mine = [s for s in stages if s["node"] == n]
        staging.scatter([s["time"] - t0 for s in mine], [s["seconds"] for s in mine], size=8,
                        legend_label=n, color=colour.get(n, "black"))
    table = "".join(f"<tr><td>{html.escape(s.node)}</td><td>{s.tasks}</td><td>{s.unitaries:,}</td>"
                    f"<td>{s.bytes / 1e6:,.1f}</td><td>{html.escape(Path(s.path).name)}</td></tr>"
                    for s in st.shards)
    rate = f"{st.rate:,.0f} unitaries/s" if st.rate else "-"
    missing = st.to_dict()["missing"]
    summary = Div(sizing_mode="stretch_width", name="summary", text=(
        f"<h1>unidask run {html.escape(st.name)}</h1>"
        f"<p>{st.unitaries:,} of {st.count:,} unitaries staged; tasks {st.tasks_done}/"
        f"{st.tasks_expected} ({st.tasks_missing} missing{': ' + missing if missing else ''}); "
        f"{st.bytes / 1e6:,.1f} MB in {len(st.shards)} shard(s); {rate}; "
        f"{len(stages)} stage-out(s)</p>"
        "<table border=1 cellpadding=4><tr><th>node</th><th>tasks</th><th>unitaries</th><th>MB</th>"
        f"<th>shard</th></tr>{table}</table>"))
    page = column(summary, throughput, durations, staging, sizing_mode="stretch_width")
    with writing(out):
        files.write_atomic(out, file_html(page, INLINE, title=f"unidask report: {st.name}"), mode=None)
    return out
