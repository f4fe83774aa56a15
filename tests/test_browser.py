"""The web page of `turboquant serve` in a real headless browser (Debian's chromium, driven by playwright).

The page gets its data only from the API (with the token from the URL fragment), so this checks
what a user sees: the studies table, the points plotted for each front (read back from the
plotly graph in the page) and the policy file that clicking a point downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.cli import main
from studies import Store, export_policy
from tests.serving import ServiceProcess

TOKEN = "browser-token"
CHROMIUM = Path("/usr/bin/chromium")


def _chromium() -> Path:
    """Debian's chromium; installed from the distribution's packages when missing (CI starts bare).

    Playwright's own browser download comes from a CDN these machines cannot reach, so the
    system browser is launched by path instead.
    """
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.fail("chromium is missing and apt-get is not available to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
    return CHROMIUM


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus, local_ray):
    folder = tmp_path_factory.mktemp("browser")
    storage = f"sqlite:///{folder / 'b.db'}"
    common = ["--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
              "--calib-seqs", "4", "--bits", "2,3,4,8", "--groups", "32,ch", "--workers", "1",
              "--storage", storage]
    # Two studies, so the page has to list and plot more than one.
    assert main(["search", *common, "--budget", "5bpw", "--trials", "6", "--study", "page-a"]) == 0
    assert main(["search", *common, "--budget", "3bpw", "--trials", "4", "--study", "page-b"]) == 0
    svc = ServiceProcess(storage, token=TOKEN, log_dir=folder)
    try:
        svc.wait_ready()
        yield svc, storage
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    svc, _ = served
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(_chromium()), headless=True)
        context = browser.new_context(accept_downloads=True)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.goto(f"{svc.base}/#token={TOKEN}")
        # Both fronts drawn by plotly (its graph div gets ._fullData once plotted).
        tab.wait_for_function("['page-a', 'page-b'].every(s => { const d = document.getElementById('front-' + s);"
                              " return d && d._fullData && d._fullData.length; })", timeout=60_000)
        yield tab
        assert not errors, errors
        browser.close()


def _cli_front(storage: str, study: str, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["front", study, "--storage", storage, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_page_lists_the_studies(served, page) -> None:
    _, storage = served
    rows = page.eval_on_selector_all("#studies tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    stored = Store(storage).studies_frame()
    assert sorted(r[0] for r in rows) == sorted(stored["study"]) == ["page-a", "page-b"]
    by_name = {r[0]: r for r in rows}
    assert by_name["page-a"][1] == "tiny-random-llama" and by_name["page-a"][3] == "6"
    assert by_name["page-b"][3] == "4"


@pytest.mark.parametrize("study", ["page-a", "page-b"])
def test_plotted_points_are_the_front(served, page, study, capsys) -> None:
    _, storage = served
    front = _cli_front(storage, study, capsys)
    trace = page.evaluate("id => { const d = document.getElementById(id).data[0];"
                          " return {x: d.x, y: d.y, trials: d.customdata}; }", f"front-{study}")
    assert trace["trials"] == [p["trial"] for p in front]
    assert trace["x"] == [p["bpw"] for p in front]
    assert trace["y"] == [p["kl"] for p in front]
    # What the browser drew: one marker per front point.
    assert page.locator(f"#front-{study} .scatterlayer .points path").count() == len(front)


def test_clicking_a_point_downloads_its_policy(served, page, tmp_path, capsys) -> None:
    _, storage = served
    front = _cli_front(storage, "page-a", capsys)
    i = len(front) // 2
    marker = page.locator("#front-page-a .scatterlayer .points path").nth(i)
    box = marker.bounding_box()
    assert box is not None
    # A real mouse click where the marker is drawn (plotly's drag layer receives it, then plotly_click).
    with page.expect_download(timeout=30_000) as download:
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    trial = front[i]["trial"]
    assert download.value.suggested_filename == f"page-a-trial{trial}.json"
    path = tmp_path / "downloaded.json"
    download.value.save_as(path)
    doc = json.loads(path.read_text())
    assert doc == export_policy(Store(storage), "page-a", trial=trial)
    assert doc["metrics"]["kl"] == front[i]["kl"] and doc["metrics"]["bytes"] == front[i]["bytes"]
