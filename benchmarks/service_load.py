"""Load on the HTTP service: many concurrent clients reading a 1,000-trial front while searches write, start
and finish; then a soak of tiny searches through the API one after another.

Everything runs on loopback and stops by itself (bounded in time and requests):
1. a SQLite study of ``--trials`` synthetic trials is written through the store (random
   bytes/KL pairs: the front query's cost depends on the row count, not the values);
2. ``turboquant serve`` starts on a free loopback port;
3. a real ``turboquant search`` on the tiny model writes to the same database meanwhile, and tiny searches
   are launched through the API one after another (each starts, runs and finishes during the load);
4. ``--clients`` threads read ``/studies/big/front`` for ``--seconds``;
5. the soak: ``--soak`` tiny searches through the API one after another; the service process's resident
   memory after the first (Ray and torch loaded) and after the last.
Prints requests per second, p50 / p99 latency, errors, the searches that ran during the load, and the soak's
memory. Goals (issues 6 and 22): no errors, p99 < 200 ms; memory growth over the soak within 10 %.
Writes the printed table to ``--out`` as well.

    python benchmarks/service_load.py [--clients 16] [--seconds 60] [--trials 1000] [--soak 50]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from studies import Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_study(store: Store, n: int) -> None:
    study = store.create_study(name="big", model="tiny-random-llama", dataset="synthetic", budget_bytes=60_000,
                               numel=100_000, sampler="nsga2", space={}, provenance={"synthetic": True})
    rng = random.Random(0)
    for number in range(n):
        nbytes = rng.randint(20_000, 70_000)
        store.record_trial(study, number, state="complete", policy={"format_version": 1, "matrices": {}},
                           bytes=nbytes, bpw=8 * nbytes / 100_000, kl=rng.random() * 100_000 / nbytes,
                           ppl=10.0, top1=0.5, logit_err=0.1)


def _tiny(name: str, corpus: str) -> dict:
    """A tiny search through the API: 2 trials, no sensitivity table, one worker (a few seconds)."""
    return {"study": name, "model": "tiny-random-llama", "budget": "5bpw", "trials": 2, "workers": 1,
            "sampler": "random", "dataset": corpus, "seq_len": 32, "eval_seqs": 2, "calib_seqs": 1, "bits": [2, 4, 8],
            "groups": [32], "granularity": "layer", "sensitivity": False}


def _run_tiny(client: httpx.Client, name: str, corpus: str, timeout: float = 600) -> str:
    """Launches one tiny search and waits for it; its final status (or the error)."""
    r = client.post("/studies", json=_tiny(name, corpus))
    if r.status_code != 202:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"/studies/{name}").json()
        if body["status"] not in ("queued", "running"):
            return body["status"] if body["status"] == "done" else f"{body['status']}: {body.get('error')}"
        time.sleep(0.25)
    return "timed out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--soak", type=int, default=50, help="tiny searches one after another (0: none)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "service_load.txt"))
    args = parser.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    root = Path(tempfile.mkdtemp(prefix="tq-load-"))
    storage = f"sqlite:///{root}/load.db"
    store = Store(storage)
    t0 = time.perf_counter()
    _seed_study(store, args.trials)
    say(f"seeded study 'big' with {args.trials} trials in {time.perf_counter() - t0:.1f} s")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(random.Random(1).choice(["to", "be", "or", "not", "that", "is"]) for _ in range(40000)))

    t0 = time.perf_counter()
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--storage", storage,
                               "--data-dir", str(root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writer = subprocess.Popen([sys.executable, "-m", "app.cli", "search", "--model", "tiny-random-llama",
                               "--dataset", str(corpus), "--seq-len", "64", "--eval-seqs", "4", "--budget", "4.5bpw",
                               "--workers", "1", "--trials", "100000", "--storage", storage, "--study", "writer"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    churned: list[str] = []
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base}/studies/big/front", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not come up within 180 s")
                time.sleep(0.2)
        say(f"service up after {time.perf_counter() - t0:.1f} s")
        # Measure only while the search is really writing trials.
        while store.find_study("writer") is None or store.trials_frame(store.get_study("writer")).empty:
            if time.time() > deadline + 120 or writer.poll() is not None:
                raise SystemExit("the writing search did not start")
            time.sleep(0.5)
        say(f"search writing after {time.perf_counter() - t0:.1f} s")
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client() -> None:
            with httpx.Client(base_url=base, timeout=10) as c:
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    try:
                        r = c.get("/studies/big/front")
                        ok = r.status_code == 200 and isinstance(r.json(), list)
                        err = None if ok else f"HTTP {r.status_code}"
                    except httpx.HTTPError as exc:
                        err = type(exc).__name__
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        if err:
                            errors.append(err)

        def churn() -> None:  # searches that start and finish while the clients read
            with httpx.Client(base_url=base, timeout=30) as c:
                while time.perf_counter() < stop_at:
                    churned.append(_run_tiny(c, f"churn-{len(churned)}", corpus.name))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        churner = threading.Thread(target=churn)
        load_before = os.getloadavg()
        start = time.perf_counter()
        churner.start()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        load_after = os.getloadavg()
        churner.join()
        wrote = int((store.trials_frame(store.get_study("writer"))["state"] == "complete").sum())
        writer.terminate()
        writer.wait(timeout=30)
        lat = sorted(latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        say(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
            f"{'trials written':>15} {'API searches':>13}")
        say(f"{args.clients:>8} {len(lat):>9} {len(lat) / elapsed:>8.1f} {1000 * statistics.median(lat):>8.1f} "
            f"{1000 * p99:>8.1f} {len(errors):>7} {wrote:>15} {sum(s == 'done' for s in churned):>6} done of "
            f"{len(churned)}")
        if errors:
            say(f"errors: {sorted(set(errors))}")
        if any(s != "done" for s in churned):
            say(f"API searches not done: {sorted(set(s for s in churned if s != 'done'))}")
        # The machine is shared: say how busy it was (1/5/15-minute load averages, on os.cpu_count() cores).
        say(f"load average before {' '.join(f'{v:.2f}' for v in load_before)}, after "
            f"{' '.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} cores")
        if args.soak:
            _soak(base, corpus.name, args.soak, psutil.Process(server.pid), say)
    finally:
        for p in (writer, server):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
    Path(args.out).write_text("\n".join(lines) + "\n")


def _soak(base: str, corpus: str, n: int, service: "psutil.Process", say) -> None:
    """``n`` tiny searches through the API one after another; the service's resident memory after the first
    (torch, transformers and Ray's driver loaded by then) and after the last."""
    t0 = time.perf_counter()
    outcomes = []
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(n):
            outcomes.append(_run_tiny(c, f"soak-{i}", corpus))
            if i == 0:
                first = service.memory_info().rss
    last = service.memory_info().rss
    done = sum(o == "done" for o in outcomes)
    say(f"soak: {n} searches one after another in {time.perf_counter() - t0:.0f} s, {done} done; service RSS "
        f"{first / 2**20:.0f} MiB after the first, {last / 2**20:.0f} MiB after the last ({last / first - 1:+.1%})")
    if done < n:
        say(f"soak searches not done: {sorted(set(o for o in outcomes if o != 'done'))}")


if __name__ == "__main__":
    main()
