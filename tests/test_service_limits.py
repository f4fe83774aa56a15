"""What one process or request may do to the others (issue 22): Ray outlives the thread that started it,
searches queue past the service's limit and can be cancelled, concurrent searches share caches and models
safely, and requests that cannot run are refused before anything is written."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_a_local_ray_started_from_a_short_lived_thread_outlives_it() -> None:
    # The service's first search started Ray from its own thread: Linux's parent-death signal killed the GCS
    # and raylet when that thread ended, and Ray aborted the whole service a minute later.
    script = textwrap.dedent("""
        import os, threading, time
        os.environ["RAY_AUTH_MODE"] = "disabled"
        import ray
        from search.workers import init_ray
        t = threading.Thread(target=init_ray, args=(None, 1))
        t.start(); t.join()
        time.sleep(3)
        procs = ray._private.worker._global_node.all_processes
        dead = [name for name, ps in procs.items() for p in ps if p.process.poll() is not None]
        print("dead:", dead)
        assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "dead: []" in out.stdout and "ok" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.fixture
def app(tmp_path, local_ray, corpus):
    from fastapi.testclient import TestClient

    from app.service import ServiceLimits, create_app

    storage = f"sqlite:///{tmp_path / 'q.db'}"
    application = create_app(storage, limits=ServiceLimits(data_dir=Path(corpus).parent, max_running=1))
    with TestClient(application) as client:
        yield client, storage, application.state.service


def _body(corpus: str, study: str, trials: int) -> dict:
    return {"study": study, "model": "tiny-random-llama", "budget": "5bpw", "trials": trials, "workers": 1,
            "sampler": "random", "dataset": Path(corpus).name, "seq_len": 32, "eval_seqs": 2, "calib_seqs": 1,
            "bits": [2, 4, 8], "groups": [32], "granularity": "layer", "sensitivity": False}


def _status(client, study: str) -> dict:
    r = client.get(f"/studies/{study}")
    assert r.status_code == 200, r.text
    return r.json()


def _until(predicate, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_searches_past_the_limit_queue_and_any_can_be_cancelled(app, corpus) -> None:
    from studies import Store

    client, storage, jobs = app
    assert client.post("/studies", json=_body(corpus, "long", 500)).status_code == 202
    assert client.post("/studies", json=_body(corpus, "next", 3)).status_code == 202
    assert client.post("/studies", json=_body(corpus, "never", 3)).status_code == 202
    _until(lambda: _status(client, "long")["complete"] >= 2)
    assert _status(client, "next")["status"] == "queued" and _status(client, "never")["status"] == "queued"
    # A queued search cancelled never starts: nothing of it is stored.
    r = client.post("/studies/never/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    # The running one stops asking for trials; those out finish and are kept.
    assert client.post("/studies/long/cancel").status_code == 202
    done = _until(lambda: (s := _status(client, "long"))["status"] != "running" and s)
    assert done["status"] == "cancelled" and 2 <= done["complete"] < 500 and done["failed"] == 0
    store = Store(storage)
    trials = store.trials_frame(store.get_study("long"))
    assert (trials["state"] == "complete").sum() == done["complete"]  # every finished trial recorded
    # The queue moves on: the next search runs to its end.
    assert _until(lambda: (s := _status(client, "next"))["status"] not in ("queued", "running") and s)["status"] == "done"
    assert store.find_study("never") is None
    assert client.post("/studies/never/cancel").status_code == 409  # already cancelled
    assert jobs.get("next").summary["complete"] == 3


def test_concurrent_searches_tokenize_into_one_private_cache(tmp_path, monkeypatch, data_config) -> None:
    from evaluators.data import load_corpus, make_token_sets
    from evaluators.models import load_model

    monkeypatch.setenv("TURBOQUANT_CACHE", str(tmp_path / "cache"))
    loaded, text = load_model("tiny-random-llama"), load_corpus(data_config.dataset)
    results, errors = [], []

    def tokenize() -> None:
        try:
            results.append(make_token_sets(loaded, text, seq_len=32, n_eval=2, n_calib=1).eval)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=tokenize) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8 and all(np.array_equal(r, results[0]) for r in results)
    cache = tmp_path / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # the corpus's text is the user's alone
    files = list((cache / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temporary left behind


def test_the_tiny_model_is_the_same_whatever_other_threads_draw() -> None:
    import torch

    from evaluators.models import load_model

    stop, prints = threading.Event(), []

    def noise() -> None:
        while not stop.is_set():
            torch.randn(64)

    drawers = [threading.Thread(target=noise) for _ in range(2)]
    for t in drawers:
        t.start()
    try:
        builders = [threading.Thread(target=lambda: prints.append(load_model("tiny-random-llama").fingerprint))
                    for _ in range(10)]
        for t in builders:
            t.start()
        for t in builders:
            t.join()
    finally:
        stop.set()
        for t in drawers:
            t.join()
    assert len(prints) == 10 and len(set(prints)) == 1


@pytest.mark.parametrize("case, options, message", [
    ("window longer than the model", ["--seq-len", "100000"], "longer than tiny-random-llama reads (512 positions)"),
    ("memory limit too small", ["--memory-limit", "1b"], "GiB is available"),
    ("more workers than cores", ["--workers", str((os.cpu_count() or 1) + 1)], "cores"),
])
def test_searches_that_cannot_run_are_refused_before_anything_is_stored(case, options, message, tmp_path, corpus,
                                                                        capsys) -> None:
    db = tmp_path / "s.db"
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "32", "--eval-seqs", "2",
            "--calib-seqs", "1", "--budget", "4bpw", "--trials", "2", "--storage", f"sqlite:///{db}", *options]
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not db.exists()  # neither the database nor a sensitivity row


def test_a_study_is_searched_by_one_process_at_a_time(tmp_path, corpus, postgres, capsys) -> None:
    # Two processes resuming one study to 6 trials left 10: each counted only its own.
    from studies.locks import StudyBusy, study_lock

    sqlite = f"sqlite:///{tmp_path / 's.db'}"
    for storage in (sqlite, postgres.url):
        with study_lock(storage, "busy"):
            with pytest.raises(StudyBusy, match="being searched by another process"):
                with study_lock(storage, "busy"):
                    pass
            with study_lock(storage, "another"):  # other studies are not held up
                pass
        with study_lock(storage, "busy"):  # released with the block
            pass
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "32", "--eval-seqs", "2",
            "--calib-seqs", "1", "--budget", "4bpw", "--trials", "2", "--storage", sqlite, "--study", "busy",
            "--no-sensitivity", "--workers", "1"]
    with study_lock(sqlite, "busy"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "study 'busy' is being searched by another process" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_the_service_outlives_its_searches_and_leaves_nothing_behind(tmp_path, corpus) -> None:
    """Three searches in a row with a pause longer than Ray's 60 s GCS timeout between them, then 20 at once
    (queued past --max-running): all finish, the service still answers, and SIGTERM takes Ray with it."""
    import psutil

    from tests.serving import ServiceProcess

    svc = ServiceProcess(f"sqlite:///{tmp_path / 's.db'}", log_dir=tmp_path,
                         options=("--data-dir", str(Path(corpus).parent), "--max-running", "2"))
    try:
        svc.wait_ready()
        client = svc.client()

        def run(names: list[str]) -> None:
            for name in names:
                assert client.post("/studies", json=_body(corpus, name, 2)).status_code == 202
            for name in names:
                progress = svc.wait_study(client, name, timeout=900)
                assert progress["status"] == "done" and progress["complete"] == 2, progress

        run(["first"])
        time.sleep(65)  # the first search's thread is long gone: Ray must still be there
        run(["second"])
        run(["third"])
        run([f"crowd-{i}" for i in range(20)])
        assert client.get("/studies").status_code == 200
        assert len({s["study"] for s in client.get("/studies").json()}) == 23
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        assert children  # Ray's processes, started by the service
        os.kill(svc.proc.pid, signal.SIGTERM)  # the service alone, not its process group
        assert svc.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    finally:
        svc.stop()


def test_a_huge_request_body_is_refused_before_it_is_parsed(tmp_path) -> None:
    # A bits list of 8M entries blocked the service's event loop for a minute while it was parsed.
    from fastapi.testclient import TestClient

    from app.service import create_app

    huge = b'{"study": "x", "budget": "3bpw", "bits": [' + b"4," * 4_000_000 + b"4]}"
    with TestClient(create_app(f"sqlite:///{tmp_path / 'h.db'}")) as client:
        t0 = time.perf_counter()
        r = client.post("/studies", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "request body over 1,048,576 bytes" in r.json()["detail"]
        chunked = client.post("/studies", content=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                              headers={"content-type": "application/json"})  # no length said
        assert chunked.status_code == 413
        assert time.perf_counter() - t0 < 10  # not parsed: a parse took about a minute
        ok = client.post("/studies", json={"study": "x", "budget": "3bpw", "bits": [4] * 65})
        assert ok.status_code == 422 and "at most 64" in ok.text  # a small body is read and validated


def test_a_stored_study_never_allows_remote_code_by_itself(tmp_path, corpus) -> None:
    # A database may be shared: a study recorded as trusting its model's code is resumed (export --budget's
    # trials, the API's refine) or re-measured (front --dataset) only with the caller's permission.
    from evaluators import UserError
    from search.at_budget import request_of
    from search.rescore import rescore_front
    from studies import Store

    storage = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(storage)
    provenance = {"model": "tiny-random-llama", "dataset": corpus, "seq_len": 32, "n_eval": 2, "n_calib": 1,
                  "seed": 0, "trust_remote_code": True, "dtype": "float32", "budget": "4bpw"}
    row = store.create_study(name="remote", model="tiny-random-llama", dataset=corpus, budget_bytes=1000, numel=2000,
                             sampler="evo", space={"bits": [4], "groups": [32], "formats": ["rtn"]},
                             provenance=provenance)
    store.record_trial(row, 0, state="complete", policy={"format_version": 1, "matrices": {}}, bytes=900, bpw=3.6,
                       kl=0.1, ppl=1.0, top1=1.0, logit_err=0.0)
    with pytest.raises(UserError, match="--trust-remote-code"):
        request_of(row)
    with pytest.raises(UserError, match="--trust-remote-code"):
        rescore_front(storage, "remote", corpus, progress=False)
    assert request_of(row, trust_remote_code=True).trust_remote_code is True
