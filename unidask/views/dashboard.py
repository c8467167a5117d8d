"""The unidask page on Dask's dashboard (``/unidask``) and its figures as JSON (``/unidask/json``).

The driver publishes its progress as scheduler metadata under the key ``"unidask"`` (about once a
second); the page and the JSON route read it in the scheduler's process. :func:`install` adds both
to Dask's dashboard; it must run before the scheduler is created (the local cluster does).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import dask.config

from ..core import daskapi, files, fmt
from . import plots

KEY = "unidask"
PUBLISH_EVERY = 1.0   # seconds
LIVE_EVERY = 5.0      # seconds between copies of the state in RUN_DIR/live.json (for `unidask status`)
HISTORY = 600         # samples of (time, unitaries written, per node) kept for the plots
DURATIONS = 2000      # durations of the last tasks kept for the histogram
NODE_LINES = 32       # above this many nodes the page draws the total throughput only


class Tracker:
    """The driver's live view of a run, published to the scheduler for the page."""

    def __init__(self, client, spec, live_path: Path, done_units: int, done_tasks: int):
        self.client, self.spec = client, spec
        now = time.time()
        self.state: dict[str, Any] = {
            "name": spec.name, "kind": spec.kind, "total": spec.count, "tasks_total": spec.n_tasks,
            "written": done_units, "tasks_done": done_tasks, "in_flight": 0, "started": now,
            "resumed_from": done_units, "stage_every": spec.storage.stage_every, "nodes": {},
            "history": deque([(now, done_units, {})], maxlen=HISTORY),
            "durations": deque(maxlen=DURATIONS),
        }
        self.last = self.last_live = 0.0
        self.live_path = live_path

    def node(self, name: str) -> dict[str, Any]:
        return self.state["nodes"].setdefault(name, {"written": 0, "staged": 0, "shard_bytes": 0,
                                                     "last_stage": None})

    def task_done(self, summary: dict[str, Any], in_flight: int) -> None:
        s = self.state
        s["written"] += summary["count"]
        s["tasks_done"] += 1
        s["in_flight"] = in_flight
        s["durations"].append(round(summary["seconds"], 4))
        n = self.node(summary["node"])
        n["written"] += summary["count"]
        n["shard_bytes"] = summary.get("shard_bytes", n["shard_bytes"])
        self.publish()

    def staged(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            n = self.node(r["node"])
            n["staged"], n["last_stage"] = r["rows"], r["time"]
        self.publish(force=True)

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < PUBLISH_EVERY:
            return
        self.last = now
        nodes = self.state["nodes"]
        # per-node samples for the per-node throughput plot, while there are few enough lines to read
        per_node = {k: v["written"] for k, v in nodes.items()} if len(nodes) <= NODE_LINES else {}
        self.state["history"].append((now, self.state["written"], per_node))
        published = {**self.state, "history": list(self.state["history"]),
                     "durations": list(self.state["durations"])}
        try:
            self.client.set_metadata(KEY, published)
        except Exception:  # the page is a view: never let it fail the run
            pass
        if force or now - self.last_live >= LIVE_EVERY:
            self.last_live = now
            live = {k: v for k, v in self.state.items() if k not in ("history", "nodes", "durations")}
            live.update(updated=now, host=socket.gethostname(), pid=os.getpid(), rate=self.rate())
            with contextlib.suppress(OSError):   # a view again: a hiccup of the shared filesystem
                files.write_atomic(self.live_path, json.dumps(live) + "\n")

    def rate(self) -> float:
        return rate_of(list(self.state["history"]), time.time())


def rate_of(history: list[tuple], now: float, node: str | None = None) -> float:
    """Unitaries per second over the last 30 s of ``(time, written, {node: written})`` samples
    (of ``node`` alone if given)."""
    samples = [(t, w if node is None else (rest[0].get(node, 0) if rest else 0)) for t, w, *rest in history]
    recent = [(t, w) for t, w in samples if t >= now - 30] or samples[-2:]
    dt = recent[-1][0] - recent[0][0]
    return (recent[-1][1] - recent[0][1]) / dt if dt > 0 else 0.0


def rates_over(history: list[tuple], node: str, window: float = 30) -> list[tuple[float, float]]:
    """``(time, unitaries/s of node over the window before)`` at each sample that has the node."""
    pts = [(t, rest[0][node]) for t, _, *rest in history if rest and node in rest[0]]
    out, j = [], 0
    for t, w in pts:
        while pts[j][0] < t - window:
            j += 1
        if t > pts[j][0]:
            out.append((t, (w - pts[j][1]) / (t - pts[j][0])))
    return out


def figures(state: dict[str, Any] | None, scheduler=None) -> dict[str, Any]:
    """What the page shows, derived from the published state (and the scheduler's task counts)."""
    if not state:
        return {"status": "no unidask run has reported to this scheduler yet"}
    hist = state["history"]
    now = time.time()
    rate = rate_of(hist, now)
    left = state["total"] - state["written"]
    running = state.get("in_flight", 0)
    if scheduler is not None:
        running = daskapi.running_tasks(scheduler)
    nodes = {k: {**v, "rate": rate_of(hist, now, k)} for k, v in state["nodes"].items()}
    return {
        "name": state["name"], "kind": state["kind"],
        "written": state["written"], "total": state["total"],
        "staged": sum(v["staged"] for v in nodes.values()),
        "tasks_done": state["tasks_done"], "tasks_running": running,
        "tasks_pending": max(0, state["tasks_total"] - state["tasks_done"] - running),
        "tasks_total": state["tasks_total"],
        "rate": rate, "eta_seconds": left / rate if rate > 0 else None,
        "started": state["started"], "elapsed_seconds": now - state["started"],
        "stage_every": state["stage_every"], "resumed_from": state["resumed_from"],
        "nodes": nodes, "history": hist, "durations": state["durations"],
    }


class FiguresJSON(daskapi.RequestHandler):
    def get(self):
        state = self.server.get_metadata([KEY], default=None)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(figures(state, self.server)))


routes: list[tuple] = [(r"unidask/json", FiguresJSON, {})]


def summary_html(f: dict[str, Any]) -> str:
    """The page's head: where the run is against its plan, and what "staged" means."""
    done = f["written"] / max(1, f["total"])
    eta = f["eta_seconds"]
    finish = "" if eta is None else f" (about {fmt.clock(time.time() + eta)})"
    first_stage = f["started"] + f["stage_every"]
    if any(n["last_stage"] for n in f["nodes"].values()):
        staged = (f"<b>{f['staged']:,}</b> unitaries staged: copied to the run dir on shared storage, "
                  f"safe if a node is lost; the rest are on the nodes' local disks until the next "
                  f"stage-out (every {fmt.duration(f['stage_every'])}).")
    else:
        staged = (f"No stage-out yet: the written unitaries are on the nodes' local disks until the "
                  f"first, about {fmt.clock(first_stage)} (<code>storage.stage_every</code> = "
                  f"{fmt.duration(f['stage_every'])}), and at the end of the run.")
    resumed = f" (resumed: {f['resumed_from']:,} were staged before)" if f["resumed_from"] else ""
    return (
        f"<h2 style='margin:0.3em 0'>unidask run {html.escape(f['name'])} "
        f"<small>({html.escape(f['kind'])})</small></h2>"
        f"<div style='background:#eee;width:100%;height:14px;border-radius:3px'>"
        f"<div style='background:#3b7dd8;width:{100 * done:.1f}%;height:14px;border-radius:3px'>"
        f"</div></div>"
        f"<p><b>{f['written']:,}</b> of {f['total']:,} unitaries written ({100 * done:.1f}%){resumed}"
        f" &middot; <b>{f['rate']:,.0f}</b> unitaries/s &middot; running for "
        f"{fmt.duration(f['elapsed_seconds'])} &middot; time left <b>{fmt.duration(eta)}</b>{finish}"
        f"</p><p>tasks: {f['tasks_done']:,} done, {f['tasks_running']:,} running, "
        f"{f['tasks_pending']:,} pending, of {f['tasks_total']:,}</p><p>{staged}</p>")


def page(scheduler, extra, doc) -> None:
    """The bokeh document of /unidask, in Dask's page template (its menu): the run against its
    plan, throughput per node, task durations, a per-node table; updated every second."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, Div, Range1d, Span
    doc.title = "unidask"
    summary = Div(text="waiting for the driver of a unidask run to report...",
                  sizing_mode="stretch_width", name="unidask-summary")
    progress = ColumnDataSource({"time": [], "written": []})
    # explicit ranges wherever a plot can be empty (bokeh warns of a range with no data to fit)
    against = plots.figure("progress against the plan", "time", "unitaries written", counts="y",
                           x_axis_type="datetime", x_range=Range1d(1000 * time.time() - 60_000,
                                                                   1000 * time.time()),
                           y_range=Range1d(0, 1), name="unidask-progress")
    against.line("time", "written", source=progress, line_width=2)
    plan = Span(dimension="width", location=0, line_color=plots.PLAN_COLOUR, line_dash="dashed",
                line_width=2)
    against.add_layout(plan)
    per_node = ColumnDataSource({"xs": [], "ys": [], "node": [], "colour": []})
    throughput = plots.figure("throughput per node (30 s average)", "time", "unitaries/s",
                              counts="y", x_axis_type="datetime", x_range=against.x_range,
                              y_range=Range1d(0, 1), name="unidask-throughput")
    throughput.multi_line("xs", "ys", source=per_node, color="colour", legend_field="node",
                          line_width=2)
    throughput.legend.location = "top_left"
    durations = ColumnDataSource(plots.histogram([]))
    spread = plots.figure("task durations (the last tasks)", "seconds", "tasks", counts="y",
                          x_range=Range1d(0, 1), y_range=Range1d(0, 1), name="unidask-durations")
    spread.quad(top="top", bottom=0, left="left", right="right", source=durations, fill_alpha=0.7)
    nodes = ColumnDataSource({k: [] for k in ("node", "written", "rate", "staged", "shard_mb",
                                              "last_stage")})
    table = plots.table(nodes, [("node", "node", "text"), ("written", "unitaries written", "count"),
                                ("rate", "unitaries/s", "count"),
                                ("staged", "unitaries staged", "count"),
                                ("shard_mb", "local shard MB", "float"),
                                ("last_stage", "last stage-out", "text")], name="unidask-nodes")

    def update() -> None:
        f = figures(scheduler.get_metadata([KEY], default=None), scheduler)
        if "written" not in f:
            return
        summary.text = summary_html(f)
        hist = f["history"]
        progress.data = {"time": [1000 * t for t, *_ in hist], "written": [w for _, w, *_ in hist]}
        plan.location = f["total"]
        against.y_range.end = 1.05 * f["total"]
        plots.fit(against.x_range, progress.data["time"], lo=progress.data["time"][0],
                  least=60_000)   # milliseconds
        names = sorted(f["nodes"])
        colour = plots.colours(names)
        lines = [(n, pts) for n in names if (pts := rates_over(hist, n))]
        per_node.data = {"xs": [[1000 * t for t, _ in pts] for _, pts in lines],
                         "ys": [[y for _, y in pts] for _, pts in lines],
                         "node": [n for n, _ in lines], "colour": [colour[n] for n, _ in lines]}
        durations.data = h = plots.histogram(f["durations"])
        plots.fit(throughput.y_range, [y for _, pts in lines for _, y in pts])
        plots.fit(spread.x_range, h["right"], lo=min(h["left"], default=0), least=1e-3)
        plots.fit(spread.y_range, h["top"])
        ns = [f["nodes"][k] for k in names]
        nodes.data = {"node": names, "written": [n["written"] for n in ns],
                      "rate": [round(n["rate"]) for n in ns],
                      "staged": [n["staged"] for n in ns],
                      "shard_mb": [round(n["shard_bytes"] / 1e6, 1) for n in ns],
                      "last_stage": [fmt.clock(n["last_stage"]) if n["last_stage"] else
                                     f"not yet (first about {fmt.clock(f['started'] + f['stage_every'])})"
                                     for n in ns]}

    update()
    doc.add_periodic_callback(update, 1000)
    doc.add_root(column(summary, row(against, throughput, sizing_mode="stretch_width"), spread, table,
                        sizing_mode="stretch_width", name="unidask"))
    doc.template = daskapi.page_template()
    doc.template_variables.update(extra)


# Dask's /info pages serve the scheduler's and workers' logs (file paths, tracebacks) and call
# stacks to anyone who can reach the dashboard: on a login node, every local user
PRIVATE_ROUTES = ("distributed.http.scheduler.info",)


def install() -> dict[str, Any]:
    """Add the page to Dask's dashboard (before a scheduler is created); the Dask setting that
    adds the JSON route and leaves out :data:`PRIVATE_ROUTES`, for the caller to apply where it
    creates the scheduler (never to the whole process: a notebook's own Dask is left as it was)."""
    daskapi.dashboard_page("/unidask", page)
    daskapi.mend_sitemap()
    # Dask lists every page whose path has "individual" in its "More..." menu: the way back here
    daskapi.dashboard_page("/individual-unidask", page)
    key = "distributed.scheduler.http.routes"
    routes_ = [r for r in dask.config.get(key) if r not in PRIVATE_ROUTES]
    return {key: routes_ if __name__ in routes_ else [*routes_, __name__]}
