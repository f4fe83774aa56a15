"""Optuna's own dashboard reads our database: `optuna-dashboard URL` lists our study with its trials.

Optuna's tables live in the same database as ours, so the real `optuna-dashboard` command
(a server process on loopback) is pointed at the study store of a search and its JSON API is
compared with what our store recorded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.cli import main
from studies import Store
from tests.serving import free_port


@pytest.fixture(scope="module")
def searched(tmp_path_factory, corpus, local_ray):
    storage = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'd.db'}"
    assert main(["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
                 "--calib-seqs", "4", "--bits", "2,3,4,8", "--groups", "32,ch", "--workers", "1", "--storage", storage,
                 "--budget", "4bpw", "--trials", "6", "--study", "dash"]) == 0
    return storage


@pytest.fixture(scope="module")
def dashboard(searched, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("dashlog") / "dashboard.log"
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(exe), searched, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/api/meta", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"optuna-dashboard did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def test_optuna_dashboard_lists_our_study_with_its_trials(searched, dashboard) -> None:
    studies = httpx.get(f"{dashboard}/api/studies", timeout=30).json()["study_summaries"]
    ours = [s for s in studies if s["study_name"] == "dash"]
    assert len(ours) == 1
    assert ours[0]["directions"] == ["minimize", "minimize"]  # KL and bytes
    detail = httpx.get(f"{dashboard}/api/studies/{ours[0]['study_id']}", timeout=30).json()

    store = Store(searched)
    trials = store.trials_frame(store.get_study("dash"))
    complete = trials[trials["state"] == "complete"]
    assert len(complete) == 6
    shown = {t["number"]: t for t in detail["trials"]}
    assert {n for n, t in shown.items() if t["state"] == "Complete"} == set(complete["trial"])
    for row in complete.itertuples():
        # The objective values Optuna was told are the measured KL and the real packed bytes.
        assert shown[row.trial]["values"] == [row.kl, float(row.bytes)]
        assert len(shown[row.trial]["params"]) > 0  # the per-matrix settings the sampler chose

    # Its front is the non-dominated set of all complete trials, feasible or not: optuna-dashboard 0.21
    # reads constraints from the system attribute "constraints", Optuna 5 writes "constraints:bytes".
    points = {int(r.trial): (r.kl, r.bytes) for r in complete.itertuples()}
    nondominated = {n for n, (kl, b) in points.items()
                    if not any(k2 <= kl and b2 <= b and (k2, b2) != (kl, b) for k2, b2 in points.values())}
    best = {t["number"] for t in detail["best_trials"]}
    assert best == nondominated
    # Ours keeps the feasible ones: an over-budget trial never dominates a point within the budget,
    # so our front is inside the dashboard's and what it adds is over the budget.
    row = store.get_study("dash")
    ours = set(store.front(row)["trial"])
    assert ours <= best
    assert all(points[n][1] > row.budget_bytes for n in best - ours)
    assert httpx.get(f"{dashboard}/dashboard/", timeout=30).status_code == 200  # the page itself
