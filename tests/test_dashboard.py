"""Watching a run: the /unidask page over HTTP and in a real headless browser, and the HTML report."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import unidask
from unidask import RunDir
from unidask.views import dashboard
from unidask.store import db
from unidask.core import fmt
from unidask.views.report import pauses, task_rows

from conftest import REPO, messages, run_main

ARTIFACTS = REPO / "test-artifacts"
HELD_TASKS = 1000


def held(config, tmp_path: Path, stage_every: float = 0.5, tasks: int = HELD_TASKS) -> tuple[unidask.Spec, Path]:
    """A run that goes on, a task every quarter second or so, while the file it returns exists
    (a watcher removes it when done: a run that ended under a slow browser failed a CI run)."""
    hold = tmp_path / "hold"
    hold.touch()
    spec = config(run={"count": 100 * tasks, "task_size": 100},
                  generator={"kind": "plugin_generators:held_haar", "dim": 8, "hold": str(hold)},
                  storage={"stage_every": stage_every})
    return spec, hold
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def staged_rows_per_node(run_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in RunDir(run_dir).staged_shards():
        try:
            con = db.connect_readonly(p)
            for node, rows in con.execute("SELECT node, sum(count) FROM tasks GROUP BY node"):
                out[node] = out.get(node, 0) + rows
            con.close()
        except sqlite3.Error:
            pass
    return out


def run_while(spec, watch, hold: Path | None = None):
    """Run ``spec`` in a thread while ``watch(page_url)`` runs in this one (a browser driver must
    stay on the thread that started it), then remove ``hold`` (see :func:`held`); return what
    ``watch`` returns once the run has ended."""
    url, box = threading.Event(), {}

    def echo(line: str) -> None:
        if line.startswith("unidask page: "):
            box["url"] = line.split(": ", 1)[1]
            url.set()

    def target():
        try:
            with messages(echo):
                unidask.run(spec)
        except BaseException as e:
            box["error"] = e
        finally:
            url.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    url.wait(120)
    try:
        result = watch(box["url"]) if "url" in box else None
    finally:
        if hold is not None:
            hold.unlink(missing_ok=True)
        t.join(180)
    if "error" in box:
        raise box["error"]
    return result


@pytest.mark.cluster
def test_page_figures_match_the_shards_on_disk(config, tmp_path):
    spec, hold = held(config, tmp_path)

    def watch(page):
        status, text = get(page)
        assert status == 200 and "bokeh" in text.lower()
        end = time.monotonic() + 120
        while time.monotonic() < end:
            time.sleep(0.05)
            _, body = get(page + "/json")
            f = json.loads(body)
            on_disk = staged_rows_per_node(spec.run_dir)
            staged = {n: v["staged"] for n, v in f.get("nodes", {}).items() if v["last_stage"]}
            # a stage-out's report can reach the driver before the results of the tasks it
            # staged: wait for a moment the figures have caught up (a CI run met the gap)
            caught_up = all(v["written"] >= v["staged"] for v in f.get("nodes", {}).values())
            if staged and staged == on_disk and caught_up and f["written"] < f["total"]:
                return f, on_disk
        raise AssertionError(f"the page never agreed with the staged shards on disk: {staged} {on_disk}")

    f, on_disk = run_while(spec, watch, hold)
    assert f["total"] == 100 * HELD_TASKS and f["tasks_total"] == HELD_TASKS
    assert f["written"] == 100 * f["tasks_done"] >= sum(on_disk.values())
    assert f["tasks_done"] + f["tasks_running"] + f["tasks_pending"] == HELD_TASKS
    for node, v in f["nodes"].items():
        assert v["written"] >= v["staged"] and v["shard_bytes"] > 0
    assert f["rate"] > 0 and f["eta_seconds"] is not None


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


# what a person sees, asked of the rendered document: every named figure, its axes labelled and its
# counts as k/M (not 1.800e+5), tables without an index column
FIGURES_JS = """(names) => names.map((name) => {
    const m = Bokeh.documents[0].get_model_by_name(name);
    if (m == null) return [name, "missing"];
    if (m.columns !== undefined)
        return [name, m.index_position === null && m.reorderable === false ? "ok" : "index/reorder"];
    const y = m.left[0], x = m.below[0];
    if (!x.axis_label || !y.axis_label) return [name, "unlabelled axis"];
    let shown = "";   // what the axis writes for these ticks, by bokeh's own formatter
    try { shown = y.formatter.doFormat([1.2e6, 180000, 3e9, 12], {loc: 0}).join(" "); } catch (e) {}
    return [name, shown === "1.2M 180k 3G 12" ? "counts as k/M" : "labelled"];
})"""


WRITTEN_JS = """() => {
    const s = Bokeh.documents[0].get_model_by_name("unidask-nodes").source.data;
    return s.node.map((n, i) => [n, s.written[i].toLocaleString("en-US")]);
}"""


def table_follows_its_data(page) -> bool:
    """Whether the node table shows what its data source holds now, seconds after it was first
    drawn (a table that is drawn once and never again shows the first second's figures)."""
    page.wait_for_timeout(3000)
    for _ in range(20):
        want = page.evaluate(WRITTEN_JS)
        cells = page.locator(".slick-cell").all_inner_texts()
        shown = [[cells[i].strip(), cells[i + 1].strip()] for i in range(0, len(cells), 6)]
        if want and shown == want:
            return True
        page.wait_for_timeout(200)
    return False


def open_page(browser, url: str, root_text: str, shot: str, figures: list[str] = (), live=False):
    """Open ``url``, wait until bokeh rendered ``root_text``, screenshot it; return the console's
    errors and warnings, and what :data:`FIGURES_JS` says of each of ``figures`` (and, ``live``,
    whether the node table follows its data)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    said, found = [], {}
    page.on("console", lambda m: said.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: said.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                           "Bokeh.documents[0].roots().length > 0", timeout=30000)
    page.get_by_text(root_text).first.wait_for(timeout=30000)
    page.wait_for_timeout(1500)
    if live:
        found["table follows its data"] = table_follows_its_data(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    found.update(page.evaluate(FIGURES_JS, list(figures)))
    page.close()
    return said, found


PAGE_FIGURES = {"unidask-progress": "counts as k/M", "unidask-throughput": "counts as k/M",
                "unidask-durations": "counts as k/M", "unidask-nodes": "ok"}


def test_page_renders_in_a_browser(config, browser, tmp_path):
    spec, hold = held(config, tmp_path)

    def watch(url):
        _, dask_status = get(url.rsplit("/", 1)[0] + "/status")
        seen = open_page(browser, url, "unitaries written", "dashboard-unidask.png", PAGE_FIGURES,
                         live=True)
        _, html = get(url)
        return dask_status, html, seen

    dask_status, html, (said, found) = run_while(spec, watch, hold)
    assert said == [], "\n".join(said)
    assert found == {**PAGE_FIGURES, "table follows its data": True}
    assert 'href="individual-unidask"' in dask_status     # Dask's own menu links to the page
    assert 'id="myTopnav"' in html                        # and the page has Dask's menu
    assert (ARTIFACTS / "dashboard-unidask.png").stat().st_size > 10_000


@pytest.mark.cluster
def test_page_says_why_nothing_is_staged_yet(config, tmp_path):
    """Before the first stage-out the page says when it comes, not just "0 staged"."""
    spec, hold = held(config, tmp_path, stage_every=600, tasks=200)

    def watch(url):
        end = time.monotonic() + 120
        while time.monotonic() < end:
            f = json.loads(get(url + "/json")[1])
            if f.get("written"):
                return f
            time.sleep(0.05)

    f = run_while(spec, watch, hold)
    text = dashboard.summary_html(f)
    assert f["staged"] == 0 and "No stage-out yet" in text and "storage.stage_every" in text, text
    assert "10 min 00 s" in text


REPORT_FIGURES = {"progress": "counts as k/M", "throughput": "counts as k/M",
                  "durations": "counts as k/M", "stageouts": "labelled",
                  "data-0": "labelled", "data-1": "labelled", "data-2": "labelled"}


def test_report_renders_in_a_browser(config, browser, tmp_path, capsys):
    spec = config(run={"count": 3000, "task_size": 100}, generator={"dim": 16}, storage={"stage_every": 0.2})
    unidask.run(spec)
    out = tmp_path / "report.html"
    code, stdout, _ = run_main("report", spec.run_dir, "-o", out, capsys=capsys)
    assert code == 0 and out.exists()
    text = out.read_text()
    assert "cdn.bokeh.org" not in text and "http://" not in text.split("<body")[1][:2000]  # self-contained
    said, found = open_page(browser, out.as_uri(), "first task started", "report.png", REPORT_FIGURES)
    assert said == [] and found == REPORT_FIGURES
    for shown in ("wall time", "run.count", "3000", "generator.dim", "3,000 of 3,000 staged",
                  "the data against theory", "Beta(1, 15)", "Wigner surmise"):
        assert shown in text, shown


def test_report_time_axes_span_the_run(haar_run, tmp_path):
    """Every time axis spans the run, from its first task to its last (the stage-out plot once
    spanned the millisecond of its single point)."""
    spec, _ = haar_run
    out = unidask.report(spec.run_dir, tmp_path / "r.html")
    rows = task_rows(spec.run_dir)
    wall = max(r[3] for r in rows) - min(r[2] for r in rows)
    spans = [float(m) for m in re.findall(r'"type":"object","name":"Range1d","id":"[^"]+",'
                                          r'"attributes":\{"end":([0-9.e+-]+)', out.read_text())]
    assert spans and all(s >= wall for s in spans), (spans, wall)


@pytest.mark.parametrize("out,reason", [("missing/r.html", "No such file or directory"),
                                        ("a-file/r.html", "Not a directory")])
def test_report_to_a_path_it_cannot_write(haar_run, tmp_path, out, reason, capsys):
    spec, _ = haar_run
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run_main("report", spec.run_dir, "-o", tmp_path / out, capsys=capsys)
    assert code == 2 and err == f"unidask: error: cannot write {tmp_path / out}: {reason}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.cluster
def test_report_data_section_says_why_it_is_empty(config, tmp_path):
    spec = config(run={"count": 400, "task_size": 100}, generator={"kind": "circuit", "qubits": 2})
    unidask.run(spec, merge=False)
    text = unidask.report(spec.run_dir, tmp_path / "r.html").read_text()
    assert "No merged database yet" in text and "unidask merge" in text
    unidask.merge(spec.run_dir)
    text = unidask.report(spec.run_dir, tmp_path / "r.html").read_text()
    assert "No distribution known to unidask for this generator" in text


def figures_of(page_html: str) -> dict[str, dict]:
    """The bokeh figures of a standalone page, by name: their attributes as the page's JSON has them."""
    found = re.search(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', page_html, re.S)
    out: dict[str, dict] = {}

    def walk(o):
        if isinstance(o, dict):
            if o.get("name") == "Figure":
                out[o["attributes"]["name"]] = o["attributes"]
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(json.loads(found.group(1)))
    return out


def test_report_legends_sit_below_the_data(haar_run, tmp_path):
    """No legend inside a plot, where it covered the histograms' peaks: each one under its plot."""
    spec, _ = haar_run
    figures = figures_of(unidask.report(spec.run_dir, tmp_path / "r.html").read_text())
    kinds = {name: ([x.get("name") for x in f.get("center", []) if isinstance(x, dict)],
                    [x.get("name") for x in f.get("below", []) if isinstance(x, dict)]) for name, f in figures.items()}
    assert {"throughput", "stageouts", "data-0", "data-1", "data-2"} <= set(kinds), kinds
    for name, (center, below) in kinds.items():
        assert "Legend" not in center, (name, center)
        assert name in ("progress", "durations") or "Legend" in below, (name, below)


@pytest.mark.cluster
def test_report_of_a_resumed_run_shows_its_pause(config, tmp_path):
    """A run stopped and resumed a minute later (its second half's tasks ran 60 s after the first
    half's, as the shards record): the report marks the pause, keeps it out of the throughput line
    and the wall time, and names the run dir once."""
    spec = config(run={"count": 2000, "task_size": 100}, cluster={"nodes": 1, "workers": 1})
    unidask.run(spec, merge=False)
    rows = task_rows(spec.run_dir)
    t0 = min(r[2] for r in rows)
    for shard in RunDir(spec.run_dir).staged_shards():   # the tasks' times, as a resume would leave them
        con = sqlite3.connect(shard)
        con.execute("UPDATE tasks SET started = started + 60, finished = finished + 60 WHERE task >= 10")
        con.commit()
        con.close()
    shifted = task_rows(spec.run_dir)
    pause = min(r[2] for r in shifted if r[0] >= 10) - max(r[3] for r in shifted if r[0] < 10)
    assert pauses(shifted) == [(max(r[3] for r in shifted if r[0] < 10), min(r[2] for r in shifted if r[0] >= 10))]
    text = unidask.report(spec.run_dir, tmp_path / "r.html").read_text()
    running = max(r[3] for r in shifted) - t0 - pause
    assert f"{fmt.duration(running)} running (and {fmt.duration(pause)} paused)" in text
    assert f"paused {fmt.duration(pause)}" in text and '"name":"BoxAnnotation"' in text
    assert "run.run_dir" not in text   # the run dir once, as "run dir"
    assert pauses([r for r in rows]) == []   # the run as it ran: no pause


@pytest.mark.cluster
def test_the_dashboard_serves_no_logs(config, tmp_path):
    """Dask's /info pages served the scheduler's and the workers' logs (file paths, tracebacks)
    and call stacks to anyone who can reach the dashboard (every user of a login node): left
    out of unidask's clusters; the pages of the run remain."""
    import urllib.error

    spec, hold = held(config, tmp_path)

    def status(url: str) -> int:
        try:
            return get(url)[0]
        except urllib.error.HTTPError as e:
            return e.code

    def watch(url):
        base = url.rsplit("/", 1)[0]
        return [status(base + p) for p in ("/info/main/logs.html", "/info/main/workers.html", "/unidask",
                                           "/status", "/unidask/json", "/json/identity.json", "/sitemap.json")]

    assert run_while(spec, watch, hold) == [404, 404, 200, 200, 200, 200, 200]
