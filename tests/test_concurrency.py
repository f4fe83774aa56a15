"""Two searches writing one SQLite database while a reader polls fronts: no lost trial, no lock error."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

from studies import Store


def test_two_searches_and_a_reader_share_one_sqlite_file(corpus, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/shared.db"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "search", "--model", "tiny-random-llama",
                               "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4", "--budget", "4.5bpw",
                               "--workers", "1", "--trials", "20", "--storage", storage, "--study", name],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    store = Store(storage)
    reads = 0
    while any(p.poll() is None for p in procs):
        for name in store.study_names():  # reads race the writers on purpose
            store.front(store.get_study(name))
            reads += 1
        time.sleep(0.05)
    outputs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert "locked" not in err
    for name in ("one", "two"):
        frame = store.trials_frame(store.get_study(name))
        assert (frame["state"] == "complete").sum() == 20 and frame["trial"].is_unique
    assert reads > 0


def _open_both(url: str, barrier, results) -> None:
    from search.driver import optuna_storage

    barrier.wait()  # every process opens the new database at the same moment
    try:
        Store(url)
        optuna_storage(url)
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


def test_searches_starting_together_on_a_new_database_all_open_it(tmp_path) -> None:
    # Without the retry in optuna_storage, 4 processes racing to create Optuna's schema lost 3 of 4
    # rounds here ("table studies already exists", a duplicate alembic_version row).
    ctx = multiprocessing.get_context("spawn")
    for k in range(3):
        url = f"sqlite:///{tmp_path}/new{k}.db"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_both, args=(url, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert outcomes == ["ok"] * 4, outcomes
