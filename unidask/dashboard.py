"""The unidask page on Dask's dashboard (``/unidask``) and its figures as JSON (``/unidask/json``).

The driver publishes its progress as scheduler metadata under the key ``"unidask"`` (about once a
second); the page and the JSON route read it in the scheduler's process. :func:`install` adds both
to Dask's dashboard; it must run before the scheduler is created (the local cluster does).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import deque
from typing import Any

import dask.config
from distributed.http.utils import RequestHandler

from . import files
from .rundir import RunDir

KEY = "unidask"
PUBLISH_EVERY = 1.0   # seconds
LIVE_EVERY = 5.0      # seconds between copies of the state in RUN_DIR/live.json (for `unidask status`)
HISTORY = 600         # samples of (time, unitaries written) kept for the rate plot


class Tracker:
    """The driver's live view of a run, published to the scheduler for the page."""

    def __init__(self, client, spec, done_units: int, done_tasks: int):
        self.client, self.spec = client, spec
        self.state: dict[str, Any] = {
            "name": spec.name, "kind": spec.kind, "total": spec.count, "tasks_total": spec.n_tasks,
            "written": done_units, "tasks_done": done_tasks, "in_flight": 0, "started": time.time(),
            "nodes": {}, "history": deque([(time.time(), done_units)], maxlen=HISTORY),
        }
        self.last = self.last_live = 0.0
        self.live_path = RunDir(spec.run_dir).live_path

    def node(self, name: str) -> dict[str, Any]:
        return self.state["nodes"].setdefault(name, {"written": 0, "staged": 0, "shard_bytes": 0,
                                                     "last_stage": None})

    def task_done(self, summary: dict[str, Any], in_flight: int) -> None:
        s = self.state
        s["written"] += summary["count"]
        s["tasks_done"] += 1
        s["in_flight"] = in_flight
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
        self.state["history"].append((now, self.state["written"]))
        try:
            self.client.set_metadata(KEY, {**self.state, "history": list(self.state["history"])})
        except Exception:  # the page is a view: never let it fail the run
            pass
        if force or now - self.last_live >= LIVE_EVERY:
            self.last_live = now
            live = {k: v for k, v in self.state.items() if k not in ("history", "nodes")}
            live.update(updated=now, host=socket.gethostname(), pid=os.getpid(), rate=self.rate())
            with contextlib.suppress(OSError):   # a view again: a hiccup of the shared filesystem
                files.write_atomic(self.live_path, json.dumps(live) + "\n")

    def rate(self) -> float:
        return rate_of(list(self.state["history"]), time.time())


def rate_of(history: list[tuple[float, int]], now: float) -> float:
    """Unitaries per second over the last 30 s of ``(time, written)`` samples."""
    recent = [(t, w) for t, w in history if t >= now - 30] or history[-2:]
    dt = recent[-1][0] - recent[0][0]
    return (recent[-1][1] - recent[0][1]) / dt if dt > 0 else 0.0


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
        running = sum(len(ws.processing) for ws in scheduler.workers.values())
    return {
        "name": state["name"], "kind": state["kind"],
        "written": state["written"], "total": state["total"],
        "tasks_done": state["tasks_done"], "tasks_running": running,
        "tasks_pending": max(0, state["tasks_total"] - state["tasks_done"] - running),
        "tasks_total": state["tasks_total"],
        "rate": rate, "eta_seconds": left / rate if rate > 0 else None,
        "elapsed_seconds": now - state["started"],
        "nodes": state["nodes"], "history": hist,
    }


class FiguresJSON(RequestHandler):
    def get(self):
        state = self.server.get_metadata([KEY], default=None)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(figures(state, self.server)))


routes: list[tuple] = [(r"unidask/json", FiguresJSON, {})]


def page(scheduler, extra, doc) -> None:
    """The bokeh document of /unidask: summary, rate over time, per-node table; updated every second."""
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, DataTable, Div, TableColumn
    from bokeh.plotting import figure

    doc.title = "unidask"
    summary = Div(text="waiting for the driver...", sizing_mode="stretch_width")
    rate = ColumnDataSource({"time": [], "rate": []})
    plot = figure(height=260, sizing_mode="stretch_width", x_axis_type="datetime",
                  title="unitaries per second", name="unidask-rate")
    plot.line("time", "rate", source=rate, line_width=2)
    nodes = ColumnDataSource({k: [] for k in ("node", "written", "staged", "shard_mb", "last_stage")})
    table = DataTable(source=nodes, height=200, sizing_mode="stretch_width", name="unidask-nodes",
                      columns=[TableColumn(field="node", title="node"),
                               TableColumn(field="written", title="rows written"),
                               TableColumn(field="staged", title="rows staged"),
                               TableColumn(field="shard_mb", title="shard MB"),
                               TableColumn(field="last_stage", title="last stage-out")])

    def update() -> None:
        f = figures(scheduler.get_metadata([KEY], default=None), scheduler)
        if "written" not in f:
            return
        eta = "?" if f["eta_seconds"] is None else time.strftime("%H:%M:%S", time.gmtime(f["eta_seconds"]))
        summary.text = (
            f"<h2>unidask: {f['name']} ({f['kind']})</h2>"
            f"<p><b>{f['written']:,}</b> / {f['total']:,} unitaries written "
            f"({100 * f['written'] / max(1, f['total']):.1f}%) &middot; {f['rate']:,.0f} per second "
            f"&middot; time left {eta}</p><p>tasks: {f['tasks_done']} done, {f['tasks_running']} running, "
            f"{f['tasks_pending']} pending of {f['tasks_total']}</p>")
        hist = f["history"]
        times = [1000 * t for t, _ in hist[1:]]
        rates = [(w1 - w0) / (t1 - t0) if t1 > t0 else 0.0 for (t0, w0), (t1, w1) in zip(hist, hist[1:])]
        rate.data = {"time": times, "rate": rates}
        names = sorted(f["nodes"])
        ns = [f["nodes"][k] for k in names]
        nodes.data = {"node": names, "written": [n["written"] for n in ns],
                      "staged": [n["staged"] for n in ns],
                      "shard_mb": [round(n["shard_bytes"] / 1e6, 2) for n in ns],
                      "last_stage": [time.strftime("%H:%M:%S", time.localtime(n["last_stage"]))
                                     if n["last_stage"] else "-" for n in ns]}

    update()
    doc.add_periodic_callback(update, 1000)
    doc.add_root(column(summary, plot, table, sizing_mode="stretch_width", name="unidask"))


def install() -> None:
    """Add the page and the JSON route to Dask's dashboard (before a scheduler is created)."""
    from distributed.dashboard.scheduler import applications

    applications["/unidask"] = page
    key = "distributed.scheduler.http.routes"
    routes_ = dask.config.get(key)
    if __name__ not in routes_:
        dask.config.set({key: [*routes_, __name__]})
