"""Watching a run: the /unidask page over HTTP and in a real headless browser, and the HTML report."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import unidask
from unidask import RunDir, db

from conftest import REPO, messages, run_main

ARTIFACTS = REPO / "test-artifacts"
SLOW = {"run": {"count": 12000, "task_size": 100}, "generator": {"dim": 64},
        "storage": {"stage_every": 0.5}}
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


def run_while(spec, watch):
    """Run ``spec`` in a thread while ``watch(page_url)`` runs in this one (a browser driver must
    stay on the thread that started it); return what ``watch`` returns once the run has ended."""
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
        t.join(180)
    if "error" in box:
        raise box["error"]
    return result


def test_page_figures_match_the_shards_on_disk(config):
    spec = config(**SLOW)

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
            if staged and staged == on_disk and f["written"] < f["total"]:
                return f, on_disk
        raise AssertionError(f"the page never agreed with the staged shards on disk: {staged} {on_disk}")

    f, on_disk = run_while(spec, watch)
    assert f["total"] == 12000 and f["tasks_total"] == 120
    assert f["written"] == 100 * f["tasks_done"] >= sum(on_disk.values())
    assert f["tasks_done"] + f["tasks_running"] + f["tasks_pending"] == 120
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


def open_page(browser, url: str, root_text: str, shot: str):
    """Open ``url``, wait until bokeh rendered ``root_text``, screenshot it; return console errors."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                           "Bokeh.documents[0].roots().length > 0", timeout=30000)
    page.get_by_text(root_text).first.wait_for(timeout=30000)
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    canvases = page.locator("canvas").count() + page.evaluate(
        "() => document.querySelectorAll('.bk-Canvas, [class*=bk-]').length")
    page.close()
    return errors, canvases


def test_page_renders_in_a_browser(config, browser):
    spec = config(**SLOW)
    errors, canvases = run_while(spec, lambda url: open_page(browser, url, "unitaries written",
                                                            "dashboard-unidask.png"))
    assert canvases > 0
    assert errors == []
    assert (ARTIFACTS / "dashboard-unidask.png").stat().st_size > 10_000


def test_report_renders_in_a_browser(config, browser, tmp_path, capsys):
    spec = config(run={"count": 3000, "task_size": 100}, generator={"dim": 16}, storage={"stage_every": 0.2})
    unidask.run(spec)
    out = tmp_path / "report.html"
    code, stdout, _ = run_main("report", spec.run_dir, "-o", out, capsys=capsys)
    assert code == 0 and out.exists()
    text = out.read_text()
    assert "cdn.bokeh.org" not in text and "http://" not in text.split("<body")[1][:2000]  # self-contained
    errors, canvases = open_page(browser, out.as_uri(), "unitaries staged", "report.png")
    assert canvases > 0 and errors == []


@pytest.mark.parametrize("out,reason", [("missing/r.html", "No such file or directory"),
                                        ("a-file/r.html", "Not a directory")])
def test_report_to_a_path_it_cannot_write(haar_run, tmp_path, out, reason, capsys):
    spec, _ = haar_run
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run_main("report", spec.run_dir, "-o", tmp_path / out, capsys=capsys)
    assert code == 2 and err == f"unidask: error: cannot write {tmp_path / out}: {reason}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
