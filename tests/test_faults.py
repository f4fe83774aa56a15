"""Faults injected for real: Ray workers killed mid-trial (once, or on every attempt of one trial),
the driver SIGKILLed mid-search."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import psutil

from evaluators.context import DataConfig
from search.driver import SearchConfig, run_search
from search.request import SearchRequest
from studies import Store


def _kill_first_busy_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILLs the first Ray actor process caught running ``TrialWorker.evaluate``."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        # Only this test's own Ray (started by this process): never another run's workers.
        for proc in me.children(recursive=True):
            try:
                busy = "TrialWorker.evaluate" in " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if busy:
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.005)


def test_worker_killed_mid_trial_is_retried_and_nothing_is_lost(corpus, local_ray, tmp_path) -> None:
    # Longer windows make each trial take long enough to be caught mid-flight.
    data = DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=256, n_eval=32, n_calib=2)
    storage = f"sqlite:///{tmp_path}/f.db"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_busy_worker, args=(stop, killed))
    killer.start()
    try:
        summary = run_search(SearchConfig(SearchRequest.from_data(data, study="f", budget="4.5bpw", trials=8,
                                                                  workers=2), storage=storage, progress=False))
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught mid-trial"
    store = Store(storage)
    frame = store.trials_frame(store.get_study("f"))
    assert summary["complete"] == 8 and (frame["state"] == "complete").sum() == 8
    attempts = [store.trial(store.get_study("f"), n).timings["attempts"] for n in frame["trial"]]
    assert max(attempts) == 2  # the killed trial ran again on a replacement worker


def _kill_one_trial_on_every_attempt(stop: threading.Event, killed: list[int], times: int, workers: int) -> None:
    """SIGKILLs the first busy ``TrialWorker``, then each replacement actor that takes up its retry.

    When a worker dies the driver starts a replacement and hands it the same trial first, so
    sparing every actor alive at the time of a kill means the next busy newcomer runs that
    trial again; the other workers (and their trials) are never touched. The first kill waits
    until all ``workers`` actors exist, so none of them can be mistaken for a replacement.
    """
    me = psutil.Process()
    spared: set[int] = set()
    while not stop.is_set() and len(killed) < times:
        actors = []
        for proc in me.children(recursive=True):  # only this test's own Ray
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "TrialWorker" in cmd:
                actors.append((proc, "TrialWorker.evaluate" in cmd))
        for proc, busy in actors if killed or len(actors) >= workers else ():
            if busy and proc.pid not in spared:
                spared |= {p.pid for p, _ in actors if p.pid != proc.pid}
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)
                break
        time.sleep(0.005)


def test_trial_whose_worker_always_dies_is_failed_after_max_retries(corpus, local_ray, tmp_path) -> None:
    data = DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=256, n_eval=32, n_calib=2)
    storage = f"sqlite:///{tmp_path}/r.db"
    max_retries, trials = 2, 6
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_trial_on_every_attempt, args=(stop, killed, max_retries + 1, 2))
    killer.start()
    try:
        request = SearchRequest.from_data(data, study="r", budget="4.5bpw", trials=trials, workers=2)
        summary = run_search(SearchConfig(request, storage=storage, max_retries=max_retries, progress=False))
    finally:
        stop.set()
        killer.join()
    assert len(killed) == max_retries + 1, f"only {len(killed)} kills landed"
    store = Store(storage)
    study_row = store.get_study("r")
    frame = store.trials_frame(study_row)
    assert frame["trial"].is_unique
    failed = frame[frame["state"] == "failed"]
    complete = frame[frame["state"] == "complete"]
    # The doomed trial: failed once, after 1 + max_retries attempts, with the reason stored.
    assert summary["failed"] == 1 and len(failed) == 1
    doomed = store.trial(study_row, int(failed["trial"].iloc[0]))
    assert doomed.error.startswith(f"worker died {max_retries + 1} times: The actor died unexpectedly")
    assert doomed.policy.get("matrices"), "the failed trial's policy is kept for inspection"
    # Every other trial ran once, on a worker that was never killed, and is complete and measured.
    assert summary["complete"] == trials and len(complete) == trials
    for n in complete["trial"]:
        row = store.trial(study_row, int(n))
        assert row.timings["attempts"] == 1 and int(row.worker.rsplit(":", 1)[1]) not in killed
        assert math.isfinite(row.kl) and row.kl >= 0 and row.bytes > 0
    # Optuna agrees with the store: the same trial FAILed, the same values COMPLETE.
    study = optuna.load_study(study_name="r", storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[doomed.number] == optuna.trial.TrialState.FAIL
    told = {t.number: t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert told == {int(r.trial): [r.kl, float(r.bytes)] for r in complete.itertuples()}


def test_driver_sigkill_then_resume_keeps_every_finished_trial(corpus, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/k.db"
    argv = [sys.executable, "-m", "app.cli", "search", "--model", "tiny-random-llama", "--dataset", corpus,
            "--seq-len", "256", "--eval-seqs", "32", "--calib-seqs", "2", "--budget", "4.5bpw",
            "--workers", "2", "--storage", storage, "--study", "k"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(argv + ["--trials", "40"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    store = Store(storage)
    deadline = time.time() + 180
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        study = store.find_study("k")
        if study is not None:
            finished = int((store.trials_frame(study)["state"] == "complete").sum())
            if finished >= 3:
                break
        time.sleep(0.2)
    assert proc.poll() is None and finished >= 3, "the search ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-search
    proc.wait()
    before = store.trials_frame(store.get_study("k"))
    done_before = before[before["state"] == "complete"]

    result = subprocess.run(argv + ["--trials", str(len(done_before) + 4)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    after = store.trials_frame(store.get_study("k"))
    complete = after[after["state"] == "complete"]
    assert len(complete) == len(done_before) + 4
    kept = complete.set_index("trial").loc[done_before["trial"]]
    assert list(kept["kl"]) == list(done_before["kl"])  # nothing finished was lost or re-measured
    assert after["trial"].is_unique  # nothing counted twice
