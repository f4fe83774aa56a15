"""Faults injected for real: a Ray worker killed mid-trial, the driver SIGKILLed mid-search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil


from evaluators.context import DataConfig
from search.driver import SearchConfig, run_search
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
        summary = run_search(SearchConfig(study="f", data=data, budget="4.5bpw", trials=8, workers=2,
                                          storage=storage, progress=False))
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught mid-trial"
    store = Store(storage)
    frame = store.trials_frame(store.get_study("f"))
    assert summary["complete"] == 8 and (frame["state"] == "complete").sum() == 8
    attempts = [store.trial(store.get_study("f"), n).timings["attempts"] for n in frame["trial"]]
    assert max(attempts) == 2  # the killed trial ran again on a replacement worker


def test_driver_sigkill_then_resume_keeps_every_finished_trial(corpus, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/k.db"
    argv = [sys.executable, "-m", "search.cli", "search", "--model", "tiny-random-llama", "--dataset", corpus,
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
